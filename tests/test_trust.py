"""Trust (fast tier): nothing read from a file or a server escapes its folder or poisons the cache, a run is never
mixed or silently replaced, values are checked where they enter, and weights the user already has are reused.

The downloader cases run against a small `http.server` on 127.0.0.1 started here, whose answers each test sets: an
HTML page with status 200, a file that changes between two requests, a trickle of one byte at a time, a redirect to
another host, a repository commit header. The hub-cache case lays the reduced release of tests/fixtures/ out as
huggingface_hub does (blobs/ + snapshots/REV/ links + refs/main) and runs sample.py on it with no network.
"""
import hashlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import llama
import sample
import seed
import train
import unet
import weights

ROOT = Path(__file__).resolve().parent.parent
TINY_RUN = ["--tiny", "--smoke", "--threads", "1", "--stages", "0"]

# ---- a server whose every answer the test sets ---------------------------------------------------------------------
class Server(http.server.ThreadingHTTPServer):
    """Serves `files[path]` (bytes) with Range / If-Range, a sha256 ETag on weight files; `html` paths answer an
    HTML page with status 200, `trickle` paths one byte per `trickle` seconds, `redirect[path]` = URL to send to,
    `headers[path]` extra headers. `log` = (method, path, request headers) of every request."""
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files, self.html, self.trickle, self.redirect, self.headers, self.log = {}, set(), {}, {}, {}, []

    def handle_error(self, request, client_address):
        pass  # a client that gives up on a trickle is part of the tests

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def gets(self) -> list[str]:
        return [path for method, path, _ in self.log if method == "GET"]

class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self.do_GET(body=False)

    def do_GET(self, body: bool = True):
        srv: Server = self.server
        path = self.path.split("?")[0]
        srv.log.append((self.command, path, dict(self.headers)))
        if path in srv.redirect:
            self.send_response(302)
            self.send_header("Location", srv.redirect[path])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if path in srv.html:
            page = b"<!DOCTYPE html><html><body>Please log in</body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page if body else b"")
            return
        if path not in srv.files:
            self.send_error(404)
            return
        data = srv.files[path]
        etag = f'"{hashlib.sha256(data).hexdigest()}"'
        start = 0
        ranged = self.headers.get("Range") and self.headers.get("If-Range", etag) == etag
        if ranged:
            start = int(self.headers["Range"].removeprefix("bytes=").split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        if Path(path).suffix in sample.WEIGHT_SUFFIXES and path not in srv.headers.get("no-etag", ()):
            self.send_header("ETag", etag)
        for key, value in srv.headers.get(path, {}).items():
            self.send_header(key, value)
        self.end_headers()
        if not body:
            return
        if path in srv.trickle:
            for i in range(start, len(data)):
                self.wfile.write(data[i:i + 1])
                self.wfile.flush()
                time.sleep(srv.trickle[path])
            return
        self.wfile.write(data[start:])

@pytest.fixture
def server(monkeypatch):
    srv = Server()
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", srv.url)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    yield srv
    srv.shutdown()
    srv.server_close()

def safetensors_bytes(tmp_path: Path, **tensors) -> bytes:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "t.safetensors"))
    return (tmp_path / "t.safetensors").read_bytes()

def url_path(rel: str) -> str:
    return sample.hub_url(rel).removeprefix(sample.endpoint())

# ---- paths from a file or a server stay inside their folder ------------------------------------------------------
@pytest.mark.parametrize("name", ["../../outside.bin", "/etc/passwd", "sub/../../x.bin", "link/x.bin"])
def test_index_entries_that_leave_the_folder_are_refused(tmp_path, name):
    (tmp_path / "outside").mkdir()
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "link").symlink_to(tmp_path / "outside")  # inside by name, outside once resolved
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": name}}))
    with pytest.raises(ValueError, match="lies outside"):
        weights.find_weights(folder, ["model.safetensors.index.json"])

