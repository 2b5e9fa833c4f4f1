"""Small helpers shared by several test files."""
import copy
import os
from pathlib import Path

import pytest
import torch


def perturbed_copy(model, seed: int, scale: float = 0.05):
    """A copy of ``model`` with every parameter nudged by seeded noise (a 'fine-tuned' child of the trunk)."""
    child = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in child.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return child


TESTS_DIR = str(Path(__file__).parent)


@pytest.fixture
def pipeline_outputs(tmp_path, monkeypatch):
    """Fresh outputs root per test; the kernels papermill starts find the test phases (tests/pipeline_phases)
    on PYTHONPATH."""
    out = tmp_path / "outputs"
    monkeypatch.setenv("FORGE_OUTPUTS", str(out))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([TESTS_DIR, os.environ.get("PYTHONPATH", "")]))
    return out
