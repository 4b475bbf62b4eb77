"""Shared test setup: import the project from the repository root, keep CPU threads modest."""
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).resolve().parent / "golden"
sys.path.insert(0, str(ROOT))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def golden():
    def load(name):
        return torch.load(GOLDEN / name, weights_only=True)
    return load
