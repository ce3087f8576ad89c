"""capsnet.models: registry-wide forward/backward/param-count tests and per-model behaviour."""

from __future__ import annotations

import math

import pytest
import torch

import capsnet.functional as CF
import capsnet.models as M
from capsnet.models import ModelOutput
from capsnet.objectives import compute_loss

NAMES = ["capsnet", "hinton_cnn", "matrix_capsnet", "sabour_cnn"]

# Small variants that keep each test well under a second or two on 2 cores.
SMALL = {
    "capsnet": {"conv_channels": 16, "primary_types": 4},
    "matrix_capsnet": {"A": 16, "B": 4, "C": 4, "D": 4, "iterations": 2},
    "hinton_cnn": {},
    "sabour_cnn": {"input_size": 8},
}


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def fake_digits(n, num_classes=10, size=(28, 28), channels=1, seed=0):
    """Digit-like images: each class is a fixed set of 3 blurred strokes, shifted +-2 px.

    Returns float images ``(n, channels, H, W)`` in [0, 1] and int64 labels ``(n,)``.
    """
    h, w = size
    templates = torch.rand(num_classes, 3, 2, 2, generator=torch.Generator().manual_seed(7))
    ends = 0.2 + 0.6 * templates  # (classes, strokes, endpoint, xy) in relative coordinates
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % num_classes
    shift = torch.randint(-2, 3, (n, 1, 1, 2), generator=g).float()
    yy, xx = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    pix = torch.stack([yy, xx], -1)  # (H, W, 2)
    scale = torch.tensor([h - 1.0, w - 1.0])
    a = ends[labels, :, 0] * scale  # (n, strokes, 2)
    b = ends[labels, :, 1] * scale
    a, b = a[:, :, None, None] + shift[:, None], b[:, :, None, None] + shift[:, None]
    ab = b - a
    t = (((pix - a) * ab).sum(-1) / ab.pow(2).sum(-1).clamp_min(1e-6)).clamp(0, 1)
    dist2 = (pix - (a + t[..., None] * ab)).pow(2).sum(-1)  # (n, strokes, H, W)
    img = torch.exp(-dist2 / (2 * (0.05 * min(h, w)) ** 2)).sum(1).clamp(0, 1)
    img = (img + 0.05 * torch.rand(img.shape, generator=g)).clamp(0, 1)
    return img[:, None].expand(n, channels, h, w).contiguous(), labels


def make(name, **kwargs):
    torch.manual_seed(0)
    return M.create(name, **{**SMALL[name], **kwargs})


def inputs(model, batch=2, seed=0):
    info_size = model.input_size
    return fake_digits(batch, model.num_classes, info_size, model.in_channels, seed)


def loss_for(name, out, images, labels):
    """The model's paper objective, chosen by name as the trainer chooses it."""
    return compute_loss(M.model_info(name).loss, out, images, labels, margin=0.2)


pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- registry


def test_registry_lists_models_with_metadata():
    assert M.list_models() == NAMES
    for name in NAMES:
        info = M.model_info(name)
        assert info.name == name and info.paper and info.expected_params
        assert info.loss in ("margin", "spread", "cross_entropy")
    assert M.model_info("capsnet").loss == "margin"
    assert M.model_info("matrix_capsnet").loss == "spread"
    assert M.model_info("Matrix-CapsNet").name == "matrix_capsnet"


def test_unknown_model_lists_available_models():
    with pytest.raises(ValueError, match="capsnet.*hinton_cnn.*matrix_capsnet.*sabour_cnn"):
        M.create("capsnett")
    with pytest.raises(ValueError, match="Did you mean 'capsnet'"):
        M.create("capsnett")
    with pytest.raises(TypeError):
        M.create("capsnet", no_such_option=1)


def test_create_ignores_none_and_accepts_json_sizes():
    model = M.create("capsnet", num_classes=None, input_size=[28, 28], **SMALL["capsnet"])
    assert model.num_classes == 10 and model.input_size == (28, 28)


# --------------------------------------------------------------------------- parameter counts


@pytest.mark.parametrize("name", NAMES)
def test_default_parameter_count_matches_registry(name):
    assert num_params(M.create(name)) == M.model_info(name).expected_params


