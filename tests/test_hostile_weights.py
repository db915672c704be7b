"""Hostile and careless weights, checkpoints and writes (issue "hostile input, round two", cases 11, 12,
15 and 16): a TorchScript CLIP archive is read without running it, a full disk is named and keeps the
previous model, a checkpoint of the wrong kind or a truncated ``clip.pt`` is one line naming the file,
and a live writer's temporary survives a second writer of the same target."""

from __future__ import annotations

import errno
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import pipeline.atomic as atomic
import pipeline.models.checkpoints as checkpoints
import pipeline.models.clip_backbone as clip_backbone
from pipeline.atomic import CheckpointError, atomic_dir, atomic_file, save_torch
from pipeline.models.checkpoints import SEGMENTER_META_KEYS, load_localiser, load_segmenter
from pipeline.models.clip_artifact import clip_spec, load_clip, write_clip_spec
from pipeline.models.clip_backbone import build_clip
from pipeline.train.loop import Epoch, StepOut, Training, TrainingRun, fit

# New names are reached through their modules, so that on the code before the change each test fails on
# its own assertion, not the whole file on an import.

ROOT = Path(__file__).resolve().parents[1]
TINY = {"embed_dim": 32, "vision_width": 8, "text_width": 16, "text_heads": 2, "image_size": 64,
        "context_length": 8}
# a tiny CLIP shaped as OpenAI's (64-wide heads), so build_model_from_openai_state_dict can infer it
OPENAI_SHAPED = {"embed_dim": 32, "vision_width": 64, "text_width": 64, "text_heads": 1, "image_size": 64,
                 "context_length": 8}
DROPPED = ("input_resolution", "context_length", "vocab_size", "attn_mask")  # not CLIP weights


# ----------------------------------------------------------------------------------------------------
# case 11: a TorchScript archive's __setstate__ must not run
# ----------------------------------------------------------------------------------------------------


