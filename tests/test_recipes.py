"""Every shipped recipe parses into a valid RunConfig; recipe keys are exactly RunConfig
fields; model arguments are checked against the registry."""

import sys

import pytest

from capsnet.config import (
    RunConfig,
    config_from_dict,
    field_names,
    list_recipes,
    load_recipe,
    recipe_path,
)
from capsnet.data import dataset_info
from capsnet.models import create, list_models, model_info

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

RECIPES = [r.name for r in list_recipes()]


def test_the_papers_are_covered():
    expected = {
        "quickstart",
        "capsnet_mnist", "capsnet_mnist_1iter", "capsnet_mnist_norecon",
        "capsnet_mnist_1iter_norecon", "capsnet_multimnist", "capsnet_affnist",
        "capsnet_cifar10", "sabour_cnn_mnist", "sabour_cnn_affnist",
        "matrix_capsnet_smallnorb", "matrix_capsnet_smallnorb_iter1",
        "matrix_capsnet_smallnorb_iter2", "matrix_capsnet_smallnorb_small",
        "matrix_capsnet_smallnorb_azimuth", "matrix_capsnet_smallnorb_elevation",
        "hinton_cnn_smallnorb", "hinton_cnn_smallnorb_azimuth",
        "hinton_cnn_smallnorb_elevation", "matrix_capsnet_mnist",
    }  # fmt: skip
    assert expected <= set(RECIPES)
    for name in list_models():  # the registry's recipe for each model ships
        assert model_info(name).recipe in RECIPES, name


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_parses_and_builds(name):
    path = recipe_path(name)
    text = path.read_text()
    with path.open("rb") as fh:
        raw = tomllib.load(fh)
    assert set(raw) <= set(field_names())  # keys are exactly RunConfig fields
    assert text.startswith("#"), "a recipe starts with a comment citing its source"
    assert "Departures" in text, "a recipe states where it departs from the paper"
    cfg = load_recipe(name)
    assert isinstance(cfg, RunConfig) and cfg.recipe == name and cfg.description
    assert "output_dir" not in raw  # runs of a recipe must not collide
    # The model builds with the recipe's arguments at the dataset's default size
    # (on the meta device: no memory, no time).
    info = dataset_info(cfg.dataset)
    kwargs = {
        "num_classes": info.num_classes,
        "in_channels": info.in_channels,
        "input_size": info.input_size,
        **cfg.model_arguments(),
    }
    model = create(cfg.model, device="meta", **kwargs)
    assert sum(p.numel() for p in model.parameters()) > 0
    if model_info(cfg.model).loss == "cross_entropy":
        assert cfg.iterations is None and cfg.loss in ("auto", "cross_entropy")


def test_paper_hyper_parameters():
    sabour = load_recipe("capsnet_mnist")
    assert (sabour.lr, sabour.lr_decay_rate, sabour.lr_decay_steps) == (1e-3, 0.96, 2000)
    assert (sabour.batch_size, sabour.iterations, sabour.reconstruction_weight) == (128, 3, 5e-4)
    hinton = load_recipe("matrix_capsnet_smallnorb")
    assert (hinton.lr, hinton.lr_decay_steps, hinton.weight_decay) == (3e-3, 20_000, 2e-7)
    assert (hinton.loss, hinton.margin_start, hinton.margin_stop) == ("spread", 0.2, 0.9)
    assert hinton.model_kwargs["preset"] == "paper"
    assert load_recipe("capsnet_mnist_norecon").model_kwargs["reconstruction"] is False
    assert load_recipe("capsnet_mnist_1iter").iterations == 1


def test_user_recipe_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('model = "capsnet"\nepoch = 3\n')
    with pytest.raises(ValueError, match=r"unknown key\(s\) 'epoch' \(did you mean 'epochs'\?\)"):
        load_recipe(str(bad))
    bad.write_text('model = "capsnet"\n[model_kwargs]\nrouting_iterations = 3\n')
    with pytest.raises(ValueError, match="Valid arguments: iterations"):
        load_recipe(str(bad))
    bad.write_text('model = "capsnet"\nlr = "fast"\n')
    with pytest.raises(TypeError, match="lr must be float"):
        load_recipe(str(bad))
    bad.write_text('dataset = "smallnorb"\n[data_kwargs]\nview = "azimuth"\n')
    with pytest.raises(ValueError, match="Valid options: .*viewpoint"):
        load_recipe(str(bad))
    bad.write_text('dataset = "mnist"\neval_split = "test_novel"\n')
    with pytest.raises(ValueError, match="valid: train, test"):
        load_recipe(str(bad))
    bad.write_text("model = [")
    with pytest.raises(ValueError, match="invalid TOML"):
        load_recipe(str(bad))
    with pytest.raises(ValueError, match="Available recipes"):
        load_recipe("capsnet_mnits")
    good = tmp_path / "mine.toml"
    good.write_text('model = "capsnet"\nepochs = 3\n[model_kwargs]\nreconstruction = false\n')
    cfg = load_recipe(str(good), epochs=1, model_kwargs={"primary_types": 4})
    assert cfg.epochs == 1 and cfg.recipe == "mine"
    assert cfg.model_kwargs == {"reconstruction": False, "primary_types": 4}


def test_run_config_round_trip_and_validation():
    cfg = load_recipe("quickstart")
    assert config_from_dict(cfg.to_dict()) == cfg
    assert RunConfig(lr=1).lr == 1.0 and isinstance(RunConfig(lr=1).lr, float)
    with pytest.raises(ValueError, match="precision must be one of"):
        RunConfig(precision="fp16")
    with pytest.raises(ValueError, match="device"):
        RunConfig(device="tpu")
    with pytest.raises(TypeError, match="epochs must be int"):
        RunConfig(epochs=2.5)
    with pytest.raises(ValueError, match="give routing iterations once"):
        RunConfig(iterations=2, model_kwargs={"iterations": 3})
    with pytest.raises(ValueError, match="val_samples"):
        RunConfig(train_samples=100, val_samples=100)
    with pytest.raises(ValueError, match="margin"):
        RunConfig(margin_start=0.9, margin_stop=0.2)
