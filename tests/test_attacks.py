"""capsnet.attacks: FGSM / BIM on tiny models, budgets, monotonicity, gradient path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from capsnet import attacks
from capsnet.models import ModelOutput, create

pytestmark = pytest.mark.usefixtures("one_thread")


class Linear(nn.Module):
    """A linear classifier on 1x6x6 images that returns ModelOutput."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.fc = nn.Linear(36, num_classes)

    def forward(self, images, targets=None):
        feats = images.flatten(1)
        return ModelOutput(self.fc(feats), feats, None)


class TinyMLP(nn.Module):
    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(36, 32), nn.Tanh(), nn.Linear(32, 3))

    def forward(self, images, targets=None):
        return ModelOutput(self.net(images), images.flatten(1), None)


class Saturated(nn.Module):
    """Capsule-like scores that satisfy every margin: margin loss 0 with zero gradient."""

    def forward(self, images, targets=None):
        x = images.flatten(1)[:, :3]
        lengths = 0.95 * torch.nn.functional.one_hot(torch.zeros(len(x), dtype=torch.long), 3)
        return ModelOutput(lengths + 0.01 * torch.tanh(x), x, None)


def toy_data(n: int = 96, seed: int = 0):
    """Three classes: a bright row, column or diagonal on a mid-grey 6x6 image in [0.3, 0.7]."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    images = 0.45 + 0.05 * torch.rand(n, 1, 6, 6, generator=g)
    pattern = torch.zeros(3, 6, 6)
    pattern[0, 2, :] = pattern[1, :, 3] = 0.2
    pattern[2] = 0.2 * torch.eye(6)
    images = images + pattern[labels].unsqueeze(1)
    return images.clamp(0.3, 0.7), labels


def trained(model: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    images, labels = toy_data(seed=seed + 1)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    for _ in range(100):
        opt.zero_grad()
        nn.functional.cross_entropy(model(images).scores, labels).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def linear():
    return trained(Linear())


@pytest.fixture(scope="module")
def mlp():
    return trained(TinyMLP())


def accuracy(model, images, labels):
    with torch.no_grad():
        return float((model(images).scores.argmax(-1) == labels).float().mean())


def test_toy_models_are_trained(linear, mlp):
    images, labels = toy_data()
    assert accuracy(linear, images, labels) == 1.0
    assert accuracy(mlp, images, labels) == 1.0


@pytest.mark.parametrize("attack", [attacks.fgsm, attacks.bim])
@pytest.mark.parametrize("targeted", [False, True])
def test_epsilon_zero_changes_nothing(linear, attack, targeted):
    images, labels = toy_data()
    targets = (labels + 1) % 3 if targeted else None
    adv = attack(linear, images, labels, 0.0, targets=targets)
    assert torch.equal(adv, images)


@pytest.mark.parametrize("attack", [attacks.fgsm, attacks.bim])
@pytest.mark.parametrize("targeted", [False, True])
def test_perturbation_respects_ball_and_pixel_range(mlp, attack, targeted):
    images, labels = toy_data()
    images[:, :, 0, 0] = 0.0  # pixels on the range boundary must stay inside
    images[:, :, 5, 5] = 1.0
    targets = (labels + 2) % 3 if targeted else None
    for eps in (0.01, 0.1, 0.5):
        adv = attack(mlp, images, labels, eps, targets=targets)
        assert adv.shape == images.shape and not adv.requires_grad
        assert float((adv - images).abs().max()) <= eps + 1e-6
        assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
        assert float((adv - images).abs().max()) > 0.5 * eps  # the attack moved the pixels


def test_fgsm_is_the_sign_step(linear):
    """Untargeted FGSM on a linear model moves each pixel by eps * sign(w_y - E_p[w])."""
    images, labels = toy_data(12)
    eps = 0.05
    adv = attacks.fgsm(linear, images, labels, eps)
    x = images.flatten(1).requires_grad_(True)
    loss = nn.functional.cross_entropy(linear.fc(x), labels, reduction="sum")
    (grad,) = torch.autograd.grad(loss, x)
    assert torch.allclose(adv.flatten(1), images.flatten(1) + eps * grad.sign())


@pytest.mark.parametrize("model_name", ["linear", "mlp"])
@pytest.mark.parametrize("method", ["fgsm", "bim"])
def test_larger_epsilon_never_increases_accuracy(request, model_name, method):
    model = request.getfixturevalue(model_name)
    images, labels = toy_data(96, seed=3)
    epsilons = [0.0, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2]
    out = attacks.evaluate_attack(
        model, [(images, labels)], num_classes=3, epsilons=epsilons, method=method
    )
    acc = out["accuracy"]
    assert acc[0] == out["clean_accuracy"] == 1.0
    assert all(b <= a for a, b in zip(acc, acc[1:], strict=False)), acc
    assert acc[-1] < 0.5  # and the attack really works
    assert out["success_rate"][-1] == pytest.approx(1.0 - acc[-1])
    assert all(m <= e + 1e-6 for m, e in zip(out["mean_linf"], epsilons, strict=True))


def test_targeted_attack_reaches_targets(mlp):
    images, labels = toy_data(60, seed=4)
    out = attacks.evaluate_attack(
        mlp,
        [(images[:30], labels[:30]), (images[30:], labels[30:])],
        num_classes=3,
        epsilons=[0.0, 0.05, 0.3],
        method="bim",
        targeted=True,
    )
    assert out["success_rate"][0] == 0.0  # clean images are classified correctly
    assert out["success_rate"][-1] > 0.9
    assert out["num_examples"] == 60


def test_random_targets_differ_from_labels():
    labels = torch.arange(200) % 5
    t = attacks.random_targets(labels, 5, torch.Generator().manual_seed(0))
    assert (t != labels).all() and t.min() >= 0 and t.max() < 5
    assert len(set(t[labels == 0].tolist())) == 4  # all other classes occur


def test_flat_margin_loss_is_reported_not_hidden():
    """A saturated margin loss gives sign(0) = 0: FGSM does nothing, and the result says so."""
    images, labels = toy_data(9)
    labels = torch.zeros_like(labels)
    model = Saturated()
    margin = attacks.evaluate_attack(
        model, [(images, labels)], num_classes=3, epsilons=[0.1], loss="margin"
    )
    assert margin["zero_gradient_fraction"] == 1.0
    assert margin["mean_linf"] == [0.0]
    ce = attacks.evaluate_attack(model, [(images, labels)], num_classes=3, epsilons=[0.1])
    assert ce["zero_gradient_fraction"] == 0.0


def test_gradient_flows_through_dynamic_routing():
    torch.manual_seed(0)
    model = create("capsnet", conv_channels=8, primary_types=2, reconstruction=False).eval()
    images = torch.rand(2, 1, 28, 28)
    labels = torch.tensor([1, 2])
    adv = attacks.fgsm(model, images, labels, 0.1, loss="margin")
    moved = (adv - images).abs().flatten(1).amax(1)
    assert (moved > 0).all()
    detached = create(
        "capsnet", conv_channels=8, primary_types=2, reconstruction=False, detach_inner=True
    )
    with pytest.raises(ValueError, match="detach_inner"):
        attacks.evaluate_attack(detached, [(images, labels)], num_classes=10, epsilons=[0.1])


def test_preprocess_is_differentiated(linear):
    """Attacks live in stored-image space; the model sees preprocess(x)."""
    images, labels = toy_data(12)
    small = images[:, :, 1:5, 1:5]

    def pad(x):
        return nn.functional.pad(x, (1, 1, 1, 1), value=0.5)

    adv = attacks.fgsm(linear, small, labels, 0.1, preprocess=pad)
    assert adv.shape == small.shape
    assert float((adv - small).abs().max()) == pytest.approx(0.1)


def test_bad_inputs(linear):
    images, labels = toy_data(4)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        attacks.fgsm(linear, images * 3, labels, 0.1)
    with pytest.raises(ValueError, match="epsilon"):
        attacks.fgsm(linear, images, labels, 2.0)
    with pytest.raises(ValueError, match="labels"):
        attacks.fgsm(linear, images, labels[:2], 0.1)
    with pytest.raises(ValueError, match="method"):
        attacks.evaluate_attack(linear, [], num_classes=3, epsilons=[0.1], method="pgd")
    with pytest.raises(ValueError, match="loss"):
        attacks.attack_loss(torch.rand(2, 3), torch.tensor([0, 1]), "hinge")
    with pytest.raises(ValueError, match="steps"):
        attacks.bim(linear, images, labels, 0.1, steps=0)
    with pytest.raises(ValueError, match="no examples"):
        attacks.evaluate_attack(linear, [], num_classes=3, epsilons=[0.1])


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("capsnet", dict(conv_channels=4, primary_types=2, primary_dim=4, class_dim=4,
                         reconstruction=False)),
        ("matrix_capsnet", dict(A=4, B=2, C=2, D=2)),
    ],
)  # fmt: skip
def test_attack_gradient_is_the_true_gradient_through_routing(name, kwargs):
    """Directional derivatives of the attack loss match central finite differences (float64):
    the input gradient the attacks follow is exact, routing iterations included."""
    torch.manual_seed(0)
    model = create(name, input_size=17, dtype=torch.float64, **kwargs).eval()
    x = torch.rand(2, 1, 17, 17, dtype=torch.float64)
    y = torch.tensor([3, 7])
    for loss in ("cross_entropy", "margin" if name == "capsnet" else "spread"):
        grad, _ = attacks._input_gradient(model, x, y, loss, None, 0.9)

        def f(z, loss=loss):
            with torch.no_grad():
                return float(attacks.attack_loss(model(z).scores, y, loss).sum())

        for seed in range(3):
            v = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=x.dtype)
            h = 1e-6
            numeric = (f(x + h * v) - f(x - h * v)) / (2 * h)
            assert float((grad * v).sum()) == pytest.approx(numeric, rel=1e-5, abs=1e-9)
