"""Peak memory and time of the sparse random walk vs IRN's dense transition matrix.

Setting: a 640x480 image at stride 4 (a 160x120 grid, 19,200 pixels), radius 5, beta 10, exp_times 8.
The dense reference needs a 19,200^2 float32 matrix (1.47 GB) and a product of two of them per squaring;
a full chain of 8 squarings takes many minutes on a small CPU. Its *peak* memory is reached by the first
squaring already (every later squaring holds the same two matrices), so the dense side is measured as
"build T + one squaring" and its full time is extrapolated as build + exp_times * squaring.

Each measurement runs in a fresh subprocess so peaks do not mix. On CUDA the peak is
``torch.cuda.max_memory_allocated``. On CPU (tracemalloc cannot see torch's allocations) it is the
process's resident high-water mark ``VmHWM`` over its resident size ``VmRSS`` after setup; the mark is
reset to the current size first (``echo 5 > /proc/self/clear_refs``), because the max RSS of
``getrusage`` cannot be reset and an earlier transient peak (importing torch, the warm-up) hides
everything below it. Freed memory must leave the process for this to work, so the worker fixes glibc's
mmap threshold (``MALLOC_MMAP_THRESHOLD_``): every tensor above 64 KiB is its own mapping, returned to
the OS when freed.

    python -m bench.random_walk_memory [--device cpu|cuda] [--height 120 --width 160]   (from the repo root)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from pipeline.pseudo.random_walk import random_walk, transition_matrix_dense


def _inputs(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    boundary = torch.rand(args.height, args.width, generator=g) ** 4  # mostly low, some edges
    x = torch.rand(1, args.height, args.width, generator=g)
    return x.to(args.device), boundary.to(args.device)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _warm_up(args: argparse.Namespace) -> None:
    """Run both code paths once on a tiny grid so lazily loaded kernels, thread pools and allocator
    arenas are resident before the baseline is taken: the peak then counts the data, not the libraries."""
    g = torch.Generator().manual_seed(1)
    b = torch.rand(12, 12, generator=g).to(args.device)
    random_walk(torch.rand(1, 12, 12, generator=g).to(args.device), b, args.radius, args.beta, 1)
    t = transition_matrix_dense(b, args.radius, args.beta)
    _ = t @ t
    _sync(args.device)


def _resident_bytes() -> tuple[int, int]:
    """(current, high-water) resident bytes of this process, from /proc/self/status."""
    status = Path("/proc/self/status").read_text()
    kib = {key: int(re.search(rf"{key}:\s+(\d+)", status).group(1)) for key in ("VmRSS", "VmHWM")}
    return kib["VmRSS"] * 1024, kib["VmHWM"] * 1024


def _reset_resident_peak() -> bool:
    """Reset VmHWM to the current VmRSS (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _worker(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    x, boundary = _inputs(args)
    _warm_up(args)
    cuda = args.device.startswith("cuda")
    resident = not cuda and _reset_resident_peak()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    elif resident:
        base = _resident_bytes()[0]
    else:  # no /proc: the getrusage peak, which under-counts when setup peaked higher
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out: dict = {}
    start = time.perf_counter()
    if args.worker == "sparse":
        random_walk(x, boundary, args.radius, args.beta, args.exp_times)
        _sync(args.device)
        out["time_s"] = time.perf_counter() - start
    else:
        T = transition_matrix_dense(boundary, args.radius, args.beta)
        _sync(args.device)
        built = time.perf_counter()
        T2 = T @ T
        _sync(args.device)
        squared = time.perf_counter()
        del T2
        out["build_s"] = built - start
        out["square_s"] = squared - built
        out["time_s"] = out["build_s"] + args.exp_times * out["square_s"]
    if cuda:
        out["peak_bytes"] = torch.cuda.max_memory_allocated() - base
    elif resident:
        out["peak_bytes"] = _resident_bytes()[1] - base
    else:
        out["peak_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return out


def _run(kind: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "bench.random_walk_memory", "--worker", kind]
    for key in ("device", "height", "width", "radius", "beta", "exp_times", "threads"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
    done = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(device: str | None = None, height: int = 120, width: int = 160, radius: int = 5, beta: float = 10.0,
        exp_times: int = 8, threads: int = 1) -> dict:
    """Sparse and dense measurements, each in its own subprocess, and their ratios."""
    args = argparse.Namespace(device=device or ("cuda" if torch.cuda.is_available() else "cpu"),
                              height=height, width=width, radius=radius, beta=beta, exp_times=exp_times,
                              threads=threads)
    sparse, dense = _run("sparse", args), _run("dense", args)
    return {"sparse": sparse, "dense": dense,
            "memory_ratio": dense["peak_bytes"] / max(sparse["peak_bytes"], 1),
            "time_ratio": dense["time_s"] / sparse["time_s"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--height", type=int, default=120)
    p.add_argument("--width", type=int, default=160)
    p.add_argument("--radius", type=int, default=5)
    p.add_argument("--beta", type=float, default=10.0)
    p.add_argument("--exp-times", dest="exp_times", type=int, default=8)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads for both methods (1: stable numbers on a shared machine; the sparse "
        "walk's many small CSR products slow down ~8x with 2 threads when another process holds a core)",
    )
    p.add_argument("--worker", choices=["sparse", "dense"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(_worker(args)))
        return

    n = args.height * args.width
    print(
        f"grid {args.height}x{args.width} ({n} px), radius {args.radius}, beta {args.beta}, "
        f"exp_times {args.exp_times} ({2**args.exp_times} walk steps), device {args.device}, "
        f"torch threads {args.threads}"
    )
    print(f"one dense {n}x{n} float32 matrix = {n * n * 4 / 2**30:.2f} GiB")
    sparse = _run("sparse", args)
    dense = _run("dense", args)
    mib = 2**20
    print(f"{'method':<36}{'peak MiB':>12}{'time s':>12}")
    print(f"{'sparse (full walk)':<36}{sparse['peak_bytes'] / mib:>12.1f}{sparse['time_s']:>12.2f}")
    print(
        f"{'dense (build T + 1 squaring)':<36}{dense['peak_bytes'] / mib:>12.1f}"
        f"{dense['build_s'] + dense['square_s']:>12.2f}"
    )
    print(f"{'dense (extrapolated full chain)':<36}{'same':>12}{dense['time_s']:>12.2f}")
    print(
        f"dense/sparse peak memory ratio: {dense['peak_bytes'] / max(sparse['peak_bytes'], 1):.0f} "
        f"(goal >= 50); time ratio (extrapolated): {dense['time_s'] / sparse['time_s']:.0f}"
    )
    print("dense peak is the same for any number of squarings: each holds T and T @ T only.")


if __name__ == "__main__":
    main()
