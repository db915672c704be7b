"""torchrun + DDP (gloo, 2 CPU processes) gives the single-process result: Step-1 and Step-2 weights
within float tolerance, the same response store from a dump split across two writers; make_pseudo_masks
ignores ``base.nproc`` and gives the same pseudo-masks and report with one or two refinement workers.

Launched the way a user does it: ``base.nproc: 2`` in params.yaml makes each stage script re-execute
itself under torchrun. BatchNorm is frozen (``freeze_batchnorm``) because gloo has no SyncBatchNorm:
with per-rank batch statistics two processes would legitimately differ from one.

The multi-node launch of docs/operations.md runs too, on one machine: two torchrun "nodes"
(``--nnodes 2``, one process each) meet at a c10d rendezvous on 127.0.0.1 and must train the
single-process weights; the stage script they start must not re-launch itself under a nested torchrun
even with ``base.nproc: 2``. A fast test keeps that documented command and :func:`multinode_command` in
step.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from tiny_pipeline import ROOT, run_stage, write_params

from pipeline import distributed
from pipeline.store import open_pseudo_masks, open_responses

FROZEN_BN = {"step1": {"freeze_batchnorm": True}, "step2": {"freeze_batchnorm": True}}


def _weights(path) -> dict[str, torch.Tensor]:
    """Float weights of a checkpoint, without the attention KEY biases: softmax is invariant to them, so
    their gradient is float noise that AdamW scales up to lr-sized steps in any two runs."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    out = {}
    for name, value in state["model"].items():
        if not value.is_floating_point():
            continue
        if name.endswith("attn.in_proj_bias"):
            q, _, v = value.float().chunk(3)
            value = torch.cat([q, v])
        out[name] = value.float()
    return out


def _max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _train_twice(workdir, stage: str, out: str) -> tuple[dict, dict]:
    """The stage's weights with nproc 1 and with nproc 2 (the output directory cleared between)."""
    results = []
    for nproc in (1, 2):
        shutil.rmtree(workdir / "artifacts" / out, ignore_errors=True)
        write_params(workdir, {**FROZEN_BN, "base": {"nproc": nproc}})
        log = run_stage(workdir, stage)
        assert ("launching 2 processes" in log) == (nproc == 2)
        results.append(_weights(workdir / "artifacts" / out / "model.pt"))
    return results[0], results[1]


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path):
    work = tmp_path / "run"
    write_params(work, FROZEN_BN)
    for stage in ("synthesize", "index", "pretrain_clip"):
        run_stage(work, stage)

    one, two = _train_twice(work, "train_step1", "step1")
    assert _max_difference(one, two) < 1e-4

    # dump: two ranks write alternate shards of one store; it must equal the single-process store
    stores = []
    for nproc in (1, 2):
        write_params(work, {**FROZEN_BN, "base": {"nproc": nproc}, "dump": {"shard_size": 8}})
        run_stage(work, "dump_responses")
        store = open_responses(work / "artifacts" / "responses.zarr")
        stores.append({s: (store.sent_ids(s), np.stack([store.get(s, i) for i in store.sent_ids(s)]))
                       for s in store.splits})
    assert stores[0].keys() == stores[1].keys()
    for split, (ids, maps) in stores[0].items():
        np.testing.assert_array_equal(ids, stores[1][split][0])
        np.testing.assert_allclose(maps, stores[1][split][1], atol=2e-3)
    assert not list((work / "artifacts").glob(".responses.zarr.*")), "no temporary store may remain"

    # pseudo-masks: one process with 1 or 2 refinement workers (pseudo_masks.workers, not base.nproc:
    # the stage never starts torchrun); masks and report must not change
    results = []
    for workers in (1, 2):
        write_params(work, {**FROZEN_BN, "base": {"nproc": 2},
                            "pseudo_masks": {"shard_size": 8, "workers": workers}})
        log = run_stage(work, "make_pseudo_masks")
        assert "launching" not in log, "make_pseudo_masks must not read base.nproc"
        masks = open_pseudo_masks(work / "artifacts" / "pseudo_masks.zarr")
        ids = masks.ref_ids("train")
        assert len(ids) > 16, "the test needs several shards"
        results.append((ids, np.stack([masks.get("train", int(r)) for r in ids]),
                        json.loads((work / "artifacts" / "reports" / "pseudo_masks.json").read_text())))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(results[0][1], results[1][1])
    assert results[0][2] == results[1][2]

    write_params(work, FROZEN_BN)
    one, two = _train_twice(work, "train_step2", "step2")
    assert _max_difference(one, two) < 1e-4



