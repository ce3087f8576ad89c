"""Capsule layouts and argument checks shared by the capsule layers.

Capsule layouts (the only places that reorder dimensions are the helpers here):

* A **capsule grid** is ``poses (B, H, W, T, D)`` with ``activations (B, H, W, T)``; matrix
  capsule layers take and return grids.
* A **feature map** ``(B, T*D, H, W)`` holds a grid as NCHW channels: channel
  ``t * D + d`` at position ``(h, w)`` is component ``d`` of the capsule of type ``t`` at
  ``(h, w)`` (:func:`capsules_from_feature_map`). A capsule is built from the channels of one
  position, never from neighbouring pixels of one channel.
* A **flat** capsule list ``(B, I, D)`` enumerates the grid row-major over ``(h, w, t)``
  (:func:`flatten_capsules`), the order :func:`capsnet.functional.coordinate_addition`
  expects.
* A **receptive-field** layout ``(B, P, K*K*T, D)`` lists, for each parent position (row-major
  over the output grid), its ``K*K*T`` children ordered ``(kh, kw, t)``
  (:func:`unfold_capsules`), the order :func:`capsnet.functional.conv_em_routing` expects.
"""

from __future__ import annotations

import math

import torch
import torch.utils.checkpoint
from torch import Tensor

from capsnet.functional.geometry import conv_children_index, gather_children

__all__ = [
    "capsules_from_feature_map",
    "flatten_capsules",
    "unfold_capsules",
    "conv_output_size",
    "capsule_lengths",
    "check_tensor",
    "check_class_targets",
    "positive_int",
    "maybe_checkpoint",
]


def check_tensor(name: str, x: Tensor, ndim: int, expected: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must have shape {expected}, got {tuple(x.shape)}")


def positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def conv_output_size(size: int, kernel_size: int, stride: int = 1, padding: int = 0) -> int:
    """Output length of a convolution along one axis: ``(size + 2p - K) // stride + 1``."""
    return (size + 2 * padding - kernel_size) // stride + 1


# --------------------------------------------------------------------------- layouts


def capsules_from_feature_map(x: Tensor, pose_dim: int) -> Tensor:
    """NCHW feature map -> capsule grid: channels ``t*D .. t*D + D-1`` of one position.

    Args:
        x: a feature map whose channels hold ``T`` capsule types of ``pose_dim`` values.
        pose_dim: D, the values per capsule (1 for activation maps).

    Shape:
        - x: ``(B, T*D, H, W)``.
        - output: ``(B, H, W, T, D)`` (a view when possible).
    """
    b, c, h, w = x.shape
    if c % pose_dim:
        raise ValueError(f"channels ({c}) must be a multiple of pose_dim ({pose_dim})")
    # (B, T, D, H, W) -> (B, H, W, T, D): move the grid axes in front of (type, component).
    return x.reshape(b, c // pose_dim, pose_dim, h, w).permute(0, 3, 4, 1, 2)


def flatten_capsules(grid: Tensor) -> Tensor:
    """Capsule grid -> flat list enumerated row-major over ``(h, w, t)``.

    Shape:
        - grid: ``(B, H, W, T, D)`` (or activations ``(B, H, W, T)``).
        - output: ``(B, H*W*T, D)`` (or ``(B, H*W*T)``).
    """
    children = math.prod(grid.shape[1:4])  # explicit: also for an empty batch
    if grid.ndim == 5:
        return grid.reshape(grid.shape[0], children, grid.shape[-1])
    return grid.reshape(grid.shape[0], children)


def unfold_capsules(
    poses: Tensor, activations: Tensor, kernel_size: int, stride: int
) -> tuple[Tensor, Tensor, tuple[int, int]]:
    """Gather each parent position's ``K*K*T`` children of a valid capsule convolution.

    Children are ordered ``(kh, kw, t)`` and parent positions row-major over the output grid,
    as :func:`capsnet.functional.conv_em_routing` and
    :func:`capsnet.functional.conv_children_index` define them.

    Returns:
        ``(poses, activations, (H_out, W_out))`` in the receptive-field layout.

    Shape:
        - poses: ``(B, H, W, T, D)``; activations: ``(B, H, W, T)``.
        - output poses: ``(B, P, K*K*T, D)``; output activations: ``(B, P, K*K*T)``,
          ``P = H_out * W_out``, ``H_out = (H - K) // stride + 1``.
    """
    h, w = poses.shape[1:3]
    index = conv_children_index((h, w), kernel_size, stride, device=poses.device)  # (P, KK)
    out_poses, out_act = gather_children(poses, activations, index)
    out_size = (conv_output_size(h, kernel_size, stride), conv_output_size(w, kernel_size, stride))
    return out_poses, out_act, out_size


def capsule_lengths(poses: Tensor, eps: float = 1e-9) -> Tensor:
    """Euclidean length of capsule vectors, computed in at least float32.

    ``eps`` under the square root keeps the gradient finite at the zero vector.

    Shape:
        - poses: ``(..., D)``; output: ``(...)``.
    """
    p = poses.float() if poses.dtype in (torch.float16, torch.bfloat16) else poses
    return p.pow(2).sum(-1).add(eps).sqrt()


def maybe_checkpoint(enabled: bool, fn, *args: Tensor, **kwargs):
    """``fn(*args, **kwargs)``, recomputed in the backward pass when ``enabled`` (and grad).

    The memory-saving option of the capsule layers: nothing of the layer's votes or
    routing is kept for the backward pass but its inputs; the forward pass runs twice.
    """
    if enabled and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, **kwargs)
    return fn(*args, **kwargs)


def check_class_targets(targets: Tensor, batch: int, num_classes: int) -> None:
    """Integer class targets ``(B,)`` with values in ``[0, num_classes)``."""
    if not isinstance(targets, Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise TypeError(f"targets must be an integer tensor (int64), got dtype {targets.dtype}")
    if targets.shape != (batch,):
        raise ValueError(f"targets must have shape (B,) = ({batch},), got {tuple(targets.shape)}")
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= num_classes):
        raise ValueError(
            f"targets must lie in [0, {num_classes}), got min {int(targets.min())}, "
            f"max {int(targets.max())}"
        )
