"""Argument checks and dtype rules shared by every file of :mod:`capsnet.functional`.

Errors name the argument and give the expected against the actual value, as everywhere in
capsnet (ValueError for a wrong value or shape, TypeError for a wrong type).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

LOG_2PI = math.log(2.0 * math.pi)


def check_float(name: str, x: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def check_ndim(name: str, x: Tensor, min_ndim: int, expected: str) -> None:
    if x.ndim < min_ndim:
        raise ValueError(
            f"{name} must have shape {expected} (at least {min_ndim} dims), "
            f"got shape {tuple(x.shape)}"
        )


def compute_dtype(x: Tensor) -> torch.dtype:
    """Routing statistics are accumulated in at least float32.

    Note: under bfloat16/float16 autocast the votes arrive in half precision; sums of
    squares and log-densities over hundreds of children lose too much in 8 mantissa bits,
    so routing upcasts (one copy) and returns results in the input dtype.
    """
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def reduce(loss: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"reduction must be one of 'mean', 'sum', 'none', got {reduction!r}")


def targets_to_float(targets: Tensor, num_classes: int, scores: Tensor) -> Tensor:
    """Integer class targets ``(B,)`` -> one-hot ``(B, K)``; float ``(B, K)`` passes through."""
    if not isinstance(targets, Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if targets.is_floating_point():
        if targets.shape != scores.shape:
            raise ValueError(
                f"float targets must be one-hot/multi-hot of shape {tuple(scores.shape)}, "
                f"got {tuple(targets.shape)}"
            )
        return targets.to(scores.dtype)
    if targets.dtype == torch.bool:
        raise TypeError("targets must be integer class indices or a float one-hot tensor")
    if targets.shape != scores.shape[:1]:
        raise ValueError(
            f"integer targets must have shape (B,) = ({scores.shape[0]},), "
            f"got {tuple(targets.shape)}"
        )
    if targets.numel() and (targets.min() < 0 or targets.max() >= num_classes):
        raise ValueError(f"targets must lie in [0, {num_classes}), got {targets.tolist()}")
    return F.one_hot(targets.long(), num_classes).to(scores.dtype)


def check_iterations(iterations: object) -> int:
    """``iterations`` must be an int >= 1 (a bool is refused: ``True`` is not a count)."""
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be an int >= 1, got {iterations!r}")
    return iterations
