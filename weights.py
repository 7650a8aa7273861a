"""Weight files: the one home of what every loader and writer of this project shares, in the order a loader uses it.

  1. where the model lives: `pick_device` (cuda, then Apple's mps, then cpu), `pick_dtype` (`inference_dtype`: bf16
     on a CPU that has it natively; `bf16_matrix_units`: where bf16 autocast speeds up training), and `pin_to_host`
     / `on_device` (--low-vram: a part on the GPU only while used);
  2. the file: `find_weights` (an `*.index.json` stands for its shards), `read_header` (names, shapes, dtypes, no
     data) and `read_weights` (`.safetensors`, or `torch.load(weights_only=True)`, which refuses any pickle that
     would construct more than tensors and so cannot run code; memory-mapped, cast one tensor at a time);
  3. before any data is read, `check_config` (every config value typed and bounded) and `check_keys` (one error
     naming every missing, unexpected and mis-shaped key); as data is read, no NaN or infinity;
  4. `assign`: fill a model built on the meta device, with no second copy; an integer tensor is never taken for a
     floating-point parameter.
Writers use `atomic_write` (a temporary file of this process, then `os.replace`): never a half-written file; `lock`
makes one process the only writer of a file or folder. A folder written by train.py records its run in each
`config.json` under RUN_KEY (`run_record`); `read_config` reads a config without it.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open

try:
    import fcntl  # POSIX; Windows has no advisory lock here, so concurrent writers there are not excluded
except ImportError:
    fcntl = None

Shape = tuple[int, ...]
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}
HALF_DTYPES = (torch.float16, torch.bfloat16)

# ---- 1. device and dtype ------------------------------------------------------------------------------------------
def available_devices() -> list[str]:
    """The device types torch can use here, best first."""
    found = ["cuda"] if torch.cuda.is_available() else []
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        found.append("mps")
    return found + ["cpu"]

def pick_device(name: str | torch.device | None = None, local_rank: int = 0) -> torch.device:
    """`name` checked against what is present, else the best one; a bare "cuda" is this process's local rank."""
    if name is None or str(name) == "auto":
        name = available_devices()[0]
    device = torch.device(name)
    if device.type not in available_devices():
        raise ValueError(f"device {str(name)!r} is not available here (available: {', '.join(available_devices())})")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device

def pick_dtype(device: torch.device, stored: torch.dtype | None = None) -> torch.dtype:
    """fp32 on the CPU (half-precision matmuls are slow or missing there); on an accelerator the file's own half
    type when it has one (bf16 weights keep their range), else fp16."""
    if device.type == "cpu":
        return torch.float32
    return stored if stored in HALF_DTYPES else torch.float16

def fast_cpu_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16, which AMX machines also have): there bf16 inference
    streams half the bytes of fp32 at the same rate. Elsewhere bf16 products are emulated, which the compute-bound
    models (ViT, UNet, VAE) and prefill feel: on a 2-core AVX2 EPYC `bench.py llama` measured bf16 prefill at 0.18x
    fp32's rate, and decode, which streams half the bytes, at 1.7x."""
    return bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())

def inference_dtype(device: torch.device, stored: torch.dtype | None = None) -> torch.dtype:
    """`pick_dtype`, except bf16 on a CPU with `fast_cpu_bf16` (for inference; training: `bf16_matrix_units`)."""
    return torch.bfloat16 if device.type == "cpu" and fast_cpu_bf16() else pick_dtype(device, stored)

def bf16_matrix_units(device: torch.device) -> bool:
    """Whether `device` has bf16 matrix hardware (a CUDA GPU with bf16, a CPU with AMX tiles), where bf16 autocast
    speeds up a convolution-bound training step (a small-matrix one, the tiny LLM's, loses more to the casts)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())

def pin_to_host(module: nn.Module) -> nn.Module:
    """Every parameter and buffer of `module` into page-locked host memory (ordinary host memory without CUDA), from
    which `on_device` copies it to the GPU asynchronously and without a staging copy."""
    for t in [*module.parameters(), *module.buffers()]:
        t.data = t.data.cpu().pin_memory() if torch.cuda.is_available() else t.data.cpu()
    return module

@contextlib.contextmanager
def on_device(device: torch.device, *parts: nn.Module | torch.Tensor):
    """Run a block with `parts` (modules, or single parameters and buffers) on `device`, wherever they live otherwise.
    On exit each tensor points at its host copy again: nothing is copied back, so the block must not change them
    (inference). With --low-vram only the parts a phase needs move, and only for that phase."""
    tensors = [t for part in parts for t in ([*part.parameters(), *part.buffers()] if isinstance(part, nn.Module)
                                              else [part])]
    moved = [(t, t.data) for t in {id(t): t for t in tensors}.values() if t.device != device]
    for t, host in moved:
        t.data = host.to(device, non_blocking=True)
    try:
        yield
    finally:
        for t, host in moved:
            t.data = host
        if device.type == "cuda":
            torch.cuda.empty_cache()

def stored_dtype(*headers: Mapping[str, tuple[Shape, torch.dtype]]) -> torch.dtype | None:
    """The dtype of the first floating-point tensor of these headers: the file's own type, for `pick_dtype`."""
    return next((d for header in headers for _, d in header.values() if d is not None and d.is_floating_point), None)

