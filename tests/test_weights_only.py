"""Checkpoints are data, never code: every ``torch.load`` is weights-only, a pickled payload is refused
with the file named (and not run), and the real model.pt / resume.pt contents still round-trip."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.atomic import CheckpointError, load_torch, save_torch
from pipeline.models.checkpoints import load_localiser, load_segmenter
from pipeline.train.loop import TrainingRun, load_resume_state


class _Payload:
    """Unpickling this runs ``touch <marker>``: what a planted checkpoint would do with a plain load."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _malicious(path: Path, marker: Path) -> Path:
    torch.save({"model": {"w": torch.zeros(2)}, "meta": {"clip_dir": "x"}, "fingerprint": "f",
                "evil": _Payload(marker)}, path)
    return path


@pytest.mark.parametrize("loader", ["load_torch", "load_localiser model.pt", "load_segmenter model.pt"])
def test_malicious_checkpoint_is_refused_and_not_run(tmp_path, loader):
    marker = tmp_path / "pwned"
    path = _malicious(tmp_path / "model.pt", marker)
    load = {"load_torch": load_torch, "load_localiser model.pt": load_localiser,
            "load_segmenter model.pt": load_segmenter}[loader]
    with pytest.raises(CheckpointError, match="model.pt: not a loadable checkpoint"):
        load(path)
    assert not marker.exists()


def test_malicious_resume_state_is_ignored_with_a_line_and_not_run(tmp_path, capsys):
    marker = tmp_path / "pwned"
    path = _malicious(tmp_path / "resume.pt", marker)
    assert load_resume_state(path, "f") is None
    assert not marker.exists()
    assert "resume.pt: not a loadable checkpoint" in capsys.readouterr().out


def test_resume_state_with_numpy_and_torch_generators_round_trips_weights_only(tmp_path):
    """What :meth:`TrainingRun.checkpoint` saves (state dicts, RNG tensors, numpy bit-generator states as
    dicts of ints) loads under weights_only and restores the generators exactly."""
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    rng, gen = np.random.default_rng(5), torch.Generator().manual_seed(3)
    rng.random(3), torch.rand(2, generator=gen)

    class T:
        pass

    training = T()
    training.model, training.optimizer, training.scheduler = model, opt, None
    training.generators = lambda: {"order": rng, "blackout": gen}
    run = TrainingRun("t", resume_path=tmp_path / "resume.pt", fingerprint="fp")
    run.checkpoint(training, 1, 7)
    expected = rng.random(4), torch.rand(3, generator=gen)
    rng2, gen2 = np.random.default_rng(0), torch.Generator()
    training.generators = lambda: {"order": rng2, "blackout": gen2}
    training.model, training.optimizer = torch.nn.Linear(3, 2), None
    training.optimizer = torch.optim.AdamW(training.model.parameters(), lr=0.1)
    again = TrainingRun("t", resume_path=tmp_path / "resume.pt", fingerprint="fp")
    assert again.restore(training) == (1, 7)
    assert np.array_equal(rng2.random(4), expected[0])
    assert torch.equal(torch.rand(3, generator=gen2), expected[1])
    assert torch.equal(training.model.weight, model.weight)


def test_save_torch_output_loads_weights_only(tmp_path):
    state = {"model": torch.nn.Linear(2, 2).state_dict(), "meta": {"input_size": 64, "prompt": "a {}",
                                                                     "sizes": [1, 2], "alpha": 0.5}}
    save_torch(tmp_path / "m.pt", state)
    loaded = load_torch(tmp_path / "m.pt")
    assert loaded["meta"] == state["meta"]
    assert torch.equal(loaded["model"]["weight"], state["model"]["weight"])
