"""capsnet.experiments.generalization and its viewpoint / affNIST instances: matched error."""

from __future__ import annotations

import pytest
import torch

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


def test_smoothed_is_a_centred_running_mean_that_shrinks_at_the_ends():
    from capsnet.experiments.generalization import smoothed

    assert smoothed([0.4, 0.1, 0.4, 0.25], 1) == [0.4, 0.1, 0.4, 0.25]
    # (0.4 + 0.1) / 2, (0.4 + 0.1 + 0.4) / 3, (0.1 + 0.4 + 0.25) / 3, (0.4 + 0.25) / 2
    assert smoothed([0.4, 0.1, 0.4, 0.25], 3) == pytest.approx([0.25, 0.3, 0.25, 0.325])
    assert smoothed([0.2, 0.6], 5) == pytest.approx([0.4, 0.4])
    for bad in (0, 2, -1):
        with pytest.raises(ValueError, match="odd number"):
            smoothed([0.1], bad)


def test_matched_checkpoints_on_running_means_ignores_a_lucky_snapshot():
    curves = {"caps": [0.5, 0.4, 0.1, 0.4, 0.25, 0.25, 0.25], "cnn": [0.5, 0.35, 0.2, 0.05]}
    # raw: the level is caps' lucky 0.1 (snapshot 2); the cnn's closest is 0.05 (snapshot 3)
    level, chosen = experiments.matched_checkpoints(curves)
    assert level == 0.1 and chosen == {"caps": 2, "cnn": 3}
    # running means over 3: caps 0.45, 0.333, 0.3, 0.25, 0.3, 0.25, 0.25 (best 0.25, first
    # at snapshot 3); cnn 0.425, 0.35, 0.2, 0.125 (best 0.125); level max(0.25, 0.125);
    # the cnn's closest mean to 0.25 is 0.2 (snapshot 2)
    level, chosen = experiments.matched_checkpoints(curves, smooth=3)
    assert level == pytest.approx(0.25) and chosen == {"caps": 3, "cnn": 2}


def test_generalization_protocol_matches_on_validation_and_resumes(
    tiny_runs, tmp_path, monkeypatch
):
    import numpy as np

    from training_helpers import TINY_MODEL, tiny_config

    root, _, _ = tiny_runs
    # 3 of the 32 training images held out; 29 // 8 = 3 steps per epoch
    common = {"epochs": 2, "val_samples": None, "batch_size": 8}
    configs = {
        "capsules": tiny_config(root, None, model_kwargs=dict(TINY_MODEL), **common),
        "cnn": tiny_config(root, None, model="hinton_cnn", model_kwargs={}, **common),
    }
    kwargs = dict(
        familiar=("mnist", "test", {"verify": False}),
        novel=("mnist", "test", {"verify": False}),
        experiment="protocol_demo",
        title="Protocol demo",
        device="cpu",
        seeds=(0, 1),
        snapshots_per_epoch=2,
        resamples=50,
    )
    rec = experiments.generalization_protocol(configs, tmp_path, **kwargs)
    res = rec["results"]
    assert res["seeds"] == [0, 1] and res["test_images"] == {"familiar": 24, "novel": 24}
    for label in configs:
        r = res["models"][label]
        assert len(r["per_seed"]) == 2
        for row in r["per_seed"]:
            curve = r["curves"][str(row["seed"])]
            assert curve["step"] == [2, 3, 5, 6]  # 2 snapshots per epoch of 3 steps
            assert curve["epoch"] == [0.6667, 1.0, 1.6667, 2.0]
            # the matched snapshot is the one closest to the seed's level, on validation
            gaps = [abs(e - row["matched_level"]) for e in curve["val_error"]]
            assert abs(row["val_error"] - row["matched_level"]) == min(gaps)
        # familiar and novel are the same test set here: the errors agree
        assert r["familiar_error"]["error"] == pytest.approx(r["novel_error"]["error"])
        est = r["novel_error"]
        assert est["low"] <= est["error"] <= est["high"] and est["seeds"] == 2
    comp = res["comparisons"]["capsules - cnn"]
    assert (
        0.0 <= comp["novel"]["p_value"] <= 1.0 and "reduction" in comp["novel_relative_reduction"]
    )
    per_image = np.load(tmp_path / "per_image.npz")
    assert per_image["capsules__novel"].shape == (2, 24)
    assert rec["figures"] == ["protocol_demo_validation.png", "protocol_demo.png"]
    # a second call with more epochs continues each run instead of starting again
    calls = []
    import capsnet.train as T

    original = T.train
    monkeypatch.setattr(
        T, "train", lambda cfg, **kw: calls.append((cfg.epochs, kw)) or original(cfg, **kw)
    )
    rec = experiments.generalization_protocol(configs, tmp_path, **{**kwargs, "epochs": 3})
    assert calls == [(3, {"resume": True})] * 4  # 2 models x 2 seeds
    curve = rec["results"]["models"]["cnn"]["curves"]["0"]
    assert curve["epoch"][-1] == 3.0 and len(curve["epoch"]) == 6  # 2 more snapshots
    with pytest.raises(ValueError, match="val_samples=0"):
        experiments.generalization_protocol(
            {"cnn": tiny_config(root, None, model="hinton_cnn", model_kwargs={})},
            tmp_path / "x", **kwargs,
        )  # fmt: skip


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
    assert caps.val_split == cnn.val_split == "instances"  # the viewpoint recipes
    args = parser.parse_args(
        ["experiment", "viewpoint", "--epochs", "3", "--set", "lr=1e-3", "--capsule-set",
         "epochs=8", "--baseline-set", "lr=3e-4", "--baseline-set", "batch_size=16"]
    )  # fmt: skip
    configs = experiment_cli._protocol_configs(args, mode=args.mode)
    caps, cnn = configs["capsules"], configs["cnn"]
    assert (caps.epochs, caps.lr, caps.batch_size) == (8, 1e-3, 64)  # per model after --set
    assert (cnn.epochs, cnn.lr, cnn.batch_size) == (3, 3e-4, 16)
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


