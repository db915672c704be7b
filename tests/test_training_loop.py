"""The one training loop (:mod:`pipeline.train.loop`): a run killed after an epoch and resumed ends with
exactly the weights of an uninterrupted run, for a toy training and for each of the four real ones
(CLIP pretraining, Step-1, the affinity net, Step-2) on tiny models and data."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from tiny_pipeline import TINY_CLIP
from torch import nn

from pipeline.data.samples import ImageBank
from pipeline.models.clip_backbone import ClipBackbone, FrozenClip, build_clip
from pipeline.models.segmenter import ReferringSegmenter
from pipeline.models.step1 import TRISLocaliser
from pipeline.params import load_params
from pipeline.pseudo.affinity import train_affinity
from pipeline.train.clip_pretrain import pretrain_clip
from pipeline.train.common import NonFiniteLossError
from pipeline.train.loop import Epoch, StepOut, Training, TrainingRun, fit
from pipeline.train.step1 import train_step1
from pipeline.train.step2 import train_step2

ROOT = Path(__file__).resolve().parents[1]
PARAMS = load_params(ROOT / "params.yaml")
MAX_TOKENS = 12
SIDE = 64


class CrashError(Exception):
    """Stands in for a kill right after the first epoch's checkpoint."""


class CrashingRun(TrainingRun):
    def checkpoint(self, training: Training, epoch: int, step: int) -> None:
        super().checkpoint(training, epoch, step)
        raise CrashError


