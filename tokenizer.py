"""The SEED-LLaMA tokenizer: text and images to ids, without the sentencepiece or transformers packages.

SEED-LLaMA (Ge et al., "Making LLaMA SEE and Draw with SEED Tokenizer", ICLR 2024, arXiv:2310.01218) extends LLaMA's
32000 SentencePiece pieces with 8192 image tokens `<img_00000>` ... `<img_08191>` (ids 32000 + code) and `<img>`,
`</img>`; an image in a prompt is `<img>` + its 32 SEED codes + `</img>`.

Worked example: the 8B chat template around "Describe the image." with an image of codes [12, 7, 0, 1, ..., 29],
`Tokenizer.encode(chat_prompt(["<image>Describe the image."], "8B", images=[codes]))`, here with the small test
tokenizer of tests/fixtures/llama (640 pieces, so its image tokens sit at 640 + code instead of 32000 + code):

    text    <s>USER: <img><img_00012><img_00007><img_00000>...<img_00029></img>Describe the image.\\nASSISTANT:
    split   <s> | "USER:" | <img> | <img_00012> ... <img_00029> | </img> | "Describe the image.\\nASSISTANT:"
            (the space after "USER:" touches <img>, a plain-string added token, so 4.30.2 strips it; each text
            chunk is encoded alone and gets its own dummy-prefix '▁')
    pieces  <s> ▁ U S E R : <img> <img_00012> <img_00007> <img_00000> ... <img_00029> </img>
            ▁ D es cr i b e ▁the ▁im age . <0x0A> A S S I S T A N T :
    ids     1, 434, 612, 476, 468, 501, 466, 768, 652, 647, 640, 641, ..., 669, 769,
            434, 487, 282, 373, 441, 450, 435, 299, 350, 366, 457, 13, 483, 476, 476, 488, 476, 489, 483, 639, 489, 466

In reading order: `SentencePieceModel` (google/sentencepiece src/bpe_model.cc, src/sentencepiece_processor.cc);
`Tokenizer`, SEED's `SeedLlamaTokenizer`: transformers==4.30.2's slow `LlamaTokenizer` (tokenization_llama.py,
tokenization_utils.py) plus `added_tokens.json` (SEED pins 4.30.2; later versions tokenize prompts differently);
`ImageVocab`; the chat templates of AILab-CVC/SEED @ 93b3cf4 scripts/seed_llama_inference_{8B,14B}.py and
gradio_demo/conversation.py; the BPE trainer of `train.py --tiny` (`train_bpe`, `train_tokenizer`).

Deliberate deviations:
  * only what LLaMA's tokenizer.model holds is implemented: BPE, the identity normaliser, normal, unknown, control
    and byte pieces; other model types, piece types, normalisers and treat_whitespace_as_suffix are refused by name;
  * `train_bpe` is a plain frequency-count BPE, not sentencepiece's trainer: it writes a model sentencepiece
    reads and encodes identically, but not the vocabulary sentencepiece would have learned;
  * image spans are checked (exactly 32 codes, closed by `</img>`), where the official scripts take them as they come.
"""
from __future__ import annotations

import codecs
import heapq
import itertools
import json
import math
import os
import re
import struct
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

# --- protobuf wire format, read (https://protobuf.dev/programming-guides/encoding/) ------------------------------
def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = 0
    for shift in range(0, 70, 7):
        if pos >= len(buf):
            raise ValueError("truncated varint")
        value |= (buf[pos] & 0x7F) << shift
        pos += 1
        if buf[pos - 1] < 0x80:
            return value, pos
    raise ValueError("varint longer than 10 bytes")

def _proto_fields(buf: bytes, message: str):
    """Yield (field number, value) of one message: an int for varints, bytes for length-delimited and fixed fields."""
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(buf, pos)
            value -= (value >> 63) << 64  # negative int32/int64 are sent as 64-bit two's complement (pad_id -1)
        elif wire in (1, 2, 5):
            size, pos = _read_varint(buf, pos) if wire == 2 else (8 if wire == 1 else 4, pos)
            value, pos = buf[pos:pos + size], pos + size
            if pos > len(buf):
                raise ValueError(f"{message}: field {number} runs past the end of the data")
        else:  # 3/4 are the deprecated groups, 6/7 do not exist; neither occurs in a SentencePiece model
            raise ValueError(f"{message}: field {number} has wire type {wire}, which a SentencePiece model never uses")
        if number == 0:
            raise ValueError(f"{message}: field number 0 is invalid")
        yield number, value

