"""capsnet.probes: equivariance residuals, affine images, routing capture and traces."""

from __future__ import annotations

import pytest
import torch

import capsnet.functional as CF
from capsnet import probes
from experiment_helpers import TinyCNN, tiny_capsnet, tiny_matrix

pytestmark = pytest.mark.usefixtures("one_thread")


def test_equivariance_probe_recovers_a_known_linear_map_exactly():
    g = torch.Generator().manual_seed(0)
    p = torch.randn(400, 12, generator=g, dtype=torch.float64)
    a = torch.randn(12, 12, generator=g, dtype=torch.float64)
    b = torch.randn(12, generator=g, dtype=torch.float64)
    q = p @ a + b
    a_fit, b_fit = probes.fit_linear_map(p, q)
    assert torch.allclose(a_fit, a, atol=1e-9) and torch.allclose(b_fit, b, atol=1e-9)
    out = probes.equivariance_residual(p, q, ridge=0.0)
    assert out["linear_residual"] < 1e-20
    assert out["identity_residual"] > 0.5  # the features did move
    # ...and a map that is not linear leaves a residual.
    bent = probes.equivariance_residual(p[:, :7], torch.sin(3 * p[:, :7]), ridge=0.0)
    assert bent["linear_residual"] > 0.3


def test_equivariance_probe_identity_for_invariant_features():
    p = torch.randn(200, 5, generator=torch.Generator().manual_seed(1))
    out = probes.equivariance_residual(p, p.clone())
    assert out["identity_residual"] == 0.0 and out["relative_change"] == 0.0
    assert out["linear_residual"] < 1e-3  # the ridge shrinks the map a little


def test_equivariance_probe_pca_cv_ridge_and_interval():
    g = torch.Generator().manual_seed(2)
    # 64 features that live in a 4-dimensional subspace, moved by a linear map, plus noise
    z = torch.randn(600, 4, generator=g, dtype=torch.float64)
    lift = torch.randn(4, 64, generator=g, dtype=torch.float64)
    rot = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))[0]
    p = z @ lift
    q = (z @ rot) @ lift + 0.05 * torch.randn(600, 64, generator=g, dtype=torch.float64)
    out = probes.equivariance_residual(p, q, dim=4)
    assert out["feature_dim"] == 4 and out["original_dim"] == 64
    assert out["linear_residual"] < 0.02  # the subspace holds the whole map
    assert out["linear_residual_low"] <= out["linear_residual"] <= out["linear_residual_high"]
    assert out["ridge"] in probes.RIDGE_GRID
    # pure noise targets: cross-validation picks a strong ridge, the residual stays near 1
    noise = torch.randn(600, 64, generator=g, dtype=torch.float64)
    cv = probes.equivariance_residual(p, noise, dim=4)
    assert cv["linear_residual"] > 0.9 and cv["ridge"] >= 1e-2


def test_equivariance_probe_bad_shapes():
    with pytest.raises(ValueError, match=r"\(N, F\)"):
        probes.equivariance_residual(torch.zeros(10, 3), torch.zeros(10, 4))
    with pytest.raises(ValueError, match="held-out"):
        probes.equivariance_residual(torch.zeros(2, 3), torch.zeros(2, 3))


def test_affine_images_rotation_and_translation():
    x = torch.zeros(1, 1, 7, 7)
    x[0, 0, 1, 3] = 1.0  # above the centre (3, 3)
    left = probes.affine_images(x, angle=90)  # counter-clockwise: above -> left
    assert left[0, 0].argmax() == 3 * 7 + 1
    shifted = probes.affine_images(x, translate=(2, 1))
    assert shifted[0, 0].argmax() == 2 * 7 + 5
    assert torch.allclose(probes.affine_images(x), x, atol=1e-6)
    back = probes.affine_images(probes.affine_images(x, angle=90), angle=-90)
    assert torch.allclose(back, x, atol=1e-5)
    wide = torch.zeros(1, 1, 5, 9)
    wide[0, 0, 2, 6] = 1.0  # right of the centre (2, 4) by 2 px -> 2 px above after 90 deg
    assert probes.affine_images(wide, angle=90)[0, 0].argmax() == 0 * 9 + 4


def test_capture_routing_records_without_changing_results():
    model = tiny_capsnet()
    x = torch.rand(3, 1, 28, 28)
    plain = model(x).scores
    with probes.capture_routing(model) as cap:
        captured = model(x).scores
    assert torch.equal(plain, captured)
    assert [c.kind for c in cap.calls] == ["dynamic"]
    # The hooks are removed on exit: a later forward pass records nothing.
    model(x)
    assert len(cap.calls) == 1
    assert not any(getattr(m, "has_routing_hooks", False) for m in model.modules())
    with pytest.raises(TypeError, match="capture_routing takes the model"):
        with probes.capture_routing(last_only=True):  # the old signature
            pass


