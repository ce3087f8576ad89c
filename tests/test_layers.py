"""capsnet.layers: capsule layouts, shapes, votes against plain loops, routing wiring."""

from __future__ import annotations

import pytest
import torch

import capsnet.functional as CF
from capsnet import layers as L

DT = torch.float64


def rand(*shape, seed=0, scale=1.0, dtype=DT):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype) * scale


pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- layouts


def test_capsules_from_feature_map_groups_channels_of_one_position():
    b, types, dim, h, w = 2, 3, 4, 5, 6
    x = rand(b, types * dim, h, w)
    grid = L.capsules_from_feature_map(x, dim)
    assert grid.shape == (b, h, w, types, dim)
    # Component d of capsule (h, w, t) is channel t*D + d at that position.
    for t, row, col in [(0, 0, 0), (2, 4, 5), (1, 3, 1)]:
        torch.testing.assert_close(grid[1, row, col, t], x[1, t * dim : (t + 1) * dim, row, col])
    flat = L.flatten_capsules(grid)
    assert flat.shape == (b, h * w * types, dim)
    torch.testing.assert_close(flat[0, (4 * w + 5) * types + 2], x[0, 2 * dim : 3 * dim, 4, 5])


def test_primary_capsules_one_channel_group_at_one_position_changes_one_capsule():
    torch.manual_seed(0)
    layer = L.PrimaryCapsules(6, out_types=4, pose_dim=8, kernel_size=3, stride=2).double()
    x = rand(2, 6, 13, 11)
    base = layer(x)
    h_out, w_out = layer.output_size((13, 11))
    assert base.shape == (2, h_out * w_out * 4, 8) == (2, layer.num_capsules((13, 11)), 8)
    row, col, t = 3, 2, 1
    delta = torch.zeros(2, 4 * 8, h_out, w_out, dtype=DT)
    delta[:, t * 8 : (t + 1) * 8, row, col] = 1.0
    handle = layer.conv.register_forward_hook(lambda mod, inp, out: out + delta)
    try:
        changed = (layer(x) - base).abs().amax(dim=(0, 2)) > 0  # (I,)
    finally:
        handle.remove()
    assert changed.nonzero().flatten().tolist() == [(row * w_out + col) * 4 + t]


