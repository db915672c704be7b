"""The ablation queue script: valid overrides, per-stage targets, and result collection from real DVC."""

import copy
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from pipeline.params import parse_params
from scripts.ablations import (
    ABLATIONS,
    PSEUDO_METRICS,
    STEP1_METRICS,
    collect_metrics,
    directions,
    experiments_to_run,
    queue_command,
    render_markdown,
    seed_experiments,
    shape_object_hit,
)

ROOT = Path(__file__).resolve().parents[1]


def _override(raw: dict, dotted: str, value: object) -> None:
    node = raw
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node[key]
    assert leaf in node, f"{dotted} is not a key of params.yaml"
    node[leaf] = value


def test_every_ablation_is_a_valid_params_override():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for ablation in experiments_to_run(seeds=[1, 2]):
        changed = copy.deepcopy(raw)
        for key, value in ablation.params.items():
            _override(changed, key, value)
        assert changed != raw, ablation.name
        parse_params(changed)  # raises on a wrong type or value


def test_queue_commands_name_each_experiment_and_stop_at_their_stage():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    names = [a.name for a in experiments_to_run()]
    assert len(names) == len(set(names)) == 13  # 5 (Table 3) + 1 (Table 4) + 7 (Table 5)
    for ablation in experiments_to_run():
        cmd = queue_command(ablation)
        assert cmd[:5] == ["exp", "run", "--queue", "-n", ablation.name]
        assert cmd[-1] in stages
        assert cmd.count("-S") == len(ablation.params)
    assert "step1.num_negatives=0" in queue_command(next(a for a in ABLATIONS if a.name == "abl-t5-n1"))


def test_render_markdown_shows_our_percentages_beside_the_papers():
    baseline = {"mIoU": 0.25, "PointIt": 0.5, "P@0.5": 0.1, "PointM": 0.4}
    results = {"baseline": {STEP1_METRICS: {"val": baseline}},
               "abl-t3-cls": {STEP1_METRICS: {"val": {"mIoU": 0.125, "PointIt": 0.3, "P@0.5": 0.0,
                                                      "PointM": 0.2}}}}
    table = render_markdown(results)
    assert "| L_cls only | – | – | 12.50 (18.94) | 30.00 (51.42) | 0.00 (3.87) | 20.00 (36.93) |" in table
    assert "| N + 1 = 48 | – | 25.00 (27.81) | 50.00 (66.99) | 40.00 (53.69) |" in table
    assert "| K = 3 | – | – (27.05) |" in table  # not run yet: a dash, never a made-up value


def test_seed_experiments_rerun_the_full_method_bp_and_cls_only_at_each_seed():
    extra = seed_experiments([1, 2])
    assert [a.name for a in extra] == ["seed1-full", "seed1-bp", "seed1-cls",
                                       "seed2-full", "seed2-bp", "seed2-cls"]
    assert "base.seed=2" in queue_command(extra[3]) and queue_command(extra[3]).count("-S") == 1
    bp = queue_command(extra[1])
    assert "step1.calibration_positive=false" in bp and "step1.calibration_negative=false" in bp
    cls = queue_command(extra[2])
    assert "base.seed=1" in cls and "step1.prompt=none" in cls
    assert len(experiments_to_run([1, 2])) == 13 + 6


def test_seed_noise_table_gives_mean_and_sample_std_over_all_seeds():
    def run(miou):
        return {STEP1_METRICS: {"val": {"mIoU": miou, "PointIt": 0.5, "P@0.5": 0.1, "PointM": 0.4}}}

    results = {"baseline": run(0.10), "seed1-full": run(0.20), "seed2-full": run(0.30),
               "abl-t3-cls": run(0.40), "seed1-cls": run(0.40)}  # seed2-cls has not run
    table = render_markdown(results, seeds=[1, 2], base_seed=0)
    assert "### Seed noise: Table 3 rows over seeds 0, 1, 2" in table
    assert "| + BP + P_term + N_term (full) | 3 | – | – | 20.00 ± 10.00 | 50.00 ± 0.00 |" in table
    assert "| L_cls only | 2 | – | – | 40.00 ± 0.00 |" in table
    assert "| + BP | 0 | – |" in table
    assert "Seed noise" not in render_markdown(results)


def _kinds(shape: float, other: float) -> dict:
    return {"attribute: shape": {"rate": shape, "n": 10}, "attribute: size+shape": {"rate": shape, "n": 30},
            "attribute: colour": {"rate": other, "n": 50}, "position": {"rate": other, "n": 50}}


def test_shape_object_hit_weights_the_kinds_that_name_a_shape_by_count():
    split = {"object_hit_by_kind": {"attribute: shape": {"rate": 0.2, "n": 10},
                                    "attribute: size+shape": {"rate": 0.6, "n": 30},
                                    "attribute: colour": {"rate": 1.0, "n": 500}}}
    assert shape_object_hit(split) == pytest.approx((0.2 * 10 + 0.6 * 30) / 40)
    assert shape_object_hit({"object_hit": 0.5}) is None  # a test split: no kinds, no made-up value


