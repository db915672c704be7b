"""Hostile or careless ``params.yaml`` values: each is refused when the params are read, by its dotted key.

Cases of the second hostile-input round: a NaN or out-of-domain number that passed the schema and silently
corrupted the pseudo-masks (6) or crashed pydensecrf (8), a key given twice in the YAML file (7), and a seed
or size that blew up at stage start (14). The schema walks below make the domain a property of every
numeric key, so a key added later without one fails here.
"""

from __future__ import annotations

import copy
import math
import subprocess
import sys
import types
import typing
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from pipeline.params import Params, ParamsError, load_params, overlay, parse_params

ROOT = Path(__file__).resolve().parents[1]
PARAMS_TEXT = (ROOT / "params.yaml").read_text()
RAW = yaml.safe_load(PARAMS_TEXT)

# --------------------------------------------------------------------------------------------------------
# Walking the schema: every scalar position of every numeric key, as a path into the raw mapping
# --------------------------------------------------------------------------------------------------------

DICT_VALUE = object()  # path step: "the first value of this mapping" (split_fractions)


def numeric_positions(ann: object, path: tuple = ()) -> Iterator[tuple[tuple, type]]:
    """``(path, float | int)`` of every float or int the annotation ``ann`` holds at ``path``.

    Descends into sections (models), tuples (one step per element), lists (their first item), mappings
    (their first value) and unions; a Literal is a closed set of values, not a domain, and is skipped.
    """
    origin = typing.get_origin(ann)
    if origin is typing.Annotated:
        yield from numeric_positions(typing.get_args(ann)[0], path)
    elif isinstance(ann, type) and issubclass(ann, BaseModel):
        for name, field in ann.model_fields.items():
            yield from numeric_positions(field.annotation, (*path, name))
    elif ann is bool or origin is typing.Literal or ann is str:
        return
    elif ann is float or ann is int:
        yield path, ann
    elif origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(ann):
            yield from numeric_positions(arg, path)
    elif origin is tuple:
        for i, arg in enumerate(typing.get_args(ann)):
            yield from numeric_positions(arg, (*path, i))
    elif origin is list:
        yield from numeric_positions(typing.get_args(ann)[0], (*path, 0))
    elif origin is dict:
        yield from numeric_positions(typing.get_args(ann)[1], (*path, DICT_VALUE))
    else:
        raise AssertionError(f"schema walk: no rule for {ann!r} at {path}; teach numeric_positions about it")


def key_of(path: tuple) -> str:
    """The dotted params key of a position (its leading field names)."""
    names = []
    for step in path:
        if not isinstance(step, str):
            break
        names.append(step)
    return ".".join(names)


def with_position(raw: dict, path: tuple, value: object) -> dict:
    out = copy.deepcopy(raw)
    node = out
    for step in path[:-1]:
        node = node[next(iter(node))] if step is DICT_VALUE else node[step]
    last = path[-1]
    node[next(iter(node)) if last is DICT_VALUE else last] = value
    return out


def with_value(raw: dict, dotted: str, value: object) -> dict:
    return with_position(raw, tuple(dotted.split(".")), value)


def refused(raw: dict, key: str) -> str:
    """The ParamsError text for ``raw``; fails the test when the params are accepted or the key is unnamed."""
    with pytest.raises(ParamsError) as err:
        parse_params(raw)
    assert key in str(err.value), f"{key} not named in: {err.value}"
    return str(err.value)


FLOATS = [path for path, kind in numeric_positions(Params) if kind is float]
INTS = [path for path, kind in numeric_positions(Params) if kind is int]


def test_schema_walk_finds_the_numeric_keys():
    """Guard for the two walks below: they see every section's numbers, tuples and mappings included."""
    floats, ints = {key_of(p) for p in FLOATS}, {key_of(p) for p in INTS}
    assert {"pseudo_masks.random_walk.beta", "pseudo_masks.crf.gaussian_sxy", "step1.lr",
            "synthesize.object_scale", "synthesize.split_fractions"} <= floats
    assert {"base.seed", "model.max_tokens", "step1.calibration_size", "model.clip.tiny.vision_layers",
            "synthesize.image_side", "pseudo_masks.random_walk.exp_times"} <= ints
    assert len(FLOATS) >= 37 and len(INTS) >= 54  # as of this schema; more keys only add to them


# --------------------------------------------------------------------------------------------------------
# Case 6: params that passed the schema and corrupted results
# --------------------------------------------------------------------------------------------------------


