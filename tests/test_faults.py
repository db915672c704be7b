"""Faults: a writer killed mid-way leaves no partial output; kill -9 in training, then `dvc repro`,
resumes and completes; a deleted Zarr chunk is noticed by `dvc status` and rebuilt by `dvc repro`."""

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_pipeline import ROOT, write_params

from pipeline.store import open_responses

KILLED_WRITER = textwrap.dedent("""
    import time
    import numpy as np
    from pipeline.store import RESPONSE_SCHEMA, RecordWriter
    with RecordWriter({target!r}, RESPONSE_SCHEMA, (4, 4), shard_size=2, attrs={{"input_size": [8, 8]}}) as w:
        w.add_split("train", 40)
        for start in range(0, 40, 2):
            ids = np.arange(start, start + 2)
            w.write("train", start, np.full((2, 4, 4), {value}, np.float32), sent_id=ids, ref_id=ids,
                    image_id=ids, height=ids + 1, width=ids + 1)
            print(start, flush=True)
            time.sleep({pause})
""")


def _run_writer(target: Path, value: float, pause: float) -> subprocess.Popen:
    code = KILLED_WRITER.format(target=str(target), value=value, pause=pause)
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)


def test_a_killed_zarr_writer_leaves_the_previous_store_untouched(tmp_path):
    target = tmp_path / "responses.zarr"
    first = _run_writer(target, 1.0, 0.0)
    assert first.wait(60) == 0
    proc = _run_writer(target, 2.0, 0.2)
    for _ in range(6):  # let it write a few complete shards into its temporary store
        proc.stdout.readline()
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    leftovers = list(tmp_path.glob(".responses.zarr.*.tmp"))
    written = [f for p in leftovers for f in p.rglob("*") if f.is_file() and "/response/c/" in f.as_posix()]
    assert written, "the kill must come after some shards were written"
    store = open_responses(target)  # still the complete first store
    assert len(store.sent_ids("train")) == 40
    assert np.all(store.get("train", 39) == 1.0)
    # the next successful write replaces the store and sweeps the dead writer's temporary away
    assert _run_writer(target, 3.0, 0.0).wait(60) == 0
    assert np.all(open_responses(target).get("train", 0) == 3.0)
    assert not list(tmp_path.glob(".responses.zarr.*"))


def test_a_killed_parquet_index_writer_leaves_no_table(tmp_path):
    code = textwrap.dedent(f"""
        import time
        import pyarrow as pa, pyarrow.parquet as pq
        from pipeline.atomic import atomic_dir
        with atomic_dir({str(tmp_path / 'index')!r}) as tmp:
            pq.write_table(pa.table({{"x": list(range(1000))}}), tmp / "images.parquet")
            print("written", flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "written"
    proc.kill()
    proc.wait(10)
    assert not (tmp_path / "index").exists(), "a killed index stage must not leave index/ in place"


# ----------------------------------------------------------------------------------------------------
# Through DVC: a throwaway repo holding this project's stages, pipeline and dvc.yaml, on the tiny config
# ----------------------------------------------------------------------------------------------------


def _dvc(repo: Path, *args: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "TQDM_DISABLE": "1"}
    result = subprocess.run(["dvc", *args], cwd=repo, env=env, capture_output=True, text=True,
                            timeout=timeout)
    if check:
        log = f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        assert result.returncode == 0, f"dvc {' '.join(args)} failed:\n{log}"
    return result


def _make_repo(repo: Path, override: dict) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("stages", "pipeline", "models"):
        shutil.copytree(ROOT / name, repo / name, ignore=ignore)
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    write_params(repo, override)
    git = lambda *a: subprocess.run(["git", *a], cwd=repo, check=True, capture_output=True)  # noqa: E731
    git("init", "-q")
    git("config", "user.email", "ci@example.com")
    git("config", "user.name", "ci")
    _dvc(repo, "init", "-q")
    git("add", "-A")
    git("commit", "-qm", "tiny")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("dvc") is None or shutil.which("git") is None, reason="needs dvc and git")
def test_kill_during_training_then_dvc_repro_resumes_and_a_deleted_chunk_is_rebuilt(tmp_path):
    epochs = 25
    repo = tmp_path / "repo"
    _make_repo(repo, {"step1": {"epochs": epochs}})
    _dvc(repo, "repro", "pretrain_clip")

    # kill -9 the whole `dvc repro` process group once Step-1 has checkpointed an epoch
    proc = subprocess.Popen(["dvc", "repro", "train_step1"], cwd=repo, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "TQDM_DISABLE": "1"})
    resume = repo / "artifacts" / "step1" / "resume.pt"
    deadline = time.monotonic() + 300
    while not resume.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    assert resume.exists(), "Step-1 never wrote its first checkpoint"
    done = torch.load(resume, weights_only=True)["epoch"]
    assert 1 <= done < epochs, f"the kill came after training finished (epoch {done})"
    assert not (repo / "artifacts" / "step1" / "model.pt").exists()

    result = _dvc(repo, "repro")  # the whole pipeline completes
    assert "train_step1: resuming after epoch" in result.stdout
    assert not resume.exists(), "a finished run keeps resume.pt: a forced re-run would not train"
    assert (repo / "artifacts" / "reports" / "metrics.json").is_file()
    assert _dvc(repo, "status").stdout.strip().startswith("Data and pipelines are up to date")

    # a resumed run ends with the weights of an uninterrupted one
    resumed = torch.load(repo / "artifacts" / "step1" / "model.pt", weights_only=True)["model"]
    straight = tmp_path / "straight"
    _make_repo(straight, {"step1": {"epochs": epochs}})
    _dvc(straight, "repro", "train_step1")
    reference = torch.load(straight / "artifacts" / "step1" / "model.pt", weights_only=True)["model"]
    for key, value in reference.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=1e-6, msg=key)

    # corrupt an output: delete one chunk (a shard file) of responses.zarr
    store_files = sorted((repo / "artifacts" / "responses.zarr").rglob("*"))
    chunk = next(f for f in store_files if f.is_file() and "/response/c/" in f.as_posix())
    chunk.unlink()
    status = _dvc(repo, "status").stdout
    assert "dump_responses" in status and "modified" in status
    _dvc(repo, "repro")
    assert chunk.is_file(), "dvc repro must rebuild (or restore) the corrupted store"
    assert _dvc(repo, "status").stdout.strip().startswith("Data and pipelines are up to date")
    store = open_responses(repo / "artifacts" / "responses.zarr")
    assert np.isfinite(store.get("train", int(store.sent_ids("train")[-1]))).all()

