"""capsnet.experiments.reconstruction: reconstructions and pose perturbations ([S17] Fig. 3-4)."""

from __future__ import annotations

import pytest
import torch

from capsnet import experiments
from experiment_helpers import FakeDataset, tiny_capsnet


def test_reconstruction_experiment(tmp_path):
    model = tiny_capsnet()
    rec = experiments.reconstruction_experiment(
        model, FakeDataset(12), tmp_path, num_examples=5, num_perturbed=2
    )
    res = rec["results"]
    assert res["deltas"] == pytest.approx([-0.25 + 0.05 * k for k in range(11)])
    assert len(res["perturbed"]) == 2
    assert len(res["perturbed"][0]["dimension_sensitivity"]) == 16
    assert rec["figures"] == ["reconstructions.png", "perturbation_0.png", "perturbation_1.png"]
    for f in rec["figures"]:
        assert (tmp_path / f).stat().st_size > 1000
    with pytest.raises(ValueError, match="decoder"):
        experiments.reconstruction_experiment(
            tiny_capsnet(reconstruction=False), FakeDataset(2), tmp_path
        )


def test_perturbation_grid_changes_one_dimension(tmp_path, monkeypatch):
    """Row d of the grid decodes the pose with only dimension d of the predicted class moved."""
    model = tiny_capsnet()
    seen = []
    original = model.reconstruct

    def spy(poses, classes=None):
        seen.append(poses.clone())
        return original(poses, classes)

    monkeypatch.setattr(model, "reconstruct", spy)
    rec = experiments.reconstruction_experiment(
        model, FakeDataset(3), tmp_path, num_examples=2, num_perturbed=1, deltas=[-0.1, 0.0, 0.2]
    )
    grid, base = seen[0].reshape(16, 3, 10, 16), seen[1][0]
    cls = rec["results"]["perturbed"][0]["predicted"]
    diff = grid - base
    for d in range(16):
        expected = torch.zeros(3, 10, 16)
        expected[:, cls, d] = torch.tensor([-0.1, 0.0, 0.2])
        assert torch.allclose(diff[d], expected, atol=1e-6)