def test_case_06_nan_beta_is_refused(tmp_path):
    """``random_walk.beta: .nan`` emptied every pseudo-mask with exit status 0; now the file is refused."""
    text = PARAMS_TEXT.replace("random_walk: {beta: 10.0,", "random_walk: {beta: .nan,")
    assert text != PARAMS_TEXT
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(ParamsError) as err:
        load_params(tmp_path / "params.yaml")
    assert "pseudo_masks.random_walk.beta: Input should be a finite number" in str(err.value)
    for bad in (0.0, -1.0, math.inf):  # 0 makes every affinity 1, a negative one 0 ** beta infinite
        refused(with_value(RAW, "pseudo_masks.random_walk.beta", bad), "pseudo_masks.random_walk.beta")


def test_case_06_negative_crf_kernel_settings_are_refused():
    """``bilateral_srgb: -1`` and ``bilateral_compat: -1000`` were accepted and changed the masks."""
    for key, bad in (("bilateral_srgb", -1.0), ("bilateral_compat", -1000.0), ("gaussian_compat", -3.0),
                     ("bilateral_sxy", 0.0), ("gaussian_compat", 1e300)):
        refused(with_value(RAW, f"pseudo_masks.crf.{key}", bad), f"pseudo_masks.crf.{key}")


def accepted(path: tuple, values: tuple) -> list[str]:
    """The values of ``values`` that the schema accepts at ``path``, or whose error does not name its key."""
    out = []
    for value in values:
        try:
            parse_params(with_position(RAW, path, value))
        except ParamsError as err:
            if key_of(path) in str(err):
                continue
        out.append(f"{'.'.join(map(str, path))} = {value}")
    return out


def test_case_06_every_float_field_rejects_nan_and_inf():
    """Every float of the schema is finite (NaN passes every ``ge`` / ``le`` test, as it compares False),
    refused by its dotted key: a float key added without a domain fails here."""
    misses = [miss for path in FLOATS for miss in accepted(path, (math.nan, math.inf, -math.inf))]
    assert not misses, "accepted or unnamed:\n" + "\n".join(misses)


def test_case_06_every_integer_field_has_a_range():
    """Every integer of the schema has a lower and an upper bound (no count, size or seed is negative,
    none may reach 2**70), refused by its dotted key: an int key added without a range fails here."""
    misses = [miss for path in INTS for miss in accepted(path, (-1, 2**70))]
    assert not misses, "accepted or unnamed:\n" + "\n".join(misses)


def known_configurations() -> dict[str, dict]:
    """Every params configuration the project runs: params.yaml, the tests' tiny and paper configs, the
    paper benchmark's and every ablation / seed experiment's overrides."""
    from test_paper_architecture import REAL_DATA_OVERRIDES, SMALL, overrides_under_test
    from tiny_pipeline import TINY

    from bench.paper_step1 import PAPER_BATCH, overrides_to_dict, paper_params
    from scripts.ablations import experiments_to_run

    configs = {"params.yaml": RAW, "tiny": overlay(RAW, TINY),
               "readme real data": overlay(RAW, overrides_to_dict(list(REAL_DATA_OVERRIDES))),
               "paper architecture test": overlay(overlay(RAW, TINY),
                                                  overlay(SMALL, overrides_to_dict(overrides_under_test(
                                                      Path("/weights"))))),
               "bench paper_step1": paper_params(Path("/weights"), 2 * 5 * PAPER_BATCH["batch_size"] + 16)}
    for ablation in experiments_to_run(seeds=[1, 2]):
        changed = RAW
        for key, value in ablation.params.items():
            changed = with_value(changed, key, value)
        configs[f"ablation {ablation.name}"] = changed
    return configs


def test_case_06_configurations_in_use_stay_valid():
    """The domains refuse nothing the project runs (a regression guard: it passes before the change
    too, by design)."""
    configs = known_configurations()
    assert len(configs) >= 5 + 13
    for name, raw in configs.items():
        parse_params(raw, name)


# --------------------------------------------------------------------------------------------------------
# Case 7: duplicate keys in params.yaml
# --------------------------------------------------------------------------------------------------------


def _with_duplicate_epochs() -> tuple[str, int, int]:
    """params.yaml with ``step1.epochs`` given twice: (text, first line, duplicate line)."""
    lines = PARAMS_TEXT.splitlines(keepends=True)
    start = lines.index("step1:\n")
    first = next(i for i in range(start, len(lines)) if lines[i].startswith("  epochs:"))
    lines.insert(first + 1, "  epochs: 7\n")
    return "".join(lines), first + 1, first + 2


