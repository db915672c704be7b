"""torchrun and DistributedDataParallel plumbing for the stages that scale out (training and the dump).

A stage asks for ``base.nproc`` processes; :func:`relaunch_under_torchrun` then replaces the stage's
process by ``torchrun --standalone --nproc_per_node=<nproc> <the same script>`` (torch's own elastic
launcher, not a home-made one), and each worker calls :func:`init_distributed`. Multi-node runs launch
the stage script with ``torchrun --nnodes ... --rdzv-endpoint ...`` themselves; nothing here assumes one
node except ``--standalone``.

Every rank draws the same global batch from the same seeded sampler and keeps its own contiguous slice
(what ``DistributedSampler`` does per epoch, here per batch), so the queries a rank scores (Eq. 7) are the
whole global batch's, N stays as configured, and with ``world_size == 1`` the code path is the
single-process one, bit for bit.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

LAUNCHED_ENV = "TRIS_TORCHRUN"


@dataclass(frozen=True)
class DistContext:
    """Who this process is in the job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"  # where collectives run: CPU tensors for gloo, this rank's GPU for NCCL

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone logs, writes checkpoints and finalises stores."""
        return self.rank == 0

    def local_slice(self, n: int) -> np.ndarray:
        """This rank's contiguous share of ``range(n)`` (sizes differ by at most one)."""
        return np.array_split(np.arange(n), self.world_size)[self.rank]

    def loss_weight(self, local: int, total: int) -> float:
        """Factor that turns a mean over this rank's ``local`` items into its share of the mean over all
        ``total`` items once DDP averages gradients over ranks (1.0 when not distributed)."""
        return 1.0 if not self.enabled else self.world_size * local / max(1, total)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """In-place sum over ranks (identity when not distributed)."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def sum_array(self, array: np.ndarray) -> np.ndarray:
        """Element-wise sum of an integer NumPy array over ranks, as int64."""
        if not self.enabled:
            return array.astype(np.int64)
        tensor = torch.from_numpy(array.astype(np.int64)).to(self.device)
        return self.sum_(tensor).cpu().numpy()

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """``DistributedDataParallel(model)`` when distributed, else ``model`` itself.

        ``find_unused_parameters`` is on because ablations switch parts off (``step1.prompt: none`` leaves
        the prompt's weights without gradient). On CUDA, BatchNorm becomes SyncBatchNorm so statistics
        cover the global batch; gloo has no SyncBatchNorm, so on CPU (and with ranks sharing a GPU, which
        run over gloo) each rank normalises its own slice (set ``freeze_batchnorm`` for results
        independent of the number of processes).
        """
        if not self.enabled:
            return model
        if device.type == "cuda":
            if self.device != "cpu":  # NCCL: one GPU per rank
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            return DistributedDataParallel(model, device_ids=[device.index], find_unused_parameters=True)
        return DistributedDataParallel(model, find_unused_parameters=True)

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


SINGLE_PROCESS = DistContext()


def under_torchrun() -> bool:
    """True inside a worker started by torchrun (it sets LOCAL_RANK and WORLD_SIZE)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def relaunch_under_torchrun(nproc: int) -> None:
    """Re-execute the running stage script as ``torchrun --standalone --nproc_per_node=nproc`` when
    ``nproc > 1`` and this process is not already a torchrun worker. Does not return in that case."""
    if nproc <= 1 or under_torchrun():
        return
    if os.environ.get(LAUNCHED_ENV):  # torchrun did not set its variables: refuse to fork-bomb
        raise RuntimeError("relaunch_under_torchrun: torchrun started the stage without LOCAL_RANK")
    os.environ[LAUNCHED_ENV] = "1"
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            sys.argv[0], *sys.argv[1:]]
    print(f"[distributed] launching {nproc} processes: {' '.join(argv[1:])}", flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, argv)


def rank_device(local_rank: int, device_count: int) -> int:
    """The GPU of local rank ``local_rank`` on a node with ``device_count`` GPUs: ``local_rank % count``.

    With one process per GPU this is the usual ``cuda:local_rank``; with more processes than GPUs (e.g.
    ``base.nproc: 4`` on one GPU) the ranks share the GPUs round-robin instead of asking for a
    ``cuda:3`` that does not exist."""
    if device_count < 1:
        raise ValueError(f"rank_device: no CUDA device for local rank {local_rank}")
    if local_rank < 0:
        raise ValueError(f"rank_device: local rank must be >= 0, got {local_rank}")
    return local_rank % device_count


def _backend(device: torch.device, world_size: int) -> str:
    """NCCL when every rank has a GPU of its own; gloo on CPU and when ranks share a GPU (NCCL refuses
    two ranks on one device)."""
    if device.type != "cuda":
        return "gloo"
    return "nccl" if world_size <= torch.cuda.device_count() else "gloo"


def init_distributed(device: torch.device) -> tuple[DistContext, torch.device]:
    """Join the torchrun job if there is one: gloo on CPU, NCCL on CUDA (local rank ``r`` on GPU
    ``r % device_count``, so N processes may share one GPU; they then talk over gloo)."""
    if not under_torchrun() or int(os.environ["WORLD_SIZE"]) <= 1:
        return DistContext(), device
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if device.type == "cuda":
        device = torch.device("cuda", rank_device(local, torch.cuda.device_count()))
        torch.cuda.set_device(device)
    backend = _backend(device, int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
    collectives = str(device) if backend == "nccl" else "cpu"
    return DistContext(rank, world, local, collectives), device
