"""Shared test helpers: where the parity fixtures live and how to read them."""
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
FIXTURES = SHARED / "fixtures"
REFERENCE_SAMPLES = SHARED / "reference_samples"

if str(FIXTURES) not in sys.path:  # synth.py: synthetic weights as a function of name and shape
    sys.path.insert(0, str(FIXTURES))

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def load_fixture(group: str, name: str):
    """(tensors, meta) of ../shared/fixtures/<group>/<name>.{safetensors,json}."""
    folder = FIXTURES / group
    if not folder.is_dir():
        pytest.skip(f"fixtures not found at {folder}")
    tensors = load_file(str(folder / f"{name}.safetensors"))
    meta_path = folder / f"{name}.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    return tensors, meta


def max_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a-e| / max |e| (the error scale the fixture tolerances are stated in)."""
    actual, expected = actual.double(), expected.double()
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30))
