"""tokenizer.py: SentencePiece BPE from scratch, SEED's image tokens, chat templates, training.

References: tests/fixtures/spm (sentencepiece 0.2.3 outputs), tests/fixtures/spm/added_tokens_cases and
tests/fixtures/seed_llama_prompt (transformers 4.30.2 LlamaTokenizer, SEED's pinned version), the installed
sentencepiece library (parity tier) and the official tokenizer files (golden tier).
"""
import hashlib
import json
import random
import struct
import time

import pytest

from conftest import FIXTURES, official_file
from tokenizer import (SentencePieceModel, Tokenizer, ImageVocab, chat_conversation, chat_prompt, image_span_text,
                   train_bpe, train_tokenizer, _proto_field, _proto_fields)

SPM = FIXTURES / "spm" / "spm.model"
LLAMA = FIXTURES / "llama"  # spm.model + 128 image codes (ids 640..767), <img> = 768, </img> = 769

def load_cases(*parts):
    return json.loads(FIXTURES.joinpath(*parts).read_text(encoding="utf-8"))["cases"]

@pytest.fixture(scope="module")
def sp():
    return SentencePieceModel(SPM.read_bytes())

@pytest.fixture(scope="module")
def tok():
    return Tokenizer(LLAMA)

def random_text(rng, n_max=40):
    alphabet = list("abcdefghij klmnopqrstuvwxyz  ABC0123456789.,!?\n\t▁<>/_-") + \
        ["é", "中", "🦙", "\u00a0", "ü", "<s>", "</s>", "<unk>", "<img>", "</img>", "<img_00005>", " <img_00127> "]
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, n_max)))

# --- SentencePiece layer ------------------------------------------------------------------------------------------

def test_spm_cases_match_sentencepiece(sp):
    cases = load_cases("spm", "cases.json")
    assert len(cases) == 374
    for case in cases:
        assert sp.encode(case["text"]) == case["ids"], case["text"]
        assert sp.decode(case["ids"]) == case["decoded"], case["text"]
        if case["roundtrip"]:
            assert sp.decode(sp.encode(case["text"])) == case["text"]

def test_model_fields(sp):
    assert len(sp) == 640 and sp.unk_id == 0 and sp.byte_fallback
    assert sp.add_dummy_prefix and not sp.remove_extra_whitespaces
    assert sp.pieces[3] == "<0x00>" and sp.byte_ids[0x0A] == 13
    assert sp.types.count(SentencePieceModel.BYTE) == 256

def test_not_a_tokenizer_model(tmp_path):
    cases = {"config.json": b'{"vocab_size": 770}', "empty.model": b"", "random.bin": bytes(range(256)) * 4,
             "model.safetensors": (LLAMA / "model-00002-of-00002.safetensors").read_bytes()[:4096]}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match="is not a SentencePiece model"):
            Tokenizer(tmp_path / name)
    with pytest.raises(FileNotFoundError, match="no SentencePiece model"):
        Tokenizer(tmp_path)  # a folder without tokenizer.model

def test_encoder_is_not_quadratic(sp):
    text = (FIXTURES / "spm" / "corpus.txt").read_text(encoding="utf-8")[:50_000]
    start = time.perf_counter()
    ids = sp.encode(text)
    # the heap and the per-word cache keep this far under a second; rescanning all pairs per merge takes minutes
    assert time.perf_counter() - start < 10
    assert sp.decode(ids) == text
    assert sp._words_independent and sp._bpe(sp.normalize(text)) == ids  # per-word BPE == BPE on the whole text

@pytest.mark.parity
def test_random_strings_match_sentencepiece(sp):
    spm = pytest.importorskip("sentencepiece")
    ref = spm.SentencePieceProcessor(model_file=str(SPM))
    rng = random.Random(0)
    for _ in range(500):
        text = random_text(rng)
        assert sp.encode(text) == ref.encode(text), text
        ids = [rng.randrange(len(sp)) for _ in range(rng.randint(0, 12))]  # control, byte, invalid UTF-8 ...
        assert sp.decode(ids) == ref.decode(ids), ids

