"""Shared test setup: run from the repo root, keep torch to one thread so parallel CI stays predictable."""

import os
import sys
from pathlib import Path

import pytest
import torch

from pipeline.params import Params, load_params

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(1)


@pytest.fixture
def repo_root() -> Path:
    return ROOT


@pytest.fixture
def in_tmp_cwd(tmp_path, monkeypatch):
    """Run a test inside an empty working directory (stages write relative ``artifacts/`` paths)."""
    monkeypatch.chdir(tmp_path)
    os.environ.setdefault("TQDM_DISABLE", "1")
    return tmp_path


@pytest.fixture
def default_params() -> Params:
    """The committed ``params.yaml``: the schema has no defaults, so tests start from the real values and
    change what they need with ``.model_copy(update=...)``."""
    return load_params(ROOT / "params.yaml")
