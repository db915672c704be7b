"""Peak memory and wall time of the whole ``make_pseudo_masks`` stage on RefCOCO-shaped sets of two sizes.

For each size (train objects), a REFER-layout set with RefCOCO (unc)'s proportions is written by
:func:`bench.refcoco_scale.write_refcoco_sized` (640x480 JPEGs, COCO polygons, 1-3 sentences an object),
indexed as the ``index`` stage does, given a ``responses.zarr`` of 10x10 response-like maps (RN50 at
320 px) bound to that index, and the embedded default's frozen CLIP (``artifacts/clip``, so PRMS runs
for real). Then the stage script itself runs in a fresh interpreter with the repository's
``params.yaml`` (``--workers`` overrides ``pseudo_masks.workers``), and a sampler reads, every 0.2 s:

- the RSS of the stage's main process (peak);
- the PSS summed over the main process and its refinement workers (peak; PSS splits pages the forked
  workers share with the main process, so the sum is what the job costs the machine);
- ``ru_maxrss`` of the job (the largest single process, from ``wait4``).

The stage streams, so these must not grow with the number of objects; the figure to read is the
growth per 1,000 objects between the two sizes. A peak is set by short-lived arrays (an affinity
batch, an encoder batch) and moves by some tens of MiB from run to run of the same set, so
``--repeat`` runs each set again and the growth is taken between the sizes' means. ``--code DIR``
runs another checkout's stage (e.g. the code before streaming) on the same sets.

    python -m bench.pseudo_masks_memory                          # 2,200 and 4,400 train objects
    python -m bench.pseudo_masks_memory --objects 2200 6600 --repeat 2  # the README's figures
    python -m bench.pseudo_masks_memory --objects 2000 8000 --workers 16
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import yaml

from bench.common import ROOT, require
from bench.refcoco_scale import REFCOCO_UNC, RESPONSE_MAP, _response_maps, measure_index, write_refcoco_sized

SAMPLE_S = 0.2


def build_workdir(work: Path, objects: int, workers: int, clip: Path, seed: int = 0) -> dict:
    """A directory the stage can run in: ``artifacts/{index,responses.zarr,clip}`` and ``params.yaml``
    for a RefCOCO-shaped set of about ``objects`` train objects. Returns the set's counts."""
    from pipeline.data.index import load_index
    from pipeline.params import read_params_yaml
    from pipeline.store import RESPONSE_SCHEMA, RecordWriter

    scale = objects / REFCOCO_UNC["train"][1]
    write_refcoco_sized(work / "refer", scale, seed=seed)
    index_dir = work / "artifacts" / "index"
    index_stats = measure_index(work / "refer", index_dir)
    index = load_index(index_dir)
    sentences = index.sentences.merge(index.images[["image_id", "height", "width"]], on="image_id")
    rng = np.random.default_rng(seed)
    with RecordWriter(work / "artifacts" / "responses.zarr", RESPONSE_SCHEMA, (RESPONSE_MAP, RESPONSE_MAP),
                      4096, {"input_size": [320, 320]}, index=index_dir) as writer:
        for split, rows in sentences.groupby("split", sort=True):
            rows = rows.sort_values("sent_id")
            writer.add_split(str(split), len(rows))
            for start in range(0, len(rows), 4096):
                part = rows.iloc[start:start + 4096]
                writer.write_table(str(split), start, _response_maps(rng, len(part)), part)
    shutil.copytree(clip, work / "artifacts" / "clip")
    raw = read_params_yaml(ROOT / "params.yaml")
    raw["pseudo_masks"]["workers"] = workers
    (work / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    train = index.refs[index.refs["split"] == "train"]
    return {"images": int(train["image_id"].nunique()), "objects": len(train),
            "sentences": int((sentences["split"] == "train").sum()), "index_s": index_stats["seconds"]}


def _sample(proc: psutil.Process, peaks: dict, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            tree = [proc, *proc.children(recursive=True)]
            main = proc.memory_info().rss
            pss = 0
            for p in tree:
                try:
                    pss += p.memory_full_info().pss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            peaks["main_rss"] = max(peaks["main_rss"], main)
            peaks["tree_pss"] = max(peaks["tree_pss"], pss)
            peaks["processes"] = max(peaks["processes"], len(tree))
        except psutil.NoSuchProcess:
            return
        stop.wait(SAMPLE_S)


def run_stage(work: Path, code: Path) -> dict:
    """Run ``code``'s make_pseudo_masks in ``work``; wall time, sampled peaks and ``ru_maxrss``."""
    env = {**os.environ, "PYTHONPATH": str(code), "TQDM_DISABLE": "1"}
    log = (work / "stage.log").open("w")
    t0 = time.perf_counter()
    script = str(code / "stages" / "make_pseudo_masks.py")
    child = subprocess.Popen([sys.executable, script], cwd=work, env=env, stdout=log,
                             stderr=subprocess.STDOUT)
    peaks = {"main_rss": 0, "tree_pss": 0, "processes": 0}
    stop = threading.Event()
    sampler = threading.Thread(target=_sample, args=(psutil.Process(child.pid), peaks, stop), daemon=True)
    sampler.start()
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - t0
    stop.set()
    sampler.join()
    child.returncode = os.waitstatus_to_exitcode(status)
    log.close()
    text = (work / "stage.log").read_text()
    if child.returncode != 0:
        raise SystemExit(f"bench: make_pseudo_masks failed in {work}:\n{text[-3000:]}")
    stage_s = next((float(line.split()[-2]) for line in text.splitlines() if "] wall time" in line), wall)
    report = json.loads((work / "artifacts" / "reports" / "pseudo_masks.json").read_text())
    return {"wall_s": wall, "stage_s": stage_s, "ru_maxrss": usage.ru_maxrss * 1024, **peaks,
            "n_objects": report["n_objects"]}


def measure(objects: int, workers: int, code: Path, keep: Path | None, repeat: int = 1) -> list[dict]:
    """Build a set of ``objects`` train objects and measure the stage on it ``repeat`` times."""
    clip = ROOT / "artifacts" / "clip"
    require(clip)
    work = Path(tempfile.mkdtemp(prefix=f"tris-pm-{objects}-")) if keep is None else keep / str(objects)
    try:
        counts = build_workdir(work, objects, workers, clip)
        return [{**counts, **run_stage(work, code)} for _ in range(repeat)]
    finally:
        if keep is None:
            shutil.rmtree(work, ignore_errors=True)


def report(rows: list[dict], workers: int, code: Path) -> str:
    """The markdown table and the growth per 1,000 objects between the smallest and the largest set."""
    mib = 2**20
    lines = [f"make_pseudo_masks ({code}), pseudo_masks.workers {workers}, {os.cpu_count()} cores:", "",
             "| train objects (images, sentences) | wall time | peak RSS, main process | peak PSS, all "
             "processes | ru_maxrss |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['objects']:,} ({r['images']:,}, {r['sentences']:,}) | {r['stage_s']:.0f} s "
                     f"({r['wall_s']:.0f} s with start-up) | {r['main_rss'] / mib:,.0f} MiB | "
                     f"{r['tree_pss'] / mib:,.0f} MiB ({r['processes']} processes) | "
                     f"{r['ru_maxrss'] / mib:,.0f} MiB |")
    sizes = sorted({r["objects"] for r in rows})
    if len(sizes) > 1:
        def mean(objects: int, key: str) -> float:
            return float(np.mean([r[key] for r in rows if r["objects"] == objects]))

        a, b = sizes[0], sizes[-1]
        per_k = 1000 / (b - a)
        growth = {key: (mean(b, key) - mean(a, key)) * per_k for key in ("main_rss", "tree_pss", "ru_maxrss")}
        lines += ["", f"growth per 1,000 objects ({a:,} -> {b:,}, means over the runs of each size): main "
                  f"RSS {growth['main_rss'] / mib:+.1f} MiB, all-process PSS {growth['tree_pss'] / mib:+.1f} "
                  f"MiB, ru_maxrss {growth['ru_maxrss'] / mib:+.1f} MiB, time "
                  f"{(mean(b, 'stage_s') - mean(a, 'stage_s')) * per_k:.0f} s"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, nargs="+", default=[2200, 4400], help="train objects per set")
    parser.add_argument("--workers", type=int, default=2, help="pseudo_masks.workers for the runs")
    parser.add_argument("--code", type=Path, default=ROOT, help="checkout whose stage runs")
    parser.add_argument("--keep", type=Path, help="build the sets under this folder and keep them")
    parser.add_argument("--repeat", type=int, default=1, help="runs of the stage on each set")
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    args = parser.parse_args()
    if any(n < 10 for n in args.objects):
        parser.error("--objects: at least 10 train objects per set")
    if args.repeat < 1:
        parser.error("--repeat: at least 1")
    rows = [row for n in sorted(args.objects)
            for row in measure(n, args.workers, args.code.resolve(), args.keep, args.repeat)]
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    print(report(rows, args.workers, args.code.resolve()))


if __name__ == "__main__":
    main()
