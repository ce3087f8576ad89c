"""Training and attack objectives: the one place a loss is chosen by name.

* :func:`class_loss` picks the classification loss by name: ``"margin"`` ([S17] eq. 4),
  ``"spread"`` ([H18] eq. 3) or ``"cross_entropy"`` (the CNN baselines). The trainer, the
  evaluation and the adversarial attacks all go through it.
* :func:`compute_loss` is the training objective: :func:`class_loss` plus, for the margin
  loss, the weighted reconstruction term ([S17] §4.1).
* :func:`two_digit_loss` is the MultiMNIST objective ([S17] §6).
* :func:`resolve_loss` turns ``"auto"`` / ``"model"`` into a model's paper loss.

The schedules that feed these (the spread margin, the learning rate) live in
:mod:`capsnet.schedules`.

Letters: B batch, K classes.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as TF
from torch import Tensor, nn

from capsnet import functional as F
from capsnet._checks import check_choice

__all__ = ["LOSSES", "class_loss", "compute_loss", "two_digit_loss", "resolve_loss"]

LOSSES = ("margin", "spread", "cross_entropy")
"""The loss names :func:`class_loss` accepts."""


def class_loss(
    name: str, scores: Tensor, targets: Tensor, *, margin: float = 0.9, reduction: str = "mean"
) -> Tensor:
    """The classification loss ``name`` of ``scores``.

    Args:
        name: ``"margin"`` (scores are capsule lengths), ``"spread"`` (activations; uses
            ``margin``) or ``"cross_entropy"`` (softmax cross-entropy on the scores, for
            logits or, in attacks, any scores).
        scores: class scores.
        targets: integer classes, or (margin loss) multi-hot ``(B, K)`` targets.
        margin: the spread-loss margin m (the end of its schedule, 0.9, at test time).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Shape:
        - scores: ``(B, K)``; targets: ``(B,)`` or ``(B, K)``.
        - output: scalar, or ``(B,)`` with ``reduction="none"``.

    Raises:
        ValueError: an unknown ``name`` (the message lists :data:`LOSSES`).
    """
    check_choice("loss", name, LOSSES)
    if name == "margin":
        return F.margin_loss(scores, targets, reduction=reduction)
    if name == "spread":
        return F.spread_loss(scores, targets, margin, reduction=reduction)
    return TF.cross_entropy(scores, targets, reduction=reduction)


def compute_loss(
    kind: str,
    output: Any,
    images: Tensor,
    labels: Tensor,
    *,
    margin: float = 0.9,
    reconstruction_weight: float = 0.0005,
    reduction: str = "mean",
) -> Tensor:
    """The training objective of ``kind`` (``"margin"``, ``"spread"``, ``"cross_entropy"``).

    ``margin`` adds ``reconstruction_weight`` x the reconstruction loss when the model
    returns reconstructions ([S17] §4.1); ``spread`` uses ``margin`` ([H18] §3.1). Losses
    are computed in float32 (also under bf16 autocast).

    Args:
        kind: the loss name (see :func:`class_loss`).
        output: the model's :class:`capsnet.models.ModelOutput` (``scores``,
            ``reconstructions``).
        images: the model's input (the reconstruction target).
        labels: classes, or multi-hot targets.
        margin, reduction: as in :func:`class_loss`.
        reconstruction_weight: weight of the reconstruction term (margin loss only).

    Shape:
        - images: ``(B, C, H, W)``; labels: ``(B,)`` or ``(B, K)``.
        - output: scalar, or ``(B,)`` with ``reduction="none"``.
    """
    loss = class_loss(kind, output.scores.float(), labels, margin=margin, reduction=reduction)
    if kind == "margin" and output.reconstructions is not None and reconstruction_weight > 0:
        recon = F.reconstruction_loss(
            output.reconstructions.float(), images.float(), reduction=reduction
        )
        loss = loss + reconstruction_weight * recon
    return loss


def two_digit_loss(
    model: nn.Module,
    output: Any,
    labels: Tensor,
    labels2: Tensor,
    components: Tensor,
    *,
    reconstruction_weight: float = 0.0005,
) -> Tensor:
    """MultiMNIST objective ([S17] §6): the margin loss with both digits present, plus
    each digit reconstructed from its own class capsule and compared with that digit alone.

    Shape: labels, labels2 ``(B,)``; components ``(B, 2, C, H, W)`` in [0, 1] (the two
    digits of each image, first with ``labels``).
    """
    scores = output.scores.float()
    k = scores.shape[-1]
    targets = (TF.one_hot(labels, k) + TF.one_hot(labels2, k)).clamp(max=1).float()
    loss = class_loss("margin", scores, targets)
    if output.reconstructions is not None and reconstruction_weight > 0:
        # nn.Module.__getattr__ is typed Tensor | Module, so mypy sees a maybe-Tensor
        second = model.reconstruct(output.poses, labels2)  # type: ignore[operator]
        recon = F.reconstruction_loss(output.reconstructions.float(), components[:, 0])
        recon = recon + F.reconstruction_loss(second.float(), components[:, 1])
        loss = loss + reconstruction_weight * recon
    return loss


def resolve_loss(name: str, model_name: str | None = None) -> str:
    """A loss name from :data:`LOSSES`: ``name`` itself, or for ``"auto"`` / ``"model"``
    the paper loss of the registered model ``model_name``
    (``capsnet.models.model_info(model_name).loss``)."""
    if name in ("auto", "model"):
        if model_name is None:
            raise ValueError(f"loss {name!r} needs the model's registry name")
        from capsnet.models import model_info

        return model_info(model_name).loss
    return check_choice("loss", name, (*LOSSES, "auto", "model"))