def test_parameter_counts_match_spec_arithmetic():
    # docs/spec.md §1: 20,992 + 5,308,672 + 1,474,560 (+ 1,411,344 decoder).
    assert M.model_info("capsnet").expected_params == 8_215_568
    assert num_params(M.create("capsnet", reconstruction=False)) == 6_804_224
    assert M.model_info("capsnet").extra["expected_params_without_decoder"] == 6_804_224
    # docs/spec.md §2: about 310K (paper preset, smallNORB's 5 classes) and about 68K (small).
    paper = M.create("matrix_capsnet", preset="paper", num_classes=5, input_size=32)
    assert (
        num_params(paper) == M.model_info("matrix_capsnet").extra["expected_params_paper_smallnorb"]
    )
    assert num_params(paper) == 316_394
    assert num_params(M.create("matrix_capsnet", preset="small")) == 68_444
    # Explicit letters override the preset.
    custom = M.create("matrix_capsnet", preset="paper", A=64, B=8, C=16, D=16)
    assert num_params(custom) == 68_444
    assert round(num_params(M.create("sabour_cnn")) / 1e6, 1) == 35.4
    assert round(num_params(M.create("hinton_cnn")) / 1e6, 1) == 4.3  # docs/spec.md §2.10


# --------------------------------------------------------------------------- forward / backward


@pytest.mark.parametrize("name", NAMES)
def test_forward_backward_outputs(name):
    model = make(name)
    images, labels = inputs(model)
    out = model(images, labels)
    assert isinstance(out, ModelOutput)
    assert out.scores.shape == (2, model.num_classes)
    assert out.poses.shape[0] == 2
    if name in ("capsnet", "matrix_capsnet"):
        assert out.poses.shape == (2, model.num_classes, 16)
        assert ((out.scores >= 0) & (out.scores <= 1)).all()
    if name == "capsnet":
        assert out.reconstructions.shape == images.shape
        assert ((out.reconstructions >= 0) & (out.reconstructions <= 1)).all()
    else:
        assert out.reconstructions is None
    loss = loss_for(name, out, images, labels)
    loss.backward()
    assert torch.isfinite(loss)
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname


@pytest.mark.parametrize("name", NAMES)
def test_forward_does_not_change_the_model(name):
    model = make(name).eval()
    images, labels = inputs(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    attrs = dict(vars(model))
    first = model(images, labels)
    second = model(images, labels)
    torch.testing.assert_close(first.scores, second.scores)
    assert dict(vars(model)).keys() == attrs.keys()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k])


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("capsnet", {"input_size": 36}),  # MultiMNIST
        ("capsnet", {"input_size": 40}),  # affNIST / shifted MNIST
        ("capsnet", {"input_size": 32, "in_channels": 3}),  # CIFAR-10
        ("capsnet", {"input_size": (28, 34), "reconstruction": False}),
        ("matrix_capsnet", {"input_size": 32, "num_classes": 5}),  # smallNORB
        ("matrix_capsnet", {"input_size": (28, 40), "in_channels": 2}),
        ("matrix_capsnet", {"input_size": 17}),  # the smallest the kernels allow
        ("hinton_cnn", {"input_size": (28, 36), "in_channels": 2}),
        ("sabour_cnn", {"input_size": (10, 14), "in_channels": 3}),
    ],
)
def test_other_input_sizes(name, kwargs):
    model = make(name, **kwargs)
    images, labels = inputs(model)
    out = model(images, labels)
    assert out.scores.shape == (2, model.num_classes)
    assert torch.isfinite(out.scores).all()
    if out.reconstructions is not None:
        assert out.reconstructions.shape == images.shape


def test_capsnet_primary_capsule_count_follows_input_size():
    assert make("capsnet").digits.in_caps == 6 * 6 * 4
    assert M.create("capsnet").digits.in_caps == 1152
    assert make("capsnet", input_size=40).digits.in_caps == 12 * 12 * 4
    assert make("capsnet", input_size=(28, 34)).digits.in_caps == 6 * 9 * 4


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_autocast_is_finite(name):
    model = make(name)
    images, labels = inputs(model, batch=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images, labels)
        loss = loss_for(name, out, images, labels)
    loss.float().backward()
    for tensor in (out.scores, out.poses, out.reconstructions):
        if tensor is not None:
            assert torch.isfinite(tensor.float()).all()
    for pname, p in model.named_parameters():
        assert torch.isfinite(p.grad).all(), pname