# ----------------------------------------------------------------------------------------------------
# More than one machine: the multi-node command of docs/operations.md, two "nodes" on 127.0.0.1
# ----------------------------------------------------------------------------------------------------


def multinode_command(nnodes: int, endpoint: str, run_id: str, script: str) -> list[str]:
    """The per-node launch of docs/operations.md (``torchrun`` is ``python -m torch.distributed.run``):
    the same command on every node; c10d rendezvous assigns the node ranks, rank 0 hosts the store."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--nproc-per-node", "1",
            "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", run_id,
            "--local-addr", endpoint.rsplit(":", 1)[0], script]


def test_operations_doc_multinode_command_is_the_tested_one():
    """The ``torchrun`` block of docs/operations.md "Several nodes" is :func:`multinode_command`, with its
    placeholders for the rendezvous, the job id and this node's address."""
    text = (ROOT / "docs" / "operations.md").read_text()
    block = re.search(r"```bash\n(torchrun .*?)```", text, re.S)
    assert block, "docs/operations.md: no ```bash block starting with torchrun"
    documented = block.group(1).replace("\\\n", " ").split()
    tested = multinode_command(2, "HOST:PORT", "RUN_ID", "stages/train_step1.py")
    assert tested[:3] == [sys.executable, "-m", "torch.distributed.run"]
    tested = ["torchrun", *tested[3:]]
    tested[tested.index("--local-addr") + 1] = "THIS_NODE_ADDRESS"
    assert documented == tested


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _loopback_env() -> dict[str, str]:
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    if os.path.isdir("/sys/class/net/lo"):
        env["GLOO_SOCKET_IFNAME"] = "lo"  # gloo's pairs on the loopback interface, not the host's address
    return env


