"""sample.py end to end: the downloader against a local hub, every task on the official-format reduced files and on a
native checkpoint folder, and the host-RAM peak while loading.

The "hub" is a local `http.server` on 127.0.0.1 serving a complete reduced release built from tests/fixtures/ in the
official hub layout (official file names, the sharded `.bin` LLaMA with its index, the diffusers unCLIP folder).
Faults are injected per path: a connection cut half-way (once), a wrong sha256 ETag, a 404.
"""
import hashlib
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sample

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
EVA_URL_PATH = "/lavis/BLIP2/eva_vit_g.pth"  # where the fake storage bucket serves the EVA ViT

# ------------------------------------------------------------------------------------------------------
# A reduced official release in the hub layout, and a local server for it
# ------------------------------------------------------------------------------------------------------

def build_hub(root: Path) -> Path:
    """Copy the shared fixtures into the hub layout under the official file names (sample.py's *_REPO/*_FILES)."""
    def put(src: Path, rel: str):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, root / rel)

    tok, llm, unclip = sample.TOKENIZER_REPO, sample.LLM_REPOS["8b"], sample.UNCLIP_REPO
    # The official quantizer file has no `visual_encoder.*`: the ViT comes from LAVIS's eva_vit_g.pth.
    put(FIXTURES / "seed_tokenizer/seed_quantizer_no_vit.pt", f"{tok}/seed_quantizer.pt")
    put(FIXTURES / "seed_tokenizer/eva_vit_g.pth", sample.EVA_VIT_PATH)
    for f in ("tokenizer.model", "added_tokens.json", "special_tokens_map.json", "tokenizer_config.json"):
        put(FIXTURES / "llama" / f, f"{tok}/{f}")
    # SEED-LLaMA: the 2023-era config (`torch_dtype`) and the fp16 `.bin` shards with their index, as released.
    put(FIXTURES / "llama/config.seed_era_4.30.2.json", f"{llm}/config.json")
    for f in ("generation_config.json", "pytorch_model.bin.index.json", "pytorch_model-00001-of-00002.bin",
              "pytorch_model-00002-of-00002.bin"):
        put(FIXTURES / "llama" / f, f"{llm}/{f}")
    # The whole diffusers folder, image_encoder/ and feature_extractor/ included: the test checks they are not fetched.
    for src in sorted((FIXTURES / "unclip/pipeline").rglob("*")):
        if src.is_file():
            put(src, f"{unclip}/{src.relative_to(FIXTURES / 'unclip/pipeline')}")
    return root

class Hub(http.server.ThreadingHTTPServer):
    """Serves `root` as `/{owner}/{repo}/resolve/main/{file}` (and the EVA file at EVA_URL_PATH), with Range support,
    a sha256 ETag on weight files as the hub sends for LFS files, a request log and injectable faults."""
    daemon_threads = True

    def __init__(self, root: Path):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root, self.log = root, []
        self.cut_once, self.bad_etag, self.missing, self.redirect = set(), set(), set(), set()

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that hangs up early is part of the tests
            super().handle_error(request, client_address)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def env(self, cache: Path, **extra) -> dict:
        env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "SEED_CACHE", "XDG_CACHE_HOME")}
        return {**env, "HF_ENDPOINT": self.url, "SEED_EVA_VIT_URL": self.url + EVA_URL_PATH,
                "SEED_CACHE": str(cache), **extra}

    def file_requests(self) -> list[str]:
        return [rel for rel, _ in self.log]

