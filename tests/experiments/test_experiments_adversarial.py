"""capsnet.experiments.adversarial: FGSM / BIM sweeps over several models ([H18] §6)."""

from __future__ import annotations

import numpy as np
import pytest

from capsnet import experiments
from experiment_helpers import FakeDataset, TinyCNN, tiny_capsnet
from experiment_helpers import load_json as load


def test_attack_experiment_writes_json_and_plot(tmp_path):
    data = FakeDataset(4)
    models = {"capsules": tiny_capsnet(reconstruction=False), "cnn": TinyCNN()}
    rec = experiments.attack_experiment(
        models,
        data,
        tmp_path,
        epsilons=[0.0, 0.1],
        steps=2,
        batch_size=4,
        losses={"capsules": "model", "cnn": "cross_entropy"},
        model_names={"capsules": "capsnet"},
    )
    stored = load(tmp_path / "attack.json")
    assert stored == rec
    assert stored["figures"] == ["attack.png"]
    assert (tmp_path / "attack.png").stat().st_size > 1000
    runs = stored["results"]["capsules"]
    assert len(runs) == 4 and runs[0]["loss"] == "margin"
    assert {(r["method"], r["targeted"]) for r in runs} == {
        ("fgsm", False),
        ("fgsm", True),
        ("bim", False),
        ("bim", True),
    }
    assert runs[0]["accuracy"][0] == runs[0]["clean_accuracy"]
    assert len(stored["summary"]) == 8 + 4  # a row per model and attack, then cnn - capsules
    with pytest.raises(ValueError, match="model_names"):
        experiments.attack_experiment({"m": TinyCNN()}, data, tmp_path, losses="model")


def test_attack_intervals_per_image_and_paired_rows(tmp_path):
    """Per-image outcomes reproduce the rates; intervals hold them; the comparison rows are
    the first model minus the later one on the same images."""
    from capsnet import stats

    data = FakeDataset(12)
    models = {"capsules": tiny_capsnet(reconstruction=False), "cnn": TinyCNN()}
    rec = experiments.attack_experiment(
        models, data, tmp_path, epsilons=[0.0, 0.2], methods=["fgsm"], batch_size=4
    )
    arrays = np.load(tmp_path / "per_image.npz")
    assert set(arrays.files) == {
        f"{m}__fgsm__{k}" for m in models
        for k in ("untargeted__correct", "targeted__correct", "targeted__hit")
    }  # fmt: skip
    for label in models:
        untargeted, targeted = rec["results"][label]
        ok = arrays[f"{label}__fgsm__untargeted__correct"]
        hit = arrays[f"{label}__fgsm__targeted__hit"]
        assert ok.shape == hit.shape == (2, 12) and ok.dtype == bool
        assert ok.mean(1).tolist() == pytest.approx(untargeted["accuracy"])
        assert hit.mean(1).tolist() == pytest.approx(targeted["success_rate"])
        for value, (low, high) in zip(
            untargeted["accuracy"], untargeted["accuracy_interval"], strict=True
        ):
            assert low <= value <= high
        for value, (low, high) in zip(
            targeted["success_rate"], targeted["success_interval"], strict=True
        ):
            assert low <= value <= high
    rows = rec["results"]["comparisons"]
    assert [(r["comparison"], r["targeted"]) for r in rows] == [
        ("capsules - cnn", False),
        ("capsules - cnn", True),
    ]
    a = arrays["capsules__fgsm__untargeted__correct"][1]
    b = arrays["cnn__fgsm__untargeted__correct"][1]
    expected = stats.paired_comparison(a, b)
    assert rows[0]["eps=0.2"].startswith(f"{expected.difference:+.1f} [")
    assert 100 * ((~a).mean() - (~b).mean()) == pytest.approx(expected.difference)
    assert rows[0] in rec["summary"]
