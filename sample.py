"""sample.py: SEED-LLaMA end to end, from pixels to codes to words and back to pixels.

    python sample.py --ckpt official                  # every task on a built-in test picture (downloads ~40 GB once)
    python sample.py --ckpt official --task t2i --prompt "Can you generate an image of a dog on the green grass?"
    python sample.py --ckpt out/tiny --task chat      # a checkpoint folder written by train.py

What runs (paper: "Making LLaMA SEE and Draw with SEED Tokenizer", arXiv:2310.01218):
  image --SeedTokenizer.encode--> 32 codes --Llama--> text and/or 32 new codes --SeedTokenizer.embed--> 1024-d
  image embedding --UnCLIPDecoder--> image.
The prompts are the official templates (AILab-CVC/SEED: scripts/seed_llama_inference_8B.py / _14B.py, and
gradio_demo/conversation.py for multi-turn chat); an image enters the prompt as `<img>` + 32 `<img_xxxxx>` + `</img>`.

Weights. `--ckpt official` fetches the released files with the standard library only (urllib) into a cache laid out
as on the Hugging Face hub, then loads them with each model's `from_official`. `--ckpt PATH` loads a folder written by
train.py: `PATH/seed/`, `PATH/llama/` (with the tokenizer files) and `PATH/decoder/`, each written by the model's
`save_pretrained`. Every task works the same way with either source.

Deliberate deviations from the official scripts:
  * Text-to-image and edit requests append `<img>` to the prompt ("force image generation", the flask demo's
    `force_boi` option), so the answer is always an image; the scripts leave it to the model.
  * `--constrained` restricts the 32 tokens after `<img>` to image codes and then forces `</img>`; the official code
    samples freely and may produce a broken span (which we report as an error instead of decoding garbage).
  * The generation length is capped so that prompt + answer fit the model's context window.
"""
import argparse
import contextlib
import errno
import hashlib
import http.client
import json
import os
import re
import shlex
import shutil
import socket
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

# ======================================================================================================
# The official files, laid out as on the hub (OFFICIAL_FORMATS.md §g)
# ======================================================================================================

TOKENIZER_REPO = "AILab-CVC/seed-tokenizer-2"
TOKENIZER_FILES = ["seed_quantizer.pt", "tokenizer.model", "added_tokens.json", "special_tokens_map.json",
                   "tokenizer_config.json"]
# LAVIS hosts the EVA ViT-g that SEED's quantizer reads its `visual_encoder` from; it is not on the hub, so it gets a
# fixed place in the cache (`BLIP2/eva_vit_g.pth`, the team's layout) and its own URL override.
EVA_VIT_PATH = "BLIP2/eva_vit_g.pth"
EVA_VIT_URL = "https://storage.googleapis.com/sfr-vision-language-research/LAVIS/models/BLIP2/eva_vit_g.pth"
LLM_REPOS = {"8b": "AILab-CVC/seed-llama-8b-sft", "14b": "AILab-CVC/seed-llama-14b-sft"}
LLM_FILES = ["config.json", "generation_config.json"]
# The SEED-LLaMA repos ship sharded pickles; the safetensors index is accepted too (mirrors, converted copies).
LLM_INDEX_FILES = ["pytorch_model.bin.index.json", "model.safetensors.index.json"]
UNCLIP_REPO = "stabilityai/stable-diffusion-2-1-unclip"
# SEED passes image embeddings straight to the pipeline, so `image_encoder/` and `feature_extractor/` (2.5 GB of
# OpenCLIP ViT-H) are never run and never downloaded.
UNCLIP_FILES = ["model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
                "tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer/special_tokens_map.json",
                "tokenizer/tokenizer_config.json", "image_normalizer/config.json", "scheduler/scheduler_config.json",
                "image_noising_scheduler/scheduler_config.json"]
UNCLIP_WEIGHTS = ["unet/diffusion_pytorch_model{}.safetensors", "vae/diffusion_pytorch_model{}.safetensors",
                  "text_encoder/model{}.safetensors", "image_normalizer/diffusion_pytorch_model{}.safetensors"]

# Hashes published for two files (OFFICIAL_FORMATS.md §a.1, §c.2): (size in bytes, sha256). A hash is only checked when
# the downloaded file has exactly the official size: a file of another size is not the official file at all (a
# mirror serving a reduced copy, as the tests do), and the server's size and its own sha256 ETag still guard it. So
# the tests exercise this table by serving a file of the official size with other contents.
KNOWN_FILES = {
    f"{TOKENIZER_REPO}/seed_quantizer.pt":
        (1_228_836_570, "322a9fba55cb0e97e1a633981fbbdff20577af69146a0f23fa7b14201459a13f"),
    f"{TOKENIZER_REPO}/tokenizer.model":
        (499_723, "9e556afd44213b6bd1be2b850ebbbd98f5481437a8021afaf58ee7fb1818d347"),
}


