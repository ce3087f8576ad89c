"""capsnet.experiments.viewpoint_equivariance: azimuth pairs and the held-out linear map."""

from __future__ import annotations

import math

import pytest
import torch

from capsnet import experiments
from experiment_helpers import FakeDataset, TinyCNN, tiny_capsnet


def _info(instances, elevations=2, azimuths=range(0, 36, 2), lightings=1):
    rows = [
        (i, e, a, light)
        for i in instances
        for e in range(elevations)
        for a in azimuths
        for light in range(lightings)
    ]
    return torch.tensor(rows, dtype=torch.long)


def test_azimuth_pairs_match_object_elevation_and_lighting_20_degrees_on():
    info = _info([4, 6], azimuths=[0, 2, 34, 10])
    labels = torch.zeros(len(info), dtype=torch.long)
    i, j = experiments.azimuth_pairs(labels, info, 20)
    assert len(i) > 0 and len(i) == len(j)
    for a, b in zip(i.tolist(), j.tolist(), strict=True):
        assert info[a, 0] == info[b, 0] and info[a, 1] == info[b, 1] and info[a, 3] == info[b, 3]
        assert (info[b, 2] - info[a, 2]) % 36 == 2
    # 0 -> 2 and 34 -> 0 (wraps round) exist; 2 -> 4 and 10 -> 12 do not
    assert len(i) == 2 * 2 * 2
    # the same instance number in another category is another object
    other = torch.ones(len(info), dtype=torch.long)
    i2, _ = experiments.azimuth_pairs(torch.cat([labels, other]), torch.cat([info, info]))
    assert len(i2) == 2 * len(i)
    with pytest.raises(ValueError, match="multiple of 20"):
        experiments.azimuth_pairs(labels, info, 30)


class FakeNorb(FakeDataset):
    def __init__(self, instances, seed):
        info = _info(instances, elevations=1, azimuths=range(0, 12, 2))
        super().__init__(len(info), num_classes=10, seed=seed)
        self.info = info
        self.labels = torch.zeros(len(info), dtype=torch.long)


def test_viewpoint_equivariance_experiment(tmp_path):
    models = {"capsules": tiny_capsnet(reconstruction=False), "cnn": TinyCNN()}
    rec = experiments.viewpoint_equivariance_experiment(
        models, FakeNorb([4, 6, 7], 0), FakeNorb([0, 1], 1), tmp_path, resamples=50
    )
    res = rec["results"]
    assert set(res["capsules"]) == {"class_poses", "true_class_pose"}
    assert "penultimate_pca16" in res["cnn"]
    r = res["capsules"]["true_class_pose"]
    assert (r["num_fit"], r["num_test"]) == (3 * 5, 2 * 5)  # 6 azimuths: 5 pairs each
    assert math.isfinite(r["linear_residual"]) and r["feature_dim"] == 16
    assert rec["figures"] == ["viewpoint_equivariance.png"]
    assert (tmp_path / "viewpoint_equivariance.json").is_file()
    with pytest.raises(ValueError, match="viewpoint info"):
        experiments.viewpoint_equivariance_experiment(
            models, FakeDataset(), FakeNorb([0], 1), tmp_path
        )
