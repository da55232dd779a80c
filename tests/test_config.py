"""Config validation: every bad input names its field, its value and the choices."""

from __future__ import annotations

import pytest

from cvad.cli import expand_set_values
from cvad.config import ConfigError, apply_overrides, load_config, validate_config


def errors_of(raw: dict) -> str:
    with pytest.raises(ConfigError) as info:
        validate_config(raw)
    return str(info.value)


def test_defaults_fill_method_params():
    config = validate_config({})
    assert config.model.name == "padim"
    assert config.model.params["epsilon"] == 0.01
    assert config.dataset.name == "builtin"


def test_unknown_key_lists_allowed_keys():
    message = errors_of({"dataset": {"imagesize": 128}})
    assert "dataset.imagesize: unknown key" in message
    assert "image_size" in message


def test_unknown_model_and_backbone_list_choices():
    message = errors_of({"model": {"name": "padin"}, "backbone": {"name": "mobilenet"}})
    assert "model.name: unknown model 'padin'" in message and "padim" in message
    assert "backbone.name: unknown backbone 'mobilenet'" in message and "mobilenetv2_100" in message


def test_bad_value_names_field_and_value():
    message = errors_of({"dataset": {"image_size": 8}})
    assert "dataset.image_size" in message and "8" in message


def test_literal_choice_lists_allowed_values():
    message = errors_of({"strategy": {"name": "rehearsal"}})
    assert "strategy.name" in message and "'replay'" in message and "rehearsal" in message


def test_replay_size_rules():
    assert "needs strategy.replay_size" in errors_of({"strategy": {"name": "replay"}})
    assert "applies only to strategy 'replay'" in errors_of({"strategy": {"name": "joint", "replay_size": 40}})
    assert validate_config({"strategy": {"name": "replay", "replay_size": 40}}).strategy.replay_size == 40


def test_method_params_are_validated_against_the_method():
    message = errors_of({"model": {"name": "padim", "params": {"covariance": "diag", "bogus": 1}}})
    assert "model.params.covariance" in message and "'full'" in message
    assert "model.params.bogus: unknown key" in message and "n_features" in message


def test_dataset_root_rules():
    assert "dataset.root is required" in errors_of({"dataset": {"name": "mvtec"}})
    assert "not used by the built-in dataset" in errors_of({"dataset": {"root": "/data"}})


def test_overrides_parse_yaml_values_and_nest():
    raw = apply_overrides(
        {"dataset": {"name": "builtin"}}, ["dataset.image_size=96", "dataset.tasks=[brick, grass]", "seed=3"]
    )
    assert raw == {"dataset": {"name": "builtin", "image_size": 96, "tasks": ["brick", "grass"]}, "seed": 3}
    with pytest.raises(ConfigError, match="expected key=value"):
        apply_overrides({}, ["dataset.image_size"])


def test_load_config_reports_file_problems(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    good = tmp_path / "good.yaml"
    good.write_text("model:\n  name: padim\n")
    assert load_config(good, ["model.params.n_features=20"]).model.params["n_features"] == 20


def test_set_accepts_several_values_after_one_flag():
    argv = ["run", "c.yaml", "--set", "a=1", "b=2", "--out", "x"]
    assert expand_set_values(argv) == ["run", "c.yaml", "--set", "a=1", "--set", "b=2", "--out", "x"]