# ---- 2. finding and reading weight files --------------------------------------------------------------------------
def inside(folder: Path, name: str, source: str) -> Path:
    """folder / name, refused when `name` (read from `source`) is absolute, climbs out with `..`, or resolves
    outside `folder` through a link. A hub snapshot's files are links into its repository's `blobs/` by design, so
    the bound of a folder `.../snapshots/REV` is the repository folder two levels up."""
    folder = Path(folder)
    path = folder / str(name)
    bound = folder.parent.parent if folder.parent.name == "snapshots" else folder
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts \
            or not path.resolve().is_relative_to(bound.resolve()):
        raise ValueError(f"{source} names {name!r}, which lies outside {folder}: refused")
    return path

def index_shards(index: Path) -> list[str]:
    """The shard file names of a sharded checkpoint's `*.index.json` (its `weight_map` values), sorted."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        return sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{index} is not a checkpoint index (a JSON object with a 'weight_map'): {e}") from e

def find_weights(folder: Path, names: Sequence[str]) -> list[Path]:
    """The weight files of `folder`: the first of `names` that exists; an `*.index.json` stands for its shards."""
    folder = Path(folder)
    for name in names:
        path = folder / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return [path]
        shards = [inside(folder, s, str(path)) for s in index_shards(path)]
        missing = [s.name for s in shards if not s.is_file()]
        if missing:
            raise FileNotFoundError(f"{path} names shard files that do not exist: {missing}")
        return shards
    raise FileNotFoundError(f"no weights in {folder}: expected one of {list(names)}")

def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    """A torch.save file, read with weights_only=True (memory-mapped when it is a zip archive), checked to be a
    flat {name: tensor} dict; every failure names the file."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # torch raises several types for foreign files (UnpicklingError, RuntimeError, EOFError)
        detail = str(e)
        if "GLOBAL" in detail:  # weights_only's refusal: the pickle names a function or class to call on load
            what = next((line for line in detail.splitlines() if "GLOBAL" in line), "").strip()
            raise ValueError(f"{path}: refused to load: the pickle would construct objects that are not plain "
                             f"tensors, which can execute code (torch.load weights_only=True). {what}") from e
        raise ValueError(f"cannot read weight file {path} (truncated or not a checkpoint?): "
                         f"{type(e).__name__}: {detail[:200]}") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a state dict (a flat dict of tensors), got {type(state).__name__}")
    return state

def _safetensors(path: Path):
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"cannot read weight file {path} (truncated or not a safetensors file?): {e}") from e

def read_header(path: Path) -> dict[str, tuple[Shape, torch.dtype]]:
    """name -> (shape, dtype) of every tensor of a weight file, without reading the data."""
    path = Path(path)
    if path.suffix == ".safetensors":
        with _safetensors(path) as f:
            return {k: (tuple(f.get_slice(k).get_shape()), SAFETENSORS_DTYPES.get(f.get_slice(k).get_dtype()))
                    for k in f.keys()}
    return {k: (tuple(t.shape), t.dtype) for k, t in _torch_load(path).items()}