def test_per_instance_errors_count_each_object_of_the_evaluated_images():
    import numpy as np
    import torch

    from capsnet.experiments.generalization import has_instances, per_instance_errors

    class Norb:
        # 2 classes x 2 instances x 3 views; info[:, 0] is the instance
        labels = torch.tensor([0] * 6 + [1] * 6)
        info = torch.tensor([[i, 0, v, 0] for _ in range(2) for i in (4, 7) for v in range(3)])
        classes = ["car", "truck"]

    indices = np.array([0, 1, 3, 4, 5, 6, 9, 10])  # a subset, as with max_examples
    correct = np.array([True, False, False, False, True, True, True, False])
    errors = per_instance_errors(correct, Norb(), indices)
    # car/4: images 0, 1 -> 1 of 2 wrong; car/7: 3, 4, 5 -> 2 of 3; truck/4: 6 -> 0 of 1;
    # truck/7: 9, 10 -> 1 of 2
    assert errors == pytest.approx(
        {"car/4": 50.0, "car/7": 100 * 2 / 3, "truck/4": 0.0, "truck/7": 50.0}
    )
    assert has_instances(Norb()) and not has_instances(object())


def _fingerprint(ds):
    """The images of a dataset, one number each (which images, in which order)."""
    return ds.images.flatten(1).double().mul(torch.arange(ds.images[0].numel())).sum(1).tolist()


@pytest.mark.parametrize("val_seed, val_per_seed", [(None, False), (0, True)])
def test_each_seed_is_matched_on_its_own_validation_images(
    tiny_runs, tmp_path, monkeypatch, val_seed, val_per_seed
):
    """With val_seed None (or val_per_seed) every training seed holds out other images; the
    protocol must score each run's snapshots on that run's validation split, not seed 0's."""
    import dataclasses

    import capsnet.checkpoint as C
    import capsnet.experiments.generalization as G
    from capsnet import data
    from capsnet.validation import split_validation
    from training_helpers import TINY_MODEL, tiny_config

    root, _, _ = tiny_runs
    cfg = tiny_config(root, None, model_kwargs=dict(TINY_MODEL), val_samples=5, val_seed=val_seed)
    scored = {}

    class Stop(Exception):
        pass

    monkeypatch.setattr(G, "_train_run", lambda config, run_dir, epochs, state: None)
    monkeypatch.setattr(G, "_snapshots", lambda run_dir: [(1, run_dir / "snapshot-1.safetensors")])
    monkeypatch.setattr(G, "_steps_per_epoch", lambda run_dir: 1)
    monkeypatch.setattr(C, "load", lambda path, device=None: str(path))
    monkeypatch.setattr(
        G, "evaluate_accuracy",
        lambda model, ds, **kw: scored.setdefault(model, _fingerprint(ds)) and 0.5,
    )  # fmt: skip

    def stop(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(G, "matched_checkpoints", stop)
    with pytest.raises(Stop):
        G.generalization_protocol(
            {"capsules": cfg}, tmp_path, familiar=("mnist", "test", {"verify": False}),
            novel=("mnist", "test", {"verify": False}), experiment="x", title="x",
            seeds=(0, 1, 2), device="cpu", val_per_seed=val_per_seed,
        )  # fmt: skip
    train_set = data.create("mnist", split="train", root=root, verify=False)
    for seed in (0, 1, 2):
        path = str(tmp_path / "runs" / "capsules" / f"seed-{seed}" / "snapshot-1.safetensors")
        own_cfg = dataclasses.replace(cfg, seed=seed, val_seed=None)
        own = split_validation(train_set, own_cfg)[1]
        assert scored[path] == _fingerprint(own)
    assert len({tuple(v) for v in scored.values()}) > 1  # the seeds' splits differ


def test_viewpoint_matches_on_running_means_with_validation_objects_per_seed(monkeypatch):
    """The viewpoint experiment's rule (3-snapshot means, validation drawn per seed), what
    the CLI flags change, and an even window refused before any training."""
    import argparse

    import capsnet.experiments.viewpoint as V
    from capsnet import experiment_cli
    from capsnet.config import RunConfig

    seen = {}
    monkeypatch.setattr(V, "generalization_protocol", lambda configs, out, **kw: seen.update(kw))
    V.viewpoint_experiment({"cnn": RunConfig(model="hinton_cnn")}, "unused", dataset="toynorb")
    assert (seen["smooth"], seen["val_per_seed"]) == (3, True)
    parser = argparse.ArgumentParser(prog="capsnet")
    experiment_cli.register_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["experiment", "viewpoint"])
    assert experiment_cli._rule_flags(args) == {}  # the experiment's own defaults
    args = parser.parse_args(["experiment", "viewpoint", "--smooth", "1", "--no-val-per-seed"])
    assert experiment_cli._rule_flags(args) == {"smooth": 1, "val_per_seed": False}
    args = parser.parse_args(["experiment", "affnist-protocol", "--val-per-seed"])
    assert experiment_cli._rule_flags(args) == {"val_per_seed": True}
    with pytest.raises(ValueError, match="odd number"):
        experiments.generalization_protocol(
            {"cnn": RunConfig(model="hinton_cnn")}, "unused", familiar=("mnist", "test", {}),
            novel=("mnist", "test", {}), experiment="x", title="x", smooth=2,
        )  # fmt: skip