class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        hub: Hub = self.server
        path = self.path.split("?")[0]
        if path == EVA_URL_PATH:
            rel = sample.EVA_VIT_PATH
        else:
            owner, name, resolve, main, file = (path.lstrip("/").split("/", 4) + [""] * 5)[:5]
            rel = f"{owner}/{name}/{file}" if (resolve, main) == ("resolve", "main") else ""
        hub.log.append((rel, self.headers.get("Range")))
        src = hub.root / rel
        if not rel or rel in hub.missing or not src.is_file():
            self.send_error(404)
            return
        data = src.read_bytes()
        cdn = self.path.endswith("?cdn")
        if rel in hub.redirect and not cdn:  # the hub's LFS answer: a redirect that carries the sha256 and size
            self.send_response(302)
            self.send_header("Location", path + "?cdn")
            sha = "0" * 64 if rel in hub.bad_etag else hashlib.sha256(data).hexdigest()
            self.send_header("X-Linked-Etag", f'"{sha}"')
            self.send_header("X-Linked-Size", str(len(data)))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        start = 0
        if self.headers.get("Range"):
            start = int(self.headers["Range"].removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        if cdn:  # a CDN's own ETag is an md5, which must not be taken for the sha256
            self.send_header("ETag", f'"{hashlib.md5(data).hexdigest()}"')
        elif src.suffix in (".bin", ".pt", ".pth", ".safetensors", ".model"):
            sha = "0" * 64 if rel in hub.bad_etag else hashlib.sha256(data).hexdigest()
            self.send_header("ETag", f'"{sha}"')
        self.end_headers()
        if rel in hub.cut_once:  # send half the body, then drop the connection (once)
            hub.cut_once.discard(rel)
            self.wfile.write(data[start:start + (len(data) - start) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(data[start:])

@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    server = Hub(build_hub(tmp_path_factory.mktemp("hub")))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()

@pytest.fixture
def hub_env(hub, monkeypatch):
    """Point this process's downloader at the local hub (for the in-process downloader tests)."""
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("SEED_EVA_VIT_URL", hub.url + EVA_URL_PATH)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    hub.log.clear()
    return hub

# ------------------------------------------------------------------------------------------------------
# The downloader, in process
# ------------------------------------------------------------------------------------------------------

def test_cache_folder_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("SEED_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert sample.weights_root() == tmp_path / "xdg" / "seed-from-scratch"
    monkeypatch.setenv("SEED_CACHE", str(tmp_path / "cache"))
    assert sample.weights_root() == tmp_path / "cache"
    assert sample.weights_root(str(tmp_path / "w")) == tmp_path / "w"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.delenv("SEED_CACHE")
    assert sample.weights_root() == Path.home() / ".cache" / "seed-from-scratch"

def test_urls(monkeypatch):
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.delenv("SEED_EVA_VIT_URL", raising=False)
    assert sample.hub_url("AILab-CVC/seed-tokenizer-2/seed_quantizer.pt") == \
        "https://huggingface.co/AILab-CVC/seed-tokenizer-2/resolve/main/seed_quantizer.pt"
    assert sample.hub_url(sample.EVA_VIT_PATH) == sample.EVA_VIT_URL
    monkeypatch.setenv("HF_ENDPOINT", "http://mirror/")
    assert sample.hub_url("a/b/c/d.json") == "http://mirror/a/b/resolve/main/c/d.json"

def test_download_and_reuse(hub_env, tmp_path):
    files = sample.resolve_official(tmp_path, "8b")
    got = hub_env.file_requests()
    assert len(got) == len(set(got)), "a file was requested twice"
    assert not any("image_encoder" in r or "feature_extractor" in r for r in got), "SEED never runs these"
    assert f"{sample.LLM_REPOS['8b']}/pytorch_model-00002-of-00002.bin" in got, "shards come from the index"
    assert (files.unclip / "unet/diffusion_pytorch_model.safetensors").read_bytes() == \
        (hub_env.root / sample.UNCLIP_REPO / "unet/diffusion_pytorch_model.safetensors").read_bytes()
    assert files.vit.read_bytes() == (FIXTURES / "seed_tokenizer/eva_vit_g.pth").read_bytes()
    assert not list(tmp_path.rglob("*.incomplete"))
    hub_env.log.clear()
    sample.resolve_official(tmp_path, "8b")
    assert hub_env.log == [], "a complete cache must not touch the network"

def test_fp16_variant_names(hub_env, tmp_path):
    """The fp16 run asks for the `.fp16.` unCLIP weights (the reduced hub has none, so it is a clear 404)."""
    with pytest.raises(sample.DownloadError, match="404.*diffusion_pytorch_model.fp16.safetensors"):
        sample.resolve_official(tmp_path, "8b", variant="fp16")

def test_resume_after_cut(hub_env, tmp_path):
    rel = f"{sample.LLM_REPOS['8b']}/pytorch_model-00001-of-00002.bin"
    size = (hub_env.root / rel).stat().st_size
    hub_env.cut_once.add(rel)
    sample.download(sample.hub_url(rel), tmp_path / "shard.bin")
    assert (tmp_path / "shard.bin").read_bytes() == (hub_env.root / rel).read_bytes()
    assert hub_env.log == [(rel, None), (rel, f"bytes={size // 2}-")], "the second request resumes at the cut"

def test_resume_from_an_earlier_run(hub_env, tmp_path):
    rel = f"{sample.TOKENIZER_REPO}/seed_quantizer.pt"
    data = (hub_env.root / rel).read_bytes()
    (tmp_path / "q.pt.incomplete").write_bytes(data[:1000])
    sample.download(sample.hub_url(rel), tmp_path / "q.pt")
    assert (tmp_path / "q.pt").read_bytes() == data
    assert hub_env.log == [(rel, "bytes=1000-")]

def test_sha256_mismatch_from_server(hub_env, tmp_path):
    rel = f"{sample.TOKENIZER_REPO}/seed_quantizer.pt"
    hub_env.bad_etag.add(rel)
    try:
        with pytest.raises(sample.DownloadError, match="SHA-256.*moved to .*q.pt.corrupt"):
            sample.download(sample.hub_url(rel), tmp_path / "q.pt")
    finally:
        hub_env.bad_etag.discard(rel)
    assert not (tmp_path / "q.pt").exists() and (tmp_path / "q.pt.corrupt").exists()
    sample.download(sample.hub_url(rel), tmp_path / "q.pt")  # the next run fetches it afresh
    assert (tmp_path / "q.pt").read_bytes() == (hub_env.root / rel).read_bytes()

def test_sha256_from_the_redirect(hub_env, tmp_path):
    """The hub sends an LFS file's sha256 on the redirect to its CDN (`X-Linked-Etag`), not on the file itself."""
    rel = f"{sample.LLM_REPOS['8b']}/pytorch_model-00002-of-00002.bin"
    hub_env.redirect.add(rel)
    try:
        sample.download(sample.hub_url(rel), tmp_path / "good.bin")  # followed, and the right hash passes
        assert (tmp_path / "good.bin").read_bytes() == (hub_env.root / rel).read_bytes()
        hub_env.bad_etag.add(rel)
        with pytest.raises(sample.DownloadError, match="SHA-256 differs from the expected 0000"):
            sample.download(sample.hub_url(rel), tmp_path / "bad.bin")
    finally:
        hub_env.redirect.discard(rel)
        hub_env.bad_etag.discard(rel)
    assert (tmp_path / "bad.bin.corrupt").exists() and not (tmp_path / "bad.bin").exists()

def test_sha256_mismatch_from_known_table(hub_env, tmp_path):
    """A file of exactly the official tokenizer.model size must have the official hash (sample.KNOWN_FILES)."""
    size, sha = sample.KNOWN_FILES[f"{sample.TOKENIZER_REPO}/tokenizer.model"]
    (hub_env.root / "fake/repo/tokenizer.model").parent.mkdir(parents=True, exist_ok=True)
    (hub_env.root / "fake/repo/tokenizer.model").write_bytes(b"x" * size)
    with pytest.raises(sample.DownloadError, match=f"SHA-256 differs from the expected {sha}"):
        sample.download(sample.hub_url("fake/repo/tokenizer.model"), tmp_path / "tokenizer.model",
                        known=(size, sha))
    assert (tmp_path / "tokenizer.model.corrupt").exists() and not (tmp_path / "tokenizer.model").exists()

def test_404(hub_env, tmp_path):
    rel = f"{sample.UNCLIP_REPO}/vae/config.json"
    hub_env.missing.add(rel)
    try:
        with pytest.raises(sample.DownloadError, match=r"vae/config.json does not exist \(HTTP 404\)"):
            sample.resolve_official(tmp_path, "8b")
    finally:
        hub_env.missing.discard(rel)

def test_no_network(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: connection refused
    monkeypatch.setattr(sample.time, "sleep", lambda s: None)
    with pytest.raises(sample.DownloadError, match="cannot reach .*Check the network"):
        sample.download(sample.hub_url("a/b/c.json"), tmp_path / "c.json")

def test_offline_names_missing_files(hub_env, monkeypatch, tmp_path):
    sample.resolve_official(tmp_path, "8b")
    llm = tmp_path / sample.LLM_REPOS["8b"]
    (llm / "pytorch_model-00002-of-00002.bin").unlink()
    (tmp_path / sample.EVA_VIT_PATH).unlink()
    hub_env.log.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(sample.DownloadError) as e:
        sample.resolve_official(tmp_path, "8b")
    assert "HF_HUB_OFFLINE=1" in str(e.value) and "pytorch_model-00002-of-00002.bin" in str(e.value) \
        and sample.EVA_VIT_PATH in str(e.value)
    assert hub_env.log == []

def test_not_enough_space(hub_env, monkeypatch, tmp_path):
    monkeypatch.setattr(sample.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10, 10, 0))
    rel = f"{sample.TOKENIZER_REPO}/seed_quantizer.pt"
    with pytest.raises(sample.DownloadError, match="not enough disk space for q.pt"):
        sample.download(sample.hub_url(rel), tmp_path / "q.pt")

@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full to simulate a full disk")
def test_disk_full_while_writing(hub_env, tmp_path):
    (tmp_path / "q.pt.incomplete").symlink_to("/dev/full")  # every write fails with ENOSPC
    rel = f"{sample.TOKENIZER_REPO}/seed_quantizer.pt"
    with pytest.raises(sample.DownloadError, match="the disk is full"):
        sample.download(sample.hub_url(rel), tmp_path / "q.pt")

# ------------------------------------------------------------------------------------------------------
# Every task, end to end, in a subprocess on the CPU
# ------------------------------------------------------------------------------------------------------

# Random weights never close an image span on their own and ramble for the whole budget: constrain the spans, keep
# answers short and the decoder at 2 steps, so a run takes seconds.
FAST = ["--device", "cpu", "--constrained", "--max-new-tokens", "8", "--steps", "2"]

def run_sample(args: list[str], env: dict, stdin: str = "") -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(ROOT / "sample.py"), *args], env=env, input=stdin, text=True,
                          capture_output=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, f"sample.py {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc

def printed_codes(stdout: str) -> list[list[int]]:
    rows = [line.split(":", 1)[1].split() for line in stdout.splitlines() if " codes (" in line]
    return [[int(c) for c in row] for row in rows]

def check_all_tasks(stdout: str, out: Path, n_codes: int) -> None:
    for task in ("reconstruct", "caption", "vqa", "t2i", "edit", "chat"):
        assert f"[{task}]" in stdout, f"task {task} did not run"
    for name in ("reconstruct", "t2i", "edit", "chat_1"):
        with Image.open(out / f"{name}.png") as im:
            assert im.mode == "RGB" and im.width > 0
    codes = printed_codes(stdout)
    # input (reconstruct, caption, vqa, edit, chat), the negative, t2i, edit and chat outputs
    assert len(codes) >= 9 and all(len(c) == 32 and all(0 <= x < n_codes for x in c) for c in codes)

@pytest.fixture(scope="module")
def official_run(hub, tmp_path_factory):
    """`python sample.py --ckpt official` (every task) against the local hub, from an empty cache."""
    tmp = tmp_path_factory.mktemp("official")
    hub.log.clear()
    proc = run_sample(["--ckpt", "official", "--out", str(tmp / "out"), *FAST], hub.env(tmp / "cache"))
    return tmp, proc, list(hub.log)

@pytest.mark.slow
def test_official_every_task(official_run):
    tmp, proc, log = official_run
    check_all_tasks(proc.stdout, tmp / "out", n_codes=128)
    requested = [rel for rel, _ in log]
    assert len(requested) == len(set(requested)) and f"{sample.LLM_REPOS['8b']}/pytorch_model-00001-of-00002.bin" \
        in requested and not any("image_encoder" in r for r in requested)

@pytest.mark.slow
def test_official_chat_from_cache(official_run, hub, tmp_path):
    """The second run reads the cache only (no request at all) and holds a multi-turn chat from stdin."""
    cache = official_run[0] / "cache"
    test_picture_path = tmp_path / "in.png"
    sample.test_picture(64).save(test_picture_path)
    hub.log.clear()
    turns = f"/image {test_picture_path} What is this?\n/draw Draw it bigger.\nAnd now?\n/reset\nhello\n/quit\n"
    proc = run_sample(["--ckpt", "official", "--task", "chat", "--out", str(tmp_path / "out"), *FAST],
                      hub.env(cache), stdin=turns)
    assert hub.log == [], "a complete cache must not touch the network"
    assert proc.stdout.count("assistant:") == 4 and "(conversation cleared)" in proc.stdout
    assert (tmp_path / "out/chat_1.png").is_file()
    assert len(printed_codes(proc.stdout)) == 2  # the attached picture and the drawn one

def test_official_offline_run_names_missing(hub, tmp_path):
    env = hub.env(tmp_path / "empty", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--ckpt", "official", *FAST], env=env,
                          text=True, capture_output=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 1 and "HF_HUB_OFFLINE=1" in proc.stderr and "seed_quantizer.pt" in proc.stderr

def native_checkpoint(folder: Path) -> Path:
    """A checkpoint folder as train.py writes it, from tiny random models: seed/, llama/ (+ tokenizer), decoder/."""
    from llama import Llama, LlamaConfig
    from tokenizer import Tokenizer
    from seed import SeedConfig, SeedTokenizer
    from unet import DecoderConfig, UnCLIPDecoder

    torch.manual_seed(0)
    tokenizer = Tokenizer(FIXTURES / "llama")  # 640 pieces + 128 image codes + <img>, </img>
    seed_cfg = replace(SeedConfig.preset("tiny"), n_codes=tokenizer.image_vocab.n_codes)
    SeedTokenizer(seed_cfg).save_pretrained(folder / "seed")
    Llama(replace(LlamaConfig.preset("tiny"), vocab_size=len(tokenizer))).save_pretrained(folder / "llama",
                                                                           tokenizer=tokenizer)
    decoder_cfg = DecoderConfig.preset("tiny")
    assert decoder_cfg.embed_dim == seed_cfg.embed_dim
    UnCLIPDecoder(decoder_cfg).save_pretrained(folder / "decoder")
    return folder

@pytest.fixture(scope="module")
def native_ckpt(tmp_path_factory) -> Path:
    return native_checkpoint(tmp_path_factory.mktemp("native") / "ckpt")

@pytest.mark.slow
def test_native_checkpoint_every_task(native_ckpt, tmp_path):
    ckpt = native_ckpt
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # a native checkpoint never needs the network
    proc = run_sample(["--ckpt", str(ckpt), "--out", str(tmp_path / "out"), *FAST], env)
    check_all_tasks(proc.stdout, tmp_path / "out", n_codes=128)
    with Image.open(tmp_path / "out/reconstruct.png") as im:
        assert im.size == (32, 32)  # the tiny decoder draws in pixel space

@pytest.mark.slow
def test_train_py_checkpoint_every_task(tmp_path):
    """What `python train.py --tiny --smoke` writes is what `sample.py --ckpt PATH` reads."""
    subprocess.run([sys.executable, str(ROOT / "train.py"), "--tiny", "--smoke", "--out", str(tmp_path / "run")],
                   check=True, capture_output=True, timeout=600, cwd=ROOT)
    proc = run_sample(["--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "out"), *FAST, "--negative", "uncond"],
                      {**os.environ, "HF_HUB_OFFLINE": "1"})
    check_all_tasks(proc.stdout, tmp_path / "out", n_codes=sample.SeedLlama.from_pretrained(
        str(tmp_path / "run"), "cpu").image_vocab.n_codes)

def test_broken_span_is_reported_not_drawn():
    """An unconstrained model may write `<img>` + too few codes: the answer is shown as text, nothing is drawn."""
    from tokenizer import Tokenizer

    class Stub(sample.SeedLlama):
        def __init__(self):
            self.tokenizer = Tokenizer(FIXTURES / "llama")
            self.image_vocab = self.tokenizer.image_vocab

    pipe = Stub()
    vocab = pipe.image_vocab
    text, images, note = pipe.read([vocab.boi_id, vocab.code_offset + 3, vocab.eoi_id])
    assert images == [] and text == "" and "exactly 32 codes" in note and "exactly 32 codes" in note
    good = vocab.span_ids(list(range(32)))
    assert pipe.read(good) == ("<image>", [list(range(32))], None)

def test_native_checkpoint_missing_part(tmp_path):
    (tmp_path / "ckpt/seed").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="llama.*decoder"):
        sample.SeedLlama.from_pretrained(str(tmp_path / "ckpt"), "cpu")

# ------------------------------------------------------------------------------------------------------
# Host RAM while loading the reduced official set
# ------------------------------------------------------------------------------------------------------

RAM_PROBE = """
import sys, torch
sys.path.insert(0, {root!r})
import sample
def hwm():
    return int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) * 1024
before = hwm()
pipe = sample.SeedLlama.from_pretrained('official', 'cpu', torch.float32)
params = sum(p.numel() * p.element_size() for m in (pipe.seed, pipe.llm, pipe.decoder) for p in m.state_dict().values())
print(before, hwm(), params)
"""

def probe_ram(cache: Path, env: dict) -> tuple[int, int, int, int]:
    """(VmHWM after the imports, VmHWM after loading every model in fp32, bytes of the loaded state, bytes of the
    weight files) for `SeedLlama.from_pretrained('official')` on the cache, in a fresh process."""
    proc = subprocess.run([sys.executable, "-c", RAM_PROBE.format(root=str(ROOT))], env=env, text=True,
                          capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    before, peak, params = map(int, proc.stdout.split())
    files = sum(f.stat().st_size for f in cache.rglob("*") if f.suffix in (".pt", ".pth", ".bin", ".safetensors"))
    return before, peak, params, files

def write_official_llama(folder: Path, dim: int, n_layers: int, ffn: int, vocab: int = 770) -> None:
    """A random LLaMA in the released format: HF key names, fp16 `.bin` shards (one per layer half) + index."""
    torch.manual_seed(0)
    shapes = {"model.embed_tokens.weight": (vocab, dim), "model.norm.weight": (dim,), "lm_head.weight": (vocab, dim)}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        shapes.update({p + f"self_attn.{n}_proj.weight": (dim, dim) for n in "qkvo"})
        shapes.update({p + "mlp.gate_proj.weight": (ffn, dim), p + "mlp.up_proj.weight": (ffn, dim),
                       p + "mlp.down_proj.weight": (dim, ffn), p + "input_layernorm.weight": (dim,),
                       p + "post_attention_layernorm.weight": (dim,)})
    names = list(shapes)
    shards = [names[:len(names) // 2], names[len(names) // 2:]]
    weight_map = {}
    for k, keys in enumerate(shards):
        shard = f"pytorch_model-{k + 1:05d}-of-{len(shards):05d}.bin"
        torch.save({n: (torch.randn(shapes[n]) * 0.02).half() for n in keys}, folder / shard)
        weight_map.update({n: shard for n in keys})
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = json.loads((FIXTURES / "llama/config.seed_era_4.30.2.json").read_text())
    config.update(hidden_size=dim, num_hidden_layers=n_layers, intermediate_size=ffn, num_attention_heads=dim // 64,
                  num_key_value_heads=dim // 64, head_dim=64)
    (folder / "config.json").write_text(json.dumps(config))

@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="VmHWM needs Linux /proc")
def test_peak_host_ram_while_loading(official_run, hub, tmp_path, capsys):
    """Loading holds one copy of the weights: growing the LLM by ~100 MB (fp32) grows the peak by about as much.

    On the reduced set alone the weights (~3 MB) are lost in the fixed cost of the first load (allocator arenas,
    lazily imported code, ~80 MB), so the test loads it twice: as built, and with a 26M-parameter LLaMA in its
    place (fp16 `.bin` shards, loaded in fp32), and compares the two peaks."""
    small_cache = official_run[0] / "cache"
    s_before, s_peak, s_params, s_files = probe_ram(small_cache, hub.env(small_cache, HF_HUB_OFFLINE="1"))
    big_cache = tmp_path / "cache"
    shutil.copytree(small_cache, big_cache)
    llm = big_cache / sample.LLM_REPOS["8b"]
    for f in llm.glob("pytorch_model*"):
        f.unlink()
    write_official_llama(llm, dim=512, n_layers=8, ffn=1408)
    b_before, b_peak, b_params, b_files = probe_ram(big_cache, hub.env(big_cache, HF_HUB_OFFLINE="1"))
    grown = b_params - s_params
    with capsys.disabled():
        for name, (before, peak, params, files) in {"reduced set": (s_before, s_peak, s_params, s_files),
                                                    "with a 26M LLaMA": (b_before, b_peak, b_params, b_files)}.items():
            print(f"\n[ram] {name}: weight files {files / 2**20:.1f} MiB, loaded fp32 state {params / 2**20:.1f} "
                  f"MiB, VmHWM after imports {before / 2**20:.1f} MiB, after loading {peak / 2**20:.1f} MiB "
                  f"(+{(peak - before) / 2**20:.1f} MiB)")
    # One more copy of the grown weights (or a whole fp16 shard kept alive) would add >= 0.5 x grown on top.
    assert (b_peak - b_before) - (s_peak - s_before) < 1.35 * grown

# ------------------------------------------------------------------------------------------------------
# The CLI and the pipeline object, in process
# ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--image", "no/such.png"], "--image no/such.png: no such file"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--steps", "0"], "not available here|--steps"),
    (["--top-p", "0"], r"--top-p must be a number in \(0, 1\], got 0.0"),
    (["--task", "chat", "--image", __file__], "attach pictures with '/image PATH'"),
])
def test_bad_arguments_fail_before_loading(argv, message, capsys, tmp_path):
    assert sample.main(["--ckpt", str(tmp_path / "nothing"), "--out", str(tmp_path / "out"), *argv]) == 2
    assert re.search(message, capsys.readouterr().err)

def test_14b_comes_from_its_own_repo(hub_env, tmp_path):
    with pytest.raises(sample.DownloadError, match="seed-llama-14b-sft/resolve/main/pytorch_model.bin.index.json"):
        sample.resolve_official(tmp_path, "14b")

def test_low_vram_pipeline_and_chat_history(native_ckpt, tmp_path):
    """--low-vram moves each model to the device only while it runs (here cpu -> cpu: the code path); a chat keeps
    the drawn image as codes in its history, and the next prompt holds exactly those codes."""
    pipe = sample.SeedLlama.from_pretrained(str(native_ckpt), "cpu", torch.float32, low_vram=True)
    assert pipe.low_vram and pipe.template == "8B"
    settings = sample.Settings(max_new_tokens=4, constrained=True, steps=1, negative=False)
    chat = sample.Chat(pipe, settings, tmp_path)
    chat.turn("look", image=sample.test_picture(64))
    chat.turn("draw", draw=True)
    assert len(chat.images) == 2 and len(chat.messages) == 4 and (tmp_path / "chat_1.png").is_file()
    drawn = pipe.image_vocab.span_ids(chat.images[1])  # <img> + 32 code ids + </img>
    prompt = chat.prompt("again", [])
    assert any(prompt[i:i + len(drawn)] == drawn for i in range(len(prompt))), "the drawn codes left the history"

def test_weights_folder_used_as_is(hub, monkeypatch):
    """`--weights DIR` with a complete copy in the hub layout: nothing fetched, even offline."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    files = sample.resolve_official(sample.weights_root(str(hub.root)), "8b")
    assert files.llm == hub.root / sample.LLM_REPOS["8b"] and files.vit == hub.root / sample.EVA_VIT_PATH

def test_text_stream_prints_the_answer_once(capsys):
    """Streamed pieces add up to the decoded answer, multi-byte characters included, and stop at an image."""
    from tokenizer import Tokenizer

    tok = Tokenizer(FIXTURES / "llama")
    ids = tok.encode("a café ☃ and 12 dogs") + tok.image_vocab.span_ids([5] * 32) + tok.encode("done")
    stream = sample.TextStream(tok, tok.image_vocab.boi_id)
    text = tok.encode("a café ☃ and 12 dogs")
    for i in ids:
        stream(0, i)
        if len(stream.ids) == len(text) and stream.open:
            assert capsys.readouterr().out == "a café ☃ and 12 dogs", "the text is shown as it comes"
    answer = tok.decode_with_images(ids)[0].replace("<image>", "[image]").strip()
    stream.finish(answer)
    assert capsys.readouterr().out == answer[len("a café ☃ and 12 dogs"):] + "\n" and answer.endswith("[image]done")

class _Recorder:
    """Stands in for a model's call: records the keyword arguments, then calls the model."""

    def __init__(self, call):
        self.call, self.kwargs = call, []

    def __getattr__(self, name):  # the model's other attributes (the decoder's unet)
        return getattr(self.call, name)

    def __call__(self, *args, **kwargs):
        self.kwargs.append(kwargs)
        return self.call(*args, **kwargs)

def test_llm_cfg_and_sampler_options_reach_the_models(native_ckpt, tmp_path, monkeypatch):
    """--llm-cfg guides the LLM's image codes against the template around an empty request (t2i, edit, /draw; never
    the negative image's codes), --sampler picks the decoder's sampler; both change what comes out."""
    pipe = sample.SeedLlama.from_pretrained(str(native_ckpt), "cpu", torch.float32)
    llm, decoder = _Recorder(pipe.llm.generate), _Recorder(pipe.decoder)
    pipe.llm.generate, pipe.decoder = llm, decoder
    monkeypatch.setattr(sample.SeedLlama, "from_pretrained", lambda *args, **kwargs: pipe)
    argv = ["--ckpt", "tiny", "--out", str(tmp_path), "--device", "cpu", "--constrained", "--max-new-tokens", "8",
            "--steps", "2", "--negative", "none", "--llm-cfg", "3", "--sampler", "ddim"]
    for task in ("t2i", "edit"):
        assert sample.main([*argv, "--task", task]) == 0
    assert [(kwargs["guidance_scale"], kwargs["uncond_prompt"]) for kwargs in llm.kwargs] == \
        [(3.0, pipe.tokenizer.encode_chat([""], "8B"))] * 2
    assert [kwargs["sampler"] for kwargs in decoder.kwargs] == ["ddim"] * 2
    settings = sample.Settings(max_new_tokens=8, constrained=True, steps=2, negative=False)
    pipe.negative_codes(replace(settings, llm_guidance=3.0, negative=True))
    assert llm.kwargs[-1]["guidance_scale"] == 1.0 and llm.kwargs[-1]["uncond_prompt"] is None

    prompt = pipe.tokenizer.encode_chat(["draw"], "8B")
    plain = pipe.generate(prompt, settings, force_image=True)
    assert pipe.generate(prompt, replace(settings, llm_guidance=3.0), force_image=True) != plain
    assert pipe.generate(prompt, replace(settings, llm_guidance=3.0)) == pipe.generate(prompt, settings), \
        "a text answer is not guided"
    codes = pipe.read(plain)[1][0]
    pndm, ddim = (np.asarray(pipe.draw(codes, replace(settings, sampler=name))) for name in ("pndm", "ddim"))
    assert pndm.shape == ddim.shape and (pndm != ddim).any()

def test_generation_defaults_are_the_official_ones_once():
    """Settings and the CLI take the LLM's defaults from llama.GenerationConfig (the official scripts' values)."""
    from llama import GenerationConfig

    official, args = GenerationConfig(), sample.build_parser().parse_args(["--ckpt", "x"])
    assert sample.settings_given(args) == {}, "a flag not given leaves the checkpoint's own value"
    settings = sample.Settings()
    assert (settings.temperature, settings.top_p, settings.top_k, settings.max_new_tokens, settings.llm_guidance) \
        == (official.temperature, official.top_p, official.top_k, official.max_new_tokens, official.guidance_scale)
    assert settings == sample.Settings() and settings.sampler == "pndm"
    assert "default 512" in sample.build_parser().format_help().replace("\n", " ").replace("  ", " ")
    with pytest.raises(SystemExit):  # an abbreviation is not taken for the flag it starts
        sample.build_parser().parse_args(["--ckpt", "x", "--temp", "0.5"])

def test_api_on_the_reduced_official_release(hub, monkeypatch):
    """SeedLlama.from_pretrained("official") on a complete copy in the hub layout (read as it is, no network): every
    API call returns its plain value, and an image given as a path, a PIL image or its codes is the same image."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = sample.SeedLlama.from_pretrained("official", "cpu", torch.float32, weights=str(hub.root))
    assert pipe.settings == sample.Settings() and pipe.prompts == sample.OFFICIAL_PROMPTS and pipe.template == "8B"
    fast = dict(max_new_tokens=4, constrained=True, steps=1, negative=False)
    picture = sample.test_picture(64)
    codes = pipe.codes(picture)
    assert isinstance(pipe.caption(picture, **fast), str) and isinstance(pipe.answer(codes, "What?", **fast), str)
    drawn, drawn_codes = pipe.text_to_image("a dog", return_codes=True, **fast)
    assert isinstance(drawn, Image.Image) and len(drawn_codes) == 32
    assert isinstance(pipe.edit(codes, "snow", **fast), Image.Image)
    again = pipe.reconstruct(codes, **fast)
    assert np.array_equal(np.asarray(again), np.asarray(pipe.reconstruct(picture, **fast)))
    text, pictures = pipe.chat(**fast).turn("draw", draw=True)
    assert text == "[image]" and len(pictures) == 1
