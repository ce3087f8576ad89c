"""RunConfig refuses what would misbehave later: loose booleans, non-finite or
out-of-range numbers, and model kwargs of the wrong type."""

from __future__ import annotations

import pytest

from capsnet.config import MAX_THREADS, RunConfig, load_recipe, parse_bool


@pytest.mark.parametrize("text", ["no", "false", "0", "No", "FALSE", 0, False])
def test_false_spellings(text):
    assert parse_bool("k", text) is False


@pytest.mark.parametrize("text", ["yes", "true", "1", "True", 1, True])
def test_true_spellings(text):
    assert parse_bool("k", text) is True


@pytest.mark.parametrize("text", ["maybe", "", "2", 2, 0.0, None, "nope"])
def test_other_booleans_are_errors_naming_the_key(text):
    with pytest.raises(ValueError, match="my_key must be a boolean"):
        parse_bool("my_key", text)


def test_recipe_string_no_reads_as_false(tmp_path):
    """The bug: ``reconstruction = "no"`` in a recipe built a model with a decoder."""
    recipe = tmp_path / "r.toml"
    recipe.write_text('model = "capsnet"\ndownload = "no"\n[model_kwargs]\nreconstruction = "no"\n')
    cfg = load_recipe(str(recipe))
    assert cfg.model_kwargs["reconstruction"] is False and cfg.download is False
    recipe.write_text('model = "capsnet"\n[model_kwargs]\nreconstruction = "off-ish"\n')
    with pytest.raises(ValueError, match="model_kwargs.reconstruction must be a boolean"):
        load_recipe(str(recipe))


@pytest.mark.parametrize(
    "values, message",
    [
        ({"lr": float("inf")}, "lr must be a finite number"),
        ({"lr": float("nan")}, "lr must be"),
        ({"weight_decay": float("nan")}, "weight_decay must be a finite number"),
        ({"grad_clip": float("inf")}, "grad_clip must be a finite number"),
        ({"reconstruction_weight": float("inf")}, "finite"),
        ({"num_threads": 100000}, f"num_threads must be in 1..{MAX_THREADS}"),
        ({"num_threads": 0}, "num_threads must be >= 1"),
        ({"epochs": 0}, "epochs must be >= 1"),
        ({"batch_size": -1}, "batch_size must be >= 1"),
        ({"margin_stop": 1.5}, "margin_stop <= 1"),
        ({"margin_start": -0.1}, "0 <= margin_start"),
        ({"margin_per_epoch": -0.1}, "margin_per_epoch must be >= 0"),
        ({"margin_updates_per_epoch": 0}, "margin_updates_per_epoch must be >= 1"),
        ({"momentum": 1.0}, r"momentum must be in \[0, 1\)"),
    ],
)
def test_out_of_range_numbers(values, message):
    with pytest.raises(ValueError, match=message):
        RunConfig(**values)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"conv_channels": "64"}, "model_kwargs.conv_channels: 'capsnet' expects int, got '64'"),
        ({"conv_channels": 6.5}, "expects int, got 6.5 (float)"),
        ({"primary_dim": True}, "expects int, got True (bool)"),
    ],
)
def test_model_kwargs_are_type_checked(kwargs, message):
    with pytest.raises(TypeError) as err:
        RunConfig(model_kwargs=kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_model_kwargs_of_the_right_type_pass():
    cfg = RunConfig(model_kwargs={"conv_channels": 64, "reconstruction": "yes"})
    assert cfg.model_kwargs == {"conv_channels": 64, "reconstruction": True}
    cnn = RunConfig(model="sabour_cnn", model_kwargs={"dropout": 0})  # int for a float: fine
    assert cnn.model_kwargs == {"dropout": 0}
    em = RunConfig(model="matrix_capsnet", model_kwargs={"inverse_temperatures": [1, 2.5]})
    assert em.model_kwargs["inverse_temperatures"] == [1, 2.5]
    with pytest.raises(TypeError, match="inverse_temperatures"):
        RunConfig(model="matrix_capsnet", model_kwargs={"inverse_temperatures": ["a"]})