class DownloadError(RuntimeError):
    """A weight file could not be fetched or verified; the message says why and what to do."""


def weights_root(weights: str | None = None) -> Path:
    """Where the official files live: `--weights DIR`, else $SEED_CACHE, else the XDG cache folder."""
    if weights:
        return Path(weights).expanduser()
    if os.environ.get("SEED_CACHE"):
        return Path(os.environ["SEED_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "seed-from-scratch"


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_url(rel: str) -> str:
    """The URL of a file given by its path in the layout (`owner/repo/file`); EVA has its own."""
    if rel == EVA_VIT_PATH:
        return os.environ.get("SEED_EVA_VIT_URL") or EVA_VIT_URL
    owner, name, file = rel.split("/", 2)
    endpoint = (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    return f"{endpoint}/{owner}/{name}/resolve/main/{file}"


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n} B"


class _KeepLinkedHeaders(urllib.request.HTTPRedirectHandler):
    """The hub answers a large (LFS) file with a redirect to its CDN; the redirect, not the final answer, carries the
    file's sha256 (`X-Linked-Etag`) and size (`X-Linked-Size`). urllib drops redirect headers, so keep them."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None:
            new.linked = {**getattr(req, "linked", {}),
                          **{k.lower(): v for k, v in headers.items() if k.lower().startswith("x-linked-")}}
        return new


_OPENER = urllib.request.build_opener(_KeepLinkedHeaders())


def _sha256_header(headers: dict) -> str | None:
    """The sha256 the server vouches for, if any: the hub sends it as the (quoted) ETag of LFS files. A 40-hex ETag is
    a git blob id and a CDN ETag is an md5, so only a 64-hex value counts."""
    for key in ("x-linked-etag", "etag"):
        value = (headers.get(key) or "").strip().removeprefix("W/").strip('"').lower()
        if re.fullmatch(r"[0-9a-f]{64}", value):
            return value
    return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _request(url: str, offset: int):
    """Open `url` from byte `offset` on; returns (response, total size or None, offset the body starts at)."""
    req = urllib.request.Request(url, headers={"User-Agent": "seed-from-scratch"})
    if offset:
        req.add_header("Range", f"bytes={offset}-")
    resp = _OPENER.open(req, timeout=60)
    headers = {**getattr(req, "linked", {}), **{k.lower(): v for k, v in resp.headers.items()}}
    if resp.status == 206:  # Content-Range: bytes START-END/TOTAL
        m = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", headers.get("content-range", ""))
        if not m or int(m.group(1)) != offset:
            resp.close()
            raise DownloadError(f"{url}: the server answered the range request with a bad Content-Range "
                                f"{headers.get('content-range')!r}")
        total = int(m.group(2)) if m.group(2) != "*" else None
    else:  # 200: the server ignored the range, the body is the whole file
        offset = 0
        total = int(headers["content-length"]) if "content-length" in headers else None
    if total is None and "x-linked-size" in headers:
        total = int(headers["x-linked-size"])
    return resp, total, offset, headers


def download(url: str, dest: Path, known: tuple[int, str] | None = None, retries: int = 3) -> Path:
    """Fetch `url` to `dest`: resumable (HTTP Range into `dest.incomplete`), size- and sha256-checked, atomic.

    A dropped connection is retried `retries` times, each resuming where the last one stopped; an interrupted run
    also resumes from the `.incomplete` file. A file whose hash does not match is moved to `dest.corrupt`, never
    used, and the next run downloads it afresh.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".incomplete")
    for attempt in range(retries + 1):
        offset = part.stat().st_size if part.exists() else 0
        try:
            resp, total, offset, headers = _request(url, offset)
        except urllib.error.HTTPError as e:
            if e.code == 416 and offset:  # the partial file is already whole (or longer): start over
                part.unlink()
                continue
            if e.code == 404:
                raise DownloadError(f"{url} does not exist (HTTP 404). Check the name, the mirror in HF_ENDPOINT or "
                                    f"SEED_EVA_VIT_URL, or put the file at {dest} yourself.") from None
            hint = " (a gated repository? log in on the hub and accept its terms)" if e.code in (401, 403) else ""
            raise DownloadError(f"{url}: HTTP {e.code} {e.reason}{hint}") from None
        except (urllib.error.URLError, socket.timeout, ConnectionError) as e:
            if attempt < retries:
                time.sleep(min(2 ** attempt, 10))
                continue
            reason = getattr(e, "reason", e)
            raise DownloadError(f"cannot reach {url}: {reason}. Check the network, set HF_ENDPOINT to a mirror, or "
                                f"copy the files into {dest.parent} and set HF_HUB_OFFLINE=1.") from None
        with resp:
            if total is not None:
                need = total - offset
                free = shutil.disk_usage(dest.parent).free
                if need > free:
                    raise DownloadError(f"not enough disk space for {dest.name}: it needs {_gb(need)} more, "
                                        f"{dest.parent} has {_gb(free)} free. Free some space, or choose another "
                                        f"folder with --weights or SEED_CACHE.")
            bar = tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name,
                       leave=False, file=sys.stderr, mininterval=0.5)
            try:
                with open(part, "ab" if offset else "wb") as f, bar:
                    while chunk := resp.read(1 << 20):
                        f.write(chunk)
                        bar.update(len(chunk))
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    raise DownloadError(f"the disk is full while writing {part}. Free some space and run again: "
                                        f"the download resumes where it stopped.") from None
                if isinstance(e, (ConnectionError, socket.timeout)) and attempt < retries:
                    continue
                raise
            except http.client.IncompleteRead:
                if attempt < retries:
                    continue
                raise
        size = part.stat().st_size
        if total is not None and size < total:  # the connection ended early without an error: resume
            if attempt < retries:
                continue
            raise DownloadError(f"{url}: the transfer stopped at {size} of {total} bytes {retries + 1} times; run "
                                f"again to resume from {part}.")
        expected = _sha256_header(headers)
        if known is not None and size == known[0]:
            expected = known[1]
        if (total is not None and size != total) or (expected and _sha256(part) != expected):
            corrupt = dest.with_name(dest.name + ".corrupt")
            os.replace(part, corrupt)
            what = f"size {size} instead of {total}" if total is not None and size != total else \
                f"SHA-256 differs from the expected {expected}"
            raise DownloadError(f"{url} arrived corrupt ({what}). It was moved to {corrupt} and will not be used; "
                                f"run again to download it afresh.")
        os.replace(part, dest)
        return dest
    raise DownloadError(f"{url}: gave up after {retries + 1} attempts; run again to resume from {part}.")


