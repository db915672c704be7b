"""dvc.yaml lists, per stage, exactly the params keys the stage reads, so `dvc exp run -S key=value`
re-runs the stages whose results depend on the key, and only those.

Which keys a stage reads is *observed*, not guessed from its source: with ``TRIS_PARAMS_TRACE`` set,
:func:`pipeline.stage.start_stage` hands the stage a recording view of its params
(:class:`pipeline.params_trace.ParamsReads`) and writes the dotted keys read, however deep in the library,
to a file per stage. The slow test runs every stage on the tiny config that way and compares with dvc.yaml.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel
from tiny_pipeline import ROOT, run_pipeline

from pipeline.params import Params, load_params
from pipeline.stage import TRACE_ENV

# Read by start_stage for every stage; they choose where and how fast, not what is computed.
EXECUTION_ONLY = {"base.device", "base.threads", "base.num_workers"}

# Keys a stage reads only on a branch the tiny config does not take (it runs on synthetic data with the
# embedded CLIP); dvc.yaml must still list them, so that a run on that branch re-runs the stage.
BRANCH_ONLY = {
    "index": {"data.refer"},  # read when data.source = refer
    # the generated corpora, declared whole: read when pretrain_clip.caption_images > 0 (captioned
    # pictures beside the RIS pairs) or model.frozen_clip.pretrained = embedded (the frozen CLIP's cutouts)
    "pretrain_clip": {"pretrain_clip.frozen", "pretrain_clip.caption_objects", "synthesize.objects_per_image",
                      "synthesize.image_side", "synthesize.object_scale", "synthesize.expressions_per_object",
                      "synthesize.distractor_rate", "synthesize.family_weights"},
    # step2.select: best_val scores val each epoch (the Step-2 threshold, the map resize)
    "train_step2": {"evaluate.step2_threshold", "model.align_corners"},
    "make_pseudo_masks": {"step1.input_size"},  # read for pseudo_masks.prms_image: step1_input
}


def stages(dvc_yaml: Path) -> dict[str, list[str]]:
    """Stage name -> its ``params:`` entries."""
    spec = yaml.safe_load(dvc_yaml.read_text())
    return {name: stage.get("params", []) for name, stage in spec["stages"].items()}


def _under(key: str, entry: str) -> bool:
    """``key`` is ``entry`` or lies inside the section ``entry``."""
    return key == entry or key.startswith(entry + ".")


def leaf_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Dotted key of every leaf of the schema (a mapping-valued field is one leaf)."""
    keys = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += leaf_keys(ann, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def compare(listed: list[str], reads: set[str], branch_only: set[str] = frozenset()) -> list[str]:
    """What is wrong with one stage's ``params:`` list, given the keys the stage was seen to read.

    * a key read but not listed (changing it would not re-run the stage);
    * an entry of which nothing is read (changing it would re-run the stage for nothing);
    * a listed section of which some leaves are never read (list the keys read instead).
    A read of a whole section (``model_dump()``) reads each of its leaves. ``branch_only`` entries are
    exempt from the last two: they are read on a branch the observed run did not take.
    """
    reads = {k for k in reads if k not in EXECUTION_ONLY} | set(branch_only)
    leaves = leaf_keys(Params)
    read_leaves = {leaf for leaf in leaves if any(_under(leaf, r) for r in reads)}
    problems = [f"reads {k} but dvc.yaml does not list it" for k in sorted(reads)
                if not any(_under(k, e) for e in listed)]
    for entry in listed:
        under = [leaf for leaf in leaves if _under(leaf, entry)]
        unread = [leaf for leaf in under if leaf not in read_leaves]
        if len(unread) == len(under):
            problems.append(f"lists {entry} but never reads it")
        elif unread:
            problems.append(f"lists the section {entry} but never reads {unread}")
    return problems


def compare_all(dvc_yaml: Path, observed: dict[str, set[str]]) -> dict[str, list[str]]:
    """:func:`compare` for every stage of ``dvc_yaml``; only the stages with problems."""
    out = {}
    for name, listed in stages(dvc_yaml).items():
        problems = compare(listed, observed[name], BRANCH_ONLY.get(name, set()))
        if problems:
            out[name] = problems
    return out


def test_every_listed_param_exists_and_no_stage_depends_on_the_whole_file(repo_root):
    params = load_params(repo_root / "params.yaml").model_dump()
    for name, listed in stages(repo_root / "dvc.yaml").items():
        for entry in listed:
            assert isinstance(entry, str), f"{name}: params entry {entry!r} names a file, not keys"
            node = params
            for part in entry.split("."):
                assert isinstance(node, dict) and part in node, f"{name}: {entry} is not a params key"
                node = node[part]


def test_compare_reports_missing_unread_and_too_broad_entries():
    reads = {"base.seed", "base.threads", "model.hidden_dim", "step1", "evaluate.threshold"}
    assert compare(["base.seed", "model.hidden_dim", "step1", "evaluate.threshold"], reads) == []
    assert compare(["base.seed", "step1", "evaluate.threshold"], reads) == [
        "reads model.hidden_dim but dvc.yaml does not list it"]
    assert compare(["base.seed", "model.hidden_dim", "step1.lr", "evaluate.threshold"], reads) == [
        "reads step1 but dvc.yaml does not list it"]
    problems = compare(["base.seed", "model.hidden_dim", "step1", "evaluate", "dump"], reads)
    unread = [k for k in leaf_keys(Params) if k.startswith("evaluate.") and k != "evaluate.threshold"]
    assert "evaluate.gallery_size" in unread  # the section's other keys, whatever they are by now
    assert problems == [f"lists the section evaluate but never reads {unread}",
                        "lists dump but never reads it"]
    assert compare(["base.seed", "model.hidden_dim", "step1", "evaluate.threshold", "data.refer"], reads,
                   {"data.refer"}) == []


@pytest.fixture(scope="module")
def observed(tmp_path_factory) -> dict[str, set[str]]:
    """Stage -> the params keys it read while the whole tiny pipeline ran."""
    work = tmp_path_factory.mktemp("tiny")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(TRACE_ENV, str(work / "reads"))
        run_pipeline(work)
    return {f.stem: set(json.loads(f.read_text())) for f in (work / "reads").glob("*.json")}


@pytest.mark.slow
def test_each_stage_lists_exactly_the_params_it_reads(observed):
    assert set(observed) == set(stages(ROOT / "dvc.yaml")), "every stage should have left its reads"
    # what the old regex over the stage files could not see: reads inside the library
    assert {"model.hidden_dim", "model.max_tokens", "base.nproc"} <= observed["train_step1"]
    assert compare_all(ROOT / "dvc.yaml", observed) == {}


@pytest.mark.slow
def test_the_check_fails_on_a_broken_dvc_yaml(observed, tmp_path):
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    spec["stages"]["train_step1"]["params"].remove("model.hidden_dim")
    spec["stages"]["evaluate_step2"]["params"].append("step2.lr")
    broken = tmp_path / "dvc.yaml"
    broken.write_text(yaml.safe_dump(spec, sort_keys=False))
    assert compare_all(broken, observed) == {
        "train_step1": ["reads model.hidden_dim but dvc.yaml does not list it"],
        "evaluate_step2": ["lists step2.lr but never reads it"],
    }
