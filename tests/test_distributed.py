"""torchrun + DDP (gloo, 2 CPU processes) gives the single-process result: Step-1 and Step-2 weights
within float tolerance, the same response store from a dump split across two writers, and the same
pseudo-masks and report from make_pseudo_masks split across two ranks.

Launched the way a user does it: ``base.nproc: 2`` in params.yaml makes each stage script re-execute
itself under torchrun. BatchNorm is frozen (``freeze_batchnorm``) because gloo has no SyncBatchNorm:
with per-rank batch statistics two processes would legitimately differ from one.
"""

import json
import shutil

import numpy as np
import pytest
import torch
from tiny_pipeline import run_stage, write_params

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

    # pseudo-masks: ranks take alternate shards of objects; masks and report must not change
    results = []
    for nproc in (1, 2):
        write_params(work, {**FROZEN_BN, "base": {"nproc": nproc}, "pseudo_masks": {"shard_size": 8}})
        run_stage(work, "make_pseudo_masks")
        masks = open_pseudo_masks(work / "artifacts" / "pseudo_masks.zarr")
        ids = masks.ref_ids("train")
        assert len(ids) > 16, "the test needs several shards per rank"
        results.append((ids, np.stack([masks.get("train", int(r)) for r in ids]),
                        json.loads((work / "artifacts" / "reports" / "pseudo_masks.json").read_text())))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(results[0][1], results[1][1])
    assert results[0][2] == results[1][2]

    write_params(work, FROZEN_BN)
    one, two = _train_twice(work, "train_step2", "step2")
    assert _max_difference(one, two) < 1e-4

