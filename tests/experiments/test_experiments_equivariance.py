"""capsnet.experiments.equivariance: the linear-map residual per model and transform."""

from __future__ import annotations

import math

from capsnet import experiments, probes
from experiment_helpers import FakeDataset, TinyCNN, tiny_capsnet


def test_equivariance_experiment(tmp_path):
    models = {"capsules": tiny_capsnet(reconstruction=False), "cnn": TinyCNN()}
    rec = experiments.equivariance_experiment(
        models, FakeDataset(40), tmp_path, translations=[2], rotations=[10], max_examples=40
    )
    res = rec["results"]
    assert set(res["capsules"]) == {"class_poses", "true_class_pose"}
    # CNN features are also probed at the capsules' pose sizes (PCA), for equal dimension
    capsule_dims = {16, res["capsules"]["class_poses"]["rotation 10"]["feature_dim"]}
    cnn_dim = res["cnn"]["penultimate"]["rotation 10"]["feature_dim"]
    expected = {"penultimate"} | {f"penultimate_pca{d}" for d in capsule_dims if d < cnn_dim}
    assert set(res["cnn"]) == expected and "penultimate_pca16" in expected
    assert res["cnn"]["penultimate_pca16"]["rotation 10"]["feature_dim"] == 16
    r = res["capsules"]["true_class_pose"]["rotation 10"]
    assert r["feature_dim"] == 16 and r["num_fit"] == 20 and math.isfinite(r["linear_residual"])
    assert r["linear_residual_low"] <= r["linear_residual"] <= r["linear_residual_high"]
    assert r["ridge"] in probes.RIDGE_GRID  # cross-validated
    assert rec["figures"] == ["equivariance_translation.png", "equivariance_rotation.png"]