def rebuild_model(data, types=None, extra=(), scores=None):
    """The fixture model with some piece types (or scores) changed and extra pieces appended (field 1 = pieces)."""
    pieces, rest = [], b""
    for number, value in _proto_fields(data, "ModelProto"):
        if number == 1:
            fields = dict(_proto_fields(value, "SentencePiece"))
            piece = fields[1].decode()
            kind = (types or {}).get(piece, fields.get(3, 1))
            score = (scores or {}).get(piece, struct.unpack("<f", fields[2])[0])  # fixed32 float
            pieces.append(_proto_field(1, piece) + _proto_field(2, score) + _proto_field(3, kind))
        else:
            rest += _proto_field(number, value)
    pieces += [_proto_field(1, p) + _proto_field(2, 0.0) + _proto_field(3, 4) for p in extra]
    return b"".join(_proto_field(1, p) for p in pieces) + rest

@pytest.mark.parametrize("score", [float("nan"), float("inf")])
def test_a_score_that_is_not_a_number_is_refused(tmp_path, score):
    """A NaN score would silently reorder every merge: the file is refused, naming the piece."""
    (tmp_path / "tokenizer.model").write_bytes(rebuild_model(SPM.read_bytes(), scores={"at": score}))
    with pytest.raises(ValueError, match=f"{tmp_path / 'tokenizer.model'} .*piece 284 has score {score}"):
        Tokenizer(tmp_path)

@pytest.mark.parametrize("types, extra, named", [({"at": 5}, (), "piece 284 'at' has type UNUSED"),
                                                 ({}, ["<img>"], "piece 640 '<img>' has type USER_DEFINED")])
def test_piece_types_llama_never_has_are_refused(tmp_path, types, extra, named):
    """LLaMA's tokenizer.model holds only normal, unknown, control and byte pieces; other types are refused."""
    (tmp_path / "tokenizer.model").write_bytes(rebuild_model(SPM.read_bytes(), types, extra))
    with pytest.raises(ValueError, match=f"{tmp_path / 'tokenizer.model'}: {named}, which is not supported"):
        Tokenizer(tmp_path)

def test_unigram_models_are_refused():
    data = train_bpe(WORLD, vocab_size=330)
    rest = b"".join(_proto_field(n, v) for n, v in _proto_fields(data, "ModelProto") if n != 2)
    with pytest.raises(ValueError, match="unigram.model: model_type UNIGRAM is not supported"):
        SentencePieceModel(rest + _proto_field(2, _proto_field(3, 1)), "unigram.model")

# --- transformers 4.30.2 layer: added tokens, specials, whitespace -------------------------------------------------

def test_added_token_cases_match_transformers_4_30_2(tok):
    cases = load_cases("spm", "added_tokens_cases.seed_era_4.30.2.json")
    assert len(cases) == 138
    for case in cases:
        assert tok.encode(case["text"]) == case["ids_no_special_tokens"], case["text"]
        assert tok.encode(case["text"], bos=True) == case["ids_add_special_tokens"], case["text"]
        assert tok.decode(case["ids_add_special_tokens"]) == case["decode"], case["text"]
        assert tok.decode(case["ids_add_special_tokens"], skip_special_tokens=True) == case["decode_skip_special"]

def test_vocabulary_from_files(tok):
    assert len(tok) == 770
    assert tok.image_vocab == ImageVocab(boi_id=768, eoi_id=769, code_offset=640, n_codes=128)
    assert (tok.bos_id, tok.eos_id, tok.unk_id, tok.pad_id) == (1, 2, 0, 0)
    assert Tokenizer(SPM).image_vocab is None and len(Tokenizer(SPM)) == 640

