"""The benchmark suite in one command: every figure of docs/benchmarks.md's table, measured in one
run on this machine, each beside its goal.

    python -m bench               # all, with a full `dvc repro` in a temporary clone (~15 min, 2 cores)
    python -m bench --in-place    # the full repro as `dvc repro --force` here (rebuilds artifacts/)
    python -m bench --quick       # no full repro (no-op repro of this checkout only)

The RefCOCO-scale costs (``bench.refcoco_scale``: a RefCOCO-sized REFER set indexed and stored, per-object
PRMS / refinement at 640x480, 1 -> 2 process scaling, projected make_pseudo_masks times) follow as a
second table; ``--no-refcoco`` skips them (~10 min on 2 cores).

The other benchmarks read the artifacts of a finished `dvc repro` of this checkout (model, index,
stores); with ``--in-place`` they read the ones the timed run has just built.
"""

from __future__ import annotations

import argparse
import os
import platform

import torch

from bench import (
    dump_throughput,
    loop_overhead,
    prms_calls,
    random_walk_memory,
    refcoco_scale,
    repro_time,
    step1_throughput,
    storage,
)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    return f"{cpu}, {os.cpu_count()} cores{gpu}; torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="skip the full dvc repro")
    group.add_argument("--in-place", action="store_true", help="time `dvc repro --force` in this checkout")
    parser.add_argument("--no-refcoco", action="store_true", help="skip the RefCOCO-scale table")
    args = parser.parse_args()
    rows: list[tuple[str, str, str]] = []

    def add(what: str, figure: str, goal: str = "") -> None:
        rows.append((what, figure, goal))
        print(f"  {what}: {figure}", flush=True)

    print(f"machine: {machine()}", flush=True)
    r = repro_time.run("noop" if args.quick else "in-place" if args.in_place else "clone")
    if "full_s" in r:
        breakdown = ", ".join(f"{k} {v:.0f}" for k, v in r["stages"].items())
        add(f"full dvc repro ({r['where']})", f"**{r['full_s'] / 60:.1f} min** (s: {breakdown}; "
            f"start-up/DVC {r['overhead_s']:.0f})")
    add("no-op dvc repro", f"**{r['noop_s']:.2f} s**", "<= 3 s")
    d = dump_throughput.run()
    add("response dump vs forward-only throughput", f"{d['dump_per_s']:.0f} / {d['forward_per_s']:.0f} "
        f"sentences/s = **{d['ratio']:.3f}**", ">= 0.9")
    s = storage.run()
    add("responses.zarr bytes per sentence vs float32 .npy per ref",
        f"{s['responses_bytes_per_sentence']:.0f} B / {s['npy_bytes_per_ref']:.0f} B = "
        f"**{100 * s['responses_ratio']:.3f} %**", "<= 1 %")
    add("pseudo_masks.zarr bytes per ref vs float32 .npy per ref",
        f"{s['pseudo_mask_bytes_per_ref']:.0f} B / {s['npy_bytes_per_ref']:.0f} B = "
        f"**{100 * s['pseudo_masks_ratio']:.3f} %**", "<= 1 %")
    w = random_walk_memory.run()
    mib = 2**20
    add("random walk 640x480 / stride 4: dense vs sparse peak memory",
        f"{w['dense']['peak_bytes'] / mib:.0f} MiB / {w['sparse']['peak_bytes'] / mib:.1f} MiB = "
        f"**{w['memory_ratio']:.0f}x**", ">= 50x")
    add("random walk: dense (extrapolated) vs sparse time",
        f"{w['dense']['time_s']:.1f} s / {w['sparse']['time_s']:.2f} s = **{w['time_ratio']:.0f}x**")
    p = prms_calls.run()
    add("PRMS image-encoder calls per object",
        f"**{p['calls_per_ref']:.3f}** ({p['images_per_ref']:.2f} masked images/object; "
        f"{p['naive_calls_per_ref']:.2f} with one call per expression)")
    t = step1_throughput.run()
    add(f"Step-1 training throughput ({t['device']}, fp32)", f"**{t['fp32_images_per_s']:.1f}** images/s")
    if "amp_images_per_s" in t:
        add("Step-1 training, bf16 autocast vs fp32", f"{t['amp_images_per_s']:.1f} images/s = "
            f"**x{t['amp_speedup']:.2f}** (peak GPU memory {t['fp32_peak_mib']:.0f} / "
            f"{t['amp_peak_mib']:.0f} MiB)")
    o = loop_overhead.run()
    add(f"training loop vs bare forward + backward + optimiser step (Step-1, {o['device']})",
        f"{o['loop_images_per_s']:.1f} / {o['bare_images_per_s']:.1f} images/s = **{o['ratio']:.3f}**",
        ">= 0.9")
    print(f"\nMachine: {machine()}\n")
    print("| benchmark | measured | goal |\n|---|---|---|")
    for what, figure, goal in rows:
        print(f"| {what} | {figure} | {goal} |")
    if not args.no_refcoco:
        print()
        print(refcoco_scale.report(refcoco_scale.run()))


if __name__ == "__main__":
    main()
