"""Sharing results through a DVC remote, as docs/operations.md describes: a researcher runs the pipeline once
and pushes; a colleague clones the Git repository, pulls, and has an up-to-date pipeline that
`dvc repro` leaves alone. Experiments travel the same way with `dvc exp push` / `dvc exp pull`.

Everything is local: the shared Git repository is a bare repo in a temporary directory, the DVC remote
a local directory, and DVC's update check and analytics are off, so nothing touches the network.
"""

import filecmp
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from tiny_pipeline import ROOT, stage_names, write_params

STATUS_CLEAN = "Data and pipelines are up to date."
EXPERIMENT = "stricter-step2"


def _run(cwd: Path, *args: str, timeout: float = 900) -> str:
    """Run a command in ``cwd`` (the repo there imports its own ``pipeline``); fail with its log."""
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": str(cwd), "DVC_NO_ANALYTICS": "1",
           "GIT_TERMINAL_PROMPT": "0"}
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    log = f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert result.returncode == 0, f"{' '.join(args)} failed in {cwd.name}:\n{log}"
    return result.stdout


def _offline_git_and_dvc(repo: Path) -> None:
    _run(repo, "git", "config", "user.email", "ci@example.com")
    _run(repo, "git", "config", "user.name", "ci")
    _run(repo, "git", "config", "commit.gpgsign", "false")
    _run(repo, "dvc", "config", "--local", "core.check_update", "false")


def _researcher_repo(repo: Path) -> None:
    """This project's tracked files in a fresh Git repo, on the tiny config."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, repo / name)
    write_params(repo)
    _run(repo, "git", "init", "-q", "-b", "main")
    _offline_git_and_dvc(repo)
    _run(repo, "git", "add", "-A")
    _run(repo, "git", "commit", "-qm", "tiny config")


def _assert_nothing_runs(repo: Path) -> None:
    """`dvc status` is clean and `dvc repro` skips every stage, changing no file."""
    assert _run(repo, "dvc", "status").strip() == STATUS_CLEAN
    before = _run(repo, "git", "status", "--porcelain")
    out = _run(repo, "dvc", "repro")
    skipped = [name for name in stage_names() if f"Stage '{name}' didn't change, skipping" in out]
    assert skipped == stage_names() and "Running stage" not in out and STATUS_CLEAN in out, out
    assert _run(repo, "git", "status", "--porcelain") == before, "dvc repro changed tracked files"


def _outputs_match(a: Path, b: Path) -> None:
    """The colleague's artifacts are the researcher's, file for file."""
    for name in ("step1/model.pt", "step2/model.pt", "reports/metrics.json", "reports/step1.json"):
        assert filecmp.cmp(a / "artifacts" / name, b / "artifacts" / name, shallow=False), name
    for store in ("responses.zarr", "pseudo_masks.zarr"):
        files = sorted(p.relative_to(a) for p in (a / "artifacts" / store).rglob("*") if p.is_file())
        assert files and all(filecmp.cmp(a / f, b / f, shallow=False) for f in files), store


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("dvc") is None or shutil.which("git") is None, reason="needs dvc and git")
def test_push_clone_pull_gives_an_up_to_date_pipeline_and_experiments_travel_too(tmp_path):
    researcher, colleague = tmp_path / "researcher", tmp_path / "colleague"
    hub, storage = tmp_path / "hub.git", tmp_path / "dvc-storage"
    researcher.mkdir()
    _researcher_repo(researcher)

    # the researcher: train once, push the results to the DVC remote and the code + dvc.lock to Git
    _run(researcher, "dvc", "repro")
    _run(researcher, "dvc", "remote", "add", "-d", "storage", str(storage))
    _run(researcher, "dvc", "push")
    _run(researcher, "git", "add", "-A")
    _run(researcher, "git", "commit", "-qm", "results")
    _run(tmp_path, "git", "init", "-q", "--bare", "-b", "main", str(hub))
    _run(researcher, "git", "remote", "add", "origin", str(hub))
    _run(researcher, "git", "push", "-q", "origin", "main")

    # a colleague: clone and pull; nothing is stale and nothing re-runs
    _run(tmp_path, "git", "clone", "-q", str(hub), str(colleague))
    _offline_git_and_dvc(colleague)
    assert not (colleague / "artifacts" / "step1").exists()
    _run(colleague, "dvc", "pull")
    assert "in sync" in _run(colleague, "dvc", "status", "--cloud")
    _assert_nothing_runs(colleague)
    assert not _run(colleague, "git", "status", "--porcelain").strip()
    _outputs_match(researcher, colleague)

    # an experiment: run and push it (Git ref to the hub, outputs to the DVC remote); pull and apply it
    _run(researcher, "dvc", "exp", "run", "-n", EXPERIMENT, "-S", "evaluate.step2_threshold=0.6")
    _run(researcher, "dvc", "exp", "push", "origin", EXPERIMENT)
    _run(colleague, "dvc", "exp", "pull", "origin", EXPERIMENT)
    assert EXPERIMENT in _run(colleague, "dvc", "exp", "list", "--name-only")
    _run(colleague, "dvc", "exp", "apply", EXPERIMENT)
    assert yaml.safe_load((colleague / "params.yaml").read_text())["evaluate"]["step2_threshold"] == 0.6
    _assert_nothing_runs(colleague)
    _outputs_match(researcher, colleague)
