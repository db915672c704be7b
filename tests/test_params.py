import copy
from pathlib import Path

import pytest
import torch
import yaml
from pydantic import BaseModel

from pipeline.params import Params, ParamsError, load_params, parse_params
from pipeline.params_trace import record_reads

RAW = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())


def schema_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Dotted key of every section and leaf of the schema (a mapping-valued field is one leaf)."""
    keys = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        keys.append(key)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += schema_keys(ann, key + ".")
    return keys


def without(raw: dict, dotted: str) -> dict:
    out = copy.deepcopy(raw)
    *parents, leaf = dotted.split(".")
    node = out
    for part in parents:
        node = node[part]
    del node[leaf]
    return out


def with_value(raw: dict, dotted: str, value: object) -> dict:
    out = copy.deepcopy(raw)
    *parents, leaf = dotted.split(".")
    node = out
    for part in parents:
        node = node[part]
    node[leaf] = value
    return out


def test_committed_params_file_is_valid(repo_root):
    params = load_params(repo_root / "params.yaml")
    assert params.step1.alpha == pytest.approx(0.1)
    assert params.step1.num_negatives == 47


def test_unknown_key_is_rejected_with_its_dotted_name():
    with pytest.raises(ParamsError) as err:
        parse_params(with_value(RAW, "step1.alpah", 0.2))
    assert "step1.alpah" in str(err.value)
    assert "unknown key" in str(err.value)


def test_unknown_section_is_rejected():
    with pytest.raises(ParamsError, match="stepone"):
        parse_params({**RAW, "stepone": {}})


def test_wrong_type_names_the_key():
    with pytest.raises(ParamsError) as err:
        parse_params(with_value(RAW, "step1.num_negatives", "many"))
    assert "step1.num_negatives" in str(err.value)


def test_nested_key_and_cross_field_checks():
    with pytest.raises(ParamsError, match="pseudo_masks.affinity.radius"):
        parse_params(with_value(RAW, "pseudo_masks.affinity.radius", 0))
    with pytest.raises(ParamsError, match="conf_bg"):
        parse_params(with_value(with_value(RAW, "pseudo_masks.conf_fg", 0.1), "pseudo_masks.conf_bg", 0.2))


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(ParamsError, match="nope.yaml"):
        load_params(tmp_path / "nope.yaml")


def test_non_mapping_file_is_rejected(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(ParamsError, match="mapping"):
        load_params(path)


def test_round_trip(default_params):
    assert parse_params(default_params.model_dump(mode="json")) == default_params


def test_params_yaml_sets_every_key_of_the_schema():
    """Nothing is left to a default: the file names every key the schema has (and no other)."""
    for key in schema_keys(Params):
        node = RAW
        for part in key.split("."):
            assert isinstance(node, dict) and part in node, f"params.yaml lacks {key}"
            node = node[part]


@pytest.mark.parametrize("key", schema_keys(Params))
def test_a_missing_key_fails_by_its_dotted_name(key):
    """Delete any key or section of params.yaml and validation, hence every stage (start_stage loads the
    whole file), fails naming it: there is no second value to fall back on."""
    with pytest.raises(ParamsError) as err:
        parse_params(without(RAW, key))
    assert f"  {key}: Field required" in str(err.value)


def test_a_missing_key_stops_a_stage(tmp_path, monkeypatch):
    from pipeline.stage import start_stage

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(without(RAW, "step1.cls_weight")))
    with pytest.raises(SystemExit, match=r"step1\.cls_weight: Field required"):
        start_stage("train_step1", tmp_path / "params.yaml")


@pytest.mark.parametrize(("key", "value"), [
    ("base.seed", True),             # YAML `seed: true` is not the integer 1
    ("step1.amp", "no"),             # YAML `amp: 'no'` (a string) is not False
    ("step2.resume", 1),
    ("step1.epochs", 2.0),
    ("step1.lr", True),
    ("synthesize.objects_per_image", [3, True]),
])
def test_values_are_not_coerced(key, value):
    with pytest.raises(ParamsError, match=key.replace(".", r"\.")):
        parse_params(with_value(RAW, key, value))


def test_floats_accept_yaml_exponents_and_integers():
    """``1.0e-03`` is a YAML float; ``1e-3`` is a string to PyYAML (YAML 1.1) but a float to YAML 1.2 and
    to ``dvc exp run -S``, so both are the float 0.001; an integer for a float field is that float."""
    for text in ("1.0e-03", "1e-3"):
        lr = yaml.safe_load(f"lr: {text}")["lr"]
        assert parse_params(with_value(RAW, "step1.lr", lr)).step1.lr == 1e-3
    beta = parse_params(with_value(RAW, "pseudo_masks.random_walk.beta", 10)).pseudo_masks.random_walk.beta
    assert isinstance(beta, float) and beta == 10.0
    with pytest.raises(ParamsError, match=r"step1\.lr"):
        parse_params(with_value(RAW, "step1.lr", "fast"))


def test_recorded_reads_name_leaves_and_whole_sections(default_params):
    view, reads = record_reads(default_params)
    assert view.step1.lr == default_params.step1.lr
    crf = view.pseudo_masks.crf
    assert crf.iterations == default_params.pseudo_masks.crf.iterations
    assert view.model.clip.tiny.model_dump() == default_params.model.clip.tiny.model_dump()
    assert reads == {"step1.lr", "pseudo_masks.crf.iterations", "model.clip.tiny"}
    with pytest.raises(AttributeError):
        view.step1.lr = 1.0


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1", "cdua"])
def test_device_cuda_without_gpu_stops_a_stage_with_one_line(tmp_path, device):
    """`base.device: cuda` on a CPU-only machine: one line naming base.device, not a traceback."""
    from pipeline.stage import start_stage

    raw = copy.deepcopy(RAW)
    raw["base"]["device"] = device
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(SystemExit) as exit_info:
        start_stage("train_step1", tmp_path / "params.yaml")
    message = str(exit_info.value.code)
    assert message.startswith("train_step1: base.device=") and "\n" not in message
