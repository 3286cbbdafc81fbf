"""Issue 13, item 5: a damaged or hand-edited adapter folder is an AdapterLoadError naming file and field."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_ADAPTER, save_tiny_adapter
from safetensors.torch import load_file, save_file

from kblam import AdapterLoadError
from kblam.adapter import CONFIG_NAME, WEIGHTS_NAME, KBAdapter, KBLaMConfig, load_calibration, load_weights


@pytest.fixture
def adapter(tmp_path):
    return save_tiny_adapter(tmp_path / "adapter")


def load(folder):
    config = KBLaMConfig.load(folder)
    return config, load_weights(folder, config)


def edit_config(folder, **changes):
    path = folder / CONFIG_NAME
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is ...:
            del data[key]
        else:
            data[key] = value
    path.write_text(json.dumps(data))


def error_of(folder) -> AdapterLoadError:
    with pytest.raises(AdapterLoadError) as info:
        load(folder)
    return info.value


def test_a_good_folder_and_the_shipped_adapter_load(adapter):
    from kblam.model import SHIPPED_ADAPTER

    config, state = load(adapter)
    assert config == KBLaMConfig(**TINY_ADAPTER) and set(state) == set(KBAdapter(config).state_dict())
    config, state = load(SHIPPED_ADAPTER)
    assert config.trained and config.kb_layers == [15, 18, 21, 24, 27]


def test_optional_fields_may_be_absent_required_ones_may_not(adapter):
    edit_config(adapter, copy_commit_after=..., kblam_version=..., extra=...)
    assert KBLaMConfig.load(adapter).copy_commit_after == 2  # a config written before the field existed
    edit_config(adapter, kb_layers=...)
    error = error_of(adapter)
    assert (error.path, error.field, error.reason) == (str(adapter / CONFIG_NAME), "kb_layers", "is missing (required)")
    assert str(error) == f"{adapter / CONFIG_NAME}, field 'kb_layers': is missing (required)"


@pytest.mark.parametrize("field, value, reason", [
    ("kb_scale_factor", 0, "must be > 0, got 0"),
    ("kb_scale_factor", "100", "must be a finite number or null, got '100'"),
    ("prior_scale", -1.0, "must be > 0"),
    ("trained", "no", "must be true or false, got 'no'"),
    ("trained", 1, "must be true or false, got 1"),
    ("encoder_dim", 8.0, "must be an integer, got 8.0"),
    ("encoder_dim", True, "must be an integer, got true"),
    ("encoder_dim", 0, "must be >= 1, got 0"),
    ("kb_layers", [0, 3], "must be layers of the base model, 0..2"),
    ("kb_layers", [2, 0], "ascending order"),
    ("kb_layers", [], "at least one layer"),
    ("kb_layers", [0, "2"], "must be a list of integers"),
    ("num_key_value_heads", 3, "must divide num_attention_heads (4), got 3"),
    ("query_rank", 0, "must be >= 1, got 0"),
    ("refusal", " ", "must not be empty"),
    ("base_model", None, "must be a string, got null"),
    ("extra", [], "must be a JSON object"),
    ("key_template", "The {property} of {entity}", "may contain only {name}, {property} and {value}, found {entity}"),
    ("key_template", "{name.__class__}", "found {name.__class__}"),
    ("key_template", "{name[0]}", "found {name[0]}"),
    ("value_template", "{value:>999999999}", "found {value:>999999999}"),
    ("value_template", "{value!r}", "found {value!r}"),
    ("value_template", "{}", "found {}"),
    ("value_template", "{value", "is not a valid template"),
    ("value_template", "no fields", "must contain at least one of"),
])
def test_bad_field_values_name_the_field(adapter, field, value, reason):
    edit_config(adapter, **{field: value})
    error = error_of(adapter)
    assert error.field == field and reason in error.reason, str(error)


def test_nan_in_config_is_refused(adapter):
    text = (adapter / CONFIG_NAME).read_text().replace('"kb_scale_factor": 100.0', '"kb_scale_factor": NaN')
    (adapter / CONFIG_NAME).write_text(text)
    assert error_of(adapter).field == "kb_scale_factor"


@pytest.mark.parametrize("text, reason", [
    ("{not json", "is not valid JSON: Expecting property name enclosed in double quotes (line 1, column 2)"),
    ("[1, 2]", "must be a JSON object of config fields, got list"),
    ("[" * 50_000, "nested too deeply"),
    ('{"trained": true, "trained": false}', "key 'trained' appears twice"),
    ('{"encoder_dim": ' + "9" * 5000 + "}", "is not a config"),
    ('{"base_model": "a", "colour": "blue"}', "unknown field(s) 'colour'"),
])
def test_unreadable_configs_name_the_file(adapter, text, reason):
    (adapter / CONFIG_NAME).write_text(text)
    error = error_of(adapter)
    assert error.path == str(adapter / CONFIG_NAME) and reason in error.reason, str(error)


def test_missing_files_and_folders(adapter, tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter folder not found"):
        load(tmp_path / "nowhere")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(OSError, match="Too many levels of symbolic links"):
        load(tmp_path / "loop")
    assert "is a file" in error_of(adapter / WEIGHTS_NAME).reason
    (adapter / WEIGHTS_NAME).unlink()
    assert error_of(adapter).path == str(adapter / WEIGHTS_NAME)
    (adapter / CONFIG_NAME).unlink()
    assert "not a kblam adapter folder" in str(error_of(adapter))


@pytest.mark.parametrize("damage", ["empty", "garbage", "truncated"])
def test_damaged_weights_name_the_file(adapter, damage):
    path = adapter / WEIGHTS_NAME
    data = path.read_bytes()
    path.write_bytes({"empty": b"", "garbage": b"\x00garbage" * 100, "truncated": data[: len(data) // 2]}[damage])
    error = error_of(adapter)
    assert error.path == str(path) and "not a readable safetensors file" in error.reason


def _rewrite_weights(adapter, change):
    path = adapter / WEIGHTS_NAME
    state = load_file(str(path))
    change(state)
    save_file(state, str(path))


def test_wrong_shape_missing_and_extra_tensors(adapter):
    _rewrite_weights(adapter, lambda s: s.update({"key_proj.0.weight": torch.zeros(8, 9)}))
    error = error_of(adapter)
    assert error.tensor == "key_proj.0.weight" and error.reason == "has shape (8, 9), the config needs (8, 8)"
    _rewrite_weights(adapter, lambda s: s.pop("key_proj.0.weight"))
    assert error_of(adapter).tensor == "key_proj.0.weight"
    _rewrite_weights(adapter, lambda s: s.update({"key_proj.0.weight": torch.zeros(8, 8), "surplus": torch.zeros(1)}))
    assert error_of(adapter).tensor == "surplus"


def test_weights_for_another_config_are_refused(adapter):
    edit_config(adapter, null_slot=False)  # the file still holds null_key/null_value/null_bias
    assert "the config does not use" in error_of(adapter).reason


def test_non_finite_and_integer_weights_are_refused(adapter):
    _rewrite_weights(adapter, lambda s: s["value_proj.2.weight"].fill_(float("nan")))
    error = error_of(adapter)
    assert error.tensor == "value_proj.2.weight" and error.reason == "64 of 64 values are NaN or infinite"
    _rewrite_weights(adapter, lambda s: s.update({"value_proj.2.weight": torch.zeros(8, 8, dtype=torch.int32)}))
    assert "floating point" in error_of(adapter).reason


def test_from_pretrained_checks_the_folder_before_loading_a_base_model(adapter):
    from kblam import KBLaM

    edit_config(adapter, kb_scale_factor=0)
    # base_model "test/tiny" does not exist: reaching the base-model load would raise something else.
    with pytest.raises(AdapterLoadError, match="kb_scale_factor"):
        KBLaM.from_pretrained(adapter)


def test_every_config_field_has_a_type_the_checker_knows():
    """A new KBLaMConfig field with a new kind of annotation must teach kblam.adapter_check about it."""
    import dataclasses
    import typing

    from kblam.adapter_check import _type_problem

    hints = typing.get_type_hints(KBLaMConfig)
    defaults = KBLaMConfig(**TINY_ADAPTER)
    for f in dataclasses.fields(KBLaMConfig):
        assert _type_problem(getattr(defaults, f.name), hints[f.name]) is None, f.name



def _calibration(**changes) -> dict:
    from kblam.confidence import SIGNALS

    n = len(SIGNALS)
    return {"features": list(SIGNALS), "mean": [0.0] * n, "scale": [1.0] * n, "weights": [0.5] * n, "bias": 0.1,
            "threshold": 0.5, **changes}


@pytest.mark.parametrize("changes, field, reason", [
    ({"mean": ["0"] * 9}, "mean", "must be a list of finite numbers"),
    ({"bias": float("inf")}, "bias", "must be a finite number"),
    ({"features": [["top_share"]]}, "features", "must be a list of strings"),
    ({"threshold": 1.5}, None, "threshold in [0, 1]"),
    ({"features": ["top_share", "luck"], "mean": [0, 0], "scale": [1, 1], "weights": [1, 1]}, None, "'luck'"),
    ({"weights": [1.0]}, None, "do not match their weights"),
])
def test_a_bad_calibration_is_named_before_the_base_loads(adapter, changes, field, reason):
    from kblam.confidence import CALIBRATION_NAME

    (adapter / CALIBRATION_NAME).write_text(json.dumps(_calibration(**changes)))
    with pytest.raises(AdapterLoadError) as info:
        load_calibration(adapter)
    error = info.value
    assert error.path == str(adapter / CALIBRATION_NAME) and error.field == field and reason in error.reason, str(error)


def test_a_good_calibration_loads(adapter):
    from kblam.confidence import CALIBRATION_NAME

    assert load_calibration(adapter) is None
    (adapter / CALIBRATION_NAME).write_text(json.dumps(_calibration()))
    assert load_calibration(adapter).bias == 0.1
