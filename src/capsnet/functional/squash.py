"""``squash``, the vector capsule non-linearity of [S17] eq. (1) (docs/spec.md §1)."""

from __future__ import annotations

import torch
from torch import Tensor

from capsnet.functional._common import check_float, compute_dtype

__all__ = ["squash"]


def squash(s: Tensor, dim: int = -1, eps: float = 1e-8) -> Tensor:
    """Squashing non-linearity, [S17] eq. (1): ``|s|^2 / (1 + |s|^2) * s / |s|``.

    Keeps the direction of ``s`` and maps its length into [0, 1). Written as
    ``s * |s| / (1 + |s|^2)`` with ``|s| = sqrt(sum s^2 + eps)`` so the zero vector maps to
    zero with a finite gradient (no 0/0).

    Args:
        s: input vectors.
        dim: the dimension holding the vector components.
        eps: added under the square root; keeps the gradient at ``s = 0`` finite.

    Shape:
        - s: ``(..., D, ...)`` with the vector along ``dim``.
        - output: same as ``s``.
    """
    check_float("s", s)
    compute = compute_dtype(s)
    sf = s.to(compute)
    squared_norm = sf.pow(2).sum(dim=dim, keepdim=True)
    scale = torch.sqrt(squared_norm + eps) / (1.0 + squared_norm)
    return (sf * scale).to(s.dtype)
