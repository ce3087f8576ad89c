"""capsnet.objectives: the losses chosen by name for training, evaluation and attacks."""

import pytest
import torch

from capsnet import attacks, objectives, train
from capsnet import functional as F
from capsnet.models import ModelOutput


def _output(n=5, k=10):
    torch.manual_seed(0)
    scores = torch.rand(n, k)
    labels = torch.randint(0, k, (n,))
    images = torch.rand(n, 1, 4, 4)
    recon = torch.rand(n, 1, 4, 4)
    return ModelOutput(scores, torch.zeros(n, k, 16), recon), images, labels


def test_class_loss_by_name():
    out, _, labels = _output()
    s = out.scores
    assert torch.allclose(objectives.class_loss("margin", s, labels), F.margin_loss(s, labels))
    assert torch.allclose(
        objectives.class_loss("spread", s, labels, margin=0.4), F.spread_loss(s, labels, 0.4)
    )
    assert torch.allclose(
        objectives.class_loss("cross_entropy", s, labels, reduction="none"),
        torch.nn.functional.cross_entropy(s, labels, reduction="none"),
    )
    assert objectives.class_loss("margin", s, labels, reduction="none").shape == (5,)


@pytest.mark.parametrize("name", ["hinge", "auto", "Margin", None])
def test_unknown_loss_lists_the_valid_ones(name):
    out, _, labels = _output()
    with pytest.raises(ValueError, match="loss must be one of 'margin', 'spread', 'cross_entropy'"):
        objectives.class_loss(name, out.scores, labels)


def test_compute_loss_matches_the_papers():
    out, images, labels = _output()
    scores, recon = out.scores, out.reconstructions
    expected = (
        F.margin_loss(scores, labels) + 0.0005 * ((recon - images) ** 2).sum((1, 2, 3)).mean()
    )
    assert torch.allclose(objectives.compute_loss("margin", out, images, labels), expected)
    no_recon = out._replace(reconstructions=None)
    assert torch.allclose(
        objectives.compute_loss("margin", no_recon, images, labels), F.margin_loss(scores, labels)
    )
    # The reconstruction term belongs to the margin objective only.
    assert torch.allclose(
        objectives.compute_loss("spread", out, images, labels, margin=0.4),
        F.spread_loss(scores, labels, 0.4),
    )
    assert torch.allclose(
        objectives.compute_loss("cross_entropy", out, images, labels),
        torch.nn.functional.cross_entropy(scores, labels),
    )
    with pytest.raises(ValueError, match="margin"):
        objectives.compute_loss("hinge", out, images, labels)
    assert train.compute_loss is objectives.compute_loss  # the old import keeps working


def test_attack_loss_is_the_class_loss_per_example():
    out, _, labels = _output()
    for name in attacks.ATTACK_LOSSES:
        assert torch.equal(
            attacks.attack_loss(out.scores, labels, name, spread_margin=0.7),
            objectives.class_loss(name, out.scores, labels, margin=0.7, reduction="none"),
        )
    assert set(attacks.ATTACK_LOSSES) == set(objectives.LOSSES)
    assert attacks.ATTACK_LOSSES[0] == "cross_entropy"  # the default


def test_resolve_loss():
    assert objectives.resolve_loss("spread", "capsnet") == "spread"
    assert objectives.resolve_loss("auto", "capsnet") == "margin"
    assert objectives.resolve_loss("model", "matrix_capsnet") == "spread"
    assert objectives.resolve_loss("auto", "sabour_cnn") == "cross_entropy"
    with pytest.raises(ValueError, match="registry name"):
        objectives.resolve_loss("model")
    with pytest.raises(ValueError, match="'auto', 'model'"):
        objectives.resolve_loss("hinge", "capsnet")
