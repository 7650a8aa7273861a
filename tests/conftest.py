"""What every test file shares: the tiers, the fixture folder and the lookup of the official files.

Tiers (see README "Tests"):
  * fast invariants on tiny configs          -- no marker, always run;
  * parity against the shared fixtures and the reference libraries -- `parity`, skipped when a library is absent;
  * golden tests on the real official files  -- `golden`, skipped unless $SEED_WEIGHTS points at them.
"""
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
sys.path.insert(0, str(ROOT))  # the top-level modules (seed.py, llama.py, ...) are imported by name

torch.set_num_threads(min(2, os.cpu_count() or 1))

@pytest.fixture
def fixtures() -> Path:
    return FIXTURES

def official_file(*parts: str) -> Path:
    """A file of the official release under $SEED_WEIGHTS (laid out as on the hub), or skip the test."""
    root = os.environ.get("SEED_WEIGHTS")
    if not root:
        pytest.skip("golden test: set SEED_WEIGHTS to a folder holding the official files")
    path = Path(root, *parts)
    if not path.exists():
        pytest.skip(f"golden test: {path} is absent")
    return path