def test_case_07_duplicate_key_is_refused_naming_key_and_line(tmp_path):
    text, first, dup = _with_duplicate_epochs()
    assert yaml.safe_load(text)["step1"]["epochs"] == 7  # what a stage used to train with, silently
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(ParamsError) as err:
        load_params(tmp_path / "params.yaml")
    assert f"duplicate key step1.epochs at line {dup} (first at line {first})" in str(err.value)
    assert str(tmp_path / "params.yaml") in str(err.value)


def test_case_07_duplicate_key_stops_a_stage_in_one_line(tmp_path):
    from pipeline.stage import start_stage

    (tmp_path / "params.yaml").write_text(_with_duplicate_epochs()[0])
    with pytest.raises(SystemExit) as exc:
        start_stage("train_step1", tmp_path / "params.yaml")
    message = str(exc.value.code)
    assert message.startswith("train_step1: ") and "duplicate key step1.epochs" in message
    assert "\n" not in message


@pytest.mark.parametrize(("text", "key"), [
    ("a: 1\na: 2\n", "a"),                                           # a whole section twice
    ("crf: {iterations: 5, iterations: 6}\n", "crf.iterations"),    # flow mapping
    ("s:\n  - {x: 1}\n  - {x: 2, x: 3}\n", "s.1.x"),                 # inside a list
    ("n:\n  1: a\n  0x1: b\n", "n.1"),                               # equal after YAML resolution
])
def test_case_07_duplicates_are_refused_anywhere_in_the_file(tmp_path, text, key):
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(ParamsError, match=rf"duplicate key {key.replace('.', r'[.]')} at line"):
        load_params(tmp_path / "params.yaml")


def test_case_07_loader_keeps_yaml_merges_and_stays_safe():
    """A key merged in with ``<<`` and set again is no duplicate; the loader is still a SafeLoader."""
    from pipeline.params import UniqueKeyLoader

    merged = yaml.load("a: &a {x: 1, y: 2}\nb:\n  <<: *a\n  x: 3\n", Loader=UniqueKeyLoader)  # noqa: S506
    assert merged == {"a": {"x": 1, "y": 2}, "b": {"x": 3, "y": 2}}
    assert issubclass(UniqueKeyLoader, yaml.SafeLoader)
    with pytest.raises(yaml.YAMLError):
        yaml.load("x: !!python/object/apply:os.getpid []\n", Loader=UniqueKeyLoader)  # noqa: S506


# --------------------------------------------------------------------------------------------------------
# Case 8: crf.gaussian_sxy: .nan segfaulted make_pseudo_masks
# --------------------------------------------------------------------------------------------------------

CRF_PROBE = """
import sys
import numpy as np
from pipeline.params import CrfParams
from pipeline.pseudo.crf import crf_refine
crf = CrfParams(iterations=5, gaussian_sxy=float(sys.argv[1]), gaussian_compat=float(sys.argv[2]),
                bilateral_sxy=float(sys.argv[1]), bilateral_srgb=float(sys.argv[1]),
                bilateral_compat=float(sys.argv[2]))
side = int(sys.argv[3])  # a strip: the largest coordinate (side / width) is what overflows, not the area
rng = np.random.default_rng(0)
image = (rng.random((32, side, 3)) * 255).astype(np.uint8)
soft = crf_refine(image, rng.random((32, side)).astype(np.float32), crf)
print("finite", bool(np.isfinite(soft).all()))
"""


def test_case_08_nan_gaussian_sxy_is_refused_by_name(tmp_path):
    """``.nan`` (rc 139 in pydensecrf before) and a width so small that pydensecrf's lattice overflows
    (1e-30: segfault; 1e-6: heap corruption) are refused naming the key; the stage exits in one line."""
    from pipeline.stage import start_stage

    for bad in (math.nan, 1e-30, 1e-6):
        refused(with_value(RAW, "pseudo_masks.crf.gaussian_sxy", bad), "pseudo_masks.crf.gaussian_sxy")
    text = PARAMS_TEXT.replace("gaussian_sxy: 3.0", "gaussian_sxy: .nan")
    assert text != PARAMS_TEXT
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(SystemExit, match=r"^make_pseudo_masks: .*pseudo_masks\.crf\.gaussian_sxy: Input "
                       r"should be a finite number"):
        start_stage("make_pseudo_masks", tmp_path / "params.yaml")


