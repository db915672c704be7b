"""Write outputs to a temporary sibling path and move them into place.

A crash (or ``kill -9``) mid-write then leaves the previous output, or nothing, never a half-written
table, store or checkpoint that DVC or a later stage would mistake for a finished one.

A temporary is named after its writer, ``.<name>.<host>.<boot>.<pid>.<start>.<random>.tmp`` (hashes of
the host name and boot id, the process id and the process's start time), so the next write of the same
target removes what a *killed* writer left behind and nothing else: a temporary whose writer still runs
(a second ``dump_responses`` in the same workspace) is left alone, a recycled pid is told apart by its
start time, and one written from another host (a shared file system) is kept, as its writer's liveness
cannot be checked from here. Temporaries of the earlier ``.<name>.<random>.tmp`` form are swept as before.

A write that fails because the disk is full (``ENOSPC``, or torch's ``unexpected pos`` / ``file write
failed`` with little space left) raises :class:`DiskFullError` naming the output and the free space, one
line, after the temporary is removed; the previous output is untouched.

``mkstemp`` / ``mkdtemp`` create their temporaries private (0600 / 0700), which suits a temporary but not
the finished output: the temporary is given the mode a plain ``open()`` / ``mkdir()`` would have given it
under the current umask before it is moved into place, so outputs stay readable by whoever could read
them before (DVC cache, shared result folders).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import socket
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


def _short_hash(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()[:8]


def _boot_id() -> str:
    """Changes at every boot (Linux); elsewhere constant, and liveness falls back to the pid alone."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _process_start(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (``/proc/<pid>/stat`` field 22); ``None`` when
    no such process runs (or it is a zombie: its writing is over); ``0`` where there is no ``/proc``."""
    if not Path("/proc/self/stat").exists():  # not Linux: the pid is all there is to check
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return 0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else int(fields[19])


def _owner_tag() -> str:
    """This process as the owner of a temporary: ``<host>.<boot>.<pid>.<start>``."""
    pid = os.getpid()
    return f"{_short_hash(socket.gethostname())}.{_short_hash(_boot_id())}.{pid}.{_process_start(pid) or 0}"


def _owner_alive(host: str, boot: str, pid: int, start: int) -> bool:
    """Whether the writer that named a temporary may still be writing it. Another host's writer cannot
    be checked from here, so it counts as alive; a previous boot's, or a pid now running another
    process (another start time), is dead."""
    if host != _short_hash(socket.gethostname()):
        return True
    if boot != _short_hash(_boot_id()):
        return False
    now = _process_start(pid)
    return now is not None and (start == 0 or now == 0 or now == start)


def _leftovers(target: Path) -> list[Path]:
    """Temporaries of ``target`` whose writer is dead (killed mid-write): safe to remove."""
    owned = re.compile(rf"\.{re.escape(target.name)}\.([0-9a-f]{{8}})\.([0-9a-f]{{8}})\.(\d+)\.(\d+)"
                       rf"\.[A-Za-z0-9_]{{8}}(?:\.tmp|\.\d+\.old)")
    legacy = re.compile(rf"\.{re.escape(target.name)}\.(?:[A-Za-z0-9_]{{8}}\.tmp|old)")
    stale = []
    for path in target.parent.iterdir():
        if not path.name.startswith(f".{target.name}."):
            continue
        match = owned.fullmatch(path.name)
        if match is not None:
            host, boot, pid, start = match.groups()
            if not _owner_alive(host, boot, int(pid), int(start)):
                stale.append(path)
        elif legacy.fullmatch(path.name):  # written before temporaries carried their owner
            stale.append(path)
    return stale


def _tmp_sibling(target: Path, is_dir: bool) -> Path:
    """A new temporary beside ``target``, named after this process, after sweeping dead writers' ones."""
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in _leftovers(target):  # left by a killed writer; a live writer's temporary stays
        _remove(stale)
    prefix = f".{target.name}.{_owner_tag()}."
    if is_dir:
        path = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=target.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=target.parent)
        os.close(fd)
        path = Path(name)
    os.chmod(path, default_mode(is_dir))  # mkstemp/mkdtemp make it private; the output should not be
    return path


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)  # two writers may sweep the same dead temporary