@pytest.mark.slow
def test_two_torchrun_nodes_with_c10d_rendezvous_match_one_process(tmp_path):
    work = tmp_path / "run"
    write_params(work, FROZEN_BN)
    for stage in ("synthesize", "index", "pretrain_clip"):
        run_stage(work, stage)
    log = run_stage(work, "train_step1")
    assert "launching" not in log
    one = _weights(work / "artifacts" / "step1" / "model.pt")

    # base.nproc: 2 as well: under an outer torchrun the stage must not start a torchrun of its own
    shutil.rmtree(work / "artifacts" / "step1")
    write_params(work, {**FROZEN_BN, "base": {"nproc": 2}})
    command = multinode_command(2, f"127.0.0.1:{_free_port()}", "tris-test",
                                str(ROOT / "stages" / "train_step1.py"))
    nodes = [subprocess.Popen(command, cwd=work, env=_loopback_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    logs = []
    try:
        for node in nodes:
            logs.append(node.communicate(timeout=600)[0])
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    for node, text in zip(nodes, logs, strict=True):
        assert node.returncode == 0, f"a torchrun node failed:\n{text[-4000:]}"
    both = "\n".join(logs)
    assert "[distributed] launching" not in both, "the stage re-launched itself under the outer torchrun"
    assert "rank 0 of 2" in both and "rank 1 of 2" in both
    two = _weights(work / "artifacts" / "step1" / "model.pt")
    assert _max_difference(one, two) < 1e-4


def test_a_torchrun_worker_does_not_relaunch_itself(monkeypatch):
    calls = []
    monkeypatch.setattr(distributed.os, "execv", lambda *args: calls.append(args))
    monkeypatch.setenv(distributed.LAUNCHED_ENV, "")  # recorded, so the "1" the relaunch sets is undone
    for name, value in {"LOCAL_RANK": "0", "RANK": "1", "WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    distributed.relaunch_under_torchrun(2)
    assert calls == [], "a worker of an outer torchrun must run the stage, not start another torchrun"

    # the same call outside torchrun re-executes the script under `torchrun --standalone`
    monkeypatch.delenv("LOCAL_RANK")
    monkeypatch.delenv("WORLD_SIZE")
    distributed.relaunch_under_torchrun(2)
    assert len(calls) == 1
    argv = calls[0][1]
    assert argv[1:4] == ["-m", "torch.distributed.run", "--standalone"] and "--nproc_per_node=2" in argv
    assert os.environ[distributed.LAUNCHED_ENV] == "1"  # its workers will refuse to re-launch again


# ----------------------------------------------------------------------------------------------------
# Ranks on GPUs: N processes on fewer GPUs share them round-robin (fake device counts, no GPU needed)
# ----------------------------------------------------------------------------------------------------


def test_rank_device_maps_local_ranks_round_robin_over_the_gpus():
    assert [distributed.rank_device(r, 1) for r in range(4)] == [0, 0, 0, 0]  # base.nproc: 4 on one GPU
    assert [distributed.rank_device(r, 2) for r in range(5)] == [0, 1, 0, 1, 0]
    assert [distributed.rank_device(r, 8) for r in range(8)] == list(range(8))  # one GPU per rank
    with pytest.raises(ValueError, match="no CUDA device"):
        distributed.rank_device(0, 0)
    with pytest.raises(ValueError, match="local rank"):
        distributed.rank_device(-1, 2)


def _fake_cuda_job(monkeypatch, gpus: int, local_rank: int, world: int) -> dict:
    """``init_distributed`` as local rank ``local_rank`` of ``world`` on a node with ``gpus`` fake GPUs."""
    seen: dict = {}
    monkeypatch.setattr(distributed.torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(distributed.torch.cuda, "set_device", lambda d: seen.setdefault("set", d))
    monkeypatch.setattr(distributed.dist, "init_process_group",
                        lambda backend, timeout: seen.setdefault("backend", backend))
    for name, value in {"LOCAL_RANK": local_rank, "RANK": local_rank, "WORLD_SIZE": world,
                        "LOCAL_WORLD_SIZE": world}.items():
        monkeypatch.setenv(name, str(value))
    ctx, device = distributed.init_distributed(torch.device("cuda"))
    seen.update(ctx=ctx, device=device)
    return seen


def test_n_processes_on_one_gpu_share_it_over_gloo(monkeypatch):
    seen = _fake_cuda_job(monkeypatch, gpus=1, local_rank=3, world=4)
    assert seen["device"] == torch.device("cuda", 0), "rank 3 of 4 asked for a GPU that is not there"
    assert seen["set"] == torch.device("cuda", 0)
    assert seen["backend"] == "gloo"  # NCCL refuses two ranks on one device
    assert seen["ctx"].device == "cpu" and seen["ctx"].world_size == 4 and seen["ctx"].local_rank == 3


def test_one_process_per_gpu_keeps_nccl_and_its_own_gpu(monkeypatch):
    seen = _fake_cuda_job(monkeypatch, gpus=4, local_rank=3, world=4)
    assert seen["device"] == torch.device("cuda", 3)
    assert seen["backend"] == "nccl" and seen["ctx"].device == "cuda:3"


def test_ranks_sharing_a_gpu_get_ddp_without_syncbatchnorm(monkeypatch):
    """SyncBatchNorm needs NCCL; over gloo each rank normalises its own slice, as on CPU."""
    built = {}
    monkeypatch.setattr(distributed, "DistributedDataParallel",
                        lambda model, **kw: built.update(model=model, **kw) or model)
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(2))
    shared = distributed.DistContext(rank=1, world_size=2, local_rank=1, device="cpu")
    shared.wrap(model, torch.device("cuda", 0))
    assert isinstance(built["model"][0], torch.nn.BatchNorm2d) and built["device_ids"] == [0]
    own = distributed.DistContext(rank=1, world_size=2, local_rank=1, device="cuda:1")
    own.wrap(model, torch.device("cuda", 1))
    assert isinstance(built["model"][0], torch.nn.SyncBatchNorm)