def assert_resume_is_exact(train: Callable[[TrainingRun | None], nn.Module], tmp_path: Path) -> None:
    """``train(run)`` builds a fresh model (from a re-seeded global RNG, as a stage process does) and
    trains it for two epochs; straight, and killed after epoch 1 then resumed, give the same bytes."""
    torch.manual_seed(0)
    straight = train(None).state_dict()
    path = tmp_path / "resume.pt"
    torch.manual_seed(0)
    with pytest.raises(CrashError):
        train(CrashingRun("test", resume_path=path, fingerprint="f"))
    torch.manual_seed(0)
    torch.rand(7)  # the resumed process's global RNGs are wherever its start-up left them
    if torch.cuda.is_initialized():
        torch.rand(7, device="cuda")
    run = TrainingRun("test", resume_path=path, fingerprint="f")
    assert run.resuming and run.state["epoch"] == 1
    resumed = train(run).state_dict()
    assert list(resumed) == list(straight)
    for key, value in straight.items():
        assert resumed[key].dtype == value.dtype, key
        assert resumed[key].cpu().numpy().tobytes() == value.cpu().numpy().tobytes(), key


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[ImageBank, pd.DataFrame]:
    """Eight random images with two objects each and one or two expressions per object."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = {}
    for i in range(8):
        paths[i] = root / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (48, 56, 3), dtype=np.uint8)).save(paths[i])
    words = ["red", "blue", "left", "right", "ball", "box", "small", "big"]
    rows = []
    for i in range(8):
        for k in range(2):
            for s in range(1 + (i + k) % 2):
                rows.append({"image_id": i, "ref_id": 10 * i + k, "sent_id": len(rows),
                             "text": f"{words[(i + k) % 8]} {words[(i + 2 * k + s) % 8]} thing"})
    return ImageBank(paths, SIDE), pd.DataFrame(rows)


class ToyTraining(Training):
    """Draws from the global torch RNG (dropout: the CUDA one on CUDA), a carried numpy and a carried
    torch generator."""

    name = "toy"

    def __init__(self, epochs: int = 2, device: str = "cpu") -> None:
        self.device = device
        self.model = self.net = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 1)).to(device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-2)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda t: 1 / (1 + t))
        self.epochs = epochs
        self.rng = np.random.default_rng(1)
        self.gen = torch.Generator().manual_seed(2)

    def epoch(self, epoch: int) -> Epoch:
        return Epoch([self.rng.normal(size=(3, 4)) for _ in range(3)], 3)

    def step(self, x: np.ndarray) -> StepOut:
        x = (torch.as_tensor(x, dtype=torch.float32) + torch.rand(4, generator=self.gen)).to(self.device)
        loss = self.net(x).square().mean()
        return StepOut(loss, {"loss": loss})

    def generators(self) -> dict:
        return {"rng": self.rng, "gen": self.gen}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_toy_resume_restores_every_random_generator(tmp_path, device):
    assert_resume_is_exact(lambda run: fit(ToyTraining(device=device), run), tmp_path)


def test_a_finished_run_deletes_its_resume_file_and_a_foreign_one_is_ignored(tmp_path):
    path = tmp_path / "resume.pt"
    run = TrainingRun("toy", resume_path=path, fingerprint="abc")
    fit(ToyTraining(), run)
    assert path.is_file() and not TrainingRun("toy", resume_path=path, fingerprint="other").resuming
    assert TrainingRun("toy", resume_path=path, fingerprint="abc").state["epoch"] == 2
    run.finish()
    assert not path.exists()
    path.write_bytes(b"torn")
    assert not TrainingRun("toy", resume_path=path, fingerprint="abc").resuming


def test_non_finite_loss_stops_before_the_checkpoint(tmp_path):
    training = ToyTraining()
    with torch.no_grad():
        training.model[0].weight.fill_(float("nan"))
    path = tmp_path / "resume.pt"
    with pytest.raises(NonFiniteLossError, match=r"toy: loss term 'loss'.*epoch 0, step 0"):
        fit(training, TrainingRun("toy", resume_path=path, fingerprint="f"))
    assert not path.exists()


def test_start_keeps_the_old_model_until_a_run_finishes_and_clears_an_unwanted_resume_file(tmp_path):
    """The previous ``model.pt`` stays until a finished run replaces it (a full disk or a kill mid-run
    must not lose it); ``resume.pt`` beside it says a newer run is unfinished."""
    out = tmp_path / "step"
    out.mkdir()
    (out / "model.pt").write_bytes(b"old")
    stage = tmp_path / "stage.py"
    stage.write_text("")
    run = TrainingRun.start("toy", out, config={"lr": 1}, inputs=[], stage_script=stage, resume=True)
    fit(ToyTraining(epochs=1), run)
    assert (out / "model.pt").read_bytes() == b"old" and (out / "resume.pt").is_file()
    again = TrainingRun.start("toy", out, config={"lr": 1}, inputs=[], stage_script=stage, resume=True)
    assert again.resuming and again.fingerprint == run.fingerprint
    assert not TrainingRun.start("toy", out, config={"lr": 2}, inputs=[], stage_script=stage,
                                 resume=True).resuming
    assert not TrainingRun.start("toy", out, config={"lr": 1}, inputs=[], stage_script=stage,
                                 resume=False).resuming
    assert not (out / "resume.pt").exists()


def test_clip_pretraining_resumes_exactly(data, tmp_path):
    bank, sentences = data
    p = PARAMS.pretrain_clip.model_copy(update={"epochs": 2, "batch_size": 4, "warmup_steps": 1,
                                                "erase_prob": 0.5})

    def train(run):
        model = build_clip("tiny-rn", None, tiny=TINY_CLIP, context_length=MAX_TOKENS)
        return pretrain_clip(model, bank, sentences, p, torch.device("cpu"), seed=3, max_tokens=MAX_TOKENS,
                             run=run)

    assert_resume_is_exact(train, tmp_path)


def test_step1_resumes_exactly(data, tmp_path):
    bank, sentences = data
    p = PARAMS.step1.model_copy(update={"epochs": 2, "batch_size": 4, "num_negatives": 5,
                                        "calibration_negatives": 2, "calibration_size": SIDE,
                                        "input_size": SIDE, "amp": False})
    clip = build_clip("tiny-rn", None, tiny=TINY_CLIP, context_length=MAX_TOKENS)

    def train(run):
        model = TRISLocaliser(ClipBackbone(build_clip("tiny-rn", None, tiny=TINY_CLIP,
                                                      context_length=MAX_TOKENS)), hidden_dim=4)
        return train_step1(model, FrozenClip(clip), bank, sentences, p, torch.device("cpu"), seed=3,
                           max_tokens=MAX_TOKENS, run=run)

    assert_resume_is_exact(train, tmp_path)


def test_affinity_net_resumes_exactly(tmp_path):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (40, 40, 3), dtype=np.uint8) for _ in range(6)]
    labels = [rng.choice(np.array([0, 1, 255], np.uint8), (40, 40)) for _ in range(6)]
    p = PARAMS.pseudo_masks.affinity.model_copy(update={"epochs": 2, "batch_size": 4, "input_size": 32,
                                                        "radius": 3})
    assert_resume_is_exact(lambda run: train_affinity(images, labels, p, seed=3, run=run), tmp_path)


def test_step2_resumes_exactly(data, tmp_path):
    bank, sentences = data
    p = PARAMS.step2.model_copy(update={"epochs": 2, "batch_size": 4, "input_size": SIDE, "amp": False,
                                        "fusion_dim": 16, "decoder_dim": 8})
    rng = np.random.default_rng(0)
    masks = {int(r): (rng.random((SIDE, SIDE)) < 0.3).astype(np.uint8) for r in sentences["ref_id"].unique()}

    def train(run):
        clip = build_clip("tiny-rn", None, tiny=TINY_CLIP, context_length=MAX_TOKENS)
        model = ReferringSegmenter(ClipBackbone(clip), p.fusion_dim, p.decoder_dim)
        return train_step2(model, bank, sentences, masks, p, torch.device("cpu"), seed=3,
                           max_tokens=MAX_TOKENS, run=run)

    assert_resume_is_exact(train, tmp_path)