class WriteFailedError(OSError):
    """An output could not be written (the device refused the bytes); the previous output is untouched."""

    stage_one_line = True  # a stage reports it as one line (pipeline.stage), not a traceback


class DiskFullError(WriteFailedError):
    """An output could not be written because its file system is full."""


_TORCH_SHORT_WRITE = ("unexpected pos", "file write failed")  # torch.save's words for a short write
_FULL_BELOW = 64 << 20  # after a short write, less free space than this means the disk filled up


def _free_bytes(path: Path) -> int | None:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def _size(n: int | None) -> str:
    if n is None:
        return "unknown space"
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return ""  # unreachable


def _write_failure(err: BaseException, target: Path, tmp: Path) -> WriteFailedError | None:
    """The one-line error for a write the device refused, or ``None`` when ``err`` is something else.

    Free space is measured while the failed temporary is still on disk, i.e. as the write saw it.
    """
    if not isinstance(err, (OSError, RuntimeError)) or isinstance(err, WriteFailedError):
        return None
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    no_space = isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)
    short_write = isinstance(err, RuntimeError) and any(s in text.lower() for s in _TORCH_SHORT_WRITE)
    if not (no_space or short_write):
        return None
    where = target
    filename = getattr(err, "filename", None)
    if isinstance(filename, str) and Path(filename).is_relative_to(tmp) and Path(filename) != tmp:
        where = target / Path(filename).relative_to(tmp)  # the file inside an output folder
    free = _free_bytes(tmp.parent)
    if no_space or (free is not None and free < _FULL_BELOW):
        error: WriteFailedError = DiskFullError(
            f"{where}: no space left on device ({_size(free)} free in {target.parent} after the failed "
            f"write); the previous {target.name}, if any, is kept; free space and run again")
    else:
        error = WriteFailedError(f"{where}: writing it failed ({text}; {_size(free)} free in "
                                 f"{target.parent}); the previous {target.name}, if any, is kept")
    error.errno = errno.ENOSPC if isinstance(error, DiskFullError) else getattr(err, "errno", None)
    return error


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory that replaces ``target`` only if the block succeeds."""
    target = Path(target)
    tmp = _tmp_sibling(target, is_dir=True)
    try:
        yield tmp
    except BaseException as err:
        failure = _write_failure(err, target, tmp)
        _remove(tmp)
        if failure is not None:
            raise failure from err
        raise
    _replace_dir(tmp, target)


def _replace_dir(tmp: Path, target: Path) -> None:
    """Move the finished folder ``tmp`` onto ``target``, the previous one aside first (a folder cannot be
    renamed over a non-empty one). When a concurrent writer lands its own folder in between, that one is
    moved aside too and this one, finished later, wins, as a file replace would."""
    olds: list[Path] = []
    for attempt in range(10):
        if target.exists() or target.is_symlink():
            old = tmp.with_name(f"{tmp.name[:-len('.tmp')]}.{attempt}.old")
            with contextlib.suppress(FileNotFoundError):  # another writer moved it aside just now
                os.replace(target, old)
                olds.append(old)
        try:
            os.replace(tmp, target)
            break
        except OSError as err:
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST) or attempt == 9:
                if olds and not (target.exists() or target.is_symlink()):
                    os.replace(olds.pop(), target)  # put the previous output back
                raise
    for old in olds:
        _remove(old)


@contextlib.contextmanager
def atomic_file(target: str | Path) -> Iterator[Path]:
    """Yield a temporary file path that is renamed onto ``target`` only if the block succeeds."""
    target = Path(target)
    tmp = _tmp_sibling(target, is_dir=False)
    try:
        yield tmp
    except BaseException as err:
        failure = _write_failure(err, target, tmp)
        _remove(tmp)
        if failure is not None:
            raise failure from err
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
    DVC hashes of checkpoints are reproducible run to run. A full disk raises :class:`DiskFullError`
    naming ``target`` (torch's own message, ``unexpected pos ...``, names neither the file nor the disk),
    and ``target``'s previous content is kept.
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