# --- SentencePiece BPE -------------------------------------------------------------------------------------------
_WORD_START = re.compile("(?<=[^\u2581])(?=\u2581)")  # before a '▁' that follows another character
_AFTER_CHAR_SPACE = re.compile("[^\u2581]\u2581")
PIECE_TYPES = {1: "NORMAL", 2: "UNKNOWN", 3: "CONTROL", 4: "USER_DEFINED", 5: "UNUSED", 6: "BYTE"}

def _parse_model(data: bytes, source: str) -> tuple[list[tuple[str, float, int]], dict, dict]:
    """ModelProto -> (pieces as (piece, score, type), TrainerSpec fields, NormalizerSpec fields), keyed by the
    field numbers of google/sentencepiece src/sentencepiece_model.proto."""
    pieces, specs = [], {2: b"", 3: b""}  # 2: TrainerSpec, 3: NormalizerSpec
    try:
        for number, value in _proto_fields(data, "ModelProto"):
            if number == 1:  # repeated SentencePiece {1: piece, 2: score, 3: type}
                if not isinstance(value, bytes):
                    raise ValueError("field 1 (pieces) is not a message")
                fields = dict(_proto_fields(value, "SentencePiece"))
                score = struct.unpack("<f", fields[2])[0] if 2 in fields else 0.0
                if not math.isfinite(score):  # a NaN would silently reorder every BPE merge
                    raise ValueError(f"piece {len(pieces)} has score {score}, not a finite number")
                pieces.append((fields.get(1, b"").decode("utf-8"), score, fields.get(3, SentencePieceModel.NORMAL)))
            elif number in specs:
                specs[number] = value
        return pieces, dict(_proto_fields(specs[2], "TrainerSpec")), dict(_proto_fields(specs[3], "NormalizerSpec"))
    except (ValueError, UnicodeDecodeError, struct.error, TypeError, AttributeError) as e:
        raise ValueError(f"{source} is not a SentencePiece model (cannot parse its protobuf: {e})") from None

def _refuse_unsupported(types: list[int], pieces: list[str], spec: dict, norm: dict, source: str) -> None:
    """Refuse by name what LLaMA's tokenizer.model (and `train_bpe`'s) never has, rather than half-support it."""
    if not pieces or types.count(SentencePieceModel.UNKNOWN) != 1:
        raise ValueError(f"{source} is not a SentencePiece model: it needs pieces with exactly one <unk>, "
                         f"found {len(pieces)} pieces and {types.count(SentencePieceModel.UNKNOWN)} unknown ones")
    model_type = spec.get(3, 1)  # TrainerSpec.model_type, default UNIGRAM
    if model_type != 2:
        name = {1: "UNIGRAM", 3: "WORD", 4: "CHAR"}.get(model_type, model_type)
        raise ValueError(f"{source}: model_type {name} is not supported (only BPE)")
    for i, kind in enumerate(types):
        # user-defined pieces would be matched whole before BPE, unused ones re-split after it (bpe_model.cc)
        if PIECE_TYPES.get(kind) not in ("NORMAL", "UNKNOWN", "CONTROL", "BYTE"):
            raise ValueError(f"{source}: piece {i} {pieces[i]!r} has type {PIECE_TYPES.get(kind, kind)}, which "
                             f"is not supported (only NORMAL, UNKNOWN, CONTROL and BYTE pieces, as LLaMA's)")
    if norm.get(2, b""):  # LLaMA's normaliser is "identity" with an empty map; NFKC tables are not implemented
        raise ValueError(f"{source}: normaliser {norm.get(1, b'').decode()!r} with a precompiled charsmap "
                         f"is not supported (only the identity normaliser, as LLaMA's)")
    if spec.get(24, 0):
        raise ValueError(f"{source}: treat_whitespace_as_suffix is not supported")

