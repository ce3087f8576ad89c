"""capsnet.runs: loading a run's model, config, dataset and class names (the one loader of
capsnet evaluate, the experiment commands, the report and capsnet.load)."""

import json
import shutil

import pytest
import torch

import capsnet
from capsnet import runs
from training_helpers import make_mnist, tiny_config


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from capsnet.train import train

    root = make_mnist(tmp_path_factory.mktemp("data"))
    run = tmp_path_factory.mktemp("runs") / "run"
    train(tiny_config(root, run))
    return run


def test_best_and_last(run_dir):
    best = runs.load_run(run_dir, device="cpu")
    last = runs.load_run(run_dir, which="last", device="cpu")
    assert best.weights == run_dir / "best.safetensors" and best.which == "best"
    assert last.weights == run_dir / "last.safetensors" and last.path == str(last.weights)
    assert last.epoch == 2 and last.step == json.loads((run_dir / "last.json").read_text())["step"]
    assert best.epoch == json.loads((run_dir / "best.json").read_text())["epoch"]
    assert best.name == best.label == "capsnet" and best.run_dir == run_dir
    assert best.config == json.loads((run_dir / "config.json").read_text())
    assert best.model_kwargs["num_classes"] == 10
    assert not best.model.training
    assert next(best.model.parameters()).device == torch.device("cpu")
    # capsnet.load is the same loader (default device: the CPU).
    model = capsnet.load(run_dir, which="last")
    for a, b in zip(model.state_dict().values(), last.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_a_lone_checkpoint_file(run_dir):
    run = runs.load_run(run_dir / "last.safetensors", device="cpu")
    assert run.run_dir == run_dir and run.weights == run_dir / "last.safetensors"
    assert run.config["dataset"] == "mnist"


def test_dataset_and_class_names(run_dir):
    run = runs.load_run(run_dir, device="cpu")
    test = run.dataset()  # the run's eval_split, data_root and data_kwargs
    assert test.split == "test" and len(test) == 40
    assert len(run.dataset("train")) == 64
    assert run.class_names == [str(c) for c in test.classes] == [str(i) for i in range(10)]
    with pytest.raises(ValueError, match="names no dataset"):
        runs.run_dataset(runs.Run(run.model, "capsnet", {}, run_dir, run.weights))


def test_missing_and_bad_runs(run_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        runs.load_run(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        runs.load_run(empty)
    with pytest.raises(ValueError, match="which must be one of 'best', 'last', got 'first'"):
        runs.load_run(run_dir, which="first")
    with pytest.raises(ValueError, match="device must be one of"):
        runs.load_run(run_dir, device="gpu")
    (tmp_path / "w.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="not a readable .safetensors file"):
        runs.load_run(tmp_path / "w.safetensors")


def test_which_falls_back_to_the_other_checkpoint(run_dir, tmp_path):
    only_last = tmp_path / "only_last"
    shutil.copytree(run_dir, only_last)
    for name in ("best.safetensors", "best.json"):
        (only_last / name).unlink()
    run = runs.load_run(only_last, which="best", device="cpu")
    assert run.weights == only_last / "last.safetensors"
    (only_last / "evaluation.json").unlink()
    assert run.class_names is None  # a run that has not finished


def test_read_run_json(tmp_path):
    (tmp_path / "config.json").write_text('{"model": "capsnet"}')
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "torn.json").write_text('{"model": ')
    assert runs.read_run_json(tmp_path, "config.json") == {"model": "capsnet"}
    for name in ("list.json", "torn.json", "missing.json"):
        assert runs.read_run_json(tmp_path, name) == {}


def test_old_names_still_import():
    from capsnet.experiment_cli import LoadedRun, load_run, run_dataset

    assert LoadedRun is runs.Run and load_run is runs.load_run and run_dataset is runs.run_dataset
