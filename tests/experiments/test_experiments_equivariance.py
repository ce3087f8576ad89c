"""capsnet.experiments.equivariance: the linear-map residual per model and transform."""

from __future__ import annotations

import math

from capsnet import experiments
from experiment_helpers import FakeDataset, TinyCNN, tiny_capsnet


def test_equivariance_experiment(tmp_path):
    models = {"capsules": tiny_capsnet(reconstruction=False), "cnn": TinyCNN()}
    rec = experiments.equivariance_experiment(
        models, FakeDataset(40), tmp_path, translations=[2], rotations=[10], max_examples=40
    )
    res = rec["results"]
    assert set(res["capsules"]) == {"class_poses", "true_class_pose"}
    assert set(res["cnn"]) == {"penultimate"}
    r = res["capsules"]["true_class_pose"]["rotation 10"]
    assert r["feature_dim"] == 16 and r["num_fit"] == 20 and math.isfinite(r["linear_residual"])
    assert rec["figures"] == ["equivariance_translation.png", "equivariance_rotation.png"]
