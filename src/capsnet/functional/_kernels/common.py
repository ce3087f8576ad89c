"""Helpers shared by the routing kernels: layout, autocast, batched products, squash backward."""

from __future__ import annotations

import torch
from torch import Tensor


def parent_major(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``(..., I, O, D)`` -> contiguous ``(G, O, I, D)`` in ``dtype`` (one copy at most)."""
    xt = x.transpose(-3, -2)
    if xt.dtype != dtype or not xt.is_contiguous():
        xt = xt.to(dtype=dtype, memory_format=torch.contiguous_format, copy=True)
    return xt.reshape(-1, *xt.shape[-3:])


def no_autocast(x: Tensor) -> torch.autocast:
    """Routing runs in its compute dtype (float32 for half inputs) even under autocast."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def matvec(x: Tensor, y: Tensor) -> Tensor:
    """Batched matrix-vector product ``x (N, I, D) @ y (N, D)`` -> ``(N, 1, I)``.

    Written as ``y^T x^T`` (a row vector times a transposed matrix): for the small, many
    matrices of routing the BLAS kernel for that form is 2-3x faster on CPU than
    ``bmm(x, y[..., None])`` (benchmarks/RESULTS.md); the result has the same memory layout.
    """
    return torch.bmm(y.unsqueeze(1), x.transpose(1, 2))


def needs_grad(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def squash_backward(s: Tensor, grad_v: Tensor, eps: float = 1e-8) -> Tensor:
    """Gradient of :func:`squash` (last dim) at ``s``.

    ``v = s f(n)`` with ``n = |s|^2``, ``f(n) = sqrt(n + eps) / (1 + n)``, so
    ``dL/ds = f grad_v + 2 s (grad_v . s) f'(n)``.
    """
    n = s.pow(2).sum(-1, keepdim=True)
    root = torch.sqrt(n + eps)
    f = root / (1.0 + n)
    df = (0.5 / root - f) / (1.0 + n)  # f'(n) = (1/(2 root) - root/(1+n)) / (1+n)
    return f * grad_v + 2.0 * df * (grad_v * s).sum(-1, keepdim=True) * s
