import pytest
import yaml

from pipeline.params import Params, ParamsError, load_params, parse_params


def test_committed_params_file_is_valid(repo_root):
    params = load_params(repo_root / "params.yaml")
    assert params.step1.alpha == pytest.approx(0.1)
    assert params.step1.num_negatives == 47


def test_unknown_key_is_rejected_with_its_dotted_name():
    with pytest.raises(ParamsError) as err:
        parse_params({"step1": {"alpah": 0.2}})
    assert "step1.alpah" in str(err.value)
    assert "unknown key" in str(err.value)


def test_unknown_section_is_rejected():
    with pytest.raises(ParamsError, match="stepone"):
        parse_params({"stepone": {}})


def test_wrong_type_names_the_key():
    with pytest.raises(ParamsError) as err:
        parse_params({"step1": {"num_negatives": "many"}})
    assert "step1.num_negatives" in str(err.value)


def test_nested_key_and_cross_field_checks():
    with pytest.raises(ParamsError, match="pseudo_masks.affinity.radius"):
        parse_params({"pseudo_masks": {"affinity": {"radius": 0}}})
    with pytest.raises(ParamsError, match="conf_bg"):
        parse_params({"pseudo_masks": {"conf_fg": 0.1, "conf_bg": 0.2}})


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(ParamsError, match="nope.yaml"):
        load_params(tmp_path / "nope.yaml")


def test_non_mapping_file_is_rejected(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(ParamsError, match="mapping"):
        load_params(path)


def test_defaults_round_trip():
    assert parse_params(Params().model_dump(mode="json")) == Params()