def test_case_08_crf_at_the_edges_of_its_domain_runs_finite():
    """The accepted domain is safe for pydensecrf: the smallest widths and largest weights the schema
    accepts, at the largest working size (pseudo_masks.size <= 1024), give finite marginals (in a child
    process, so a crash fails the test instead of killing pytest). Fails before: 0.01 / 1000 are edges
    of a domain that did not exist, checked through the params type."""
    from pipeline.params import MAX_SIDE, CrfParams

    field = CrfParams.model_fields
    assert [m.ge for m in field["gaussian_sxy"].metadata if hasattr(m, "ge")] == [0.01]
    assert [m.le for m in field["bilateral_compat"].metadata if hasattr(m, "le")] == [1000]
    result = subprocess.run([sys.executable, "-c", CRF_PROBE, "0.01", "1000", str(MAX_SIDE)], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "finite True" in result.stdout


# --------------------------------------------------------------------------------------------------------
# Case 14: a seed NumPy refuses, a max_tokens that allocates 40 GB
# --------------------------------------------------------------------------------------------------------


def test_case_14_seed_outside_numpys_range_is_refused(tmp_path):
    """``base.seed: 2**70`` was a raw ValueError at every stage start; now the key is named."""
    from pipeline.stage import start_stage

    for bad in (2**70, 2**32, -1):
        refused(with_value(RAW, "base.seed", bad), "base.seed")
    assert parse_params(with_value(RAW, "base.seed", 2**32 - 1)).base.seed == 2**32 - 1
    (tmp_path / "params.yaml").write_text(PARAMS_TEXT.replace("  seed: 0\n", f"  seed: {2**70}\n"))
    with pytest.raises(SystemExit, match=r"^train_step1: .*base\.seed: Input should be less than or equal "
                       r"to 4294967295"):
        start_stage("train_step1", tmp_path / "params.yaml")


def test_case_14_seed_everything_names_base_seed():
    """Direct callers of seed_everything get the same one-line reason instead of torch's overflow."""
    from pipeline.runtime import seed_everything

    for bad in (2**70, -1):
        with pytest.raises(ValueError, match=r"base\.seed: .* 0 \.\. 4294967295"):
            seed_everything(bad)


def test_case_14_max_tokens_is_bounded_by_clip_context():
    """``model.max_tokens: 100000`` built a 40 GB text tower; CLIP's text context is 77 positions."""
    from pipeline.models.clip_backbone import CLIP_CONTEXT_LENGTH
    from pipeline.params import CLIP_CONTEXT_LENGTH as SCHEMA_CONTEXT

    assert SCHEMA_CONTEXT == CLIP_CONTEXT_LENGTH == 77
    for bad in (100_000, 78):
        refused(with_value(RAW, "model.max_tokens", bad), "model.max_tokens")
    assert parse_params(with_value(RAW, "model.max_tokens", 77)).model.max_tokens == 77


@pytest.mark.parametrize("key", [
    "step1.input_size", "step2.input_size", "pseudo_masks.size", "pseudo_masks.affinity.input_size",
    "step1.calibration_size", "model.clip.tiny.image_size", "pretrain_clip.frozen.image_size",
    "step1.batch_size", "step2.batch_size", "pretrain_clip.batch_size", "dump.batch_size",
    "pseudo_masks.affinity.batch_size", "step1.num_negatives", "pseudo_masks.affinity.radius",
    "model.hidden_dim", "pseudo_masks.random_walk.exp_times",
])
def test_case_14_sizes_that_allocate_have_an_upper_bound(key):
    """Sides, batches and query counts whose memory grows quadratically (or exponentially: the walk's
    2**exp_times steps) stop at a stated bound, named in the error."""
    message = refused(with_value(RAW, key, 100_000), key)
    assert "less than or equal to" in message


def test_case_14_tiny_clip_heads_must_divide_the_width():
    """open_clip asserted ``embed_dim must be divisible by num_heads`` deep in pretrain_clip."""
    refused(with_value(RAW, "model.clip.tiny.text_heads", 3), "model.clip.tiny.text_heads")


def test_case_02_synthetic_split_names_are_the_index_known_ones(default_params):
    """A synthetic split the index would skip (``split_unknown``) is refused when params are loaded."""
    from typing import get_args

    from pipeline.data.index import KNOWN_SPLITS
    from pipeline.params import SplitName

    assert get_args(SplitName) == KNOWN_SPLITS
    raw = default_params.model_dump()
    raw["synthesize"]["split_fractions"] = {"train": 0.5, "Val": 0.5}
    with pytest.raises(ParamsError, match=r"synthesize\.split_fractions"):
        parse_params(raw)