def test_bad_added_tokens(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(SPM.read_bytes())
    (tmp_path / "added_tokens.json").write_text(json.dumps({"<img_00000>": 640, "<img_00001>": 642}))
    with pytest.raises(ValueError, match="consecutive"):
        Tokenizer(tmp_path)
    (tmp_path / "added_tokens.json").write_text(json.dumps({"<img_00001>": 640, "<img_00000>": 641,
                                                            "<img>": 642, "</img>": 643}))
    with pytest.raises(ValueError, match="image token <img_00001> has id 640, expected 642"):
        Tokenizer(tmp_path)

# --- images and chat templates ------------------------------------------------------------------------------------

def test_seed_llama_prompt_cases_match_transformers_4_30_2(tok):
    cases = load_cases("seed_llama_prompt", "cases.seed_era_4.30.2.json")
    assert len(cases) == 86
    for case in cases:
        args = (case["messages"], case["template"], case["system"])
        assert chat_conversation(*args) == case["conversation_text"]
        assert chat_prompt(*args, images=case["codes"], force_boi=case["force_boi"]) == case["text"]
        ids = tok.encode_chat(*args, images=case["codes"], force_boi=case["force_boi"])
        assert ids == case["input_ids"], case["text"]
        assert [k for k, i in enumerate(ids) if i == tok.image_vocab.boi_id] == case["boi_positions"]

def test_worked_example_of_the_header(tok):
    """The ids tokenizer.py's docstring shows for the 8B template around one image."""
    codes = [12, 7] + list(range(30))
    ids = tok.encode(chat_prompt(["<image>Describe the image."], "8B", images=[codes]))
    assert ids == [1, 434, 612, 476, 468, 501, 466, 768, 652, 647] + list(range(640, 670)) + [769] + \
        [434, 487, 282, 373, 441, 450, 435, 299, 350, 366, 457, 13, 483, 476, 476, 488, 476, 489, 483, 639, 489, 466]
    assert [tok.sp.pieces[i] for i in ids[1:7]] == ["▁", "U", "S", "E", "R", ":"]

def test_image_spans_round_trip(tok):
    vocab = tok.image_vocab
    codes = [(7 * k) % 128 for k in range(32)]
    span = vocab.span_ids(codes)
    assert len(span) == 34 and span[0] == 768 and span[-1] == 769 and span[1] == 640
    assert tok.encode(image_span_text(codes)) == span
    generated = tok.encode("Here it is.") + span + tok.encode("Done.") + vocab.span_ids(codes[::-1]) + [tok.eos_id]
    texts, images = vocab.split(generated)
    assert images == [codes, codes[::-1]] and len(texts) == 3
    assert tok.decode_with_images(generated) == ("Here it is.<image>Done.<image>", [codes, codes[::-1]])

def test_invalid_spans_are_named(tok):
    vocab, codes = tok.image_vocab, list(range(32))
    with pytest.raises(ValueError, match="exactly 32 codes, got 31"):
        vocab.span_ids(codes[:31])
    with pytest.raises(ValueError, match="image code 8192 at index 3 is outside \\[0, 8192\\)"):
        image_span_text(codes[:3] + [8192] + codes[4:])
    with pytest.raises(ValueError, match="image code 128 at index 0 is outside \\[0, 128\\)"):
        vocab.span_ids([128] + codes[1:])
    span = vocab.span_ids(codes)
    with pytest.raises(ValueError, match="never closed"):
        vocab.split(span[:-1])
    with pytest.raises(ValueError, match="closes no <img>"):
        vocab.split([5] + span[-1:])
    with pytest.raises(ValueError, match="id 300 at position 4, which is not an image code"):
        vocab.split(span[:4] + [300] + span[5:])
    with pytest.raises(ValueError, match="exactly 32 codes, got 33"):
        vocab.split(span[:-1] + [640] + span[-1:])
    with pytest.raises(ValueError, match="exactly 32 codes, got 33"):
        tok.encode_chat(["<image>hi"], images=[codes + [0]])

def test_chat_template_errors():
    with pytest.raises(ValueError, match="unknown chat template '7B'; choose one of \\('8B', '14B'\\)"):
        chat_conversation(["hi"], "7B")
    with pytest.raises(ValueError, match="got 2"):
        chat_conversation(["hi", "hello"])
    with pytest.raises(ValueError, match="1 <image> placeholders but 0 images"):
        chat_prompt(["<image>what is it?"])

# --- training and saving ------------------------------------------------------------------------------------------

WORLD = ["a big red circle at the top", "a small blue square on the left", "two green triangles at the bottom",
         "the  circle   is left of 3 squares\nand 12 stars"] * 5

def test_train_tokenizer_as_seed(tmp_path):
    tok = train_tokenizer(WORLD, tmp_path, vocab_size=330, n_image_codes=16)
    assert len(tok.sp) == 330 and len(tok) == 330 + 18
    assert tok.image_vocab == ImageVocab(boi_id=346, eoi_id=347, code_offset=330, n_codes=16)
    added = json.loads((tmp_path / "added_tokens.json").read_text())
    assert added["<img_00000>"] == 330 and added["</img>"] == 347
    assert json.loads((tmp_path / "special_tokens_map.json").read_text())["additional_special_tokens"] == \
        ["<img>", "</img>"]
    again = Tokenizer(tmp_path)
    text = chat_prompt(["<image>what is it?"], images=[list(range(16)) * 2], n_codes=16)
    assert again.encode(text) == tok.encode(text) and again.image_vocab == tok.image_vocab
    for line in WORLD[0].split("\n"):  # learned words are whole pieces; digits stay single
        assert len(tok.sp.encode(line)) <= 7
    assert len(tok.sp.encode("12")) == 3
    with pytest.raises(ValueError, match="vocab_size 100 is too small"):
        train_bpe(WORLD, 100)

@pytest.mark.parity
def test_trained_model_loads_in_sentencepiece(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    (tmp_path / "tokenizer.model").write_bytes(train_bpe(WORLD, vocab_size=330))
    ref = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    ours = Tokenizer(tmp_path).sp
    assert ref.get_piece_size() == len(ours) == 330
    assert [ref.id_to_piece(i) for i in range(330)] == ours.pieces
    rng = random.Random(2)
    for text in WORLD + [random_text(rng) for _ in range(300)]:
        assert ours.encode(text) == ref.encode(text), text
        assert ours.decode(ref.encode(text)) == ref.decode(ref.encode(text))

@pytest.mark.parity
def test_saved_folder_loads_in_transformers(tmp_path):
    """The four files `train_tokenizer` writes are a valid HF LlamaTokenizer folder with the same vocabulary."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("sentencepiece")
    ours = train_tokenizer(WORLD, tmp_path, vocab_size=330, n_image_codes=16)
    hf = transformers.LlamaTokenizer.from_pretrained(tmp_path, legacy=True)
    assert len(hf) == len(ours) == 348
    tokens = ["<img_00000>", "<img_00015>", "<img>", "</img>", "<s>", "</s>", "<unk>"]
    assert hf.convert_tokens_to_ids(tokens) == [ours.split_tokens[t] for t in tokens]
    assert hf.additional_special_tokens == ["<img>", "</img>"] and set(hf.all_special_ids) == ours.special_ids
    for text in WORLD[:3] + ["<img><img_00003></img>two green"]:  # no whitespace next to an added token
        assert hf(text, add_special_tokens=False).input_ids == ours.encode(text)

def test_save_round_trip(tok, tmp_path):
    tok.save(tmp_path)
    assert (tmp_path / "tokenizer.model").read_bytes() == (LLAMA / "tokenizer.model").read_bytes()
    for name in ["added_tokens.json", "tokenizer_config.json"]:
        assert json.loads((tmp_path / name).read_text()) == json.loads((LLAMA / name).read_text())
    again = Tokenizer(tmp_path)
    for case in load_cases("spm", "added_tokens_cases.seed_era_4.30.2.json")[:40]:
        assert again.encode(case["text"]) == case["ids_no_special_tokens"]

# --- official files -----------------------------------------------------------------------------------------------

@pytest.mark.golden
def test_official_tokenizer():
    model = official_file("AILab-CVC", "seed-tokenizer-2", "tokenizer.model")
    official_file("AILab-CVC", "seed-tokenizer-2", "added_tokens.json")
    digest = hashlib.sha256(model.read_bytes()).hexdigest()
    assert digest == "9e556afd44213b6bd1be2b850ebbbd98f5481437a8021afaf58ee7fb1818d347"  # hf:AILab-CVC/seed-tokenizer-2 tokenizer.model (= LLaMA's)
    tok = Tokenizer(model.parent)
    assert len(tok) == 40194 and len(tok.sp) == 32000
    assert tok.split_tokens["<img_00000>"] == 32000 and tok.image_vocab.code_offset == 32000
    assert tok.image_vocab.n_codes == 8192 and (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 0)
    assert tok.encode("\n") == [29871, 13]  # dummy '▁' + byte piece <0x0A>
    ids = tok.encode_chat(["<image>What is this animal?"], images=[[8191] * 32])
    boi = ids.index(tok.image_vocab.boi_id)
    assert ids[0] == 1 and ids.count(40191) == 32 and ids[boi + 33] == tok.image_vocab.eoi_id