def test_a_hub_snapshot_may_link_into_its_blobs(tmp_path):
    snapshot = tmp_path / "models--a--b" / "snapshots" / ("0" * 40)
    (tmp_path / "models--a--b" / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (tmp_path / "models--a--b" / "blobs" / "abc").write_bytes(b"x")
    (snapshot / "w.bin").symlink_to("../../blobs/abc")
    assert weights.inside(snapshot, "w.bin", "index") == snapshot / "w.bin"

def test_a_servers_index_cannot_write_outside_the_cache(server, tmp_path):
    llm = sample.LLM_REPOS["8b"]
    index = {"weight_map": {"a": "../../../../x/.bashrc"}}
    server.files[url_path(f"{llm}/{sample.LLM_INDEX_FILES[0]}")] = json.dumps(index).encode()
    with pytest.raises(ValueError, match=r"\.bashrc.*lies outside"):
        sample.resolve_official(tmp_path / "cache", "8b")
    assert not [p for p in server.gets() if "bashrc" in p], "the entry was requested"
    assert not (tmp_path / "x").exists() and not list(tmp_path.rglob(".bashrc"))

# ---- the cache holds only verified files --------------------------------------------------------------------------
def test_an_html_page_with_status_200_is_never_cached(server, tmp_path):
    rel = f"{sample.LLM_REPOS['8b']}/{sample.LLM_INDEX_FILES[0]}"
    server.html.add(url_path(rel))
    with pytest.raises(sample.DownloadError, match=f"{sample.LLM_INDEX_FILES[0]} answered with an HTML page"):
        sample.resolve_official(tmp_path, "8b")
    assert not (tmp_path / rel).exists()
    # the same page sent as a binary file (its own sha256 ETag matches): the format check refuses it
    server.files["/a/b/resolve/main/shard.bin"] = b"\n <!DOCTYPE html><html>Please log in</html>"
    with pytest.raises(sample.DownloadError, match="shard.bin arrived corrupt \\(an HTML page"):
        sample.download(sample.hub_url("a/b/shard.bin"), tmp_path / "shard.bin")
    assert not (tmp_path / "shard.bin").exists()

def test_two_processes_one_file_one_download(server, tmp_path):
    server.files["/a/b/resolve/main/w.safetensors"] = safetensors_bytes(tmp_path, w=torch.arange(6.0))
    server.trickle["/a/b/resolve/main/w.safetensors"] = 0.0005
    dest = tmp_path / "cache" / "w.safetensors"
    errors = []

    def fetch():
        try:
            sample.download(sample.hub_url("a/b/w.safetensors"), dest)
        except Exception as e:  # noqa: BLE001 -- reported by the assertion below
            errors.append(e)
    threads = [threading.Thread(target=fetch) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert dest.read_bytes() == server.files["/a/b/resolve/main/w.safetensors"]
    assert server.gets().count("/a/b/resolve/main/w.safetensors") == 1, "the second writer waited and reused it"
    assert not list(dest.parent.glob("*.incomplete*"))

def test_the_published_hash_applies_at_any_size_on_the_official_hub(server, monkeypatch, tmp_path):
    monkeypatch.setattr(sample, "OFFICIAL_ENDPOINT", server.url)
    rel = f"{sample.TOKENIZER_REPO}/tokenizer.model"
    server.files[url_path(rel)] = b"\x0a" + os.urandom(100)  # the server's own ETag matches; the published one not
    with pytest.raises(sample.DownloadError, match="SHA-256 differs from the expected " + sample.KNOWN_FILES[rel][1]):
        sample.download(sample.hub_url(rel), tmp_path / "tokenizer.model", known=sample.KNOWN_FILES[rel])
    assert not (tmp_path / "tokenizer.model").exists()

def test_a_weight_file_without_any_hash_is_refused(server, tmp_path, capsys):
    server.files["/a/b/resolve/main/w.safetensors"] = safetensors_bytes(tmp_path, w=torch.ones(2))
    server.headers["no-etag"] = {"/a/b/resolve/main/w.safetensors"}
    with pytest.raises(sample.DownloadError, match="no SHA-256"):
        sample.download(sample.hub_url("a/b/w.safetensors"), tmp_path / "w.safetensors")
    assert (tmp_path / "w.safetensors.corrupt").exists() and not (tmp_path / "w.safetensors").exists()
    # LAVIS's bucket (not the hub) publishes no SHA-256: size and format are what is left to check, and said so
    bucket = f"http://localhost:{server.server_address[1]}/a/b/resolve/main/w.safetensors"
    sample.download(bucket, tmp_path / "eva.safetensors")
    assert "comes with no hash" in capsys.readouterr().err

def test_a_file_that_is_not_its_format_is_refused(server, tmp_path):
    server.files["/a/b/resolve/main/w.safetensors"] = b"\x10\x00\x00\x00\x00\x00\x00\x00not json, not weights"
    with pytest.raises(sample.DownloadError, match="not a safetensors file"):
        sample.download(sample.hub_url("a/b/w.safetensors"), tmp_path / "w.safetensors")

def test_a_resume_of_a_changed_file_restarts_it(server, tmp_path):
    old, new = b"PK\x03\x04" + b"o" * 5000, safetensors_bytes(tmp_path, w=torch.arange(100.0))
    path, dest = "/a/b/resolve/main/w.safetensors", tmp_path / "w.safetensors"
    (tmp_path / "w.safetensors.incomplete").write_bytes(old[:2000])  # an earlier run's part of the old version
    (tmp_path / "w.safetensors.incomplete.etag").write_text(f'"{hashlib.sha256(old).hexdigest()}"')
    server.files[path] = new
    sample.download(sample.hub_url("a/b/w.safetensors"), dest)
    assert dest.read_bytes() == new, "two versions were stitched"
    assert server.log[0][2].get("If-Range") == f'"{hashlib.sha256(old).hexdigest()}"'

def test_a_trickling_server_times_out_with_a_clear_message(server, monkeypatch, tmp_path):
    monkeypatch.setattr(sample, "STALL", (1 << 16, 0.5))
    server.files["/a/b/resolve/main/w.safetensors"] = safetensors_bytes(tmp_path, w=torch.ones(64))
    server.trickle["/a/b/resolve/main/w.safetensors"] = 0.05
    t0 = time.monotonic()
    with pytest.raises(sample.DownloadError, match=r"stalled.*Run again to resume"):
        sample.download(sample.hub_url("a/b/w.safetensors"), tmp_path / "w.safetensors", retries=0)
    assert time.monotonic() - t0 < 10

def test_a_silent_server_times_out(monkeypatch, tmp_path):
    import socket
    quiet = socket.socket()
    quiet.bind(("127.0.0.1", 0))
    quiet.listen(1)  # accepts the connection (the kernel does) and never answers
    monkeypatch.setattr(sample, "TIMEOUT_S", 0.5)
    try:
        with pytest.raises(sample.DownloadError, match="time-out"):
            sample.download(f"http://127.0.0.1:{quiet.getsockname()[1]}/x.json", tmp_path / "x.json", retries=0)
    finally:
        quiet.close()

def test_a_cached_file_that_fails_to_parse_is_moved_aside(server, tmp_path, capsys):
    rel = "a/b/config.json"
    (tmp_path / rel).parent.mkdir(parents=True)
    (tmp_path / rel).write_text("<html>proxy error</html>")
    server.files[url_path(rel)] = b'{"ok": 1}'
    sample.fetch_files(tmp_path, [rel])
    assert json.loads((tmp_path / rel).read_text()) == {"ok": 1}
    assert (tmp_path / f"{rel}.corrupt").read_text() == "<html>proxy error</html>"
    assert "config.json.corrupt" in capsys.readouterr().err

def test_the_token_goes_to_the_hub_only(server, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    other = f"http://localhost:{server.server_address[1]}/cdn/w.json"  # another host name: the CDN
    server.redirect["/a/b/resolve/main/w.json"] = other
    server.files["/cdn/w.json"] = b"{}"
    sample.download(sample.hub_url("a/b/w.json"), tmp_path / "w.json")
    sent = {path: headers.get("Authorization") for _, path, headers in server.log}
    assert sent == {"/a/b/resolve/main/w.json": "Bearer hf_secret", "/cdn/w.json": None}

def test_free_space_for_the_whole_download_is_checked_first(server, monkeypatch, tmp_path):
    for name in ("x.json", "y.json"):
        server.files[f"/a/b/resolve/main/{name}"] = b"{}" * 100
    monkeypatch.setattr(sample.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10, 10, 300))
    with pytest.raises(sample.DownloadError, match="not enough disk space for the 2 missing files.*400 B more"):
        sample.fetch_files(tmp_path, ["a/b/x.json", "a/b/y.json"])
    assert server.gets() == [], "nothing is downloaded before the space is known to suffice"

def test_a_repository_is_read_at_one_commit(server, tmp_path):
    commit = "c" * 40
    server.files["/a/b/resolve/main/x.json"] = b"{}"
    server.headers["/a/b/resolve/main/x.json"] = {"X-Repo-Commit": commit}
    server.files[f"/a/b/resolve/{commit}/y.json"] = b"{}"
    sample.fetch_files(tmp_path, ["a/b/x.json"])
    sample.fetch_files(tmp_path, ["a/b/y.json"])
    assert server.gets() == ["/a/b/resolve/main/x.json", f"/a/b/resolve/{commit}/y.json"]

# ---- weights where the user already has them: the HF hub cache and the torch hub cache ----------------------------
def hf_cache_layout(release: Path, cache: Path, torch_home: Path) -> None:
    """`release` (the hub layout of tests/test_sample.build_hub) as huggingface_hub stores it: every file a link
    from snapshots/REV/ into blobs/<sha256>; eva_vit_g.pth in the torch hub cache."""
    for repo in (sample.TOKENIZER_REPO, sample.LLM_REPOS["8b"], sample.UNCLIP_REPO):
        folder, rev = cache / f"models--{repo.replace('/', '--')}", hashlib.sha1(repo.encode()).hexdigest()
        (folder / "refs").mkdir(parents=True)
        (folder / "refs" / "main").write_text(rev)
        for src in (release / repo).rglob("*"):
            if src.is_file():
                blob = folder / "blobs" / hashlib.sha256(src.read_bytes()).hexdigest()
                blob.parent.mkdir(exist_ok=True)
                shutil.copyfile(src, blob)
                link = folder / "snapshots" / rev / src.relative_to(release / repo)
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(os.path.relpath(blob, link.parent))
    (torch_home / "hub" / "checkpoints").mkdir(parents=True)
    shutil.copyfile(release / sample.EVA_VIT_PATH, torch_home / "hub" / "checkpoints" / "eva_vit_g.pth")

@pytest.fixture
def hf_cached(tmp_path, monkeypatch) -> tuple[Path, Path, dict]:
    """The reduced release in an HF hub cache (HF_HOME) and the torch hub cache (TORCH_HOME), no network reachable:
    (the seed cache root, which must stay empty; the HF_HOME folder; the environment)."""
    from test_sample import build_hub  # the reduced release in the hub layout
    hf_cache_layout(build_hub(tmp_path / "release"), tmp_path / "hf" / "hub", tmp_path / "torch")
    env = {"HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "torch"), "SEED_CACHE": str(tmp_path / "c"),
           "HF_ENDPOINT": "http://127.0.0.1:9", "SEED_EVA_VIT_URL": "http://127.0.0.1:9/eva"}  # the discard port
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return tmp_path / "c", tmp_path / "hf", env

def snapshot_of(folder: Path) -> list:
    return sorted((str(p), p.is_symlink(), p.lstat().st_mtime_ns) for p in folder.rglob("*"))

def test_official_weights_are_read_in_place_from_the_hf_and_torch_caches(hf_cached):
    root, hf, _ = hf_cached
    before = snapshot_of(hf)
    files = sample.resolve_official(root, "8b")  # the network is unreachable: it must not be needed
    assert files.llm.parent.name == "snapshots" and files.llm.is_relative_to(hf)
    assert files.unclip.is_relative_to(hf) and files.tokenizer.is_relative_to(hf)
    assert files.vit.parent.name == "checkpoints"
    assert not root.exists() or not [p for p in root.rglob("*") if p.is_file()], "a second copy was written"
    assert snapshot_of(hf) == before, "the HF cache is read only"

@pytest.mark.slow
def test_sample_py_official_from_the_hf_and_torch_caches_with_no_network(hf_cached, tmp_path):
    root, hf, env = hf_cached
    before = snapshot_of(hf)
    proc = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--ckpt", "official", "--task", "reconstruct",
                           "--device", "cpu", "--steps", "2", "--out", str(tmp_path / "out")],
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not root.exists() or not [p for p in root.rglob("*") if p.is_file()], "a second copy was written"
    assert snapshot_of(hf) == before

# ---- values are checked where they enter --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_seed(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("seed")
    torch.manual_seed(0)
    seed.SeedTokenizer(seed.SeedConfig.preset("tiny")).save_pretrained(folder)
    return folder

def copy_with(folder: Path, dest: Path, change) -> Path:
    shutil.copytree(folder, dest)
    state = load_file(str(dest / "model.safetensors"))
    change(state)
    save_file(state, str(dest / "model.safetensors"))
    return dest

def test_an_integer_tensor_for_a_float_weight_is_refused(tiny_seed, tmp_path):
    key = "quantize.embedding.weight"
    bad = copy_with(tiny_seed, tmp_path / "s", lambda s: s.update({key: s[key].round().to(torch.int32)}))
    with pytest.raises(ValueError, match=rf"model.safetensors: integer tensors .*{key} \(torch.int32\)"):
        seed.SeedTokenizer.from_pretrained(bad)

def test_nan_weights_are_refused(tiny_seed, tmp_path):
    key = "quantize.embedding.weight"
    bad = copy_with(tiny_seed, tmp_path / "s", lambda s: s[key].view(-1)[3].fill_(float("nan")))
    with pytest.raises(ValueError, match=rf"model.safetensors: tensor {key} holds NaN"):
        seed.SeedTokenizer.from_pretrained(bad)

def edit_config(folder: Path, dest: Path, part: str | None, **values) -> Path:
    shutil.copytree(folder, dest)
    config = json.loads((dest / "config.json").read_text())
    (config[part] if part else config).update(values)
    (dest / "config.json").write_text(json.dumps(config))
    return dest

@pytest.mark.parametrize("values, field", [({"image_size": 1e9}, "image_size"), ({"vit_heads": 0}, "vit_heads"),
                                           ({"n_codes": "256"}, "n_codes")])
def test_seed_config_values_are_bounded(tiny_seed, tmp_path, values, field):
    with pytest.raises(ValueError, match=rf"config.json: config values out of range: {field}="):
        seed.SeedTokenizer.from_pretrained(edit_config(tiny_seed, tmp_path / "s", None, **values))

@pytest.mark.parametrize("values, field", [({"max_position_embeddings": 10 ** 12}, "max_position_embeddings"),
                                           ({"rope_theta": 0.0}, "rope_theta"), ({"rope_theta": -1}, "rope_theta"),
                                           ({"num_attention_heads": 0}, "num_attention_heads"),
                                           ({"rms_norm_eps": float("nan")}, "rms_norm_eps")])
def test_official_llama_config_values_are_bounded(fixtures, tmp_path, values, field):
    folder = tmp_path / "llm"
    shutil.copytree(fixtures / "llama", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **values}))
    with pytest.raises(ValueError, match=rf"{folder / 'config.json'}: config values out of range: {field}="):
        llama.Llama.from_official(folder)

