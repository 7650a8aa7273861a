"""House rules of the repository, checked on every run (fast tier).

* the design card's import graph: model files import nothing of ours, except seed.py -> qformer, vq;
  scripts import models, never the other way round;
* runtime modules import only torch, numpy, PIL, safetensors, tqdm and the standard library (bench.py, whose job is
  to time us against the reference libraries, may also import those, inside the benchmark that needs them);
* every torch.load passes weights_only=True;
* every top-level module opens with a docstring, and no function is longer than 60 lines;
* the top-level modules together stay within the line budget (growth is a decision);
* the repository cites only what it contains, and speaks of the project, not of how it was written;
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
LINE_BUDGET = 7095  # every top-level module together
OURS = {Path(m).stem for m in MODELS + SCRIPTS}
# What each module may import from this repository (the design card's "house").
ALLOWED_LOCAL = {
    "weights": set(), "tokenizer": set(), "world": set(), "vq": set(), "qformer": set(),
    "seed": {"qformer", "vq", "weights"},
    "llama": {"weights"}, "unet": {"weights"},
    **{script: {"weights", "tokenizer", "world", "vq", "qformer", "seed", "llama", "unet"}
       for script in ("train", "sample")},
    "bench": {"weights", "tokenizer", "world", "vq", "qformer", "seed", "llama", "unet", "train", "sample"},
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
    """Every top-level module is in the README's file tree (` 4  seed.py   ~500  EVA ViT ...`), its line count
    within 15 % of the truth."""
    readme = (ROOT / "README.md").read_text()
    stated = re.findall(r"^\s*(?:\d+\s+)?(\w+\.py)\s+~(\d+)\s", readme, flags=re.M)
    unlisted = {p.name for p in ROOT.glob("*.py")} - {name for name, _ in stated}
    assert not unlisted, f"the README's annotated file tree does not list {sorted(unlisted)}"
    for name, count in stated:
        path = next(ROOT.glob(f"**/{name}"), None)
        assert path is not None, f"README lists {name}, which does not exist"
        actual = len(path.read_text().splitlines())
        assert abs(actual - int(count)) <= 0.15 * actual, f"README says {name} has ~{count} lines; it has {actual}"

@pytest.mark.parametrize("path", _modules(), ids=lambda p: p.name)
def test_functions_are_small(path):
    long = [f"{node.name} (line {node.lineno}, {node.end_lineno - node.lineno + 1} lines)"
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60]
    assert not long, f"{path.name}: functions over 60 lines: {long}"

def test_line_budget():
    total = sum(len(p.read_text().splitlines()) for p in ROOT.glob("*.py"))
    assert total <= LINE_BUDGET, f"the top-level modules hold {total} lines, over the budget of {LINE_BUDGET}"

# Documents that are not in the repository, and words about how the code was produced rather than what it does.
FOREIGN = re.compile(r"SHAPES_WORLD\.md|OFFICIAL_FORMATS\.md|TINY_CODES\.md|\bissue \d+|\b(this|previous|next|earlier|last)"
                     r" session\b|\bhelper\)|train-core|train-llm|the team\b", re.I)

def test_cites_only_what_it_contains():
    files = [*ROOT.glob("*.py"), ROOT / "README.md", *ROOT.glob("tests/*.py"), *ROOT.glob("docs/*.md")]
    hits = [f"{p.name}:{i}: {line.strip()[:80]}" for p in files if p != Path(__file__)
            for i, line in enumerate(p.read_text().splitlines(), 1) if FOREIGN.search(line)]
    assert not hits, "lines citing documents outside the repository or speaking of how it was made:\n" + "\n".join(hits)
