"""capsnet experiment seeds: pooled error over seeds, paired comparisons, the command."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from capsnet.experiments import seed_comparison
from capsnet.models import ModelOutput
from experiment_helpers import load_json

N, K = 60, 5


class IndexedDataset:
    """Image i carries its index in its first pixel, so a model can answer per image."""

    def __init__(self):
        self.images = torch.zeros(N, 1, 8, 8, dtype=torch.uint8)
        self.images[:, 0, 0, 0] = torch.arange(N, dtype=torch.uint8)
        self.labels = torch.arange(N) % K
        self.num_classes = K
        self.classes = [f"c{k}" for k in range(K)]

    def eval_transform(self, x):
        return x

    def __len__(self):
        return N


class Lookup(nn.Module):
    """Predicts ``preds[i]`` for image i: a model whose per-image correctness we choose."""

    def __init__(self, preds):
        super().__init__()
        self.register_buffer("preds", torch.as_tensor(preds))

    def forward(self, x, targets=None):
        idx = (x[:, 0, 0, 0] * 255).round().long()
        scores = nn.functional.one_hot(self.preds[idx], K).float()
        return ModelOutput(scores, scores, None)


def _model(wrong):
    """A Lookup that is wrong exactly on the images in ``wrong``."""
    labels = torch.arange(N) % K
    preds = labels.clone()
    preds[list(wrong)] = (labels[list(wrong)] + 1) % K
    return Lookup(preds)


def test_pooled_errors_and_paired_difference_match_a_plain_count(tmp_path):
    wrong_a = [{1, 2, 3}, {1, 4, 5, 6, 7}]  # 5 % and 8.33 %
    wrong_b = [{1, 2, 8, 9, 10, 11}, {2, 3, 12}]  # 10 % and 5 %
    rec = seed_comparison(
        {"caps": [_model(w) for w in wrong_a], "cnn": [_model(w) for w in wrong_b]},
        IndexedDataset(),
        tmp_path,
        runs={"caps": [{"seed": 0}, {"seed": 1}], "cnn": [{"seed": 0}, {"seed": 1}]},
        resamples=300,
    )
    res = rec["results"]
    assert res["test_images"] == N
    caps, cnn = res["models"]["caps"], res["models"]["cnn"]
    assert [r["error"] for r in caps["per_seed"]] == pytest.approx([5.0, 100 * 5 / 60])
    assert caps["error"]["error"] == pytest.approx(100 * 8 / 120)
    assert cnn["error"]["error"] == pytest.approx(100 * 9 / 120)
    assert caps["error"]["low"] <= caps["error"]["error"] <= caps["error"]["high"]
    assert caps["error"]["seeds"] == 2 and caps["error"]["images"] == N
    assert caps["seed_spread"] == pytest.approx(float(np.std([5.0, 100 * 5 / 60], ddof=1)))
    comp = res["comparisons"]["caps - cnn"]
    assert comp["difference"] == pytest.approx(100 * (8 - 9) / 120)
    # discordant pairs, seed by seed: only caps wrong / only cnn wrong
    only_a = sum(len(a - b) for a, b in zip(wrong_a, wrong_b, strict=True))
    only_b = sum(len(b - a) for a, b in zip(wrong_a, wrong_b, strict=True))
    assert (comp["only_a_wrong"], comp["only_b_wrong"]) == (only_a, only_b) == (6, 7)
    n = only_a + only_b
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2**n)
    assert comp["p_value"] == pytest.approx(p)
    assert comp["relative_reduction"]["reduction"] == pytest.approx(1 - 8 / 9)
    saved = np.load(tmp_path / "per_image.npz")
    assert saved["caps"].shape == (2, N) and (~saved["caps"]).sum() == 8
    assert {"seeds.json", "seeds.png"} <= {p.name for p in tmp_path.iterdir()}
    assert load_json(tmp_path / "seeds.json")["summary"][0]["per seed %"] == "5.00, 8.33"


def test_unpaired_groups_shared_seeds_and_test_selection_are_said(tmp_path):
    rec = seed_comparison(
        {"a": [_model({1}), _model({2})], "b": [_model({3})]},
        IndexedDataset(),
        tmp_path,
        runs={
            "a": [{"seed": 0, "selected_on": "val"}, {"seed": 0, "selected_on": "test"}],
            "b": [{"seed": 0, "selected_on": "val"}],
        },
        max_examples=30,
        resamples=50,
    )
    assert rec["results"]["comparisons"] == {}
    assert rec["results"]["test_images"] == 30
    notes = " ".join(rec["notes"])
    assert "no paired comparison (2 against 1 seeds" in notes
    assert "a: runs share a training seed" in notes
    assert "chosen on the test set (selected_on = test): a run 2" in notes
    with pytest.raises(ValueError, match="at least one model"):
        seed_comparison({"a": []}, IndexedDataset(), tmp_path)


def test_the_command_on_tiny_runs(tmp_path, capsys):
    import argparse

    from capsnet import experiment_cli
    from capsnet.train import train
    from training_helpers import make_mnist, tiny_config

    root = make_mnist(tmp_path / "data", n_train=48, n_test=24)
    caps = [
        train(tiny_config(root, tmp_path / f"caps-{s}", epochs=1, seed=s, val_samples=8)).run_dir
        for s in (0, 1)
    ]
    cnn = [
        train(
            tiny_config(root, tmp_path / f"cnn-{s}", model="hinton_cnn", model_kwargs={}, seed=s,
                        epochs=1, val_samples=8)
        ).run_dir
        for s in (0, 1)
    ]  # fmt: skip

    def cli(argv):
        parser = argparse.ArgumentParser(prog="capsnet")
        experiment_cli.register_cli(parser.add_subparsers(dest="command"))
        args = parser.parse_args(["experiment", "seeds", *argv])
        return args.handler(args)

    out = tmp_path / "seeds"
    argv = [*map(str, caps), "--baseline", *map(str, cnn), "--device", "cpu", "--no-progress"]
    assert cli([*argv, "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "capsnet - hinton_cnn" in printed and "McNemar p" in printed
    rec = load_json(out / "seeds.json")
    runs = rec["results"]["models"]["capsnet"]["per_seed"]
    assert [r["seed"] for r in runs] == [0, 1]
    assert {r["selected_on"] for r in runs} == {"val"} and runs[0][
        "checkpoint"
    ] == "best.safetensors"
    assert rec["results"]["test_images"] == 24 and rec["environment"]["commit"]
    from capsnet.report import build_report

    page = build_report(out).read_text()
    assert "pooled over its training seeds" in page and "seeds.png" in page
    # one model's runs must be one model
    assert cli([str(caps[0]), str(cnn[0]), "--device", "cpu", "--no-progress"]) == 1
    assert "the runs of one model must be one model" in capsys.readouterr().err