def read_weights(path: Path, names: Iterable[str] | None = None, device="cpu",
                 dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The tensors `names` (all when None) of a weight file, floats cast to `dtype` one at a time (each source
    tensor is freed once cast); integer tensors keep their type. With a `dtype` (a model being loaded) a float
    tensor holding NaN or infinity is refused, naming it: such a weight would poison every output."""
    path, wanted = Path(path), None if names is None else set(names)

    def cast(key: str, t: torch.Tensor) -> torch.Tensor:
        t = t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype)
        if dtype is not None and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{path}: tensor {key} holds NaN or infinite values; the file is damaged: fetch it again")
        return t

    if path.suffix == ".safetensors":
        with _safetensors(path) as f:
            return {k: cast(k, f.get_tensor(k)) for k in f.keys() if wanted is None or k in wanted}
    return {k: cast(k, t) for k, t in _torch_load(path).items() if wanted is None or k in wanted}

def read_json(path: Path) -> dict:
    """A JSON object from `path`; a missing or unparsable file is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value

RUN_KEY = "run"  # the entry of a component's config.json that names the train.py run that wrote it

def read_config(path: Path) -> dict:
    """A component's config.json (`read_json`) without its RUN_KEY record, which describes where it came from."""
    return {k: v for k, v in read_json(path).items() if k != RUN_KEY}

def run_record(path: Path) -> dict | None:
    """The RUN_KEY record of a config.json ({"id": ..., "config": {...}}), None when it has none."""
    return read_json(path).get(RUN_KEY) if Path(path).is_file() else None

# ---- 3. the checks before any data is read ------------------------------------------------------------------------
def check_config(values: Mapping, limits: Mapping[str, tuple[float, float]], source: str) -> None:
    """Each field of `values` named in `limits` (low, high) is a finite number in [low, high], an int unless a bound
    is a float (a list: every item); one ValueError naming every bad field and `source`. Run before the config is
    built, so a bad value is reported as itself, not as a ZeroDivisionError or a request for terabytes."""
    bad = []
    for name, (low, high) in limits.items():
        value = values.get(name)
        kind = float if isinstance(low, float) or isinstance(high, float) else int
        for item in (value if isinstance(value, (list, tuple)) else [value]) if value is not None else []:
            number = isinstance(item, (int, float) if kind is float else int) and not isinstance(item, bool)
            if not (number and math.isfinite(item) and low <= item <= high):
                bad.append(f"{name}={value!r} (need {'an integer' if kind is int else 'a number'} in [{low}, {high}])")
                break
    if bad:
        raise ValueError(f"{source}: config values out of range: {'; '.join(bad)}. Fix the file or fetch it again.")

def check_keys(expected: Mapping[str, Sequence[int]], found: Mapping[str, Sequence[int]], source: str,
               what: str = "the model", note: str = "") -> None:
    """One ValueError naming every missing, unexpected and mis-shaped key. Both dicts are keyed by the *file's*
    names (the caller renames the model's keys and leaves out those it ignores), so the user can find each one."""
    missing = sorted(k for k in expected if k not in found)
    unexpected = sorted(k for k in found if k not in expected)
    misshaped = sorted(f"{k}: file {tuple(found[k])} vs {what} {tuple(expected[k])}"
                       for k in found if k in expected and tuple(found[k]) != tuple(expected[k]))
    if not (missing or unexpected or misshaped):
        return
    lines = [f"{source} does not match {what}:"]
    for label, items in (("missing", missing), ("mis-shaped", misshaped), ("unexpected", unexpected)):
        if items:
            lines.append(f"  {label} ({len(items)}):\n    " + "\n    ".join(items))
    if note:
        lines.append(f"  ({note})")
    raise ValueError("\n".join(lines))

def shapes(module: nn.Module) -> dict[str, Shape]:
    """name -> shape of every tensor of a module's state dict (a meta-device module costs nothing)."""
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}

# ---- 4. filling a meta-device model -------------------------------------------------------------------------------
def assign(model: nn.Module, state: Mapping[str, torch.Tensor], device, dtype: torch.dtype,
           source: str = "the weights", strict: bool = True) -> nn.Module:
    """Fill a meta-device model with `state` (checked first), floats cast: the parameters become these tensors. An
    integer tensor where the model has a float parameter is refused (casting it would run a model of garbage)."""
    own = model.state_dict()
    ints = [f"{k} ({v.dtype})" for k, v in state.items()
            if k in own and own[k].is_floating_point() and not v.is_floating_point()]
    if ints:
        raise ValueError(f"{source}: integer tensors where the model has floating-point weights: {', '.join(ints)}. "
                         f"This is not a checkpoint of this model; fetch the original file.")
    state = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=strict, assign=True)
    return model.eval()

# ---- writing ------------------------------------------------------------------------------------------------------
def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """write(tmp), then rename tmp over `path`: readers see the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide a shared checkpoint from the machine's other users
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

def write_json(path: Path, value) -> None:
    """`value` as indented JSON at `path`, atomically."""
    atomic_write(path, lambda p: p.write_text(json.dumps(value, indent=1), encoding="utf-8"))

def lock(path: Path, wait: bool):
    """The open file `path` (created), exclusively locked until it is closed or the process ends, kill -9 included.
    `wait=False`: BlockingIOError when another process holds it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a")
    if fcntl is not None:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError:
            handle.close()
            raise
    return handle