def test_decoder_config_values_are_bounded(tmp_path):
    unet.UnCLIPDecoder(unet.DecoderConfig.preset("tiny")).save_pretrained(tmp_path / "d")
    bad = edit_config(tmp_path / "d", tmp_path / "bad", "unet", sample_size=10 ** 6)
    with pytest.raises(ValueError, match=r"config.json \(unet\): config values out of range: sample_size=1000000"):
        unet.UnCLIPDecoder.from_pretrained(bad)

def test_check_config_names_every_bad_field():
    limits = {"a": (1, 10), "b": (1e-6, 1.0), "c": (1, 4)}
    weights.check_config({"a": 5, "b": 0.5, "c": [1, 2]}, limits, "f.json")
    with pytest.raises(ValueError, match=r"f.json: .*a=True .*b=inf .*c=\[1, 9\]"):
        weights.check_config({"a": True, "b": float("inf"), "c": [1, 9]}, limits, "f.json")

# ---- a run is one run ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stage0_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "out"
    train.main(TINY_RUN + ["--out", str(out)])
    return out

def run_copy(stage0_run: Path, tmp_path: Path) -> Path:
    shutil.copytree(stage0_run, tmp_path / "out")
    return tmp_path / "out"

def test_a_second_run_into_a_used_folder_is_refused(stage0_run, tmp_path):
    out = run_copy(stage0_run, tmp_path)
    with pytest.raises(SystemExit, match="is not empty.*--resume.*--overwrite"):
        train.main(TINY_RUN + ["--out", str(out)])

