"""capsnet.experiments.routing: per-iteration agreement and dead capsules ([H18] Fig. 2)."""

from __future__ import annotations

import pytest
import torch

from capsnet import experiments, probes
from experiment_helpers import FakeDataset, TinyCNN, tiny_capsnet, tiny_matrix


@pytest.mark.parametrize("which", ["dynamic", "em"])
def test_routing_experiment(tmp_path, which):
    model = tiny_capsnet() if which == "dynamic" else tiny_matrix()
    n = 2 if which == "dynamic" else 1  # figures are slow to draw: one is enough here
    rec = experiments.routing_experiment(
        model, FakeDataset(8), tmp_path, num_examples=n, max_examples=8, batch_size=4
    )
    res = rec["results"]
    assert len(res["per_iteration"]) == 3
    for p in res["per_iteration"]:
        assert 0.0 <= p["true_assignment"] <= 1.0 and p["true_distance"] >= 0.0
        assert -1.0 <= p["true_cosine"] <= 1.0 and -1.0 <= p["other_cosine"] <= 1.0
    if which == "dynamic":  # iteration 1 couplings are uniform
        assert res["per_iteration"][0]["true_assignment"] == pytest.approx(0.1)
    assert set(res["dead_fraction"]) == set(
        probes.capsule_activations(model, torch.rand(1, 1, 28, 28))
    )
    assert len(res["examples"]) == n
    if which == "em":  # is EM alive? per matrix-capsule layer
        layers = res["em_layers"]
        assert set(layers) == {"primary", "conv_caps1", "conv_caps2", "class_caps"}
        for name in ("conv_caps1", "conv_caps2", "class_caps"):
            assert 0.0 <= layers[name]["saturated"] <= 1.0 and layers[name]["mass"] > 0
            assert layers[name]["activation_std"] >= 0.0
            assert layers[name]["grad_activation"] > 0 and layers[name]["grad_pose"] > 0
        assert all(p.grad is None for p in model.parameters())  # gradients not left behind
    else:
        assert res["em_layers"] == {}
    expected = {"agreement_distance.png", "agreement_cosine.png", "dead_capsules.png"}
    expected |= {f"{kind}_{k}.png" for kind in ("couplings", "vote_distances") for k in range(n)}
    assert set(rec["figures"]) == expected
    for f in expected:
        assert (tmp_path / f).stat().st_size > 1000
    with pytest.raises(ValueError, match="routing"):
        experiments.routing_experiment(TinyCNN(), FakeDataset(2), tmp_path)
