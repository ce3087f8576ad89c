"""Coordinate addition of the class capsule layer, [H18] §3 (docs/spec.md §2)."""

from __future__ import annotations

import torch
from torch import Tensor

from capsnet.functional._common import check_float, check_ndim

__all__ = ["coordinate_addition"]


def coordinate_addition(
    votes: Tensor, height: int, width: int, elements: tuple[int, int] = (0, 1)
) -> Tensor:
    """Coordinate addition, [H18] §3 (docs/spec.md §2 convention).

    For a child capsule at grid position (row, col) of an ``height x width`` grid, adds
    ``(row + 0.5) / height`` to vote element ``elements[0]`` and ``(col + 0.5) / width`` to
    element ``elements[1]``. Returns a new tensor.

    Note:
        docs/spec.md §2 (our contract) names the first two entries of the flattened 4x4 vote,
        ``elements=(0, 1)``, the default. [H18]'s text says "the first two elements of the
        right-hand column of its vote matrix", which for a row-major 4x4 matrix are
        ``elements=(3, 7)``. Only the position of the two numbers differs; both give the
        class capsules the same information.

    Args:
        votes: votes of the class capsule layer; the child axis enumerates
            ``(row, col, type)`` in row-major order, i.e. ``I = height * width * types``.
        height, width: the child capsule grid; any (also rectangular) size.
        elements: which two entries of the flattened vote get the row and the column.

    Shape:
        - votes: ``(..., I, O, D)``; output: same.
    """
    check_float("votes", votes)
    check_ndim("votes", votes, 3, "(..., in_caps, out_caps, pose_dim)")
    in_caps, pose_dim = votes.shape[-3], votes.shape[-1]
    if height < 1 or width < 1 or in_caps % (height * width):
        raise ValueError(
            f"votes.shape[-3] (in_caps = {in_caps}) must be height*width*types for "
            f"height={height}, width={width}"
        )
    row_el, col_el = elements
    if not (0 <= row_el < pose_dim and 0 <= col_el < pose_dim and row_el != col_el):
        raise ValueError(
            f"elements must be two different indices into the pose (size {pose_dim}), "
            f"got {tuple(elements)}"
        )
    types = in_caps // (height * width)
    rows = (torch.arange(height, device=votes.device, dtype=votes.dtype) + 0.5) / height
    cols = (torch.arange(width, device=votes.device, dtype=votes.dtype) + 0.5) / width
    offset = votes.new_zeros(height, width, types, pose_dim)
    offset[..., row_el] = rows[:, None, None]
    offset[..., col_el] = cols[None, :, None]
    return votes + offset.reshape(in_caps, 1, pose_dim)
