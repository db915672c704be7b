"""Shared test setup: keep torch to one thread so parallel CI stays predictable, and the fixtures many
tests share. The repo root is on ``sys.path`` through ``pythonpath`` in ``pyproject.toml``."""

import copy
import os
from pathlib import Path

import pytest
import torch
from tiny_pipeline import TINY_CLIP

from pipeline.params import Params, load_params

ROOT = Path(__file__).resolve().parents[1]
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


@pytest.fixture
def tiny_clip() -> dict:
    """The tests' small CLIP config (``model.clip.tiny`` keys), a fresh copy per test."""
    return copy.deepcopy(TINY_CLIP)
