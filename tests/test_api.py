"""sample.py as a library and as a CLI that explains itself: SeedLlama on a `train.py --smoke` run folder and its
generation_config.json, the chat's robustness (a bad turn, `<image>` written by the model, invalid UTF-8, Ctrl-C,
the end of input, the commands), bad pictures and numbers refused with one line naming them, train.py's --help and
its closing summary. The API on the reduced official release is in test_sample.py, beside the local hub."""
import io
import json
import os
import re
import stat
import subprocess
import sys
import types
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import sample
import train
import world

ROOT = Path(__file__).resolve().parent.parent

def bomb_png(path: Path, side: int = 20000) -> Path:
    """A PNG of a few KB that declares side x side pixels (a decompression bomb): a header and a short zlib stream."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = zlib.compress(b"\x00" * (side * 3 + 1) * 20, 9)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)) +
                     chunk(b"IDAT", rows) + chunk(b"IEND", b""))
    return path

@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> tuple[Path, str]:
    """`train.py --tiny --smoke` under a umask that hides new files from other users: (its folder, its stdout)."""
    out = tmp_path_factory.mktemp("api") / "run"
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--tiny", "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT, preexec_fn=lambda: os.umask(0o077))
    assert proc.returncode == 0, proc.stderr
    return out, proc.stdout

@pytest.fixture(scope="module")
def pipe(run_folder) -> sample.SeedLlama:
    return sample.SeedLlama.from_pretrained(run_folder[0], "cpu")

# ------------------------------------------------------------------------------------------------------
# The checkpoint's own defaults, and the API on them
# ------------------------------------------------------------------------------------------------------

def test_train_py_writes_its_defaults_and_a_summary(run_folder):
    out, stdout = run_folder
    config = json.loads((out / sample.GENERATION_CONFIG).read_text())
    smoke = train.apply_smoke(train.TrainConfig())
    assert config["settings"]["steps"] == smoke.decoder.sample_steps and config["settings"]["temperature"] == 0
    assert config["prompts"]["caption"] == world.CAPTION_REQUESTS[0] and config["demo"] == train.DEMO["image"].caption
    assert re.search(r"^\d+ of 10 targets met$", stdout, re.M) and f"next: python sample.py --ckpt {out}" in stdout
    assert "generation_config.json" in stdout and "seed/" in stdout


def test_checkpoint_files_are_readable_by_other_users(run_folder):
    """weights.atomic_write and Tokenizer.save give every checkpoint, weight and tokenizer file mode 0644, whatever
    the umask (their temporary files are made by mkstemp, mode 0600)."""
    out = run_folder[0]
    written = [*(out / "ckpt").glob("*.pt"), *out.glob("*/model.safetensors"), *out.glob("*/*.json"),
               out / "llama/tokenizer.model"]
    assert len(written) >= 14
    for path in written:
        assert stat.S_IMODE(path.stat().st_mode) & 0o044 == 0o044, f"{path} is not readable by others"

def test_generation_config_round_trip(tmp_path):
    """What train.py writes is what sample.py reads: the settings, the prompts, the demo picture (a test image)."""
    run = types.SimpleNamespace(cfg=train.TrainConfig(), world=world.build_world(), out=tmp_path)
    assert train.write_generation_config(run) == ["generation_config.json", "demo.png"]
    config = sample.read_generation_config(tmp_path)
    assert (config["settings"].steps, config["settings"].guidance, config["settings"].negative) == (25, 2.5, False)
    assert config["prompts"]["edit"] == train.DEMO["image"].edit(*train.DEMO["edit"])[0]
    assert len(config["prompts"]["chat"]) == 2
    demo, caption = config["demo"]
    assert caption == train.DEMO["image"].caption and world.judge(demo) == asdict(train.DEMO["image"])
    assert sample.read_generation_config(tmp_path / "nowhere") == {}, "no file: the official defaults"

@pytest.mark.parametrize("edit, message", [
    (lambda c: c["settings"].update(guidance=1e30), r"guidance in .*generation_config.json must be a number in"),
    (lambda c: c["settings"].update(stepz=3), "unknown fields stepz"),
    (lambda c: c.update(demo_image="../outside.png"), "lies outside"),
    (lambda c: c["prompts"].update(chat="hello"), "prompts.chat must be two strings"),
])
def test_generation_config_is_checked(tmp_path, edit, message):
    run = types.SimpleNamespace(cfg=train.TrainConfig(), world=world.build_world(), out=tmp_path)
    train.write_generation_config(run)
    config = json.loads((tmp_path / "generation_config.json").read_text())
    edit(config)
    (tmp_path / "generation_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        sample.read_generation_config(tmp_path)

def test_api_on_a_train_py_run(pipe, run_folder):
    """from_pretrained reads the run's own settings; every call returns a plain value; an image may be a path, a PIL
    image or its codes; keyword settings apply to one call only."""
    assert pipe.settings == sample.read_generation_config(run_folder[0])["settings"]
    path = run_folder[0] / "demo.png"
    codes = pipe.codes(path)
    assert codes == pipe.codes(Image.open(path)) == pipe.codes(codes)
    assert isinstance(pipe.caption(path), str) and isinstance(pipe.answer(codes, "what shape is it?"), str)
    picture, drawn = pipe.text_to_image("draw a small red circle in the center.", return_codes=True, constrained=True)
    assert picture.size == (32, 32) and len(drawn) == 32 and not pipe.settings.constrained
    assert isinstance(pipe.edit(path, "make it blue", constrained=True), Image.Image)
    assert np.array_equal(np.asarray(pipe.reconstruct(codes)), np.asarray(pipe.reconstruct(path)))
    with pytest.raises(ValueError, match="--guidance must be a number in"):
        pipe.reconstruct(codes, guidance=float("nan"))

def test_cli_on_a_train_py_run_uses_its_defaults(run_folder, tmp_path, capsys):
    """No flag: the run's demo picture, prompts and settings; each picture has its JSON and an enlarged copy."""
    assert sample.main(["--ckpt", str(run_folder[0]), "--task", "reconstruct", "--out", str(tmp_path)]) == 0
    assert f"[reconstruct] {train.DEMO['image'].caption}" in capsys.readouterr().out
    record = json.loads((tmp_path / "reconstruct.json").read_text())
    assert record["settings"] == asdict(sample.read_generation_config(run_folder[0])["settings"])
    assert len(record["codes"]) == 32 and record["input"] == train.DEMO["image"].caption
    with Image.open(tmp_path / "reconstruct_x8.png") as big:
        assert big.size == (256, 256)