class Planted(nn.Module):
    """A module whose TorchScript ``__setstate__`` touches a file: ``torch.jit.load`` runs it."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.marker = marker

    @torch.jit.export
    def __getstate__(self) -> tuple[str, bool]:
        return (self.marker, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, bool]) -> None:
        self.marker = state[0]
        touched = torch.from_file(self.marker, shared=True, size=1)  # creates the file: the side effect
        self.training = state[1] and touched.numel() == 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _script_save(module: nn.Module, path: Path) -> Path:
    with warnings.catch_warnings():  # torch.jit.script is deprecated, but it is how OpenAI's archives exist
        warnings.simplefilter("ignore")
        torch.jit.script(module).save(str(path))
    return path


def _jit_state(path: Path) -> dict[str, torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dict(torch.jit.load(str(path), map_location="cpu").state_dict())


@pytest.mark.parametrize("tiny_name,fp16", [("tiny-rn", False), ("tiny-vit", False), ("tiny-rn", True)])
def test_case_11_torchscript_reader_gives_what_torch_jit_load_gives(tmp_path, tiny_name, fp16):
    """Same keys, order, dtypes, shapes, strides and values as ``torch.jit.load(...).state_dict()``."""
    torch.manual_seed(11)
    source = build_clip(tiny_name, None, tiny=TINY)
    path = _script_save(source.half() if fp16 else source, tmp_path / "clip_jit.pt")
    expected, got = _jit_state(path), clip_backbone.read_torchscript_state_dict(path)
    assert list(got) == list(expected)
    for key, value in expected.items():
        assert (got[key].dtype, got[key].shape, got[key].stride()) == (value.dtype, value.shape,
                                                                      value.stride()), key
        assert torch.equal(got[key], value), key


@pytest.mark.parametrize("name,tiny", [("tiny-rn", TINY), ("RN50", OPENAI_SHAPED)],
                         ids=["tiny_architecture", "openai_inferred_architecture"])
def test_case_11_torchscript_archive_runs_no_code(tmp_path, name, tiny):
    torch.manual_seed(3)
    source = build_clip("tiny-rn", None, tiny=tiny).half()  # OpenAI's archives hold float16 weights
    honest = _script_save(source, tmp_path / "honest.pt")
    marker = tmp_path / "pwned"
    source.planted = Planted(str(marker))
    hostile = _script_save(source, tmp_path / "hostile.pt")
    del source.planted
    _jit_state(hostile)
    assert marker.exists(), "the planted archive must run its __setstate__ under torch.jit.load"
    marker.unlink()

    loaded = build_clip(name, hostile, tiny=tiny)
    assert not marker.exists(), "build_clip ran code from the weights file"
    expected = {k: v for k, v in _jit_state(honest).items() if k not in DROPPED}
    got = loaded.state_dict()
    assert set(got) >= set(expected) and len(expected) > 100
    for key, value in expected.items():
        assert torch.equal(got[key], value.float()), key
    assert all(p.dtype == torch.float32 for p in loaded.parameters())


def test_case_11_archive_naming_another_global_is_refused_unrun(tmp_path):
    """A data.pkl that asks for anything but modules, tensors and plain containers is refused by name."""
    torch.manual_seed(4)
    path = _script_save(build_clip("tiny-rn", None, tiny=TINY), tmp_path / "clip_jit.pt")
    import zipfile

    with zipfile.ZipFile(path) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    pkl = next(n for n in members if n.endswith("/data.pkl"))
    marker = tmp_path / "pwned"
    # prepend an os.system call to the pickle: GLOBAL 'os system', its argument, REDUCE, POP
    members[pkl] = members[pkl][:2] + b"cos\nsystem\n(V" + f"touch {marker}".encode() + b"\ntR0" + \
        members[pkl][2:]
    bad = tmp_path / "evil_jit.pt"
    with zipfile.ZipFile(bad, "w", zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    with pytest.raises(CheckpointError, match=r"evil_jit.pt: TorchScript archive refers to os.system"):
        build_clip("tiny-rn", bad, tiny=TINY)
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------------
# case 12: a full disk is named, and the previous model.pt is kept until a new one is complete
# ----------------------------------------------------------------------------------------------------


class _Toy(Training):
    def __init__(self) -> None:
        torch.manual_seed(0)
        self.name, self.model = "toy", nn.Linear(2, 1)
        self.net, self.epochs, self.scheduler = self.model, 1, None
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1)

    def epoch(self, epoch: int) -> Epoch:
        return Epoch([torch.ones(3, 2)], 1)

    def step(self, item: Any) -> StepOut:
        loss = self.model(item).pow(2).mean()
        return StepOut(loss, {"loss": loss.detach()})


def _full_disk(monkeypatch: pytest.MonkeyPatch, how: str, free: int = 4096) -> None:
    """torch.save writes part of the file, then fails as it does on a full disk."""
    def failing_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        f.write(b"PK\x03\x04 partial")
        if how == "torch_unexpected_pos":
            raise RuntimeError("[enforce fail at inline_container.cc:664] . "
                               "unexpected pos 8041152 vs 8041044")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    total = 100 << 30
    usage = type("Usage", (), {"free": free, "total": total})()
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda path: usage)


@pytest.mark.parametrize("how", ["torch_unexpected_pos", "oserror_enospc"])
def test_case_12_full_disk_in_train_step1_names_the_file_and_keeps_the_previous_model(
        tmp_path, monkeypatch, capsys, how):
    out = tmp_path / "step1"
    save_torch(out / "model.pt", {"model": {"w": torch.ones(2)}, "meta": {"run": "previous"}})
    previous = (out / "model.pt").read_bytes()
    stage = tmp_path / "stage.py"
    stage.write_text("")
    run = TrainingRun.start("toy", out, config={"lr": 1}, inputs=[], stage_script=stage, resume=True)
    assert (out / "model.pt").read_bytes() == previous, "a starting run must not delete the finished model"
    model = fit(_Toy(), run)
    assert (out / "resume.pt").is_file()

    _full_disk(monkeypatch, how)
    with pytest.raises(atomic.DiskFullError) as caught:
        run.finish(lambda: save_torch(out / "model.pt", {"model": model.state_dict(), "meta": {}}))
    message = str(caught.value)
    assert message.startswith(f"{out / 'model.pt'}: no space left on device") and "\n" not in message
    assert "4.0 KiB free" in message and caught.value.errno == errno.ENOSPC
    assert getattr(atomic.DiskFullError, "stage_one_line", False)
    assert (out / "model.pt").read_bytes() == previous, "the previous model must survive the failed save"
    assert (out / "resume.pt").is_file(), "an unfinished run keeps its resume state"
    assert not [p.name for p in out.iterdir() if p.name.startswith(".model.pt.")]

    with pytest.raises(atomic.DiskFullError, match=r"resume.pt: no space left on device"):  # per epoch
        run.checkpoint(_Toy(), 1, 1)

    capsys.readouterr()
    checkpoints._note_unfinished(out / "model.pt")  # what a reader run outside DVC is told
    assert f"{out / 'resume.pt'} exists: a newer training run is unfinished" in capsys.readouterr().out


def test_case_12_a_short_write_with_space_left_is_not_called_a_full_disk(tmp_path, monkeypatch):
    _full_disk(monkeypatch, "torch_unexpected_pos", free=50 << 30)
    with pytest.raises(atomic.WriteFailedError) as caught:
        save_torch(tmp_path / "model.pt", {"w": torch.ones(1)})
    assert not isinstance(caught.value, atomic.DiskFullError)
    assert str(caught.value).startswith(f"{tmp_path / 'model.pt'}: writing it failed (")
    assert "unexpected pos" in str(caught.value) and "50.0 GiB free" in str(caught.value)


# ----------------------------------------------------------------------------------------------------
# case 15: the wrong checkpoint, or a truncated clip.pt, is one line naming the file
# ----------------------------------------------------------------------------------------------------


def test_case_15_step2_checkpoint_where_step1_is_expected_is_named(tmp_path):
    step2 = tmp_path / "model.pt"
    save_torch(step2, {"model": {"w": torch.ones(1)}, "meta": {k: 1 for k in SEGMENTER_META_KEYS}})
    with pytest.raises(CheckpointError) as caught:
        load_localiser(step2)
    assert str(caught.value).startswith(f"{step2} is not a Step-1 localiser checkpoint (its meta lacks "
                                        "clip_dir")
    assert "it is a Step-2 segmenter checkpoint" in str(caught.value) and "\n" not in str(caught.value)

    step1 = tmp_path / "step1.pt"
    save_torch(step1, {"model": {"w": torch.ones(1)},
                       "meta": {"clip_dir": "artifacts/clip", "hidden_dim": 8}})
    with pytest.raises(CheckpointError, match=r"step1.pt is not a Step-2 segmenter checkpoint .*it is a "
                                              r"Step-1 localiser checkpoint"):
        load_segmenter(step1)


def test_case_15_truncated_clip_pt_is_named(tmp_path):
    clip_dir = tmp_path / "clip"
    clip_dir.mkdir()
    torch.save(build_clip("tiny-rn", None, tiny=TINY).state_dict(), clip_dir / "clip.pt")
    write_clip_spec(clip_dir, clip_spec("tiny-rn", "clip.pt", TINY, TINY["context_length"]))
    load_clip(clip_dir)  # whole, it loads
    data = (clip_dir / "clip.pt").read_bytes()
    (clip_dir / "clip.pt").write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError) as caught:
        load_clip(clip_dir)
    message = str(caught.value)
    assert message.startswith(f"{clip_dir / 'clip.pt'}: not a loadable CLIP checkpoint (torn, truncated")
    assert "\n" not in message

    other = tmp_path / "other.pt"  # whole, but another CLIP's weights
    torch.save(build_clip("tiny-rn", None, tiny={**TINY, "vision_width": 16}).state_dict(), other)
    with pytest.raises(CheckpointError, match=r"other.pt: its weights do not fit the tiny-rn CLIP"):
        build_clip("tiny-rn", other, tiny=TINY)


# ----------------------------------------------------------------------------------------------------
# case 16: a live writer's temporary is not swept by a second writer
# ----------------------------------------------------------------------------------------------------

SLOW_WRITER = textwrap.dedent("""
    import sys
    from pipeline.atomic import atomic_dir
    with atomic_dir({target!r}) as tmp:
        (tmp / "first.txt").write_text("{value}")
        print("half written", flush=True)
        sys.stdin.readline()  # the other writer runs now
        (tmp / "second.txt").write_text("{value}")
    print("done", flush=True)
