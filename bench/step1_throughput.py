"""Step-1 training throughput (images/s) on the embedded default's model and data, and on CUDA the
speed-up of bf16 autocast (``step1.amp``) over fp32 and each run's peak GPU memory.

It reads ``params.yaml`` and ``artifacts/`` of the working directory, so run in another built workdir it
measures that configuration (``bench.paper_step1`` does this for the paper's RN50 at 320 px).

Times ``--steps`` optimisation steps of the real training (:func:`pipeline.train.step1.train_step1`,
classification + calibration, batch ``step1.batch_size``) after one warm-up step; images are decoded
before timing (the stage preloads them too).

    python -m bench.step1_throughput [--steps 8]
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.common import require, step1_setup
from pipeline import paths
from pipeline.data.samples import ImageBank
from pipeline.models.checkpoints import build_localiser
from pipeline.train.step1 import localiser_meta, train_step1


def images_per_second(steps: int, amp: bool) -> tuple[float, str, float | None]:
    """Images/s of ``steps`` timed steps, the device, and the peak GPU memory of the timed steps (MiB;
    None on CPU)."""
    setup = step1_setup(amp=amp)
    params, device, index, train, frozen, cfg = (setup.params, setup.device, setup.index, setup.train,
                                                 setup.frozen, setup.step1)
    shared = {"seed": params.base.seed, "max_tokens": params.model.max_tokens}
    # one sentence per image and exactly `steps` full batches (+ 1 warm-up) of distinct images
    images = train["image_id"].drop_duplicates().to_numpy()[: (steps + 1) * cfg.batch_size]
    subset = train[train["image_id"].isin(images)].drop_duplicates("image_id").reset_index(drop=True)
    bank = ImageBank.from_index(index.images, params.step1.input_size)
    bank.preload(subset["image_id"])
    warm = subset.iloc[: cfg.batch_size]
    train_step1(build_localiser(paths.CLIP, localiser_meta(params, str(paths.CLIP))), frozen, bank, warm,
                cfg, device, **shared)
    model = build_localiser(paths.CLIP, localiser_meta(params, str(paths.CLIP)))
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    train_step1(model, frozen, bank, subset.iloc[cfg.batch_size:], cfg, device, **shared)
    peak_mib = None
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak_mib = torch.cuda.max_memory_allocated(device) / 2**20
    return (len(subset) - cfg.batch_size) / (time.perf_counter() - t0), str(device), peak_mib


def run(steps: int = 8) -> dict:
    require(paths.CLIP, paths.INDEX)
    fp32, device, fp32_peak = images_per_second(steps, amp=False)
    out = {"device": device, "fp32_images_per_s": fp32}
    if device.startswith("cuda"):
        amp, _, amp_peak = images_per_second(steps, amp=True)
        out.update(amp_images_per_s=amp, amp_speedup=amp / fp32, fp32_peak_mib=fp32_peak,
                   amp_peak_mib=amp_peak)
    return out


def describe(r: dict, what: str = "Step-1 training") -> str:
    """One line of :func:`run`'s figures: images/s, and on CUDA the bf16 speed-up and peak memory."""
    line = f"{what} on {r['device']}: {r['fp32_images_per_s']:.1f} images/s fp32"
    if "amp_images_per_s" in r:
        line += (f", {r['amp_images_per_s']:.1f} images/s bf16 autocast (x{r['amp_speedup']:.2f}); "
                 f"peak GPU memory {r['fp32_peak_mib']:.0f} MiB fp32, {r['amp_peak_mib']:.0f} MiB bf16")
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    print(describe(run(parser.parse_args().steps)))


if __name__ == "__main__":
    main()
