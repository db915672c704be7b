"""Outputs appear whole or not at all, and checkpoints are byte-reproducible."""

import hashlib
import os
import stat

import pytest
import torch

from pipeline.atomic import atomic_dir, atomic_file, save_torch


def test_failed_block_leaves_previous_output_and_no_temporaries(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("previous")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "half.txt").write_text("partial")
        raise RuntimeError("crash mid-write")
    assert (target / "old.txt").read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_same_weights_give_the_same_checkpoint_bytes(tmp_path):
    state = torch.nn.Linear(4, 2).state_dict()
    digests = set()
    for name in ("a.pt", "b.pt"):  # different targets, hence different temporary names
        save_torch(tmp_path / name, state)
        digests.add(hashlib.md5((tmp_path / name).read_bytes()).hexdigest())
    assert len(digests) == 1
    assert torch.equal(torch.load(tmp_path / "a.pt", weights_only=True)["weight"], state["weight"])


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_outputs_get_the_umask_mode_not_mkstemp_private(tmp_path, umask):
    old = os.umask(umask)
    try:
        with atomic_file(tmp_path / "f.txt") as tmp:
            tmp.write_text("x")
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "inner.txt").write_text("y")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f.txt").stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o777 & ~umask