""")


def test_case_16_two_writers_of_one_target_do_not_sweep_each_others_temporary(tmp_path):
    """The second of two ``dump_responses``-like writers used to remove the first one's live temporary
    (which then died with ``KeyError: 'train'`` / ``FileNotFoundError``)."""
    target = tmp_path / "responses.zarr"

    def writer(value: str) -> subprocess.Popen:
        code = SLOW_WRITER.format(target=str(target), value=value)
        return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    first = writer("first")
    assert first.stdout.readline().strip() == "half written"
    second = writer("second")
    assert second.stdout.readline().strip() == "half written"
    second.stdin.write("\n")
    second.stdin.flush()
    assert second.wait(60) == 0, second.stderr.read()
    assert (target / "second.txt").read_text() == "second"
    first.stdin.write("\n")
    first.stdin.flush()
    assert first.wait(60) == 0, first.stderr.read()
    assert (target / "first.txt").read_text() == "first" == (target / "second.txt").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["responses.zarr"]


def test_case_16_only_dead_writers_temporaries_are_swept(tmp_path):
    """Swept: a dead pid's, a recycled pid's (other start time), the old unnamed form. Kept: a live
    writer's, another host's (its liveness cannot be checked), another target's."""
    target = tmp_path / "out.txt"
    host, boot, pid, start = atomic._owner_tag().split(".")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    dead_pid = int(dead.stdout)
    names = {
        "dead": f".out.txt.{host}.{boot}.{dead_pid}.{start}.abcdefgh.tmp",
        "recycled": f".out.txt.{host}.{boot}.{pid}.{int(start) + 1}.abcdefgh.tmp",
        "legacy": ".out.txt.k3j4h5g6.tmp",
        "live": f".out.txt.{host}.{boot}.{pid}.{start}.abcdefgh.tmp",
        "other_host": f".out.txt.{'0' * 8 if host != '0' * 8 else '1' * 8}.{boot}.{dead_pid}.1.abcdefgh.tmp",
        "other_target": f".out.txt.b.{host}.{boot}.{dead_pid}.{start}.abcdefgh.tmp",
    }
    for name in names.values():
        (tmp_path / name).write_text("x")
    with atomic_file(target) as tmp:
        tmp.write_text("new")
    left = {key for key, name in names.items() if (tmp_path / name).exists()}
    assert left == {"live", "other_host", "other_target"}
    assert target.read_text() == "new"
    with atomic_dir(tmp_path / "d") as tmp:  # a folder's temporary carries its owner too
        assert tmp.name.startswith(f".d.{host}.{boot}.{pid}.{start}.")