def test_overwrite_starts_a_new_run(stage0_run, tmp_path):
    out = run_copy(stage0_run, tmp_path)
    old = json.loads((out / train.RUN_FILE).read_text())["id"]
    train.main(TINY_RUN + ["--out", str(out), "--overwrite"])
    new = json.loads((out / train.RUN_FILE).read_text())["id"]
    assert new != old and torch.load(out / "ckpt" / "clip.pt", weights_only=True)["run"]["id"] == new
    with pytest.raises(SystemExit, match=rf"stage 0 \(clip\) .*belongs to run {new}, not to this run"):
        train.main(["--tiny", "--smoke", "--threads", "1", "--stages", "1", "--out", str(out), "--overwrite"])

@pytest.mark.parametrize("flags, named", [(["--seed", "1"], "--seed 0 (now 1)"),
                                          (["--no-causal"], "--no-causal False (now True)"),
                                          (["--clip.steps", "5"], "--clip.steps 3 (now 5)")])
def test_resume_with_other_weight_flags_is_refused(stage0_run, tmp_path, flags, named):
    out = run_copy(stage0_run, tmp_path)
    with pytest.raises(SystemExit, match=named.replace("(", r"\(").replace(")", r"\)")):
        train.main(TINY_RUN + ["--out", str(out), "--resume", *flags])

