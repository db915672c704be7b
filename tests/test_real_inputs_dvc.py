"""The real inputs (REFER files, images, CLIP weight files) are DVC deps: a byte change re-runs exactly the
stages downstream of it (docs/operations.md, "Real inputs as DVC dependencies").

The DVC tests build a temporary Git + DVC repository with this checkout's dvc.yaml on a real-data config
(data and weights ``dvc add``-ed, as the docs tell users), record every stage as up to date with
``dvc commit`` over stand-in outputs instead of running the heavy stages, then change one byte and read
``dvc status --json`` (the stages whose deps changed) and ``dvc dag --dot`` (what runs after them). The
stages downstream really re-run because the first stage's output changes: the index with the refs, and
``artifacts/clip/weights.json`` (the weight file's md5) with the weights, tested at the end.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from test_dvc_deps import load_stages
from tiny_pipeline import ROOT, run_stage, write_params

from pipeline.inputs import (
    cached_tag_file,
    covers,
    external_weights,
    require_tracked,
    weights_file,
    weights_manifest,
)
from pipeline.params import load_params
from pipeline.train.common import fingerprint

pytestmark = pytest.mark.skipif(shutil.which("dvc") is None or shutil.which("git") is None,
                                reason="needs dvc and git")



def _load_stage(name: str):
    """A stage script as a module (its ``main`` not run), as tests/test_hostile_stores.py loads them."""
    spec = importlib.util.spec_from_file_location(f"stage_{name}_inputs_test", ROOT / "stages" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


untracked_reads = _load_stage("index").untracked_reads
untracked_weights = _load_stage("pretrain_clip").untracked_weights

REFS = "data/refer/refcoco/refs(unc).p"
WEIGHTS = "models/RN50.pt"
REAL = {  # README's real-data keys, with the data and the weights in the repository, `dvc add`-ed
    "data": {"source": "refer", "refer": {"root": "data/refer", "dataset": "refcoco", "split_by": "unc",
                                          "image_dir": "data/refer/images"}},
    "inputs": {"refs": "data/refer", "images": "data/refer/images", "weights": "models"},
    "model": {"clip": {"name": "RN50", "pretrained": WEIGHTS}},
}
PIPELINE = ["synthesize", "index", "pretrain_clip", "train_step1", "dump_responses", "evaluate_step1",
            "make_pseudo_masks", "train_step2", "evaluate_step2", "report"]


def _run(repo: Path, *args: str) -> str:
    env = {**os.environ, "TQDM_DISABLE": "1", "DVC_NO_ANALYTICS": "1"}
    result = subprocess.run(list(args), cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    log = f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{log}"
    return result.stdout


def _flip_byte(path: Path, offset: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _stand_in_outputs(repo: Path) -> None:
    """Every out, metric and artifact dep of the resolved pipeline, as a small file or folder, so that
    ``dvc commit`` can record the stages without running them."""
    spec = load_stages(repo / "dvc.yaml", repo / "params.yaml")  # ${inputs.*} resolved
    for stage in spec.values():
        for item in [*stage.get("outs", []), *stage.get("metrics", [])]:
            path = repo / (next(iter(item)) if isinstance(item, dict) else item)
            if path.suffix in (".json", ".md"):
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("{}")
            else:
                path.mkdir(parents=True, exist_ok=True)
                (path / "stand_in").write_text("x")
    for stage in spec.values():
        for dep in stage.get("deps", []):
            path = repo / dep
            if dep.startswith("artifacts/") and not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("x")


def _make_repo(repo: Path, override: dict) -> Path:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("stages", "pipeline", "models"):
        shutil.copytree(ROOT / name, repo / name, ignore=ignore)
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    write_params(repo, override)
    git = lambda *a: _run(repo, "git", *a)  # noqa: E731
    git("init", "-q")
    git("config", "user.email", "ci@example.com")
    git("config", "user.name", "ci")
    _run(repo, "dvc", "init", "-q")
    return repo


def _changed(repo: Path) -> set[str]:
    return set(json.loads(_run(repo, "dvc", "status", "--json")))


def _downstream(repo: Path, stages: set[str]) -> set[str]:
    """``stages`` and every stage after them in ``dvc dag``."""
    edges = re.findall(r'"([^"]+)" -> "([^"]+)"', _run(repo, "dvc", "dag", "--dot"))
    found, todo = set(stages), list(stages)
    while todo:
        node = todo.pop()
        for a, b in edges:
            if a == node and b not in found:
                found.add(b)
                todo.append(b)
    return found


def _would_run(repo: Path) -> set[str]:
    """The pipeline stages ``dvc repro`` would run: those whose deps changed and all after them."""
    return _downstream(repo, _changed(repo)) & set(PIPELINE)


@pytest.fixture(scope="module")
def real_repo(tmp_path_factory) -> Path:
    """A repository on the real-data config, every stage recorded as up to date."""
    repo = _make_repo(tmp_path_factory.mktemp("real") / "repo", REAL)
    refs = repo / REFS
    refs.parent.mkdir(parents=True)
    refs.write_bytes(b"\x80\x02]q\x00." * 8)
    (refs.parent / "instances.json").write_text("{}")
    (repo / "data/refer/images").mkdir()
    (repo / "data/refer/images/COCO_train2014_000000000001.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (repo / WEIGHTS).write_bytes(os.urandom(4096))
    _run(repo, "dvc", "add", "-q", "data/refer", WEIGHTS)
    _stand_in_outputs(repo)
    _run(repo, "dvc", "commit", "-f", "-q")
    _run(repo, "git", "add", "-A")
    _run(repo, "git", "commit", "-qm", "real inputs")
    assert _changed(repo) == set(), "the stand-in run should leave everything up to date"
    return repo


def test_a_byte_of_the_refs_pickle_reruns_index_and_everything_after_it_not_synthesize(real_repo):
    refs = real_repo / REFS
    _flip_byte(refs, 3)
    try:
        assert "index" in _changed(real_repo)
        assert _would_run(real_repo) == set(PIPELINE) - {"synthesize"}
    finally:
        _flip_byte(refs, 3)
    assert _changed(real_repo) == set()


def test_a_byte_of_a_weight_file_reruns_pretrain_clip_and_everything_after_it_only(real_repo):
    weights = real_repo / WEIGHTS
    _flip_byte(weights, 100)
    try:
        assert _would_run(real_repo) == set(PIPELINE) - {"synthesize", "index"}
        assert "pretrain_clip" in _changed(real_repo)
    finally:
        _flip_byte(weights, 100)
    assert _changed(real_repo) == set()


def test_an_image_byte_reruns_every_stage_that_reads_images(real_repo):
    image = next((real_repo / "data/refer/images").iterdir())
    _flip_byte(image, 5)
    try:
        assert _would_run(real_repo) == set(PIPELINE) - {"synthesize"}
        assert {"index", "pretrain_clip", "train_step1", "dump_responses", "report"} <= _changed(real_repo)
    finally:
        _flip_byte(image, 5)


def test_the_synthetic_data_feeds_nothing_with_data_source_refer(real_repo):
    assert _downstream(real_repo, {"synthesize"}) == {"synthesize"}


def test_the_embedded_default_needs_no_data_and_synthesize_feeds_index(tmp_path):
    """A clean clone on the default params: every interpolated dep exists or is an output of a stage
    (``models/`` is in the repository), and the default keeps its graph."""
    repo = _make_repo(tmp_path / "repo", {})
    _stand_in_outputs(repo)
    _run(repo, "dvc", "commit", "-f", "-q")
    assert _changed(repo) == set()
    assert _downstream(repo, {"synthesize"}) == set(PIPELINE)
    (repo / "models/README.md").write_text("edited\n")  # the weights folder is pretrain_clip's dep
    assert _would_run(repo) == set(PIPELINE) - {"synthesize", "index"}


def test_every_interpolated_dep_is_an_inputs_key_and_the_checking_stages_list_theirs():
    """``${...}`` in deps names an ``inputs`` key; the stages that check a key depend on its path and
    list the key in their params (the check reads it)."""
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    params = load_params(ROOT / "params.yaml").model_dump()
    used = {}
    for name, stage in spec.items():
        for dep in stage.get("deps", []):
            for key in re.findall(r"\$\{([^}]+)\}", dep):
                section, leaf = key.split(".")
                assert section == "inputs" and leaf in params["inputs"], f"{name}: {key}"
                used.setdefault(name, set()).add(key)
    checked = {"index": {"inputs.refs", "inputs.images"}, "pretrain_clip": {"inputs.weights"}}
    for name, keys in checked.items():
        assert keys <= used[name] and keys <= set(spec[name]["params"]), name
    # every stage but synthesize opens images (test_dvc_deps.py checks which do, with the default params)
    assert {name for name, keys in used.items() if "inputs.images" in keys} == set(PIPELINE) - {"synthesize"}


# ---- the checks that keep params.yaml's inputs and what the stages read in step ------------------------


def test_covers_compares_written_and_resolved_paths(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert covers(tmp_path / "real", tmp_path / "real/a/b.p")
    assert covers(tmp_path / "link", tmp_path / "real/x")  # through the symlink
    assert covers("models", "models")
    assert not covers("models", "models2/RN50.pt")
    assert not covers("data/refer/refcoco", "data/refer/images")


def _params(tmp_path: Path, override: dict):
    write_params(tmp_path, override)
    return load_params(tmp_path / "params.yaml")


def test_index_names_the_inputs_key_to_set_when_it_reads_outside_them(tmp_path):
    assert untracked_reads(_params(tmp_path, {})) == []
    assert untracked_reads(_params(tmp_path, REAL)) == []
    stale = {**REAL, "inputs": {"refs": "artifacts/synthetic", "images": "artifacts/synthetic/images",
                                "weights": "models"}}
    problems = untracked_reads(_params(tmp_path, stale))
    assert len(problems) == 3
    assert problems[0].startswith("data.refer.root: data/refer/refcoco/refs(unc).p is not under inputs.refs "
                                  "'artifacts/synthetic'")
    assert problems[0].endswith("set inputs.refs to 'data/refer'")
    assert problems[2].startswith("data.refer.image_dir: data/refer/images is not under inputs.images")


def test_require_tracked_stops_the_stage_under_dvc_and_warns_outside(monkeypatch, capsys):
    monkeypatch.delenv("DVC_STAGE", raising=False)
    require_tracked("index", ["data.refer.root: x is not under inputs.refs 'y'"])
    assert capsys.readouterr().err.startswith("warning: index: data.refer.root: x is not under")
    monkeypatch.setenv("DVC_STAGE", "index")
    with pytest.raises(SystemExit, match=r"^index: data.refer.root: x .*Real inputs as DVC dependencies"):
        require_tracked("index", ["data.refer.root: x is not under inputs.refs 'y'"])
    require_tracked("index", [])  # nothing to report: no exit


def test_pretrain_clip_requires_weight_files_under_inputs_weights(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    (tmp_path / WEIGHTS).write_bytes(b"w")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere/ViT-B-32.pt").write_bytes(b"v")
    assert untracked_weights(_params(tmp_path, {})) == []  # embedded: reads no file
    assert untracked_weights(_params(tmp_path, REAL)) == []
    frozen = {**REAL, "model": {**REAL["model"], "frozen_clip": {"name": "ViT-B-32",
                                                                 "pretrained": "elsewhere/ViT-B-32.pt"}}}
    [problem] = untracked_weights(_params(tmp_path, frozen))
    assert problem.startswith("model.frozen_clip.pretrained: elsewhere/ViT-B-32.pt is not under "
                              "inputs.weights 'models'")
    assert problem.endswith(f"set inputs.weights to a folder holding them ({str(tmp_path)!r})")


def test_a_cached_open_clip_tag_resolves_to_its_hub_file(tmp_path, monkeypatch):
    """``openai`` is no path: its weights are the Hugging Face cache file open_clip would load."""
    import huggingface_hub.constants

    snapshot = tmp_path / "models--timm--resnet50_clip.openai/snapshots/abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "open_clip_model.safetensors").write_bytes(b"weights")
    (tmp_path / "models--timm--resnet50_clip.openai/refs").mkdir()
    (tmp_path / "models--timm--resnet50_clip.openai/refs/main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    assert cached_tag_file("RN50", "openai") == snapshot / "open_clip_model.safetensors"
    assert weights_file("RN50", "openai") == snapshot / "open_clip_model.safetensors"
    assert cached_tag_file("ViT-B-32", "openai") is None  # not cached: loading fails with its own message
    assert weights_file("tiny-rn", "embedded") is None


def _clip_dir(tmp_path: Path, weights: Path) -> Path:
    clip = tmp_path / "clip"
    clip.mkdir()
    spec = {"name": "RN50", "pretrained": str(weights), "tiny": None, "context_length": 77}
    (clip / "clip.json").write_text(json.dumps(spec))
    (clip / "frozen_clip.json").write_text(json.dumps(spec))
    return clip


def test_one_byte_of_a_weight_file_changes_the_manifest_and_the_resume_fingerprint(tmp_path):
    weights = tmp_path / "RN50.pt"
    weights.write_bytes(os.urandom(3 << 20))
    clip = _clip_dir(tmp_path, weights)
    spec = json.loads((clip / "clip.json").read_text())
    assert external_weights([tmp_path / "index", clip], ("clip.json", "frozen_clip.json"), ()) == [weights]
    before = weights_manifest({"clip": spec}, ())
    run_before = fingerprint({"lr": 1}, [clip])
    _flip_byte(weights, (3 << 20) // 2)  # the middle of the file: a sampled hash would miss it
    after = weights_manifest({"clip": spec}, ())
    assert before["clip"]["bytes"] == after["clip"]["bytes"]
    assert before["clip"]["md5"] != after["clip"]["md5"]
    assert fingerprint({"lr": 1}, [clip]) != run_before
    tiny = {"name": "tiny-rn", "pretrained": "clip.pt", "tiny": {}, "context_length": 20}
    assert weights_manifest({"clip": tiny, "frozen_clip": tiny}, ("clip.pt",)) is None  # embedded


def test_synthesize_generates_nothing_with_data_source_refer(tmp_path):
    write_params(tmp_path, REAL)
    out = run_stage(tmp_path, "synthesize")
    assert "nothing generated" in out
    summary = json.loads((tmp_path / "artifacts/synthetic/summary.json").read_text())
    assert summary["generated"] is False
    assert sorted(p.name for p in (tmp_path / "artifacts/synthetic").rglob("*")) == [
        "README.txt", "images", "summary.json"]