def fetch_files(root: Path, rels: list[str]) -> None:
    """Make sure every file of `rels` (paths in the hub layout) is under `root`: download only the missing ones."""
    missing = [rel for rel in rels if not (root / rel).is_file()]
    if missing and offline():
        raise DownloadError("HF_HUB_OFFLINE=1 and these files are missing under " + str(root) + ":\n  " +
                            "\n  ".join(missing))
    for rel in missing:
        print(f"downloading {rel}", file=sys.stderr)
        download(hub_url(rel), root / rel, known=KNOWN_FILES.get(rel))


@dataclass
class OfficialFiles:
    """Where each part of the official release is, once `resolve_official` has made sure it is there."""
    quantizer: Path   # seed_quantizer.pt
    vit: Path         # eva_vit_g.pth
    tokenizer: Path   # the folder with tokenizer.model and the added-token files
    llm: Path         # the SEED-LLaMA folder (config.json, index, shards)
    unclip: Path      # the stable-diffusion-2-1-unclip folder
    variant: str | None


def resolve_official(root: Path, model: str = "8b", variant: str | None = None) -> OfficialFiles:
    """Make sure the official files for `model` are under `root` (downloading what is missing) and say where.

    `variant="fp16"` picks the half-size unCLIP weights (what a fp16/bf16 run on a GPU loads)."""
    if model not in LLM_REPOS:
        raise ValueError(f"unknown model {model!r}; choose one of {sorted(LLM_REPOS)}")
    llm = LLM_REPOS[model]
    suffix = f".{variant}" if variant else ""
    fixed = ([f"{TOKENIZER_REPO}/{f}" for f in TOKENIZER_FILES] + [EVA_VIT_PATH] +
             [f"{llm}/{f}" for f in LLM_FILES] + [f"{UNCLIP_REPO}/{f}" for f in UNCLIP_FILES] +
             [f"{UNCLIP_REPO}/{w.format(suffix)}" for w in UNCLIP_WEIGHTS])
    # The shard list is in the index; find an index that is already here, else fetch the official one.
    index = next((f"{llm}/{f}" for f in LLM_INDEX_FILES if (root / llm / f).is_file()), f"{llm}/{LLM_INDEX_FILES[0]}")
    if offline():
        shards = []
        if (root / index).is_file():
            shards = [f"{llm}/{s}" for s in sorted(set(json.loads((root / index).read_text())["weight_map"].values()))]
        fetch_files(root, fixed + [index] + shards)
    else:
        fetch_files(root, [index])
        weight_map = json.loads((root / index).read_text())["weight_map"]
        fetch_files(root, fixed + [f"{llm}/{s}" for s in sorted(set(weight_map.values()))])
    return OfficialFiles(quantizer=root / TOKENIZER_REPO / "seed_quantizer.pt", vit=root / EVA_VIT_PATH,
                         tokenizer=root / TOKENIZER_REPO, llm=root / llm, unclip=root / UNCLIP_REPO, variant=variant)
