"""Run directories written by capsnet 0.1.0 (commit 6ab3b5e, before the package refactor)
still load, evaluate and resume with the current code.

The fixtures in ``tests/fixtures/runs_v0_1_0`` were written by the old code with
``tests/fixtures/make_old_runs.py`` (see the README there): a tiny ``capsnet`` and a tiny
``matrix_capsnet`` run, 1 epoch on the 64 images of ``training_helpers.make_mnist``, and
next to each the old code's scores and poses for 4 test images. Their ``config.json``
names the temporary data folder of that session, so the tests make the same data again
and pass it as the data root. Tests that write (evaluate, resume) work on a copy.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import capsnet
from capsnet.cli import main
from capsnet.config import config_from_dict
from capsnet.runs import load_run
from capsnet.train import train
from training_helpers import assert_same_weights, make_mnist, weights

FIXTURES = Path(__file__).parent / "fixtures" / "runs_v0_1_0"
RUNS = ["capsnet_tiny", "matrix_capsnet_tiny"]
MODELS = {"capsnet_tiny": "capsnet", "matrix_capsnet_tiny": "matrix_capsnet"}
# The refactored EM routing sums in another order: float32 rounding, nothing more.
TRAIN_ATOL = {"capsnet_tiny": 0.0, "matrix_capsnet_tiny": 1e-4}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """The tiny MNIST files the fixtures were trained and evaluated on."""
    return make_mnist(tmp_path_factory.mktemp("data"))


def _copy(name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(FIXTURES / name, tmp_path / name))


def _json(path: Path):
    return json.loads(path.read_text())


def _assert_outputs(model, name: str, which: str) -> None:
    ref = load_file(str(FIXTURES / f"{name}.outputs.safetensors"))
    with torch.no_grad():
        out = model(ref["images"])
    torch.testing.assert_close(out.scores, ref[f"{which}.scores"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.poses, ref[f"{which}.poses"], rtol=1e-5, atol=1e-6)


def test_fixtures_are_old_runs():
    """The fixtures are whole run directories of the old trainer, made by
    ``make_old_runs.py`` (its data folder is named in their config)."""
    for name in RUNS:
        run = FIXTURES / name
        names = {p.name for p in run.iterdir()}
        assert {"config.json", "metrics.jsonl", "evaluation.json"} <= names
        assert {"best.safetensors", "best.json", "last.safetensors", "last.json"} <= names
        assert "last.state.safetensors" in names
        assert _json(run / "last.json")["format"] == "capsnet-checkpoint-1"
        config = _json(run / "config.json")
        assert config["model"] == MODELS[name] and config["epochs"] == 1
        assert config["data_root"].startswith("/tmp/capsnet-old-runs-")


@pytest.mark.parametrize("which", ["best", "last"])
@pytest.mark.parametrize("name", RUNS)
def test_load_gives_saved_weights_and_old_outputs(name, which):
    run_dir = FIXTURES / name
    saved = weights(run_dir, which)

    model = capsnet.load(run_dir, which=which)
    assert not model.training
    assert_same_weights(model.state_dict(), saved)
    _assert_outputs(model, name, which)

    run = load_run(run_dir, which=which, device="cpu")
    assert run.weights == run_dir / f"{which}.safetensors" and run.which == which
    assert run.name == MODELS[name] and run.config == _json(run_dir / "config.json")
    config_kwargs = _json(run_dir / "config.json")["model_kwargs"]
    assert config_kwargs.items() <= run.model_kwargs.items()
    record = _json(run_dir / f"{which}.json")
    assert (run.epoch, run.step) == (record["epoch"], record["step"]) == (1, 4)
    assert_same_weights(run.model.state_dict(), saved)
    _assert_outputs(run.model, name, which)


@pytest.mark.parametrize("name", RUNS)
def test_evaluate_old_run_reproduces_its_final_evaluation(name, data_root, tmp_path, capsys):
    run = _copy(name, tmp_path)
    argv = ["evaluate", str(run), "--which", "last", "--data-root", str(data_root)]
    assert main([*argv, "--device", "cpu", "--no-progress"]) == 0
    assert "confusion" in capsys.readouterr().out
    new = _json(run / "evaluation_last_test.json")
    old = _json(run / "evaluation.json")  # the old trainer's evaluation of the last model
    assert new["num_examples"] == old["num_examples"] == 40
    assert new["model"] == MODELS[name] and new["split"] == "test"
    assert new["confusion"] == old["confusion"]
    assert new["accuracy"] == old["accuracy"]
    assert new["loss"] is None  # capsnet evaluate computes no loss (0.1.0 neither)
    assert new["mean_scores"] == pytest.approx(old["mean_scores"], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("name", RUNS)
def test_resume_old_run_for_another_epoch(name, data_root, tmp_path, capsys):
    """``capsnet train --resume`` continues the old run from its saved step (epoch 1,
    step 4) with its optimiser, schedule and random-number state: the result is the
    uninterrupted 2-epoch run of the current trainer."""
    run = _copy(name, tmp_path)
    old_rows = (run / "metrics.jsonl").read_text().splitlines()
    argv = ["train", "--resume", str(run), "--epochs", "2", "--data-root", str(data_root)]
    assert main([*argv, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "resuming" in out and "step 4" in out and "epoch 2/2" in out

    last = _json(run / "last.json")
    assert (last["epoch"], last["step"], last["batch_in_epoch"]) == (2, 8, 0)
    assert _json(run / "config.json") == _json(FIXTURES / name / "config.json")
    # The old log is kept up to its end row (dropped on resume); the new one is appended.
    rows = (run / "metrics.jsonl").read_text().splitlines()
    assert json.loads(old_rows[-1])["kind"] == "end"
    assert rows[: len(old_rows) - 1] == old_rows[:-1]
    new_rows = [json.loads(r) for r in rows[len(old_rows) - 1 :]]
    assert new_rows[0]["kind"] == "start" and new_rows[0]["step"] == 4
    assert [r["step"] for r in new_rows if r["kind"] == "train"] == [6, 8]
    assert [r["epoch"] for r in new_rows if r["kind"] == "epoch"] == [2]
    assert _json(run / "evaluation.json")["num_examples"] == 40

    # The same run, uninterrupted, with the current trainer (and the values of the
    # defaults that changed since, as a resume restores them).
    from capsnet.models import restore_kwargs

    config = _json(FIXTURES / name / "config.json")
    config.update(epochs=2, data_root=str(data_root), output_dir=str(tmp_path / "fresh"))
    config["model_kwargs"] = restore_kwargs(config["model"], config["model_kwargs"])
    config.setdefault("val_seed", None)
    train(config_from_dict(config))
    capsys.readouterr()
    # Bit-for-bit only where this CPU's kernels reproduce the fixture's first epoch (it was
    # trained on another machine: an AVX-512 AMD EPYC); elsewhere the two runs start from
    # weights that differ by float32 rounding, and are held to the EM runs' rounding bound.
    config.update(epochs=1, output_dir=str(tmp_path / "fresh1"))
    train(config_from_dict(config))
    capsys.readouterr()
    first, fixture = weights(tmp_path / "fresh1"), weights(FIXTURES / name)
    same_start = all(torch.equal(first[k], fixture[k]) for k in fixture)
    atol = TRAIN_ATOL[name] if same_start else max(TRAIN_ATOL.values())
    assert_same_weights(weights(run), weights(tmp_path / "fresh"), atol=atol)
    moved, start = weights(run), weights(FIXTURES / name)  # epoch 2 trained on
    assert max((moved[k] - start[k]).abs().max().item() for k in moved) > 1e-3
