"""House rules of the repository, checked on every run (fast tier).

* the design card's import graph: model files import nothing of ours, except seed.py -> qformer, vq;
  scripts import models, never the other way round;
* runtime modules import only torch, numpy, PIL, safetensors, tqdm and the standard library (bench.py, whose job is
  to time us against the reference libraries, may also import those, inside the benchmark that needs them);
* every torch.load passes weights_only=True;
* every top-level module opens with a docstring;
* the README's annotated file tree states line counts that are still (roughly) true.
"""
import ast
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODELS = ["weights.py", "tokenizer.py", "world.py", "vq.py", "qformer.py", "llama.py", "unet.py", "seed.py"]
SCRIPTS = ["train.py", "sample.py", "bench.py"]
OURS = {Path(m).stem for m in MODELS + SCRIPTS}
# What each module may import from this repository (the design card's "house").
ALLOWED_LOCAL = {
    "weights": set(), "tokenizer": set(), "world": set(), "vq": set(), "qformer": set(),
    "seed": {"qformer", "vq", "weights"},
    "llama": {"weights"}, "unet": {"weights"},
    **{script: {"weights", "tokenizer", "world", "vq", "qformer", "seed", "llama", "unet"}
       for script in ("train", "sample", "bench")},
}
# Third-party packages allowed at run time (requirements.txt, minus pytest).
ALLOWED_THIRD_PARTY = {"torch", "numpy", "PIL", "safetensors", "tqdm"}
# The reference libraries (requirements-dev.txt): bench.py compares against them, importing them lazily.
REFERENCE_LIBRARIES = {"transformers", "diffusers"}


def _modules() -> list[Path]:
    return [ROOT / f for f in MODELS + SCRIPTS if (ROOT / f).exists()]


def _imports(path: Path, module_level_only: bool = False) -> set[str]:
    """Top-level package names imported anywhere in the file (or only in its module body)."""
    tree = ast.parse(path.read_text())
    names = set()
    for node in (tree.body if module_level_only else ast.walk(tree)):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", _modules(), ids=lambda p: p.name)
def test_import_graph(path):
    imported = _imports(path)
    local = imported & OURS
    assert local <= ALLOWED_LOCAL[path.stem], f"{path.name} imports {sorted(local - ALLOWED_LOCAL[path.stem])}"
    third = {n for n in imported - OURS if n not in sys.stdlib_module_names}
    allowed = ALLOWED_THIRD_PARTY | (REFERENCE_LIBRARIES if path.name == "bench.py" else set())
    assert third <= allowed, f"{path.name} imports {sorted(third - allowed)} at run time"
    at_top = {n for n in _imports(path, module_level_only=True) - OURS if n not in sys.stdlib_module_names}
    assert at_top <= ALLOWED_THIRD_PARTY, f"{path.name} imports {sorted(at_top - ALLOWED_THIRD_PARTY)} at module level"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: p.name)
def test_torch_load_is_weights_only(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
            kwargs = {k.arg: ast.unparse(k.value) for k in node.keywords}
            assert kwargs.get("weights_only") == "True", f"{path.name}:{node.lineno}: torch.load without weights_only=True"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: p.name)
def test_module_docstring(path):
    doc = ast.get_docstring(ast.parse(path.read_text()))
    assert doc and len(doc.splitlines()) >= 3, f"{path.name} needs a header docstring (what, paper, official file, deviations)"


def test_readme_file_tree_line_counts():
    """Lines like `seed.py   ~470  EVA ViT ...` in the README's file tree must stay within 15 % of the truth."""
    readme = (ROOT / "README.md").read_text()
    stated = re.findall(r"^\S*?(\w+\.py)\s+~(\d+)\s", readme, flags=re.M)
    assert stated, "README.md has no annotated file tree with line counts"
    for name, count in stated:
        path = next(ROOT.glob(f"**/{name}"), None)
        assert path is not None, f"README lists {name}, which does not exist"
        actual = len(path.read_text().splitlines())
        assert abs(actual - int(count)) <= 0.15 * actual, f"README says {name} has ~{count} lines; it has {actual}"
