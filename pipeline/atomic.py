"""Write outputs to a temporary sibling path and move them into place.

A crash (or ``kill -9``) mid-write then leaves the previous output, or nothing, never a half-written
table, store or checkpoint that DVC or a later stage would mistake for a finished one. The temporary
that a killed writer leaves behind (``.<name>.<random>.tmp``) is removed by the next write of the same
target.

``mkstemp`` / ``mkdtemp`` create their temporaries private (0600 / 0700), which suits a temporary but not
the finished output: the temporary is given the mode a plain ``open()`` / ``mkdir()`` would have given it
under the current umask before it is moved into place, so outputs stay readable by whoever could read
them before (DVC cache, shared result folders).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _umask() -> int:
    """The process umask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_mode(is_dir: bool) -> int:
    """The mode ``open(..., "w")`` (files) or ``mkdir`` (folders) would give under the current umask."""
    return (0o777 if is_dir else 0o666) & ~_umask()


def _tmp_sibling(target: Path, is_dir: bool) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):  # left by a killed writer
        _remove(stale)
    if is_dir:
        path = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        path = Path(name)
    os.chmod(path, default_mode(is_dir))  # mkstemp/mkdtemp make it private; the output should not be
    return path


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory that replaces ``target`` only if the block succeeds."""
    target = Path(target)
    tmp = _tmp_sibling(target, is_dir=True)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    old = None
    if target.exists() or target.is_symlink():
        old = target.with_name(f".{target.name}.old")
        _remove(old)
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        _remove(old)


@contextlib.contextmanager
def atomic_file(target: str | Path) -> Iterator[Path]:
    """Yield a temporary file path that is renamed onto ``target`` only if the block succeeds."""
    target = Path(target)
    tmp = _tmp_sibling(target, is_dir=False)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    os.replace(tmp, target)


def write_json(target: str | Path, payload: Any) -> None:
    """Atomically write ``payload`` as indented JSON (NaN is refused: metrics must be real numbers)."""
    with atomic_file(target) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=False, allow_nan=False) + "\n")


def save_torch(target: str | Path, obj: Any) -> None:
    """Atomically ``torch.save`` ``obj`` to ``target``.

    Saving through a file handle fixes the zip archive's internal record prefix (torch derives it from
    the file name otherwise, here a random temporary name), so the same weights give the same bytes and
    DVC hashes of checkpoints are reproducible run to run.
    """
    import torch

    with atomic_file(target) as tmp, open(tmp, "wb") as fh:
        torch.save(obj, fh)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded safely: torn, foreign, or holding more than tensors and plain
    data."""

    stage_one_line = True  # a stage reports it as one line (pipeline.stage), not a traceback


def load_torch(path: str | Path) -> Any:
    """``torch.load`` ``path`` onto the CPU with ``weights_only=True``.

    Checkpoints hold only tensors, state dicts, plain containers, strings and numbers (numpy generator
    states are plain dicts of ints), so the restricted unpickler reads all of them; a file that wants
    anything else (a ``__reduce__`` payload would run code on a plain ``pickle`` load) is refused with a
    :class:`CheckpointError` naming the file, and nothing in it is executed.
    """
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # the weights-only unpickler raises many types for torn or foreign bytes
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: not a loadable checkpoint (refused by the weights-only loader: "
                              f"{first})") from err
