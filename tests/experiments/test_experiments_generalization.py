"""capsnet.experiments.generalization and its viewpoint / affNIST instances: matched error."""

from __future__ import annotations

import pytest

from capsnet import experiments


def test_matched_checkpoints():
    level, chosen = experiments.matched_checkpoints(
        {"caps": [0.2, 0.08, 0.05, 0.04], "cnn": [0.15, 0.0451, 0.06, 0.03, 0.045]}
    )
    assert level == 0.04  # the best level both reach
    assert chosen == {"caps": 3, "cnn": 4}  # closest to 0.04; cnn: 0.045 beats 0.0451, 0.03
    level, chosen = experiments.matched_checkpoints({"a": [0.3, 0.1], "b": [0.2]}, target=0.15)
    assert chosen == {"a": 1, "b": 0}  # |0.1 - 0.15| < |0.3 - 0.15|
    with pytest.raises(ValueError, match="non-empty"):
        experiments.matched_checkpoints({"a": []})


def test_generalization_protocol_matches_and_resumes(tiny_runs, tmp_path, monkeypatch):
    from training_helpers import TINY_MODEL, tiny_config

    root, _, _ = tiny_runs
    configs = {
        "capsules": tiny_config(root, None, model_kwargs=dict(TINY_MODEL), epochs=2),
        "cnn": tiny_config(root, None, model="hinton_cnn", model_kwargs={}, epochs=2),
    }
    kwargs = dict(
        familiar=("mnist", "test", {"verify": False}),
        novel=("mnist", "test", {"verify": False}),
        experiment="protocol_demo",
        title="Protocol demo",
        device="cpu",
    )
    rec = experiments.generalization_protocol(configs, tmp_path, **kwargs)
    res = rec["results"]
    for label in configs:
        curves = res["models"][label]["curves"]
        assert len(curves["familiar_error"]) == len(curves["novel_error"]) == 2
        # familiar and novel are the same test set here: the errors agree
        assert curves["familiar_error"] == pytest.approx(curves["novel_error"])
        errs = curves["familiar_error"]
        gap = abs(res["models"][label]["familiar_error"] - res["matched_familiar_error"])
        assert gap == min(abs(e - res["matched_familiar_error"]) for e in errs)
    assert rec["figures"] == ["protocol_demo_tradeoff.png", "protocol_demo.png"]
    # a second call with more epochs continues the runs instead of starting again
    calls = []
    import capsnet.train as T

    original = T.train
    monkeypatch.setattr(
        T, "train", lambda cfg, **kw: calls.append(cfg.epochs) or original(cfg, **kw)
    )
    rec = experiments.generalization_protocol(configs, tmp_path, epochs=3, **kwargs)
    assert calls == [3, 3]
    assert len(rec["results"]["models"]["cnn"]["curves"]["novel_error"]) == 3


def test_protocol_cli_builds_configs_from_recipes():
    import argparse

    from capsnet import experiment_cli

    parser = argparse.ArgumentParser(prog="capsnet")
    experiment_cli.register_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["experiment", "viewpoint", "--mode", "elevation", "--epochs", "3", "--set",
         "batch_size=32", "--model-kwarg", "preset=\"small\"", "--device", "cpu"]
    )  # fmt: skip
    configs = experiment_cli._protocol_configs(args, mode=args.mode)
    caps, cnn = configs["capsules"], configs["cnn"]
    assert (caps.model, cnn.model) == ("matrix_capsnet", "hinton_cnn")
    assert caps.data_kwargs["viewpoint"] == cnn.data_kwargs["viewpoint"] == "elevation"
    assert caps.epochs == cnn.epochs == 3 and caps.batch_size == cnn.batch_size == 32
    assert caps.model_kwargs["preset"] == "small" and cnn.device == "cpu"
    args = parser.parse_args(["experiment", "affnist-protocol"])
    configs = experiment_cli._protocol_configs(args)
    assert configs["capsules"].dataset == configs["cnn"].dataset == "mnist_shifted40"
    assert not configs["capsules"].download
    args = parser.parse_args(["experiment", "viewpoint", "--download", "--num-threads", "1"])
    configs = experiment_cli._protocol_configs(args, mode=args.mode)
    assert configs["capsules"].download and configs["cnn"].download


def test_protocol_reads_the_novel_set_with_the_configs_download_flag(monkeypatch, tmp_path):
    """The novel test set is read before any training, so --download must reach it too."""
    from capsnet import data
    from capsnet.config import RunConfig

    seen = {}

    def fake_create(name, split="train", root=None, download=False, **kwargs):
        seen.update(name=name, split=split, download=download)
        raise RuntimeError("stop here")

    monkeypatch.setattr(data, "create", fake_create)
    config = RunConfig(model="hinton_cnn", dataset="mnist", download=True)
    with pytest.raises(RuntimeError, match="stop here"):
        experiments.generalization_protocol(
            {"cnn": config}, tmp_path, familiar=("mnist", "test", {}),
            novel=("mnist", "train", {}), experiment="demo", title="Demo",
        )  # fmt: skip
    assert seen == {"name": "mnist", "split": "train", "download": True}
