"""serving.properties keys of the custom-handler and text-embedding modes."""

from __future__ import annotations

import pytest

from djl_like.config import ServingConfig, load_config
from djl_like.errors import ConfigError


@pytest.mark.parametrize("key, raw, field, expected", [
    ("option.handler", "predict", "handler", "predict"),
    ("option.install_requirements", "true", "install_requirements", True),
    ("option.install_requirements", "FALSE", "install_requirements", False),
    ("option.pooling", "cls", "pooling", "cls"),
    ("pooling", "mean", "pooling", "mean"),
    ("pooling", "lasttoken", "pooling", "last"),
    ("option.pooling", "last", "pooling", "last"),
    ("normalize", "false", "normalize", False),
    ("option.normalize", "true", "normalize", True),
    ("option.truncate", "true", "truncate", True),
])
def test_mode_keys_are_typed(key, raw, field, expected):
    config = ServingConfig.from_properties({key: raw})
    assert getattr(config, field) == expected
    assert not config.unknown


def test_mode_defaults_are_safe():
    config = ServingConfig.from_properties({})
    assert config.handler == "handle"
    assert config.install_requirements is False  # installing code at start is opt-in
    assert config.pooling is None  # from the model folder or the architecture
    assert config.normalize is True
    assert config.truncate is False


def test_option_spelling_wins_over_lmi_bare_key():
    config = ServingConfig.from_properties({"pooling": "cls", "option.pooling": "mean",
                                            "normalize": "true", "option.normalize": "false"})
    assert (config.pooling, config.normalize) == ("mean", False)


@pytest.mark.parametrize("key, raw, allowed", [
    ("option.pooling", "weightedmean", "choose one of: mean, cls, last"),
    ("normalize", "yes", "expected true or false"),
    ("option.install_requirements", "1", "expected true or false"),
    ("option.handler", "", "expected a non-empty value"),
])
def test_invalid_mode_values_name_the_key(key, raw, allowed):
    with pytest.raises(ConfigError) as error:
        ServingConfig.from_properties({key: raw})
    assert f"{key}={raw!r}" in str(error.value)
    assert allowed in str(error.value)


@pytest.mark.parametrize("env, expected", [
    ({"DJL_ENTRY_POINT": "handler.py"}, "handler.py"),
    ({"OPTION_ENTRYPOINT": "model.py"}, "model.py"),
    ({"DJL_ENTRY_POINT": "handler.py", "OPTION_ENTRYPOINT": "model.py"}, "model.py"),
])
def test_entry_point_from_the_environment(tmp_path, env, expected):
    assert load_config(tmp_path, env).entry_point == expected


def test_serving_properties_entry_point_wins_over_djl_variable(tmp_path):
    (tmp_path / "serving.properties").write_text("option.entryPoint=mine.py\n")
    assert load_config(tmp_path, {"DJL_ENTRY_POINT": "other.py"}).entry_point == "mine.py"