class SentencePieceModel:
    """A SentencePiece BPE `tokenizer.model` (LLaMA's kind, and `train_bpe`'s): its protobuf parsed by hand."""
    NORMAL, UNKNOWN, CONTROL, BYTE = 1, 2, 3, 6  # SentencePiece.Type

    def __init__(self, data: bytes, source: str = "tokenizer.model"):
        self.data = bytes(data)  # kept verbatim so that `Tokenizer.save` writes the exact file back
        entries, spec, norm = _parse_model(self.data, source)
        self.pieces, self.scores, self.types = ([entry[k] for entry in entries] for k in range(3))
        _refuse_unsupported(self.types, self.pieces, spec, norm, source)
        self.byte_fallback = bool(spec.get(35, 0))
        self.unk_surface = spec.get(44, " \u2047 ".encode()).decode()
        self.add_dummy_prefix = bool(norm.get(3, 1))  # proto2 defaults: true, true, true
        self.remove_extra_whitespaces = bool(norm.get(4, 1))
        self.escape_whitespaces = bool(norm.get(5, 1))

        self.unk_id = self.types.index(self.UNKNOWN)
        self.piece_to_id = {piece: i for i, piece in reversed(list(enumerate(self.pieces)))}  # the first id wins
        # The pieces BPE may build by merging, with their scores: control, unknown and byte pieces never come from text
        self.mergeable = {p: s for p, s, t in entries if t == self.NORMAL}
        # When no piece has a '▁' right after another character, no merge can cross the start of a '▁'-led word,
        # so words can be encoded one by one, and cached, with the same result: true for LLaMA's model.
        self._words_independent = self.escape_whitespaces and not any(
            _AFTER_CHAR_SPACE.search(p) for p in self.mergeable)
        self._cache: dict[str, list[int]] = {}
        self.byte_ids = [self.piece_to_id.get(f"<0x{b:02X}>", -1) for b in range(256)]
        if self.byte_fallback and -1 in self.byte_ids:
            raise ValueError(f"{source}: byte_fallback is on but piece <0x{self.byte_ids.index(-1):02X}> is missing")
        self.byte_value = {i: b for b, i in enumerate(self.byte_ids) if i >= 0 and self.types[i] == self.BYTE}

    def __len__(self) -> int:
        return len(self.pieces)

    def normalize(self, text: str) -> str:
        """The identity normaliser: optional whitespace cleanup, spaces -> '▁', then the dummy-prefix '▁'."""
        if self.remove_extra_whitespaces:
            text = " ".join(w for w in text.split(" ") if w)
        if not text:
            return ""
        space = "\u2581" if self.escape_whitespaces else " "
        return (space if self.add_dummy_prefix else "") + text.replace(" ", space)

    def encode(self, text: str) -> list[int]:
        """Ids of `text` exactly as sentencepiece's BPE `Encode` gives them (no BOS/EOS)."""
        text = self.normalize(text)
        if not self._words_independent:
            return self._bpe(text)
        ids: list[int] = []
        for word in _WORD_START.split(text):
            if (word_ids := self._cache.get(word)) is None:
                if len(self._cache) >= 100_000:  # bound the memory of a long-running process
                    self._cache.clear()
                word_ids = self._cache[word] = self._bpe(word)
            ids += word_ids
        return ids

    def _bpe(self, text: str) -> list[int]:
        """BPE on normalised text: start from characters, then repeatedly merge the adjacent pair whose
        concatenation is the highest-scoring piece (ties: leftmost). A heap of candidate pairs over a doubly
        linked list of symbols makes this O(n log n); a popped pair whose symbols have changed since it was pushed
        is stale and skipped (bpe_model.cc: `Model::SampleEncode` with alpha 0)."""
        if not text:
            return []
        symbols = list(text)
        n = len(symbols)
        prev, nxt = list(range(-1, n - 1)), list(range(1, n)) + [-1]
        heap: list[tuple[float, int, int, str]] = []

        def push(left: int, right: int) -> None:
            if left >= 0 and right >= 0 and (score := self.mergeable.get(symbols[left] + symbols[right])) is not None:
                heapq.heappush(heap, (-score, left, right, symbols[left] + symbols[right]))

        for i in range(n - 1):
            push(i, i + 1)
        while heap:
            _, left, right, merged = heapq.heappop(heap)
            if not symbols[left] or nxt[left] != right or len(symbols[left]) + len(symbols[right]) != len(merged):
                continue  # stale: a side was merged into something else since this pair was pushed (symbols only grow)
            symbols[left], symbols[right] = merged, ""
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prev[nxt[right]] = left
            push(prev[left], left)
            push(left, nxt[left])

        ids, i = [], 0
        while i >= 0:
            piece_id = self.piece_to_id.get(symbols[i], self.unk_id)
            if piece_id == self.unk_id and self.byte_fallback:  # sentencepiece_processor.cc: one <0xNN> per byte
                ids.extend(self.byte_ids[b] for b in symbols[i].encode("utf-8"))
            else:
                ids.append(piece_id)
            i = nxt[i]
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids` as sentencepiece's `Decode`: control pieces vanish, '▁' -> ' ', runs of byte pieces are
        UTF-8 decoded (each invalid byte -> U+FFFD), and the first piece loses the dummy-prefix space."""
        if bad := [i for i in ids if not 0 <= i < len(self.pieces)]:
            raise ValueError(f"id {bad[0]} is outside the SentencePiece vocabulary [0, {len(self.pieces)})")
        out: list[str] = []
        first = True  # sentencepiece's `is_bos_ws`: true until the first non-control piece
        for is_byte, run in itertools.groupby(ids, key=lambda i: self.types[i] == self.BYTE):
            if is_byte:
                out.append(bytes(self.byte_value[i] for i in run).decode("utf-8", "sentencepiece"))
                first = False
                continue
            for i in run:
                if self.types[i] == self.CONTROL:
                    continue
                if self.types[i] == self.UNKNOWN:
                    out.append(self.unk_surface)
                else:
                    piece = self.pieces[i]
                    if first and (self.add_dummy_prefix or self.remove_extra_whitespaces) and piece[:1] == "\u2581":
                        piece = piece[1:]
                    out.append(piece.replace("\u2581", " "))
                first = False
        return "".join(out)

# UTF-8 with one U+FFFD per invalid byte, as sentencepiece (Python's 'replace' gives one per bad sequence)
codecs.register_error("sentencepiece", lambda e: ("\ufffd" * (e.end - e.start), e.end))

# --- the tokenizer SEED-LLaMA uses --------------------------------------------------------------------------------
def _token_spec(value: str | dict | None, default: str) -> tuple[str, bool, bool]:
    """(content, lstrip, rstrip) of a token as special_tokens_map.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value["content"], bool(value.get("lstrip", False)), bool(value.get("rstrip", False))
    return (value or default), False, False

class Tokenizer:
    """SEED-LLaMA's tokenizer: LLaMA's SentencePiece model plus the added image tokens, as transformers 4.30.2.

    `path` is a `tokenizer.model` file, or a folder holding it with optional `added_tokens.json`,
    `special_tokens_map.json` and `tokenizer_config.json` (AILab-CVC/seed-tokenizer-2's files).
    """

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        folder = path if path.is_dir() else None
        model_file = path / "tokenizer.model" if folder else path
        if not model_file.is_file():
            raise FileNotFoundError(f"no SentencePiece model at {model_file}")
        self.sp = SentencePieceModel(model_file.read_bytes(), str(model_file))

        def read_json(name: str) -> dict:
            file = folder / name if folder else None
            return json.loads(file.read_text(encoding="utf-8")) if file and file.is_file() else {}

        added, special, self.config = (read_json(name) for name in
                                       ("added_tokens.json", "special_tokens_map.json", "tokenizer_config.json"))
        specs = [_token_spec(special.get(name, self.config.get(name)), default)
                 for name, default in (("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", "<unk>"))]
        self.bos_token, self.eos_token, self.unk_token = (content for content, _, _ in specs)
        # (lstrip, rstrip) per token that the text is split on. In 4.30.2 plain-string tokens (the image tokens)
        # strip both sides, newlines included; <s>, </s>, <unk> are AddedTokens without lstrip/rstrip.
        self._strip = {content: (lstrip, rstrip) for content, lstrip, rstrip in specs}
        self.additional_special: list[str] = []
        for value in special.get("additional_special_tokens", []):
            content, lstrip, rstrip = _token_spec(value, "")
            self.additional_special.append(content)
            self._strip[content] = (lstrip, rstrip) if isinstance(value, dict) else (True, True)
        self.added: dict[str, int] = {}
        for token, token_id in sorted(added.items(), key=lambda kv: kv[1]):
            if token_id != len(self):  # transformers refuses the same (tokenization_utils_base.py: _from_pretrained)
                raise ValueError(f"added token {token!r} has id {token_id}, but added ids must be consecutive from "
                                 f"{len(self.sp)}: expected {len(self)}")
            self._add(token, (True, True))
        # 4.30.2 leaves clean_up_tokenization_spaces on when the config does not say; SEED's config turns it off.
        self.clean_up_spaces = bool(self.config.get("clean_up_tokenization_spaces", bool(self.config)))
        self._index()

    def _add(self, token: str, strip: tuple[bool, bool]) -> None:
        if token in self.added or token in self.sp.piece_to_id:
            raise ValueError(f"added token {token!r} is already in the vocabulary")
        self.added[token] = len(self)
        self._strip.setdefault(token, strip)

    def add_image_tokens(self, n_codes: int = 8192) -> ImageVocab:
        """Extend the vocabulary as SEED did: `<img_00000>`..`<img_{n-1}>`, then `<img>` and `</img>` as
        additional special tokens (so `decode(..., skip_special_tokens=True)` drops them, not the codes)."""
        if self.image_vocab is not None:
            raise ValueError("this tokenizer already holds image tokens")
        for token in [image_token(code) for code in range(n_codes)] + [BOI_TOKEN, EOI_TOKEN]:
            self._add(token, (True, True))
        self.additional_special += [BOI_TOKEN, EOI_TOKEN]
        self._index()
        return self.image_vocab

    def _index(self) -> None:
        """Rebuild the lookups that depend on the added and special tokens."""
        def token_id(token: str) -> int:
            return self.added.get(token, self.sp.piece_to_id.get(token, self.sp.unk_id))

        self.bos_id, self.eos_id, self.unk_id = (token_id(t) for t in (self.bos_token, self.eos_token, self.unk_token))
        self.pad_id = self.unk_id  # SeedLlamaTokenizer sets pad_token = unk_token
        self.id_to_added = {i: t for t, i in self.added.items()}
        special = [self.bos_token, self.eos_token, self.unk_token, *self.additional_special]
        self.special_ids = {token_id(t) for t in special}
        # The tokens the text is split on (4.30.2's unique_no_split_tokens): special tokens plus added tokens.
        self.split_tokens = {t: token_id(t) for t in special + list(self.added)}
        self._split_lengths = sorted({len(t) for t in self.split_tokens}, reverse=True)
        self._split_start = re.compile("[" + re.escape("".join({t[0] for t in self.split_tokens})) + "]")
        codes = [self.added.get(image_token(k)) for k in range(len(self.added))]
        n_codes = codes.index(None) if None in codes else len(codes)
        self.image_vocab = None
        if n_codes and BOI_TOKEN in self.added and EOI_TOKEN in self.added:
            offset = codes[0]
            bad = [k for k in range(n_codes) if codes[k] != offset + k]
            if bad:
                raise ValueError(f"image token {image_token(bad[0])} has id {codes[bad[0]]}, expected {offset + bad[0]}"
                                 f" (codes must be consecutive from {image_token(0)} = {offset})")
            self.image_vocab = ImageVocab(self.added[BOI_TOKEN], self.added[EOI_TOKEN], offset, n_codes)

    def __len__(self) -> int:
        return len(self.sp) + len(self.added)

    def _split(self, text: str) -> list[tuple[str, bool]]:
        """Cut `text` at the split tokens (leftmost, longest first, as transformers' Trie) and strip the chunks
        that touch a stripping token, exactly as 4.30.2 `tokenize` does. Returns (chunk, is_token) pairs."""
        parts: list[str] = []  # text, token, text, ..., text: the tokens sit at the odd indices
        start = pos = 0
        while (m := self._split_start.search(text, pos)) is not None:
            pos = m.start()
            match = next((text[pos:pos + n] for n in self._split_lengths if text[pos:pos + n] in self.split_tokens),
                         None)
            if match is None:
                pos += 1
                continue
            parts += [text[start:pos], match]
            start = pos = pos + len(match)
        parts.append(text[start:])
        for k in range(1, len(parts), 2):
            lstrip, rstrip = self._strip[parts[k]]
            if rstrip:
                parts[k + 1] = parts[k + 1].lstrip()
            if lstrip:
                parts[k - 1] = parts[k - 1].rstrip()
        return [(chunk, k % 2 == 1) for k, chunk in enumerate(parts) if chunk]

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Ids of `text`; `<s>`/`</s>`/image tokens written in the text become their ids. `bos=True` is 4.30.2's
        `add_special_tokens=True`; SEED's prompts carry a literal `<s>` and use bos=False."""
        ids = [self.bos_id] if bos else []
        for chunk, is_token in self._split(text):
            ids += [self.split_tokens[chunk]] if is_token else self.sp.encode(chunk)
        return ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids` as 4.30.2 `_decode`: added tokens are written as themselves, separated by spaces from
        their neighbours; runs of SentencePiece ids are decoded by SentencePiece, with `<s>`, `</s>`, `<unk>` kept
        literally. `skip_special_tokens` drops `<s>`, `</s>`, `<unk>`, `<img>`, `</img>`, but not `<img_xxxxx>`."""
        ids = [i for i in (ids.tolist() if hasattr(ids, "tolist") else ids)
               if not (skip_special_tokens and i in self.special_ids)]
        if bad := [i for i in ids if not 0 <= i < len(self)]:
            raise ValueError(f"id {bad[0]} is outside the vocabulary [0, {len(self)})")
        texts = []
        for added, run in itertools.groupby(ids, key=self.id_to_added.__contains__):
            texts += [self.id_to_added[i] for i in run] if added else [self._decode_run(list(run))]
        text = " ".join(texts)
        if self.clean_up_spaces:  # PreTrainedTokenizerBase.clean_up_tokenization
            for before, after in [(" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                                  (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")]:
                text = text.replace(before, after)
        return text

    def _decode_run(self, ids: list[int]) -> str:
        """LlamaTokenizer.convert_tokens_to_string of 4.30.2, including its quirk: the space it puts before a
        special token lands *before* the text that precedes it (`hello</s>` -> ` hello</s>`)."""
        out, run, prev_special = "", [], False
        for k, i in enumerate(ids):
            if i in self.special_ids:
                out += ("" if prev_special or k == 0 else " ") + self.sp.decode(run) + self.sp.pieces[i]
                run, prev_special = [], True
            else:
                run.append(i)
                prev_special = False
        return out + self.sp.decode(run)

    # --- images and chats --------------------------------------------------------------------------------------

    def _require_images(self) -> ImageVocab:
        if self.image_vocab is None:
            raise ValueError("this tokenizer has no image tokens (<img_00000>.., <img>, </img> in added_tokens.json)")
        return self.image_vocab

    def encode_chat(self, messages: Sequence[str], template: str = "8B", system: str | None = None,
                    images: Sequence[Sequence[int]] = (), force_boi: bool = False) -> list[int]:
        """Ids of an official SEED-LLaMA prompt (see `chat_prompt`), codes checked against this vocabulary."""
        return self.encode(chat_prompt(messages, template, system, images, force_boi, self._require_images().n_codes))

    def decode_with_images(self, ids: Sequence[int]) -> tuple[str, list[list[int]]]:
        """Generated ids -> (text with an `<image>` where each span was, codes of each span). Spans are checked."""
        texts, images = self._require_images().split(ids)
        return IMAGE_PLACEHOLDER.join(self.decode(t, skip_special_tokens=True) for t in texts), images

    # --- files -------------------------------------------------------------------------------------------------

    def save(self, folder: str | os.PathLike) -> None:
        """Write tokenizer.model, added_tokens.json, special_tokens_map.json, tokenizer_config.json (HF layout)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tokens = {name: {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
                  for name, content in [("bos_token", self.bos_token), ("eos_token", self.eos_token),
                                        ("unk_token", self.unk_token)]}
        extra = {"additional_special_tokens": self.additional_special} if self.additional_special else {}
        config = self.config or {
            "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
            "model_max_length": 1000000000000000019884624838656, "pad_token": None, "sp_model_kwargs": {},
            "tokenizer_class": "LlamaTokenizer", **{k: {"__type": "AddedToken", **v} for k, v in tokens.items()}}

        def as_json(value: dict, sort_keys: bool = False) -> bytes:
            return (json.dumps(value, indent=2, sort_keys=sort_keys, ensure_ascii=False) + "\n").encode("utf-8")

        for name, data in [("tokenizer.model", self.sp.data), ("added_tokens.json", as_json(self.added, True)),
                           ("special_tokens_map.json", as_json({**extra, **tokens})),
                           ("tokenizer_config.json", as_json(config))]:
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the files from the machine's other users
            os.replace(tmp, folder / name)

# --- image tokens and spans ---------------------------------------------------------------------------------------
CODES_PER_IMAGE = 32  # SEED's causal Q-Former emits 32 codes per image
BOI_TOKEN, EOI_TOKEN = "<img>", "</img>"
IMAGE_PLACEHOLDER = "<image>"  # marks where an image goes in a chat message (gradio_demo/conversation.py)

def image_token(code: int) -> str:
    return f"<img_{code:05d}>"

def check_image_codes(codes: Sequence[int], n_codes: int = 8192) -> list[int]:
    """The codes of one image as a list of ints, or a ValueError naming what is wrong with them."""
    codes = codes.tolist() if hasattr(codes, "tolist") else list(codes)
    if len(codes) != CODES_PER_IMAGE:
        raise ValueError(f"an image span holds exactly {CODES_PER_IMAGE} codes, got {len(codes)}")
    for k, code in enumerate(codes):
        if not 0 <= code < n_codes:
            raise ValueError(f"image code {code} at index {k} is outside [0, {n_codes})")
    return [int(c) for c in codes]

def image_span_text(codes: Sequence[int], n_codes: int = 8192) -> str:
    """`<img><img_00012>...</img>`: the text SEED writes for one image (32 codes)."""
    return BOI_TOKEN + "".join(image_token(c) for c in check_image_codes(codes, n_codes)) + EOI_TOKEN

@dataclass(frozen=True)
class ImageVocab:
    """Where the image tokens sit in the vocabulary: `<img>`, `</img>`, and codes k -> code_offset + k."""
    boi_id: int
    eoi_id: int
    code_offset: int
    n_codes: int
    codes_per_image: int = CODES_PER_IMAGE

    def is_code(self, token_id: int) -> bool:
        return self.code_offset <= token_id < self.code_offset + self.n_codes

    def span_ids(self, codes: Sequence[int]) -> list[int]:
        """`[<img>, code ids..., </img>]` for the 32 codes of one image."""
        return [self.boi_id] + [self.code_offset + c for c in check_image_codes(codes, self.n_codes)] + [self.eoi_id]

    def split(self, ids: Sequence[int]) -> tuple[list[list[int]], list[list[int]]]:
        """Cut generated ids at their image spans: (text runs, codes of each span), len(text runs) = spans + 1.
        Each `<img>` must be closed by `</img>` around exactly 32 image codes (the flask demo's check)."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        texts, images, run = [], [], []
        pos = 0
        while pos < len(ids):
            token = ids[pos]
            if token == self.eoi_id:
                raise ValueError(f"</img> (id {token}) at position {pos} closes no <img>")
            if token != self.boi_id:
                run.append(token)
                pos += 1
                continue
            try:
                end = ids.index(self.eoi_id, pos + 1)
            except ValueError:
                raise ValueError(f"the image span opened by <img> at position {pos} is never closed by </img>") \
                    from None
            if (bad := next((p for p in range(pos + 1, end) if not self.is_code(ids[p])), None)) is not None:
                raise ValueError(f"the image span at position {pos} holds id {ids[bad]} at position {bad}, which is "
                                 f"not an image code (codes are ids {self.code_offset}.."
                                 f"{self.code_offset + self.n_codes - 1})")
            images.append(check_image_codes([i - self.code_offset for i in ids[pos + 1:end]], self.n_codes))
            texts.append(run)
            run = []
            pos = end + 1
        texts.append(run)
        return texts, images

# --- chat templates (AILab-CVC/SEED @ 93b3cf4 scripts/seed_llama_inference_{8B,14B}.py, gradio_demo/conversation.py)
# template: (system, user turn, assistant turn, what the prompt ends with)
CHAT_TEMPLATES = {
    "8B": ("{}\n", "USER: {}\n", "ASSISTANT: {}\n", "ASSISTANT:"),  # Vicuna v1.1
    "14B": ("<<SYS>>\n{}\n<</SYS>>\n\n", "[INST] {} [/INST]\n", "{}\n", ""),  # LLaMA-2 chat
}

def chat_conversation(messages: Sequence[str], template: str = "8B", system: str | None = None) -> str:
    """The conversation text of a chat, with `<image>` placeholders where images go. `messages` alternate user,
    assistant, user, ... and end with the user turn the model answers."""
    if template not in CHAT_TEMPLATES:
        raise ValueError(f"unknown chat template {template!r}; choose one of {tuple(CHAT_TEMPLATES)}")
    if len(messages) % 2 != 1:
        raise ValueError(f"messages alternate user/assistant and end with a user turn, so their number is odd; "
                         f"got {len(messages)}")
    system_turn, user_turn, assistant_turn, end = CHAT_TEMPLATES[template]
    text = "" if system is None else system_turn.format(system)
    return text + "".join((assistant_turn if k % 2 else user_turn).format(m) for k, m in enumerate(messages)) + end

def chat_prompt(messages: Sequence[str], template: str = "8B", system: str | None = None,
                images: Sequence[Sequence[int]] = (), force_boi: bool = False, n_codes: int = 8192) -> str:
    """The prompt text SEED-LLaMA is given: `<s>` + the conversation, the k-th `<image>` replaced by the span of
    `images[k]`, plus `<img>` when `force_boi` (the flask demo's "force image generation").

    Encode it with `Tokenizer.encode(text)` without BOS: like SEED, the BOS comes from the literal `<s>`.
    """
    parts = chat_conversation(messages, template, system).split(IMAGE_PLACEHOLDER)
    if len(parts) - 1 != len(images):
        raise ValueError(f"the messages hold {len(parts) - 1} {IMAGE_PLACEHOLDER} placeholders "
                         f"but {len(images)} images were given")
    text = parts[0] + "".join(image_span_text(codes, n_codes) + part for codes, part in zip(images, parts[1:]))
    return "<s>" + text + (BOI_TOKEN if force_boi else "")

# --- training a small vocabulary (train.py --tiny) ----------------------------------------------------------------
# Pieces never cross these boundaries: a word is '▁'-led, runs of spaces form their own pieces (LLaMA's
# allow_whitespace_only_pieces) and every digit stays alone (split_digits).
_WORD_RE = re.compile("\u2581+(?=\u2581)|\u2581?[^\u25810-9]+|\u2581|[0-9]")

def train_bpe(texts: Sequence[str], vocab_size: int, max_piece_length: int = 16) -> bytes:
    """Train a BPE vocabulary with LLaMA's options (the specs below); returns the bytes of a `tokenizer.model`.

    Each step merges the most frequent adjacent pair inside a word (ties: first seen), and the new piece scores
    -step, so encoding replays the merges in order. Every character of the texts becomes a piece (character_coverage
    1.0); others fall back to bytes. Pieces may mix Unicode scripts (no split_by_unicode_script).
    """
    words: Counter[tuple[str, ...]] = Counter()
    for text in texts:
        for line in text.split("\n"):  # sentencepiece trains on lines, so '\n' is always a byte piece
            if line:
                words.update(tuple(w) for w in _WORD_RE.findall("\u2581" + line.replace(" ", "\u2581")))
    chars: Counter[str] = Counter()
    for word, count in words.items():
        for ch in word:
            chars[ch] += count
    n_base = 3 + 256 + len(chars)
    if vocab_size < n_base:
        raise ValueError(f"vocab_size {vocab_size} is too small: it needs at least {n_base} "
                         f"(3 special + 256 byte + {len(chars)} character pieces)")
    merges: list[str] = []
    known = set(chars)
    while n_base + len(merges) < vocab_size:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for a, b in zip(word, word[1:]):
                if len(a) + len(b) <= max_piece_length:
                    pairs[a, b] += count
        if not pairs:
            break
        (a, b), _ = pairs.most_common(1)[0]
        merged = a + b
        if merged not in known:  # two pairs can spell the same piece ("ab"+"c", "a"+"bc"): store it once
            known.add(merged)
            merges.append(merged)
        words = Counter({_merge_pair(word, a, b): count for word, count in words.items()})
    pieces = [("<unk>", 0.0, SentencePieceModel.UNKNOWN), ("<s>", 0.0, SentencePieceModel.CONTROL),
              ("</s>", 0.0, SentencePieceModel.CONTROL)]
    pieces += [(f"<0x{b:02X}>", 0.0, SentencePieceModel.BYTE) for b in range(256)]
    pieces += [(p, -float(k), SentencePieceModel.NORMAL) for k, p in enumerate(merges)]
    # Single characters come last with the lowest scores, as in LLaMA's vocabulary; BPE never merges into them.
    pieces += [(ch, -float(len(merges) + k), SentencePieceModel.NORMAL)
               for k, (ch, _) in enumerate(chars.most_common())]
    model = b"".join(_proto_field(1, _proto_field(1, p) + _proto_field(2, s) + _proto_field(3, t))
                     for p, s, t in pieces)
    # TrainerSpec: model_type BPE, vocab_size, split_digits, byte_fallback (ids 3..258), unk/bos/eos/pad ids.
    trainer = b"".join(_proto_field(n, v) for n, v in
                       [(3, 2), (4, len(pieces)), (25, True), (35, True), (40, 0), (41, 1), (42, 2), (43, -1)])
    # NormalizerSpec: identity, add_dummy_prefix, no remove_extra_whitespaces, escape_whitespaces.
    normalizer = b"".join(_proto_field(n, v) for n, v in [(1, "identity"), (3, True), (4, False), (5, True)])
    return model + _proto_field(2, trainer) + _proto_field(3, normalizer)

def _merge_pair(word: tuple[str, ...], a: str, b: str) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
            out.append(a + b)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)

# protobuf wire format, written: what `train_bpe` needs to write a tokenizer.model

def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative ints are written as 10-byte two's complement, as protobuf does
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)

def _proto_field(number: int, value: int | float | str | bytes) -> bytes:
    if isinstance(value, float):  # proto `float`: fixed32 (wire type 5)
        return _varint(number << 3 | 5) + struct.pack("<f", value)
    if isinstance(value, (bool, int)):
        return _varint(number << 3) + _varint(int(value))
    data = value.encode() if isinstance(value, str) else value
    return _varint(number << 3 | 2) + _varint(len(data)) + data

def train_tokenizer(texts: Sequence[str], folder: str | os.PathLike, vocab_size: int,
                    n_image_codes: int = 8192) -> Tokenizer:
    """train.py's tokenizer stage: a BPE vocabulary trained on `texts` (`train_bpe`), extended with the image
    tokens exactly as SEED's (`add_image_tokens`), saved to `folder` as the four tokenizer files."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(train_bpe(texts, vocab_size))
    tokenizer = Tokenizer(folder / "tokenizer.model")
    tokenizer.add_image_tokens(n_image_codes)
    tokenizer.save(folder)
    return tokenizer
