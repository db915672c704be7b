"""Step-1 training throughput (images/s) on the embedded default's model and data, the host syncs per
step, and on CUDA the speed-up of bf16 autocast (``step1.amp``) over fp32 and each run's peak GPU memory.

It reads ``params.yaml`` and ``artifacts/`` of the working directory, so run in another built workdir it
measures that configuration (``bench.paper_step1`` does this for the paper's RN50 at 320 px).

Times ``--steps`` optimisation steps of the real training loop (:func:`pipeline.train.loop.fit` over
:class:`pipeline.train.step1.Step1Training`: batch sampling, image prefetch, classification +
calibration, batch ``step1.batch_size``) after ``--warmup`` steps. The timed window opens after the
warm-up steps and closes after the last step, each end once the device has finished its queued work, so
one-time setup (loading, the frozen CLIP's sentence embeddings, the optimiser, kernel selection and the
allocator's first requests) is not in it; images are decoded before timing (the stage preloads them too).

Host syncs are counted over the timed steps (:class:`HostSyncs`): on CUDA every call that makes the host
wait for the GPU (torch's sync debug mode); on the CPU, where nothing waits, the tensor reads by project
code that would wait on a GPU (``item``, ``float``, ``bool``, ``tolist``...).

    python -m bench.step1_throughput [--steps 8] [--warmup 2]
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from bench.common import require, step1_setup
from pipeline import paths
from pipeline.data.samples import ImageBank
from pipeline.models.checkpoints import build_localiser
from pipeline.train.loop import Epoch, StepOut, Training, fit
from pipeline.train.step1 import Step1Training, localiser_meta

TORCH_DIR = str(Path(torch.__file__).resolve().parent)
# Tensor methods that hand a value to the host: each one makes the host wait for the GPU's queued work
READS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__")


class HostSyncs:
    """Counts the host's waits on the device between :meth:`start` and :meth:`stop`, by call site.

    On CUDA torch's sync debug mode warns at every synchronising call (a value read, a blocking copy, a
    ``nonzero``); each warning is counted at the line that made it. Elsewhere the device is the host and
    nothing waits, so what is counted is the reads of tensor values (:data:`READS`) made outside torch
    itself, i.e. by this project's code: the ones that would each be a sync on a GPU. (torch's own reads,
    such as the optimiser's step counters, are of host tensors on a GPU too.)
    """

    def __init__(self, device: torch.device | str) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.sites: Counter[str] = Counter()
        self._undo: list[tuple[str, Any]] = []  # (method, torch.Tensor's own entry or None if inherited)
        self._caught: warnings.catch_warnings | None = None
        self._records: list[warnings.WarningMessage] = []

    @property
    def count(self) -> int:
        return sum(self.sites.values())

    def start(self) -> None:
        if self.cuda:
            self._caught = warnings.catch_warnings(record=True)
            self._records = self._caught.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            return
        for name in READS:
            self._undo.append((name, torch.Tensor.__dict__.get(name)))
            setattr(torch.Tensor, name, self._counting(getattr(torch.Tensor, name)))

    def stop(self) -> None:
        if self.cuda:
            torch.cuda.set_sync_debug_mode("default")
            if self._caught is not None:
                self._caught.__exit__(None, None, None)
                self._caught = None
            for w in self._records:
                if "synchroniz" in str(w.message):
                    self.sites[f"{w.filename}:{w.lineno}"] += 1
            self._records = []
            return
        for name, own in reversed(self._undo):
            if own is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, own)
        self._undo.clear()

    def __enter__(self) -> HostSyncs:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _counting(self, original: Any) -> Any:
        sites = self.sites

        def read(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            caller = sys._getframe(1)
            if not caller.f_code.co_filename.startswith(TORCH_DIR):
                sites[f"{caller.f_code.co_filename}:{caller.f_lineno}"] += 1
            return original(tensor, *args, **kwargs)

        return read


class Timed(Training):
    """``inner``'s training (its real epochs, batches, steps and loop) with a clock and a sync counter
    over the steps after the first ``warmup`` (at least 1) ones: the window opens after step ``warmup``
    and closes after the last step of the first epoch, each end once the device is idle."""

    def __init__(self, inner: Training, warmup: int, device: torch.device) -> None:
        self.inner, self.warmup, self.device = inner, warmup, device
        self.name, self.model, self.net = inner.name, inner.model, inner.net
        self.optimizer, self.scheduler, self.epochs = inner.optimizer, inner.scheduler, inner.epochs
        self.freeze_batchnorm, self.log_every = inner.freeze_batchnorm, inner.log_every
        self.syncs = HostSyncs(device)
        if warmup < 1:
            raise ValueError(f"bench: warmup must be at least 1 step, got {warmup}")
        self.done, self.images, self.size = 0, 0, 0
        self.t0 = self.t1 = 0.0

    def epoch(self, epoch: int) -> Epoch:
        work = self.inner.epoch(epoch)
        self.size = self.size or work.size
        return work

    def step(self, item: Any) -> StepOut:
        if self.done >= self.warmup:
            self.images += len(item[0])
        return self.inner.step(item)

    def after_step(self) -> None:
        self.inner.after_step()
        self.done += 1
        if self.done == self.warmup:
            self._idle()
            self.syncs.start()
            self.t0 = time.perf_counter()
        if self.done == self.size:
            self.syncs.stop()
            self._idle()
            self.t1 = time.perf_counter()

    def metrics(self) -> dict[str, float]:
        return self.inner.metrics()

    def _idle(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def result(self) -> dict[str, Any]:
        steps = self.done - self.warmup
        return {"images_per_s": self.images / (self.t1 - self.t0), "steps": steps, "images": self.images,
                "syncs_per_step": self.syncs.count / max(1, steps), "sync_sites": dict(self.syncs.sites)}


def measure(steps: int, warmup: int, amp: bool) -> dict[str, Any]:
    """Images/s and host syncs per step of ``steps`` timed steps after ``warmup`` ones, the device, and
    on CUDA the peak GPU memory of the timed steps (MiB)."""
    setup = step1_setup(amp=amp)
    params, device, cfg = setup.params, setup.device, setup.step1
    # one sentence per image and exactly `warmup + steps` full batches of distinct images
    images = setup.train["image_id"].drop_duplicates().to_numpy()[: (warmup + steps) * cfg.batch_size]
    subset = setup.train[setup.train["image_id"].isin(images)].drop_duplicates("image_id")
    subset = subset.reset_index(drop=True)
    if len(subset) < (warmup + steps) * cfg.batch_size:
        raise SystemExit(f"bench.step1_throughput: {len(subset)} train images, fewer than "
                         f"(--warmup + --steps) x step1.batch_size = {(warmup + steps) * cfg.batch_size}")
    bank = ImageBank.from_index(setup.index.images, cfg.input_size)
    model = build_localiser(paths.CLIP, localiser_meta(params, str(paths.CLIP)))
    training = Step1Training(model, setup.frozen, bank, subset, cfg, device, seed=params.base.seed,
                             max_tokens=params.model.max_tokens)
    timed = Timed(training, warmup, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    fit(timed)
    out = {"device": str(device), **timed.result()}
    if device.type == "cuda":
        out["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def run(steps: int = 8, warmup: int = 2) -> dict:
    require(paths.CLIP, paths.INDEX)
    fp32 = measure(steps, warmup, amp=False)
    out = {"device": fp32["device"], "steps": steps, "warmup": warmup,
           "fp32_images_per_s": fp32["images_per_s"], "fp32_syncs_per_step": fp32["syncs_per_step"],
           "fp32_sync_sites": fp32["sync_sites"]}
    if out["device"].startswith("cuda"):
        amp = measure(steps, warmup, amp=True)
        out.update(amp_images_per_s=amp["images_per_s"],
                   amp_speedup=amp["images_per_s"] / fp32["images_per_s"],
                   amp_syncs_per_step=amp["syncs_per_step"], amp_sync_sites=amp["sync_sites"],
                   fp32_peak_mib=fp32["peak_mib"], amp_peak_mib=amp["peak_mib"])
    return out


def describe(r: dict, what: str = "Step-1 training") -> str:
    """One line of :func:`run`'s figures: images/s and host syncs per step, and on CUDA the bf16 speed-up
    and peak memory."""
    line = f"{what} on {r['device']}: {r['fp32_images_per_s']:.1f} images/s fp32"
    if "amp_images_per_s" in r:
        line += (f", {r['amp_images_per_s']:.1f} images/s bf16 autocast (x{r['amp_speedup']:.2f}); "
                 f"peak GPU memory {r['fp32_peak_mib']:.0f} MiB fp32, {r['amp_peak_mib']:.0f} MiB bf16")
    if "fp32_syncs_per_step" in r:
        syncs = f"{r['fp32_syncs_per_step']:.2f}"
        if "amp_syncs_per_step" in r:
            syncs += f" fp32, {r['amp_syncs_per_step']:.2f} bf16"
        line += f"; host syncs per step {syncs} (timed: {r['steps']} steps after {r['warmup']} warm-up)"
    return line


def sites(r: dict) -> str:
    """Where the counted host syncs came from (one line per call site), or an empty string."""
    counts: Counter[str] = Counter(r.get("fp32_sync_sites", {})) + Counter(r.get("amp_sync_sites", {}))
    return "\n".join(f"  {n} x {site}" for site, n in counts.most_common())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 1:
        parser.error("--steps and --warmup must be at least 1")
    r = run(args.steps, args.warmup)
    print(describe(r))
    if sites(r):
        print("host syncs in the timed steps, by call site:\n" + sites(r))


if __name__ == "__main__":
    main()
