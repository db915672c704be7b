"""What the shared training loop costs: Step-1 images/s through :func:`pipeline.train.loop.fit` (NaN
guard, DDP-style loss reduction, progress bar, epoch summary, atomic resume checkpoint) against the bare
forward + backward + optimiser step of the same model on the same batches, measured in one run.

Both sides replay one list of batches decoded and moved to the device beforehand, so image decoding is
timed by neither; the loop side writes its real per-epoch checkpoint. Each side's figure is the best of
``--repeats`` passes (the least disturbed by other load).

    python -m bench.loop_overhead [--steps 6] [--repeats 3]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import torch

from bench.common import best_of, step1_setup
from pipeline import paths
from pipeline.data.samples import ImageBank
from pipeline.models.checkpoints import build_localiser
from pipeline.train.loop import Epoch, StepOut, Training, TrainingRun, fit
from pipeline.train.step1 import Step1Training, localiser_meta


class Replay(Training):
    """``inner``'s model, optimiser and step over a fixed list of ``items``, one epoch."""

    def __init__(self, inner: Training, items: list[Any]) -> None:
        self.inner, self.items = inner, items
        self.name, self.model, self.net = inner.name, inner.model, inner.net
        self.optimizer, self.scheduler, self.epochs = inner.optimizer, inner.scheduler, 1
        self.freeze_batchnorm = inner.freeze_batchnorm

    def epoch(self, epoch: int) -> Epoch:
        return Epoch(self.items, len(self.items))

    def step(self, item: Any) -> StepOut:
        return self.inner.step(item)

    def metrics(self) -> dict[str, float]:
        return self.inner.metrics()


def bare(training: Training, items: list[Any]) -> None:
    """Forward, backward and optimiser step per item, nothing else."""
    training.net.train()
    for item in items:
        out = training.step(item)
        training.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        training.optimizer.step()
        training.scheduler.step()


def ratio(loop_images_per_s: float, bare_images_per_s: float) -> float:
    """The loop's throughput as a share of the bare steps' (goal >= 0.9)."""
    return loop_images_per_s / bare_images_per_s


def run(steps: int = 6, repeats: int = 3) -> dict:
    setup = step1_setup()
    params, device, p = setup.params, setup.device, setup.step1
    bank = ImageBank.from_index(setup.index.images, p.input_size)
    training = Step1Training(build_localiser(paths.CLIP, localiser_meta(params, str(paths.CLIP))),
                             setup.frozen, bank, setup.train, p, device,
                             seed=params.base.seed, max_tokens=params.model.max_tokens)
    items = list(training.epoch(0).inputs)[: steps + 1]
    images = sum(len(rows) for rows, _ in items[1:])
    bare(training, items[:1])  # warm-up (allocator, kernels)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def time_bare() -> None:
        bare(training, items[1:])
        sync()

    with tempfile.TemporaryDirectory() as tmp:
        resume = Path(tmp) / "resume.pt"

        def time_loop() -> None:
            resume.unlink(missing_ok=True)  # each pass trains its epoch (none resumes the previous one)
            fit(Replay(training, items[1:]), TrainingRun("bench", resume_path=resume))
            sync()

        sync()
        bare_s = best_of(repeats, time_bare)
        loop_s = best_of(repeats, time_loop)
    out = {"device": str(device), "images": images, "bare_images_per_s": images / bare_s,
           "loop_images_per_s": images / loop_s}
    out["ratio"] = ratio(out["loop_images_per_s"], out["bare_images_per_s"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    r = run(args.steps, args.repeats)
    print(f"Step-1 on {r['device']}, {r['images']} images: loop {r['loop_images_per_s']:.1f} images/s, "
          f"bare steps {r['bare_images_per_s']:.1f} images/s, ratio {r['ratio']:.3f} (goal >= 0.9)")


if __name__ == "__main__":
    main()