def test_resume_of_the_same_run_keeps_its_id(stage0_run, tmp_path):
    out = run_copy(stage0_run, tmp_path)
    run = train.main(TINY_RUN + ["--out", str(out), "--resume", "--device", "cpu"])  # where it runs is no weight flag
    assert run.run_id == json.loads((stage0_run / train.RUN_FILE).read_text())["id"]

def test_one_train_py_per_folder(stage0_run, tmp_path):
    out = run_copy(stage0_run, tmp_path)
    held = weights.lock(out / train.LOCK_FILE, wait=False)  # another train.py, still running
    try:
        with pytest.raises(SystemExit, match="another train.py is writing into it"):
            train.main(TINY_RUN + ["--out", str(out), "--resume"])
    finally:
        held.close()

def test_checkpoints_and_components_record_the_run(stage0_run, tmp_path):
    recorded = json.loads((stage0_run / train.RUN_FILE).read_text())
    assert torch.load(stage0_run / "ckpt" / "clip.pt", weights_only=True)["run"] == recorded
    assert recorded["config"]["seed"] == 0 and "device" not in recorded["config"]
    run = types.SimpleNamespace(main=True, out=tmp_path, record=recorded, barrier=lambda: None)
    train.Run.save_pretrained(run, seed.SeedTokenizer(seed.SeedConfig.preset("tiny")), "seed")
    assert weights.run_record(tmp_path / "seed" / "config.json") == recorded
    seed.SeedTokenizer.from_pretrained(tmp_path / "seed")  # the record is no config field

def test_components_record_their_run_and_a_mixed_folder_is_refused(tmp_path):
    for name, run_id in (("seed", "r1"), ("llama", "r1"), ("decoder", "r2")):
        weights.write_json(tmp_path / name / "config.json", {weights.RUN_KEY: {"id": run_id, "config": {}}})
    with pytest.raises(ValueError, match="mixes components of different train.py runs.*decoder/ of run r2"):
        sample.check_one_run(tmp_path)
    weights.write_json(tmp_path / "decoder" / "config.json", {weights.RUN_KEY: {"id": "r1", "config": {}}})
    sample.check_one_run(tmp_path)