def _step1(hit: float, shape: float, point_m: float) -> dict:
    return {STEP1_METRICS: {"val": {"object_hit": hit, "PointM": point_m,
                                    "object_hit_by_kind": _kinds(shape, 0.9)}}}


def _three_seeds(rows: dict[str, list[tuple[float, float, float]]]) -> dict:
    names = {"full": "baseline", "bp": "abl-t3-bp", "cls": "abl-t3-cls"}
    out = {}
    for short, runs in rows.items():
        for seed, run in enumerate(runs):
            out[names[short] if seed == 0 else f"seed{seed}-{short}"] = _step1(*run)
    return out


def test_directions_hold_when_calibration_beats_bp_beyond_the_pooled_sd():
    results = _three_seeds({"cls": [(0.50, 0.40, 0.45)] * 3,
                            "bp": [(0.55, 0.40, 0.50), (0.55, 0.42, 0.52), (0.55, 0.44, 0.48)],
                            "full": [(0.60, 0.60, 0.49), (0.60, 0.62, 0.47), (0.60, 0.64, 0.51)]})
    results["abl-t4-no-prms"] = {PSEUDO_METRICS: {"raw_selected": {"mIoU": 0.15}, "refined": {"mIoU": 0.40}}}
    results["baseline"][PSEUDO_METRICS] = {"raw_selected": {"mIoU": 0.17}, "refined": {"mIoU": 0.45}}
    results["abl-t5-n1"] = {STEP1_METRICS: {"val": {"object_hit": 0.20}}}
    found = directions(results, seeds=[1, 2])
    assert [d.holds for d in found] == [True, True, True, True, True, True]
    assert "pooled SD 2.00" in found[1].evidence  # both groups have sample SD 0.02
    table = render_markdown(results, seeds=[1, 2])
    assert "| Table 5, N + 1 = 1 collapses: object hit ≤ 30.00 | 20.00 | holds |" in table


def test_directions_fail_within_noise_and_say_what_was_not_measured():
    results = _three_seeds({"cls": [(0.60, 0.40, 0.45)] * 3,  # L_cls above + BP: the order fails
                            "bp": [(0.55, 0.40, 0.50), (0.55, 0.50, 0.52), (0.55, 0.60, 0.48)],
                            "full": [(0.60, 0.45, 0.30), (0.60, 0.55, 0.32), (0.60, 0.65, 0.31)]})
    found = directions(results, seeds=[1, 2])
    assert [d.holds for d in found] == [False, False, False, None, None, None]
    assert [d.holds for d in directions(results, seeds=[])][1:3] == [None, None]  # one run: no SD


def test_collect_metrics_leaves_out_experiments_that_have_not_finished():
    metrics = {"data": {"metrics": {STEP1_METRICS: {"data": {"val": {"PointM": 0.5}}}}}}
    shown = [{"rev": "abc", **metrics, "experiments": [
        {"name": "done", "executor": {"state": "success"}, "revs": [{"name": "done", **metrics}]},
        {"name": "kept", "executor": None, "revs": [{"name": "kept", **metrics}]},  # run without the queue
        {"name": "running", "executor": {"state": "running"}, "revs": [{"name": "running", **metrics}]},
        {"name": "queued", "executor": {"state": "queued"}, "revs": [{"name": "queued", "data": {}}]}]}]
    assert sorted(collect_metrics(shown)) == ["baseline", "done", "kept"]


@pytest.mark.skipif(shutil.which("dvc") is None or shutil.which("git") is None, reason="needs dvc and git")
def test_collect_metrics_reads_real_dvc_exp_show_output(tmp_path):
    run = lambda *cmd: subprocess.run(cmd, cwd=tmp_path, check=True, capture_output=True, text=True)  # noqa: E731
    run("git", "init", "-q")
    run("git", "config", "user.email", "ci@example.com")
    run("git", "config", "user.name", "ci")
    run("dvc", "init", "-q")
    (tmp_path / "params.yaml").write_text("a:\n  x: 1\n")
    (tmp_path / "write.py").write_text(
        "import json, yaml\nx = yaml.safe_load(open('params.yaml'))['a']['x']\n"
        "json.dump({'val': {'PointM': x / 10}}, open('m.json', 'w'))\n")
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  s:\n    cmd: python write.py\n    deps: [write.py]\n    params: [a.x]\n"
        "    metrics: [m.json: {cache: false}]\n")
    run("dvc", "repro", "-q")
    run("git", "add", "-A")
    run("git", "commit", "-qm", "baseline")
    run("dvc", "exp", "run", "-q", "-n", "abl-x3", "-S", "a.x=3")
    shown = json.loads(run("dvc", "exp", "show", "--json").stdout)
    results = collect_metrics(shown)
    assert results["baseline"]["m.json"] == {"val": {"PointM": 0.1}}
    assert results["abl-x3"]["m.json"] == {"val": {"PointM": 0.3}}