@pytest.mark.parametrize(
    "name, lr, steps",
    [("capsnet", 3e-3, 20), ("matrix_capsnet", 1e-2, 30), ("hinton_cnn", 1e-3, 10),
     ("sabour_cnn", 1e-3, 12)],
)  # fmt: skip
def test_overfits_a_tiny_batch(name, lr, steps):
    model = make(name, dropout=0.0) if name.endswith("_cnn") else make(name)
    images, labels = fake_digits(10, model.num_classes, model.input_size, model.in_channels)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        out = model(images, labels)
        loss = loss_for(name, out, images, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.5 * losses[0], losses


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("name", NAMES)
def test_wrong_input_raises(name):
    model = make(name)
    c, (h, w) = model.in_channels, model.input_size
    expected = rf"\(B, {c}, {h}, {w}\)"
    with pytest.raises(ValueError, match=expected):
        model(torch.rand(2, c, h + 1, w))
    with pytest.raises(ValueError, match=expected):
        model(torch.rand(2, c + 1, h, w))
    with pytest.raises(ValueError, match=expected):
        model(torch.rand(c, h, w))
    with pytest.raises(TypeError, match="floating"):
        model(torch.zeros(2, c, h, w, dtype=torch.uint8))
    with pytest.raises(TypeError, match="Tensor"):
        model([[0.0]])
    images = torch.rand(2, c, h, w)
    with pytest.raises(TypeError, match="int"):
        model(images, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"\(B,\) = \(2,\)"):
        model(images, torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match=rf"\[0, {model.num_classes}\)"):
        model(images, torch.tensor([0, model.num_classes]))


@pytest.mark.parametrize(
    "name, kwargs, match",
    [
        ("capsnet", {"input_size": 16}, "at least 17"),
        ("capsnet", {"input_size": (28, 28, 1)}, "input_size"),
        ("capsnet", {"num_classes": 0}, "num_classes"),
        ("matrix_capsnet", {"input_size": 16}, "at least 17"),
        ("matrix_capsnet", {"preset": "large"}, "small"),
        ("matrix_capsnet", {"routing": "local"}, "faithful"),
        ("matrix_capsnet", {"iterations": 2, "inverse_temperatures": [1.0]}, "per iteration"),
        ("hinton_cnn", {"input_size": 3}, "at least 4"),
    ],
)
def test_bad_constructor_arguments(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        M.create(name, **kwargs)


# --------------------------------------------------------------------------- CapsNet


def test_capsnet_decoder_masks_with_targets_else_longest():
    model = make("capsnet")
    images, _ = inputs(model, batch=3)
    out = model(images)
    predicted = out.scores.argmax(-1)
    torch.testing.assert_close(model(images, predicted).reconstructions, out.reconstructions)
    other = (predicted + 1) % model.num_classes
    assert not torch.equal(model(images, other).reconstructions, out.reconstructions)
    torch.testing.assert_close(model.reconstruct(out.poses, other), model(images, other)[2])
    assert make("capsnet", reconstruction=False)(images).reconstructions is None


def test_capsnet_options_reach_the_layers():
    model = make("capsnet", iterations=1, detach_inner=True, primary_dim=4, class_dim=8)
    assert model.digits.iterations == 1 and model.digits.detach_inner
    assert model.digits.in_dim == 4 and model.digits.out_dim == 8
    out = model(inputs(model)[0])
    assert out.poses.shape == (2, 10, 8)


# --------------------------------------------------------------------------- matrix capsnet


def test_matrix_capsnet_presets_and_options():
    paper = M.create("matrix_capsnet", preset="paper")
    assert (paper.conv1.out_channels, paper.primary.out_types) == (32, 32)
    assert (paper.conv_caps1.out_types, paper.conv_caps2.out_types) == (32, 32)
    small = M.create("matrix_capsnet")
    assert (small.conv1.out_channels, small.primary.out_types) == (64, 8)
    assert (small.conv_caps1.out_types, small.conv_caps2.out_types) == (16, 16)
    assert small.conv_caps1.routing == "faithful"  # the default, as in the official code
    assert small.grid_sizes == [(12, 12), (5, 5), (3, 3)]
    model = make(
        "matrix_capsnet",
        iterations=3,
        inverse_temperatures=[0.1, 0.2, 0.3],
        routing="per_position",
        normalize_cost=False,
        coordinate_addition=False,
    )
    for layer in (model.conv_caps1, model.conv_caps2, model.class_caps):
        assert layer.inverse_temperatures == (0.1, 0.2, 0.3)
        assert layer.iterations == 3 and not layer.normalize_cost
    assert model.conv_caps1.routing == model.conv_caps2.routing == "per_position"
    assert not model.class_caps.coordinate_addition


def test_matrix_capsnet_routing_forms_differ():
    images, _ = fake_digits(2)
    faithful = make("matrix_capsnet")
    per_position = make("matrix_capsnet", routing="per_position")
    per_position.load_state_dict(faithful.state_dict())
    assert not torch.allclose(faithful(images).scores, per_position(images).scores)


def test_matrix_capsnet_activation_conv_gets_gradient():
    """Primary activations weight the M-step, so their conv must receive a real gradient."""
    torch.manual_seed(0)
    model = M.create("matrix_capsnet")  # default settings, small preset
    images, labels = fake_digits(8)
    out = model(images)
    CF.spread_loss(out.scores, labels, margin=0.2).backward()
    act_grad = model.primary.activation.weight.grad.norm()
    pose_grad = model.primary.pose.weight.grad.norm()
    assert torch.isfinite(act_grad) and torch.isfinite(pose_grad)
    assert act_grad > 1e-3 * pose_grad > 0, (act_grad, pose_grad)
    # Class activations are not saturated at initialisation (a logistic, not a softmax).
    assert 0.01 < out.scores.mean() < 0.99
    assert not torch.allclose(out.scores.sum(-1), torch.ones(8))


def test_matrix_capsnet_default_lambda_schedule_and_why():
    from capsnet.layers import DEFAULT_EM_VARIANT, EM_LAYER_VARIANTS
    from capsnet.models.matrix_capsnet import authors_inverse_temperatures

    assert authors_inverse_temperatures(3) == pytest.approx([0.0005, 0.000975, 0.00142625])
    model = M.create("matrix_capsnet")
    assert model.variant == DEFAULT_EM_VARIANT and model.iterations == 3
    lv = EM_LAYER_VARIANTS[DEFAULT_EM_VARIANT]
    for layer in (model.conv_caps1, model.conv_caps2):
        assert layer.iterations == 3 and layer.variant == DEFAULT_EM_VARIANT
        assert layer.inverse_temperatures == pytest.approx(
            authors_inverse_temperatures(3, lv.final_lambda)
        )
        assert not layer.normalize_cost
    assert model.class_caps.inverse_temperatures == pytest.approx(
        authors_inverse_temperatures(3, lv.final_lambda * lv.class_lambda_factor)
    )
    # Why small lambdas (see MatrixCapsNet's Note): with the paper's cost and lambda 1 -> 3
    # the logistic saturates at initialisation and nothing below the class layer gets a
    # gradient.
    torch.manual_seed(0)
    saturated = M.create(
        "matrix_capsnet", iterations=3, variant="paper",
        inverse_temperatures=CF.default_inverse_temperatures(3),
    )  # fmt: skip
    images, labels = fake_digits(4)
    out = saturated(images)
    CF.spread_loss(out.scores, labels, margin=0.2).backward()
    assert (out.scores > 0.999).all()
    assert saturated.primary.pose.weight.grad.abs().max() < 1e-6


def test_matrix_capsnet_final_lambda_replaces_the_variants_in_every_layer():
    from capsnet.layers import EM_LAYER_VARIANTS
    from capsnet.models.matrix_capsnet import authors_inverse_temperatures

    model = M.create("matrix_capsnet", final_lambda=0.004, iterations=3)
    for layer in (model.conv_caps1, model.conv_caps2):
        assert layer.inverse_temperatures == pytest.approx([0.0002, 0.00039, 0.0005705])
    factor = EM_LAYER_VARIANTS[model.variant].class_lambda_factor
    assert factor == 0.25  # the class layer keeps its variant's factor
    assert model.class_caps.inverse_temperatures == pytest.approx(
        authors_inverse_temperatures(3, 0.004 * factor)
    )
    # The same model as the default when the value is the variant's own.
    torch.manual_seed(0)
    same = M.create("matrix_capsnet", final_lambda=EM_LAYER_VARIANTS[model.variant].final_lambda)
    torch.manual_seed(0)
    default = M.create("matrix_capsnet")
    images, _ = fake_digits(2)
    assert torch.equal(same(images).scores, default(images).scores)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="final_lambda must be a finite number > 0"):
            M.create("matrix_capsnet", final_lambda=bad)
    with pytest.raises(ValueError, match="not both"):
        M.create("matrix_capsnet", final_lambda=0.01, inverse_temperatures=[0.1, 0.2, 0.3])


def _fresh_gradient_norms(variant, iterations=3, seed=0):
    from capsnet import probes

    torch.manual_seed(seed)
    model = M.create("matrix_capsnet", variant=variant, iterations=iterations)
    images, labels = fake_digits(16, seed=seed)
    CF.spread_loss(model(images).scores, labels, margin=0.2).backward()
    return probes.em_gradient_norms(model)


@pytest.mark.parametrize("iterations", [2, 3])
def test_matrix_capsnet_default_variant_activation_path_is_alive(iterations):
    """On a fresh model of the default variant, every EM layer's activation-path gradient
    (beta_a) is within two orders of magnitude of its pose-path gradient (W, beta_u)."""
    from capsnet.layers import DEFAULT_EM_VARIANT

    norms = _fresh_gradient_norms(DEFAULT_EM_VARIANT, iterations)
    for layer in ("conv_caps1", "conv_caps2", "class_caps"):
        ratio = norms[layer]["grad_activation"] / norms[layer]["grad_pose"]
        assert 1e-2 <= ratio <= 1e2, (layer, norms[layer])


def test_matrix_capsnet_paper_variant_activation_path_is_off():
    """The diagnosis the variants fix: with the paper's maths and lambda ~ 1e-3, beta_a's
    gradient is 3-4 orders of magnitude below the pose path's."""
    norms = _fresh_gradient_norms("paper")
    for layer in ("conv_caps1", "conv_caps2", "class_caps"):
        assert norms[layer]["grad_activation"] < 1e-2 * norms[layer]["grad_pose"], layer


@pytest.mark.parametrize("variant", ["paper", "official", "gritzman", "capsnet"])
def test_matrix_capsnet_variants_finite_under_degenerate_inputs_and_bfloat16(variant):
    torch.manual_seed(0)
    model = M.create("matrix_capsnet", variant=variant, A=16, B=4, C=4, D=4, iterations=3)
    images, labels = fake_digits(3)
    cases = {
        "zeros": torch.zeros_like(images),
        "ones": torch.ones_like(images),
        "huge": images * 1e4,
        "constant": torch.full_like(images, 0.5),
    }
    for name, x in cases.items():
        for bf16 in (False, True):
            model.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = model(x)
                loss = CF.spread_loss(out.scores.float(), labels, margin=0.2)
            loss.backward()
            assert torch.isfinite(out.scores.float()).all(), (name, bf16)
            assert torch.isfinite(out.poses.float()).all(), (name, bf16)
            for pname, p in model.named_parameters():
                assert torch.isfinite(p.grad).all(), (name, bf16, pname)


def test_matrix_capsnet_variant_reaches_every_layer_and_legacy_kwargs():
    model = M.create("matrix_capsnet", variant="official")
    layers = (model.primary, model.conv_caps1, model.conv_caps2, model.class_caps)
    assert all(layer.variant == "official" for layer in layers)
    assert M.legacy_kwargs("matrix_capsnet") == {"variant": "paper", "iterations": 2}
    assert M.restore_kwargs("matrix_capsnet", {"iterations": 3}) == {
        "variant": "paper", "iterations": 3,
    }  # fmt: skip
    assert M.record_kwargs("matrix_capsnet", {}, model) == {"variant": "official", "iterations": 3}
    assert M.legacy_kwargs("capsnet") == {}
    with pytest.raises(ValueError, match="variant must be one of"):
        M.create("matrix_capsnet", variant="ibm")


@pytest.mark.parametrize("name", ["capsnet", "matrix_capsnet", "sabour_cnn", "hinton_cnn"])
def test_empty_batch(name):
    """A batch of 0 images (e.g. the last shard of a tiny split) gives (0, classes) scores."""
    model = M.create(name, num_classes=10, in_channels=1, input_size=28)
    images = torch.rand(0, 1, 28, 28, requires_grad=True)
    out = model(images)
    assert out.scores.shape == (0, 10)
    out.scores.sum().backward()