# ------------------------------------------------------------------------------------------------------
# Bad input: one line naming the argument or the file, no traceback
# ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--guidance", "nan"], r"--guidance must be a number in \[0, 100\], got nan"),
    (["--guidance", "1e30"], "--guidance must be"),
    (["--llm-cfg", "inf"], "--llm-cfg must be"),
    (["--temperature", "-1"], "--temperature must be"),
    (["--steps", "5000"], r"--steps must be an integer in \[1, 1000\]"),
    (["--seed", "-3"], "--seed must be"),
])
def test_absurd_numbers_are_refused_naming_the_flag(argv, message, capsys, tmp_path):
    assert sample.main(["--ckpt", str(tmp_path), "--out", str(tmp_path / "out"), *argv]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and err.count("\n") == 1

def test_a_decompression_bomb_is_refused(tmp_path, capsys):
    bomb = bomb_png(tmp_path / "bomb.png")
    assert bomb.stat().st_size < 100_000
    assert sample.main(["--ckpt", str(tmp_path), "--image", str(bomb), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{bomb} is refused" in err and "Downscale it" in err and err.count("\n") == 1

def test_an_out_folder_that_cannot_be_made_is_named(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert sample.main(["--ckpt", str(tmp_path), "--out", str(tmp_path / "file/sub")]) == 2
    assert f"--out {tmp_path / 'file/sub'}: cannot create the folder" in capsys.readouterr().err

@pytest.mark.parametrize("setup, message", [
    (lambda d: None, "expected a folder written by train.py"),
    (lambda d: [(d / p).mkdir(parents=True) for p in ("seed", "llama", "decoder")] and
     (d / "seed/config.json").write_text("{"), "seed/config.json is not valid JSON"),
])
def test_bad_checkpoint_folder_is_one_line(tmp_path, capsys, setup, message):
    setup(tmp_path / "ckpt")
    assert sample.main(["--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err

# ------------------------------------------------------------------------------------------------------
# The chat: any one bad turn is survived, the input is read robustly, commands are answered locally
# ------------------------------------------------------------------------------------------------------

def chat_session(pipe, monkeypatch, tmp_path, stdin: bytes) -> str:
    """run_chat on `stdin` (bytes, as a pipe delivers them), in process; what it printed."""
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"))
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    sample.run_chat(pipe, types.SimpleNamespace(), tmp_path)
    return out.getvalue()

def test_chat_survives_bad_turns_and_answers_commands(pipe, run_folder, monkeypatch, tmp_path):
    bomb = bomb_png(tmp_path / "bomb.png")
    lines = [b"/help", b"/image no/such.png what?", f"/image {bomb} what?".encode(), b"/draw", b"/frobnicate",
             b"describe the image. \xff\xfe", f"/image {run_folder[0] / 'demo.png'} describe it.".encode(),
             b"/save", b"/save " + str(tmp_path / "x.json").encode(), b"/reset", b"hello"]  # no /quit: end of input
    monkeypatch.setattr(pipe, "settings", replace(pipe.settings, max_new_tokens=8))  # the smoke model rambles
    shown = chat_session(pipe, monkeypatch, tmp_path, b"\n".join(lines) + b"\n")
    assert "/save [FILE]" in shown and "unknown command '/frobnicate'" in shown and "usage: /draw TEXT" in shown
    assert "no/such.png" in shown and f"{bomb} is refused" in shown and shown.count("(the conversation is kept)") == 2
    assert "you> describe the image. \ufffd\ufffd" in shown, "an invalid UTF-8 byte is replaced, not fatal"
    saved = json.loads((tmp_path / "chat.json").read_text())
    assert len(saved["messages"]) == 4 and saved["messages"][0] == "describe the image. \ufffd\ufffd"
    assert len(saved["images"]) == 1 and saved == json.loads((tmp_path / "x.json").read_text())
    assert shown.count("assistant:") == 3 and "(conversation cleared)" in shown

def test_image_tokens_written_as_text_stay_text(pipe, monkeypatch):
    """The model (or the user) writing `<image>`, `<img>` or `</img>` as letters cannot break the next turn."""
    chat = pipe.chat()
    tok = pipe.tokenizer  # the letters of image tokens, as byte pieces: not the tokens themselves
    spelled = tok.encode("see <image> and") + [tok.sp.byte_ids[b] for b in b"<img><img_00001></img>"]
    assert tok.image_vocab.boi_id not in spelled and "<img><img_00001></img>" in tok.decode(spelled)
    real = pipe.generate
    monkeypatch.setattr(pipe, "generate", lambda *a, **k: spelled)
    text, pictures = chat.turn("what is <image>?")
    assert pictures == [] and "< image>" in text and "< img>< img_00001>< /img>" in text
    assert not re.search("<(image|/?img)", chat.messages[0] + chat.messages[1])
    monkeypatch.setattr(pipe, "generate", real)
    chat.turn("describe the image.", pipe.demo[0])
    assert len(chat.images) == 1 and len(chat.messages) == 4

def test_ctrl_c_and_end_of_input(pipe, monkeypatch, tmp_path):
    """Ctrl-C at the prompt and the end of input leave; Ctrl-C during a turn drops that turn and keeps the chat."""
    for error in (EOFError, KeyboardInterrupt):
        monkeypatch.setattr("builtins.input", lambda prompt="", e=error: (_ for _ in ()).throw(e()))
        assert sample.read_line(interactive=False) is None
    monkeypatch.undo()
    calls = []

    def interrupted(chat, line, out):
        calls.append(line)
        if len(calls) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(sample, "chat_command", interrupted)
    shown = chat_session(pipe, monkeypatch, tmp_path, b"first\nsecond\n")
    assert calls == ["first", "second"] and "this turn is dropped, the conversation is kept" in shown

# ------------------------------------------------------------------------------------------------------
# train.py --help: each flag once, with its field's comment and its default
# ------------------------------------------------------------------------------------------------------

def test_train_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit):
        train.parse_config(["--help"])
    text = capsys.readouterr().out
    assert "(default: " not in text and text.count("(default 0.995)") == 1 and "EMA decay" in text
    assert re.search(r"^  --resume\s", text, re.M) and "--no_causal" not in text and "--no-causal " in text
    assert "also train embed_tokens and lm_head in the LoRA phase (PEFT's modules_to_save): the chat template's" \
        in " ".join(text.split())
    assert "torchrun --nproc_per_node=2 train.py --tiny" in text and "--decoder.*" in text
    assert train.parse_config(["--tiny", "--no_causal", "--decoder.sample-steps", "5"]).decoder.sample_steps == 5

def test_a_broken_span_is_no_picture_and_the_cli_goes_on(pipe, run_folder, monkeypatch, tmp_path, capsys):
    """An unconstrained answer whose image span never closes: the API raises NoPicture, the CLI prints it, runs the
    next task and exits 1."""
    vocab = pipe.image_vocab
    monkeypatch.setattr(pipe, "generate", lambda *a, **k: [vocab.boi_id] + [vocab.code_offset] * 5)
    with pytest.raises(sample.NoPicture, match="never closed by </img>; --constrained prevents that"):
        pipe.text_to_image("draw")
    monkeypatch.setattr(sample.SeedLlama, "from_pretrained", lambda *a, **k: pipe)
    assert sample.main(["--ckpt", str(run_folder[0]), "--out", str(tmp_path)]) == 1
    shown = capsys.readouterr().out
    assert shown.count("never closed by </img>") == 4 and "[chat] two scripted turns" in shown  # t2i, edit, 2 turns