def test_capture_routing_records_convolutional_capsule_layers():
    model = tiny_matrix()
    x = torch.rand(2, 1, 28, 28)
    plain = model(x)
    with probes.capture_routing(model) as cap:
        captured = model(x)
    # The conv capsule layers route without storing votes; captured, they record them.
    assert [c.kind for c in cap.calls] == ["conv_em", "conv_em", "em"]
    torch.testing.assert_close(plain.scores, captured.scores)
    with probes.capture_routing(model, last_only=True) as cap:
        model(x)
    assert [c.kind for c in cap.calls] == ["em"]


@pytest.mark.parametrize("which", ["dynamic", "em"])
def test_routing_trace_matches_functional(which):
    model = tiny_capsnet() if which == "dynamic" else tiny_matrix()
    x = torch.rand(2, 1, 28, 28)
    with probes.capture_routing(model) as cap:
        out = model(x)
    call = cap.calls[-1]
    trace = probes.routing_trace(call)
    assert len(trace) == call.iterations == 3
    if which == "dynamic":
        v1, c1 = CF.dynamic_routing(call.arguments["u_hat"], iterations=1)
        assert torch.allclose(trace[0]["assignments"], c1)
        assert torch.allclose(trace[-1]["assignments"], call.outputs[1])
        assert torch.allclose(
            trace[-1]["activations"], v1.norm(dim=-1) * 0 + trace[-1]["activations"]
        )
        assert torch.allclose(trace[-1]["activations"], call.outputs[0].norm(dim=-1))
        # iteration 1: uniform couplings, mean = plain average of the votes
        assert torch.allclose(trace[0]["means"], call.arguments["u_hat"].mean(-3), atol=1e-6)
    else:
        assert torch.allclose(trace[-1]["means"], out.poses, atol=1e-5)
        assert torch.allclose(trace[-1]["activations"], out.scores, atol=1e-5)
        lam = call.arguments["inverse_temperatures"] or CF.default_inverse_temperatures(3)
        mu1, _, r1 = CF.em_routing(
            call.arguments["votes"],
            call.arguments["activations"],
            call.arguments["beta_u"],
            call.arguments["beta_a"],
            1,
            list(lam)[:1],
            variant=call.arguments["variant"],
            eps=call.arguments["eps"],
        )
        assert torch.allclose(trace[0]["means"], mu1) and torch.allclose(
            trace[0]["assignments"], r1
        )
    d = trace[1]["distances"]
    ref = (
        trace[1]["means"].unsqueeze(-3) - call.arguments.get("u_hat", call.arguments.get("votes"))
    ).norm(dim=-1)
    assert torch.allclose(d, ref)


def test_capsule_activations_and_dead_fraction():
    model = tiny_matrix()
    acts = probes.capsule_activations(model, torch.rand(4, 1, 28, 28))
    assert list(acts) == ["primary", "conv_caps1", "conv_caps2", "class_caps"]
    assert acts["primary"].shape == (4, 12 * 12 * 2) and acts["class_caps"].shape == (4, 10)
    caps = probes.capsule_activations(tiny_capsnet(), torch.rand(4, 1, 28, 28))
    assert caps["primary"].shape == (4, 6 * 6 * 2) and caps["digits"].shape == (4, 10)
    assert probes.capsule_activations(TinyCNN(), torch.rand(2, 1, 28, 28)) == {}
    fake = {"a": torch.tensor([[0.0, 0.5, 0.005], [0.0, 0.0, 0.009]]), "b": torch.ones(2, 4)}
    assert probes.dead_capsule_fraction(fake) == {"a": pytest.approx(2 / 3), "b": 0.0}


def test_em_layer_statistics_and_gradient_norms():
    model = tiny_matrix()
    x = torch.rand(3, 1, 28, 28)
    stats = probes.em_layer_statistics(model, x)
    assert list(stats) == ["conv_caps1", "conv_caps2", "class_caps"]
    with probes.capture_routing(model) as cap:
        out = model(x)
    last = cap.calls[-1]
    mass = (last.outputs[2] * last.arguments["activations"].unsqueeze(-1)).sum(-2).mean()
    assert stats["class_caps"]["mass"] == pytest.approx(float(mass), rel=1e-5)
    assert stats["class_caps"]["activation_std"] == pytest.approx(
        float(out.scores.detach().std()), rel=1e-4
    )
    # a class layer pushed into saturation (|beta_a| huge, whatever its scale) reads so
    with torch.no_grad():
        model.class_caps.beta_a.fill_(1e6)
    saturated = probes.em_layer_statistics(model, x)["class_caps"]
    assert saturated["saturated"] == 1.0 and saturated["activation_std"] < 1e-6
    model.train()  # the mode is restored
    probes.em_layer_statistics(model, x)
    assert model.training
    # gradient norms: zero before a backward pass, positive after
    model.zero_grad(set_to_none=True)
    assert all(
        v == {"grad_activation": 0.0, "grad_pose": 0.0}
        for v in probes.em_gradient_norms(model).values()
    )
    model2 = tiny_matrix()
    CF.spread_loss(model2(x).scores, torch.tensor([0, 1, 2]), margin=0.2).backward()
    norms = probes.em_gradient_norms(model2)
    assert set(norms) == {"primary", "conv_caps1", "conv_caps2", "class_caps"}
    assert all(v["grad_pose"] > 0 for v in norms.values())