@pytest.mark.parametrize("size", [(28, 28), (32, 32), (28, 36)])
def test_primary_capsules_shapes_and_squash(size):
    layer = L.PrimaryCapsules(16, out_types=4, pose_dim=8, kernel_size=9, stride=2)
    x = torch.rand(2, 16, size[0] - 8, size[1] - 8)
    u = layer(x)
    h, w = ((s - 8 - 9) // 2 + 1 for s in size)
    assert u.shape == (2, h * w * 4, 8)
    assert (u.norm(dim=-1) < 1).all()


def test_unfold_capsules_matches_plain_loop():
    b, h, w, t, k, s = 2, 7, 5, 3, 3, 2
    poses, act = rand(b, h, w, t, 16), rand(b, h, w, t, seed=1)
    out_p, out_a, (ho, wo) = L.unfold_capsules(poses, act, k, s)
    assert (ho, wo) == (3, 2)
    assert out_p.shape == (b, ho * wo, k * k * t, 16) and out_a.shape == (b, ho * wo, k * k * t)
    for p in range(ho * wo):
        r, c = divmod(p, wo)
        for kh in range(k):
            for kw in range(k):
                for ti in range(t):
                    child = (kh * k + kw) * t + ti
                    src = (r * s + kh, c * s + kw, ti)
                    torch.testing.assert_close(out_p[:, p, child], poses[:, src[0], src[1], ti])
                    torch.testing.assert_close(out_a[:, p, child], act[:, src[0], src[1], ti])


# --------------------------------------------------------------------------- dense capsules


def test_dense_capsules_predictions_and_routing_match_reference():
    torch.manual_seed(0)
    layer = L.DenseCapsules(in_caps=6, in_dim=8, out_caps=3, out_dim=16, iterations=2).double()
    u = rand(4, 6, 8)
    u_hat = layer.predictions(u)
    assert u_hat.shape == (4, 6, 3, 16)
    for i in range(6):
        for j in range(3):
            torch.testing.assert_close(u_hat[:, i, j], u[:, i] @ layer.weight[i, j].T)
    v, c = layer(u, return_couplings=True)
    v_ref, c_ref = CF.dynamic_routing(u_hat, 2)
    torch.testing.assert_close(v, v_ref)
    torch.testing.assert_close(c, c_ref)
    # Routing logits are per example, not parameters: W is the only one, N(0, 0.01^2).
    assert [n for n, _ in layer.named_parameters()] == ["weight"]
    assert abs(float(layer.weight.detach().std()) - 0.01) < 0.005


def test_dense_capsules_detach_inner_is_passed_through():
    torch.manual_seed(0)
    u = rand(2, 5, 4)
    grads = []
    for detach in (False, True):
        torch.manual_seed(0)
        layer = L.DenseCapsules(
            5, in_dim=4, out_caps=3, out_dim=6, iterations=3, detach_inner=detach, init_std=1.0
        ).double()
        u_hat = layer.predictions(u)
        ref, _ = CF.dynamic_routing(u_hat, 3, detach_inner=detach)
        out = layer(u)
        torch.testing.assert_close(out, ref)
        (g,) = torch.autograd.grad(out.pow(3).sum(), layer.weight)
        grads.append(g)
    assert not torch.allclose(grads[0], grads[1])


@pytest.mark.parametrize(
    "u, error",
    [
        (torch.rand(2, 6, 7), ValueError),
        (torch.rand(6, 8), ValueError),
        (torch.ones(2, 6, 8, dtype=torch.long), TypeError),
    ],
)
def test_dense_capsules_bad_input(u, error):
    layer = L.DenseCapsules(6, in_dim=8, out_caps=3, out_dim=16)
    with pytest.raises(error, match=r"\(B, 6, 8\)|dtype"):
        layer(u)


# --------------------------------------------------------------------------- decoder


def test_decoder_masks_all_but_target_or_longest():
    torch.manual_seed(0)
    dec = L.CapsuleDecoder(4, pose_dim=16, output_shape=(1, 12, 10)).double()
    assert [m.out_features for m in dec.net if isinstance(m, torch.nn.Linear)] == [512, 1024, 120]
    poses = rand(3, 4, 16) * 0.2
    poses[:, 2] *= 4.0  # capsule 2 is the longest
    out = dec(poses)
    assert out.shape == (3, 1, 12, 10) and (out >= 0).all() and (out <= 1).all()
    torch.testing.assert_close(out, dec(poses, torch.tensor([2, 2, 2])))
    targets = torch.tensor([0, 1, 3])
    out_t = dec(poses, targets)
    assert not torch.allclose(out_t, out)
    # Only the target capsule reaches the decoder.
    other = poses.clone()
    other[:, 2] += 1.0
    torch.testing.assert_close(dec(other, targets), out_t)
    poses.requires_grad_(True)
    (g,) = torch.autograd.grad(dec(poses, targets).sum(), poses)
    mask = torch.zeros(3, 4, dtype=torch.bool)
    mask[torch.arange(3), targets] = True
    assert (g[~mask] == 0).all() and (g[mask] != 0).any()


def test_decoder_bad_targets():
    dec = L.CapsuleDecoder(4, pose_dim=16, output_shape=(1, 8, 8))
    poses = torch.rand(2, 4, 16)
    with pytest.raises(TypeError, match="int"):
        dec(poses, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"\(B,\) = \(2,\)"):
        dec(poses, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        dec(poses, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match=r"\(B, 4, 16\)"):
        dec(torch.rand(2, 5, 16))


# --------------------------------------------------------------------------- matrix capsules


def test_primary_matrix_capsules_layout_and_shapes():
    torch.manual_seed(0)
    layer = L.PrimaryMatrixCapsules(5, out_types=3).double()
    x = rand(2, 5, 6, 7)
    poses, act = layer(x)
    assert poses.shape == (2, 6, 7, 3, 16) and act.shape == (2, 6, 7, 3)
    assert ((act > 0) & (act < 1)).all()
    # Pose of type t at (h, w) = pose-conv channels t*16..t*16+15 at (h, w).
    row, col, t = 4, 1, 2
    delta = torch.zeros(2, 48, 6, 7, dtype=DT)
    delta[:, t * 16 : (t + 1) * 16, row, col] = 1.0
    handle = layer.pose.register_forward_hook(lambda mod, inp, out: out + delta)
    try:
        poses2, act2 = layer(x)
    finally:
        handle.remove()
    changed = ((poses2 - poses).abs().amax(dim=(0, 4)) > 0).nonzero().tolist()
    assert changed == [[row, col, t]]
    torch.testing.assert_close(act2, act)
    with pytest.raises(ValueError, match=r"\(B, 5, H, W\)"):
        layer(rand(2, 4, 6, 7))


def ref_conv_votes(poses, weight, k, s):
    """Plain loops: V[n, p, (kh, kw, i), o] = M[n, r*s+kh, c*s+kw, i] @ W[kh*k+kw, i, o]."""
    n, h, w, t, _ = poses.shape
    ho, wo = (h - k) // s + 1, (w - k) // s + 1
    out_types = weight.shape[2]
    votes = torch.zeros(n, ho * wo, k * k * t, out_types, 16, dtype=poses.dtype)
    for r in range(ho):
        for c in range(wo):
            for kh in range(k):
                for kw in range(k):
                    for i in range(t):
                        m = poses[:, r * s + kh, c * s + kw, i].reshape(n, 4, 4)
                        for o in range(out_types):
                            v = m @ weight[kh * k + kw, i, o]
                            votes[:, r * wo + c, (kh * k + kw) * t + i, o] = v.reshape(n, 16)
    return votes


@pytest.mark.parametrize("stride", [1, 2])
def test_conv_matrix_capsules_votes_match_plain_loops(stride):
    torch.manual_seed(0)
    layer = L.ConvMatrixCapsules(2, out_types=3, kernel_size=3, stride=stride).double()
    poses, act = rand(2, 7, 6, 2, 16), torch.rand(2, 7, 6, 2, dtype=DT)
    votes, child_act, out_size = layer.votes(poses, act)
    assert out_size == layer.output_size((7, 6))
    torch.testing.assert_close(votes, ref_conv_votes(poses, layer.weight, 3, stride))
    assert child_act.shape == votes.shape[:3]


#: Inverse temperatures that keep each variant's activations away from 0 and 1 here.
VARIANT_LAMBDAS = {
    "paper": [1.0, 1.0, 1.0],
    "official": [1e-4] * 3,
    "gritzman": [1e-4] * 3,
    "capsnet": [1e-4] * 3,
}


@pytest.mark.parametrize("variant", list(L.EM_LAYER_VARIANTS))
def test_conv_matrix_capsules_routing_modes(variant):
    torch.manual_seed(0)
    lambdas = VARIANT_LAMBDAS[variant]
    kwargs = dict(
        kernel_size=3, stride=1, iterations=3, inverse_temperatures=lambdas, variant=variant
    )
    faithful = L.ConvMatrixCapsules(2, out_types=3, **kwargs).double()
    per_pos = L.ConvMatrixCapsules(2, out_types=3, routing="per_position", **kwargs).double()
    per_pos.load_state_dict(faithful.state_dict())
    poses, act = rand(2, 5, 6, 2, 16, scale=0.5), torch.rand(2, 5, 6, 2, dtype=DT)
    votes, child_act, _ = faithful.votes(poses, act)
    betas = (faithful.beta_u, faithful.beta_a)
    mu_f, a_f = faithful(poses, act)
    mu_ref, a_ref, _ = CF.conv_em_routing(
        votes, child_act, *betas, in_size=(5, 6), kernel_size=3, stride=1,
        iterations=3, inverse_temperatures=lambdas, variant=variant,
    )  # fmt: skip
    assert mu_f.shape == (2, 3, 4, 3, 16) and a_f.shape == (2, 3, 4, 3)
    torch.testing.assert_close(mu_f.reshape(mu_ref.shape), mu_ref)
    torch.testing.assert_close(a_f.reshape(a_ref.shape), a_ref)
    mu_p, a_p = per_pos(poses, act)
    mu_ref, a_ref, _ = CF.em_routing(votes, child_act, *betas, 3, lambdas, variant=variant)
    torch.testing.assert_close(a_p.reshape(a_ref.shape), a_ref)
    torch.testing.assert_close(mu_p.reshape(mu_ref.shape), mu_ref)
    assert not torch.allclose(a_p, a_f)  # overlapping receptive fields: the forms differ


def test_conv_matrix_capsules_options_reach_routing():
    poses, act = rand(1, 5, 5, 2, 16, scale=0.3), torch.rand(1, 5, 5, 2, dtype=DT)
    torch.manual_seed(0)
    base = L.ConvMatrixCapsules(2, out_types=3, iterations=2).double()
    outs = {}
    for name, kw in {
        "base": {},
        "lambda": {"inverse_temperatures": [0.5, 0.7]},
        "normalize": {"normalize_cost": True},
    }.items():
        layer = L.ConvMatrixCapsules(2, out_types=3, iterations=2, **kw).double()
        layer.load_state_dict(base.state_dict())
        outs[name] = layer(poses, act)[1]
    assert not torch.allclose(outs["base"], outs["lambda"])
    assert not torch.allclose(outs["base"], outs["normalize"])


def test_matrix_layer_bad_options_and_inputs():
    with pytest.raises(ValueError, match="faithful"):
        L.ConvMatrixCapsules(2, out_types=3, routing="global")
    with pytest.raises(ValueError, match="one lambda per iteration"):
        L.ConvMatrixCapsules(2, out_types=3, iterations=3, inverse_temperatures=[1.0])
    layer = L.ConvMatrixCapsules(2, out_types=3, kernel_size=3)
    with pytest.raises(ValueError, match=r"\(B, H, W, 2, 16\)"):
        layer(torch.rand(1, 5, 5, 3, 16), torch.rand(1, 5, 5, 3))
    with pytest.raises(ValueError, match="activations"):
        layer(torch.rand(1, 5, 5, 2, 16), torch.rand(1, 5, 4, 2))
    with pytest.raises(ValueError, match="smaller than kernel_size"):
        layer(torch.rand(1, 2, 5, 2, 16), torch.rand(1, 2, 5, 2))
    with pytest.raises(TypeError, match="floating"):
        layer(torch.ones(1, 5, 5, 2, 16, dtype=torch.long), torch.rand(1, 5, 5, 2))


@pytest.mark.parametrize("grid", [(3, 3), (4, 4), (3, 5)])
def test_class_matrix_capsules_votes_and_coordinate_addition(grid):
    torch.manual_seed(0)
    h, w = grid
    with_ca = L.ClassMatrixCapsules(2, num_classes=4, iterations=2).double()
    without = L.ClassMatrixCapsules(
        2, num_classes=4, iterations=2, coordinate_addition=False
    ).double()
    without.load_state_dict(with_ca.state_dict())
    poses, act = rand(2, h, w, 2, 16), torch.rand(2, h, w, 2, dtype=DT)
    votes, plain = with_ca.votes(poses), without.votes(poses)
    assert votes.shape == (2, h * w * 2, 4, 16)
    for r in range(h):
        for c in range(w):
            for i in range(2):
                child = (r * w + c) * 2 + i
                for o in range(4):
                    v = poses[:, r, c, i].reshape(2, 4, 4) @ with_ca.weight[i, o]
                    torch.testing.assert_close(plain[:, child, o], v.reshape(2, 16))
                    offset = torch.zeros(16, dtype=DT)
                    offset[0], offset[1] = (r + 0.5) / h, (c + 0.5) / w
                    torch.testing.assert_close(votes[:, child, o], v.reshape(2, 16) + offset)
    mu, a = with_ca(poses, act)
    # the layers' default schedule: the default variant's final lambda, in the class
    # layer times its class_lambda_factor
    lv = L.EM_LAYER_VARIANTS[with_ca.variant]
    lambdas = L.authors_inverse_temperatures(2, lv.final_lambda * lv.class_lambda_factor)
    assert with_ca.inverse_temperatures == tuple(lambdas)
    mu_ref, a_ref, _ = CF.em_routing(
        votes, act.reshape(2, -1), with_ca.beta_u, with_ca.beta_a, 2, lambdas,
        variant=with_ca.variant, eps=lv.class_eps,
    )  # fmt: skip
    assert mu.shape == (2, 4, 16) and a.shape == (2, 4)
    torch.testing.assert_close(mu, mu_ref)
    torch.testing.assert_close(a, a_ref)


@pytest.mark.parametrize("size", [(28, 28), (32, 32), (24, 40)])
def test_matrix_layer_stack_shapes(size):
    """Conv1 5x5/2 -> primary -> ConvCaps 3x3/2 -> ConvCaps 3x3/1 -> class capsules."""
    torch.manual_seed(0)
    h, w = ((s - 5) // 2 + 1 for s in size)
    x = torch.rand(2, 8, h, w)
    poses, act = L.PrimaryMatrixCapsules(8, out_types=4)(x)
    assert poses.shape == (2, h, w, 4, 16)
    conv1 = L.ConvMatrixCapsules(4, out_types=5, kernel_size=3, stride=2, iterations=2)
    poses, act = conv1(poses, act)
    h, w = (h - 3) // 2 + 1, (w - 3) // 2 + 1
    assert poses.shape == (2, h, w, 5, 16) and act.shape == (2, h, w, 5)
    poses, act = L.ConvMatrixCapsules(5, out_types=6, kernel_size=3, stride=1, iterations=2)(
        poses, act
    )
    assert poses.shape == (2, h - 2, w - 2, 6, 16)
    poses, act = L.ClassMatrixCapsules(6, num_classes=10, iterations=2)(poses, act)
    assert poses.shape == (2, 10, 16) and act.shape == (2, 10)
    assert torch.isfinite(poses).all() and torch.isfinite(act).all()


def test_transformation_matrix_init_and_parameter_count():
    torch.manual_seed(0)
    layer = L.ConvMatrixCapsules(8, out_types=16, kernel_size=3, stride=2, variant="paper")
    assert sum(p.numel() for p in layer.parameters()) == 9 * 8 * 16 * 16 + 2 * 16
    assert layer.beta_u.abs().sum() == 0 and layer.beta_a.abs().sum() == 0
    mean = layer.weight.detach().mean(dim=(0, 1, 2))
    torch.testing.assert_close(mean, torch.eye(4), atol=0.1, rtol=0)
    cls = L.ClassMatrixCapsules(16, num_classes=10)
    assert sum(p.numel() for p in cls.parameters()) == 16 * 10 * 16 + 2 * 10


def test_variant_initialisations_follow_their_sources():
    torch.manual_seed(0)
    off = L.ConvMatrixCapsules(8, out_types=16, variant="official")
    assert off.weight.std().item() == pytest.approx(0.3 * 0.88, rel=0.05)  # truncated at 2 std
    assert off.weight.abs().max() <= 0.6 and off.weight.mean().abs() < 0.01
    assert (off.beta_a == 0.5).all() and (off.beta_u == 0.5).all()
    assert off.inverse_temperatures == pytest.approx(L.authors_inverse_temperatures(3))
    off_cls = L.ClassMatrixCapsules(16, num_classes=10, variant="official")
    assert off_cls.weight.abs().max() <= 0.02
    assert (off_cls.beta_a == 1.0).all() and (off_cls.beta_u == 2.0).all()
    assert off_cls.inverse_temperatures == pytest.approx(L.authors_inverse_temperatures(3, 0.0025))
    ibm = L.ConvMatrixCapsules(8, out_types=16, variant="gritzman")
    assert ibm.weight.std().item() == pytest.approx(0.88, rel=0.05)
    assert (ibm.beta_a <= 0).all() and (ibm.beta_a >= -2000).all() and ibm.beta_a.mean() < -500
    assert ibm.beta_u.abs().max() <= (6 / 17) ** 0.5 and ibm.beta_u.abs().sum() > 0
    prim = L.PrimaryMatrixCapsules(64, out_types=8, variant="official")
    assert (prim.activation.bias == -1.0).all() and prim.activation.weight.std() > 2.0
    with pytest.raises(ValueError, match="variant must be one of"):
        L.ConvMatrixCapsules(8, out_types=4, variant="offical")
    with torch.no_grad():  # init_std overrides the variant's std
        assert (
            L.ConvMatrixCapsules(8, out_types=4, variant="official", init_std=0.01)
            .weight.abs()
            .max()
            <= 0.02
        )


# --------------------------------------------------------------------------- checkpoint


def _layer_case(kind):
    torch.manual_seed(0)
    if kind == "dense":
        layer = L.DenseCapsules(12, in_dim=4, out_caps=3, out_dim=5, iterations=3, dtype=DT)
        return layer, (rand(2, 12, 4, seed=1).requires_grad_(),)
    poses = rand(2, 5, 5, 2, 16, seed=2, scale=0.5).requires_grad_()
    acts = torch.rand(2, 5, 5, 2, dtype=DT).requires_grad_()
    if kind == "conv":
        layer = L.ConvMatrixCapsules(
            2, out_types=3, kernel_size=3, stride=1, iterations=3, dtype=DT
        )
    else:
        layer = L.ClassMatrixCapsules(2, num_classes=4, iterations=3, dtype=DT)
    return layer, (poses, acts)


@pytest.mark.parametrize("kind", ["dense", "conv", "class"])
def test_checkpoint_gives_the_same_outputs_and_gradients(kind):
    results = []
    for checkpoint in (False, True):
        layer, inputs = _layer_case(kind)
        layer.checkpoint = checkpoint
        out = layer(*inputs)
        out = out if isinstance(out, tuple) else (out,)
        loss = sum((o * torch.linspace(-1, 1, o.numel(), dtype=DT).view_as(o)).sum() for o in out)
        grads = torch.autograd.grad(loss, [*inputs, *layer.parameters()])
        results.append((*out, *grads))
        assert f"checkpoint={checkpoint}" in repr(layer)
    for x, y in zip(*results, strict=True):
        torch.testing.assert_close(x, y)


def test_checkpointed_model_trains_like_the_plain_one():
    from capsnet import models

    x, y = torch.rand(2, 1, 28, 28), torch.tensor([1, 3])
    grads = []
    for checkpoint in (False, True):
        torch.manual_seed(0)
        model = models.create("matrix_capsnet", preset="small", checkpoint=checkpoint)
        CF.spread_loss(model(x).scores, y, 0.2).backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------- routing hooks


def _hooked(layer, *inputs):
    calls = []
    handle = layer.register_routing_hook(lambda module, call: calls.append((module, call)))
    out = layer(*inputs)
    handle.remove()
    return out, calls


def test_routing_hook_sees_dynamic_routing_and_changes_nothing():
    layer = L.DenseCapsules(6, in_dim=8, out_caps=3, out_dim=4).double()
    u = torch.randn(2, 6, 8, dtype=torch.float64)
    plain = layer(u)
    out, calls = _hooked(layer, u)
    torch.testing.assert_close(out, plain)
    assert len(calls) == 1 and calls[0][0] is layer
    call = calls[0][1]
    assert call.kind == "dynamic" and call.iterations == 3
    torch.testing.assert_close(call.arguments["u_hat"], layer.predictions(u))
    torch.testing.assert_close(call.outputs[0], plain)
    assert layer(u).shape == plain.shape and not layer.has_routing_hooks  # removed


@pytest.mark.parametrize("routing", ["faithful", "per_position"])
def test_routing_hook_on_conv_matrix_capsules_records_the_votes(routing):
    layer = L.ConvMatrixCapsules(2, out_types=3, kernel_size=3, stride=1, routing=routing)
    layer = layer.double()
    poses = torch.randn(2, 4, 5, 2, 16, dtype=torch.float64)
    acts = torch.rand(2, 4, 5, 2, dtype=torch.float64)
    plain = layer(poses, acts)
    out, calls = _hooked(layer, poses, acts)
    for x, y in zip(out, plain, strict=True):
        torch.testing.assert_close(x, y)
    ((_, call),) = calls
    assert call.kind == ("conv_em" if routing == "faithful" else "em")
    votes, _, _ = layer.votes(poses, acts)
    torch.testing.assert_close(call.arguments["votes"], votes)
    # The recorded arguments repeat the call.
    fn = CF.conv_em_routing if routing == "faithful" else CF.em_routing
    again = fn(**call.arguments)
    torch.testing.assert_close(again[1], call.outputs[1])


def test_routing_hook_on_class_capsules_and_bad_hook():
    layer = L.ClassMatrixCapsules(2, num_classes=4, iterations=2).double()
    poses = torch.randn(3, 2, 2, 2, 16, dtype=torch.float64)
    acts = torch.rand(3, 2, 2, 2, dtype=torch.float64)
    out, calls = _hooked(layer, poses, acts)
    assert calls[0][1].kind == "em" and calls[0][1].arguments["votes"].shape == (3, 8, 4, 16)
    torch.testing.assert_close(calls[0][1].outputs[1], out[1])
    with pytest.raises(TypeError, match="callable"):
        layer.register_routing_hook("not a function")


def test_old_positional_and_renamed_arguments_warn_but_work():
    with pytest.warns(DeprecationWarning, match="by position"):
        old = L.ConvMatrixCapsules(2, 3, 3, 2)
    assert (old.out_types, old.kernel_size, old.stride) == (3, 3, 2)
    with pytest.warns(DeprecationWarning, match="num_caps"):
        dec = L.CapsuleDecoder(num_caps=4, caps_dim=8, output_shape=(1, 4, 4))
    assert (dec.num_classes, dec.pose_dim, dec.num_caps) == (4, 8, 4)
    with pytest.raises(TypeError, match="both 'num_caps'"):
        L.CapsuleDecoder(4, num_caps=4, pose_dim=8, output_shape=(1, 4, 4))
    with pytest.raises(TypeError, match="positional arguments at most"):
        L.ClassMatrixCapsules(2, 4, 2, None, True)


# --------------------------------------------------------------------------- routing registry


def test_a_new_routing_algorithm_is_one_function_and_one_registry_entry():
    from capsnet.functional import algorithms

    def uniform(votes, activations=None, *, iterations=1):
        """Every child split evenly over the parents: poses are the mean vote."""
        assignments = votes.new_full(votes.shape[:-1], 1.0 / votes.shape[-2])
        poses = votes.mean(dim=-3)
        return CF.RoutingResult(poses, poses.norm(dim=-1), assignments)

    CF.register_routing("uniform_test", summary="test only")(uniform)
    try:
        assert "uniform_test" in CF.list_routings()
        layer = L.DenseCapsules(5, in_dim=4, out_caps=3, out_dim=6, routing="uniform_test")
        u = torch.randn(2, 5, 4)
        v, c = layer(u, return_couplings=True)
        torch.testing.assert_close(v, layer.predictions(u).mean(dim=1))
        torch.testing.assert_close(c, torch.full((2, 5, 3), 1 / 3))
        _, calls = _hooked(layer, u)
        assert calls[0][1].kind == "uniform_test"
    finally:
        algorithms._REGISTRY.pop("uniform_test")
    with pytest.raises(ValueError, match="routing must be one of 'dynamic', 'em'"):
        L.DenseCapsules(5, in_dim=4, out_caps=3, out_dim=6, routing="uniform_test")


def test_registered_algorithms_match_the_functions():
    votes, acts = torch.randn(2, 6, 3, 16), torch.rand(2, 6)
    em = CF.get_routing("em").function(votes, acts, iterations=2, beta_u=0.1, beta_a=-0.1)
    for x, y in zip(em, CF.em_routing(votes, acts, 0.1, -0.1, 2), strict=True):
        torch.testing.assert_close(x, y)
    v, lengths, c = CF.get_routing("dynamic").function(votes, None, iterations=3)
    v2, c2 = CF.dynamic_routing(votes, 3)
    torch.testing.assert_close(v, v2)
    torch.testing.assert_close(c, c2)
    torch.testing.assert_close(lengths, L.capsule_lengths(v2))
