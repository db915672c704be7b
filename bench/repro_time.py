"""Wall time of the embedded default's `dvc repro`: the full run on a fresh clone with its per-stage
breakdown (each stage prints ``[stage] wall time X s``), and the no-op `dvc repro` that follows
(goal <= 3 s).

    python -m bench.repro_time              # full run in a temporary clone of HEAD (~15 min on 2 cores)
    python -m bench.repro_time --in-place   # `dvc repro --force` in this checkout (rewrites artifacts/)
    python -m bench.repro_time --noop       # only the no-op repro, in this checkout (after `dvc repro`)
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from bench.common import ROOT, best_of

STAGE_TIME = re.compile(r"^\[(\w+)\] wall time ([0-9.]+) s$", re.MULTILINE)


def dvc_repro(repo: Path, *extra: str) -> str:
    result = subprocess.run(["dvc", "repro", *extra], cwd=repo, capture_output=True, text=True,
                            env={"TQDM_DISABLE": "1", **os.environ})
    if result.returncode != 0:
        log = f"{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
        raise SystemExit(f"bench: dvc repro failed in {repo}:\n{log}")
    return result.stdout


def noop_seconds(repo: Path, repeats: int = 3) -> float:
    return best_of(repeats, lambda: dvc_repro(repo))


def timed_full_repro(repo: Path, *extra: str) -> dict:
    t0 = time.perf_counter()
    log = dvc_repro(repo, *extra)
    total = time.perf_counter() - t0
    stages = {name: float(s) for name, s in STAGE_TIME.findall(log)}
    return {"full_s": total, "stages": stages, "overhead_s": total - sum(stages.values()),
            "noop_s": noop_seconds(repo), "where": "this checkout" if repo == ROOT else "a fresh clone"}


def run(mode: str = "clone") -> dict:
    """``mode``: ``clone`` (full run in a fresh clone), ``in-place`` (forced run here) or ``noop``."""
    if mode == "noop":
        return {"noop_s": noop_seconds(ROOT)}
    if mode == "in-place":
        return timed_full_repro(ROOT, "--force")
    tmp = Path(tempfile.mkdtemp(prefix="tris-repro-"))
    try:
        repo = tmp / "repo"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(repo)], check=True)
        return timed_full_repro(repo)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--noop", action="store_true", help="only time a no-op repro of this checkout")
    group.add_argument("--in-place", action="store_true", help="forced full repro of this checkout")
    args = parser.parse_args()
    r = run("noop" if args.noop else "in-place" if args.in_place else "clone")
    if "full_s" in r:
        for name, seconds in r["stages"].items():
            print(f"  {name:<18} {seconds:7.1f} s")
        print(f"full dvc repro in {r['where']}: {r['full_s']:.0f} s "
              f"(stages {sum(r['stages'].values()):.0f} s + start-up/DVC {r['overhead_s']:.0f} s)")
    print(f"no-op dvc repro: {r['noop_s']:.2f} s (goal <= 3 s)")


if __name__ == "__main__":
    main()
