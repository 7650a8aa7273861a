"""weights.py: device and dtype choice, reading weight files, the strict key check, atomic writes (fast tier)."""
import json
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

import weights

def test_pick_device_and_dtype():
    assert weights.pick_device("cpu") == torch.device("cpu")
    assert weights.pick_device().type == weights.available_devices()[0]
    assert weights.pick_dtype(torch.device("cpu"), torch.bfloat16) == torch.float32
    assert weights.pick_dtype(torch.device("cuda"), torch.bfloat16) == torch.bfloat16  # the file's own half type
    assert weights.pick_dtype(torch.device("cuda"), torch.float32) == torch.float16
    header = {"step": ((), torch.int64), "w": ((2,), torch.bfloat16), "b": ((2,), torch.float32)}
    assert weights.stored_dtype({}, header) == torch.bfloat16 and weights.stored_dtype({"i": ((1,), torch.int8)}) is None

@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal of an absent CUDA device")
def test_absent_device_is_named():
    with pytest.raises(ValueError, match="'cuda' is not available here"):
        weights.pick_device("cuda")

@pytest.mark.parametrize("name", ["../outside.bin", "/etc/passwd", "a/../../b.bin", ""])
def test_index_entries_stay_inside_the_folder(tmp_path, name):
    (tmp_path / "model.bin.index.json").write_text(json.dumps({"weight_map": {"w": name}}))
    with pytest.raises(ValueError, match="outside"):
        weights.find_weights(tmp_path, ["model.bin.index.json"])

def test_find_weights_index_and_single_file(tmp_path):
    save_file({"a": torch.zeros(2)}, str(tmp_path / "s1.safetensors"))
    save_file({"b": torch.zeros(3)}, str(tmp_path / "s2.safetensors"))
    (tmp_path / "m.index.json").write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}))
    assert [p.name for p in weights.find_weights(tmp_path, ["m.index.json"])] == ["s1.safetensors", "s2.safetensors"]
    assert weights.find_weights(tmp_path, ["none.bin", "s2.safetensors"]) == [tmp_path / "s2.safetensors"]
    with pytest.raises(FileNotFoundError, match="expected one of"):
        weights.find_weights(tmp_path, ["none.bin"])
    (tmp_path / "bad.index.json").write_text("<html>")
    with pytest.raises(ValueError, match="bad.index.json is not a checkpoint index"):
        weights.find_weights(tmp_path, ["bad.index.json"])

def test_read_header_and_weights_both_formats(tmp_path):
    state = {"f": torch.arange(6.0).view(2, 3), "i": torch.arange(4)}
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save(state, tmp_path / "w.bin")
    for name in ("w.safetensors", "w.bin"):
        assert weights.read_header(tmp_path / name) == {"f": ((2, 3), torch.float32), "i": ((4,), torch.int64)}
        got = weights.read_weights(tmp_path / name, dtype=torch.float16)
        assert got["f"].dtype == torch.float16 and got["i"].dtype == torch.int64  # integers keep their type
        assert list(weights.read_weights(tmp_path / name, names={"i"})) == ["i"]

class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned",))

def test_pickles_that_run_code_are_refused(tmp_path):
    with open(tmp_path / "evil.bin", "wb") as f:
        pickle.dump({"w": _RunsCode()}, f, protocol=2)  # torch.save's protocol: reaches weights_only's GLOBAL check
    with pytest.raises(ValueError, match="evil.bin: refused to load.*execute code"):
        weights.read_weights(tmp_path / "evil.bin")

def test_truncated_files_are_named(tmp_path):
    save_file({"a": torch.zeros(100)}, str(tmp_path / "w.safetensors"))
    torch.save({"a": torch.zeros(100)}, tmp_path / "w.bin")
    for name in ("w.safetensors", "w.bin"):
        data = (tmp_path / name).read_bytes()
        (tmp_path / name).write_bytes(data[: len(data) // 2])
        with pytest.raises(ValueError, match=name):
            weights.read_weights(tmp_path / name)

def test_check_keys_names_every_problem_in_the_files_names():
    with pytest.raises(ValueError) as err:
        weights.check_keys({"a": (2,), "b": (3,)}, {"b": (4,), "c": (1,)}, "ckpt.bin", what="the config")
    msg = str(err.value)
    assert "ckpt.bin does not match the config" in msg and "missing (1):\n    a" in msg
    assert "b: file (4,) vs the config (3,)" in msg and "unexpected (1):\n    c" in msg
    weights.check_keys({"a": (2,)}, {"a": [2]}, "ok")  # shapes as lists (JSON) compare equal

def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    path = tmp_path / "sub" / "x.json"
    weights.write_json(path, {"v": 1})
    assert json.loads(path.read_text()) == {"v": 1} and oct(path.stat().st_mode & 0o777) == "0o644"

    def broken(tmp):
        tmp.write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        weights.atomic_write(path, broken)
    assert json.loads(path.read_text()) == {"v": 1} and os.listdir(path.parent) == ["x.json"]

def test_assign_fills_a_meta_model():
    with torch.device("meta"):
        model = torch.nn.Linear(2, 3)
    state = {"weight": torch.ones(3, 2, dtype=torch.float16), "bias": torch.zeros(3, dtype=torch.float16)}
    weights.check_keys(weights.shapes(model), {k: v.shape for k, v in state.items()}, "mem")
    model = weights.assign(model, state, "cpu", torch.float32)
    assert model.weight.dtype == torch.float32 and model.weight.device.type == "cpu" and not model.training
