"""capsnet.experiments.adversarial: FGSM / BIM sweeps over several models ([H18] §6)."""

from __future__ import annotations

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
    assert len(stored["summary"]) == 8
    with pytest.raises(ValueError, match="model_names"):
        experiments.attack_experiment({"m": TinyCNN()}, data, tmp_path, losses="model")
