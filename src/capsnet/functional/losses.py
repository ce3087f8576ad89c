"""The papers' losses: margin loss [S17], spread loss [H18], reconstruction loss [S17].

Pure functions of scores and targets with a ``reduction`` argument. Choosing a training
objective by name, and the weights that combine these terms, is :mod:`capsnet.objectives`;
the spread-loss margin schedule is :func:`capsnet.schedules.spread_margin`.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from capsnet.functional._common import check_float, check_ndim, reduce, targets_to_float
from capsnet.schedules import spread_margin  # re-exported: the schedule lives with the lr one

__all__ = ["margin_loss", "spread_loss", "spread_margin", "reconstruction_loss"]


def margin_loss(
    lengths: Tensor,
    targets: Tensor,
    m_plus: float = 0.9,
    m_minus: float = 0.1,
    lambda_: float = 0.5,
    reduction: str = "mean",
) -> Tensor:
    """Margin loss, [S17] eq. (4) (docs/spec.md §1), on raw capsule lengths (no softmax).

    ``L = sum_k T_k max(0, m+ - |v_k|)^2 + lambda (1 - T_k) max(0, |v_k| - m-)^2``.

    Note: the official code multiplies this by a further 0.5; we follow the paper.

    Args:
        lengths: class capsule lengths ``|v_k|``.
        targets: integer classes ``(B,)`` or a float one-hot / multi-hot ``(B, K)``
            (MultiMNIST has two present classes).
        m_plus, m_minus, lambda_: the paper's 0.9, 0.1, 0.5.
        reduction: ``"mean"`` (batch mean of per-example sums), ``"sum"`` or ``"none"``.

    Shape:
        - lengths: ``(B, K)``; targets: ``(B,)`` or ``(B, K)``.
        - output: scalar, or ``(B,)`` with ``reduction="none"``.
    """
    check_float("lengths", lengths)
    check_ndim("lengths", lengths, 2, "(B, num_classes)")
    t = targets_to_float(targets, lengths.shape[-1], lengths)
    present = t * F.relu(m_plus - lengths).pow(2)
    absent = lambda_ * (1.0 - t) * F.relu(lengths - m_minus).pow(2)
    return reduce((present + absent).sum(-1), reduction)


def spread_loss(
    activations: Tensor, targets: Tensor, margin: float, reduction: str = "mean"
) -> Tensor:
    """Spread loss, [H18] eq. (3) (docs/spec.md §2).

    ``L = sum_{i != t} max(0, m - (a_t - a_i))^2`` for target class t.

    Args:
        activations: class capsule activations ``a``.
        targets: integer classes ``(B,)``.
        margin: m; the trainer grows it from 0.2 to 0.9 (see :func:`spread_margin`).
        reduction: ``"mean"`` (batch mean of per-example sums), ``"sum"`` or ``"none"``.

    Shape:
        - activations: ``(B, K)``; targets: ``(B,)``.
        - output: scalar, or ``(B,)`` with ``reduction="none"``.
    """
    check_float("activations", activations)
    check_ndim("activations", activations, 2, "(B, num_classes)")
    t = targets_to_float(targets, activations.shape[-1], activations)
    a_target = (activations * t).sum(-1, keepdim=True)  # (B, 1)
    per_class = F.relu(margin - (a_target - activations)).pow(2) * (1.0 - t)
    return reduce(per_class.sum(-1), reduction)


def reconstruction_loss(recon: Tensor, images: Tensor, reduction: str = "mean") -> Tensor:
    """Sum of squared pixel differences per image, [S17] §4.1 (docs/spec.md §1).

    Note: the paper scales this by 0.0005 when adding it to the margin loss; that weight
    belongs to the training objective and is applied by the caller, not here.

    Args:
        recon: decoder output, flat or image-shaped.
        images: the inputs; same number of elements per example as ``recon``.
        reduction: ``"mean"`` (batch mean of per-image sums), ``"sum"`` or ``"none"``.

    Shape:
        - recon: ``(B, C*H*W)`` or ``(B, C, H, W)``; images: ``(B, C, H, W)`` or flat.
        - output: scalar, or ``(B,)`` with ``reduction="none"``.
    """
    check_float("recon", recon)
    check_float("images", images)
    if recon.shape[0] != images.shape[0] or recon[0].numel() != images[0].numel():
        raise ValueError(
            f"recon and images must hold the same batch and pixels per example, got "
            f"{tuple(recon.shape)} and {tuple(images.shape)}"
        )
    diff = recon.reshape(recon.shape[0], -1) - images.reshape(images.shape[0], -1)
    return reduce(diff.pow(2).sum(-1), reduction)
