"""The geometry of a capsule convolution: which children each parent position reads.

Shared by the public functions, the fast kernels and the reference (so it sits below all
three). A valid (unpadded) convolution over a ``H x W`` grid of child capsules with ``T``
types per position: parent position ``p`` (row-major over ``H_out x W_out``) reads the
``K*K*T`` children of its receptive field, ordered ``(kh, kw, t)``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["conv_children_index", "ConvGeometry", "gather_children"]


def conv_children_index(
    in_size: tuple[int, int], kernel_size: int, stride: int, device: torch.device | None = None
) -> Tensor:
    """Which input position each (parent position, kernel offset) reads, for a valid conv.

    Returns a long tensor ``(P, K*K)`` holding ``row * W_in + col`` of the input position
    read by parent position ``p`` (row-major over the ``H_out x W_out`` output grid) at
    kernel offset ``(kh, kw)`` (row-major), with ``H_out = (H_in - K) // stride + 1``.
    """
    h_in, w_in = in_size
    h_out = (h_in - kernel_size) // stride + 1
    w_out = (w_in - kernel_size) // stride + 1
    if h_out < 1 or w_out < 1:
        raise ValueError(
            f"input grid {h_in}x{w_in} is smaller than the kernel {kernel_size}x{kernel_size}"
        )
    rows = torch.arange(h_out, device=device) * stride
    cols = torch.arange(w_out, device=device) * stride
    k = torch.arange(kernel_size, device=device)
    r = rows[:, None, None, None] + k[None, None, :, None]  # (Ho, 1, K, 1)
    c = cols[None, :, None, None] + k[None, None, None, :]  # (1, Wo, 1, K)
    return (r * w_in + c).reshape(h_out * w_out, kernel_size * kernel_size)


class ConvGeometry(NamedTuple):
    """Which child capsule fills each (parent position, slot) of a capsule convolution.

    ``child_id (N, P*S)`` holds the flat id ``input position * T + input type`` of the child
    in slot ``s = (kh, kw, t)`` of parent position ``p``; ``S = K*K*T``.
    """

    child_id: Tensor
    num_children: int
    batch: int
    positions: int
    slots: int

    @staticmethod
    def create(
        index: Tensor,
        in_types: int,
        in_size: tuple[int, int],
        batch: int,
        out_types: int | None = None,
    ) -> ConvGeometry:
        """The geometry of ``index (P, K*K)`` (:func:`conv_children_index`).

        With ``out_types`` each (child, parent type) pair counts as a separate "child" and
        the slots are ``(o, s)`` pairs, ``o`` major: sums then run over the positions of
        one parent type (the official code's normalisation, em_variants ``"per_type"``).
        """
        positions, kk = index.shape
        child_id = index[:, :, None] * in_types + torch.arange(in_types, device=index.device)
        num_children = in_size[0] * in_size[1] * in_types
        slots = kk * in_types
        if out_types is not None:  # (P, O, S): id = child * O + o
            child_id = child_id.reshape(positions, 1, slots) * out_types
            child_id = child_id + torch.arange(out_types, device=index.device).view(1, -1, 1)
            num_children, slots = num_children * out_types, slots * out_types
        child_id = child_id.reshape(1, positions * slots).expand(batch, -1)
        return ConvGeometry(child_id, num_children, batch, positions, slots)

    def child_sum(self, x: Tensor) -> Tensor:
        """Sum over all slots of the same child, broadcast back to the slots: (N, P, S)."""
        flat = x.reshape(self.batch, self.positions * self.slots)
        total = flat.new_zeros(self.batch, self.num_children).scatter_add_(1, self.child_id, flat)
        return total.gather(1, self.child_id).reshape(self.batch, self.positions, self.slots)

    def child_max(self, x: Tensor) -> Tensor:
        """Max over all slots of the same child, broadcast back to the slots: (N, P, S)."""
        flat = x.reshape(self.batch, self.positions * self.slots)
        best = flat.new_full((self.batch, self.num_children), -torch.inf)
        best = best.scatter_reduce_(1, self.child_id, flat, reduce="amax")
        return best.gather(1, self.child_id).reshape(self.batch, self.positions, self.slots)

    def fan_out(self, out_caps: int, dtype: torch.dtype) -> Tensor:
        """Number of parents (positions x types) each slot's child feeds: (N, P, S)."""
        ones = torch.ones(
            self.batch, self.positions, self.slots, dtype=dtype, device=self.child_id.device
        )
        return self.child_sum(ones) * out_caps


def gather_children(poses: Tensor, activations: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
    """Each parent position's ``K*K*T`` children (order ``(kh, kw, t)``) and activations.

    ``index (P, K*K)`` from :func:`conv_children_index`. Shape: ``poses (N, H, W, T, D)``,
    ``activations (N, H, W, T)`` -> ``(N, P, K*K*T, D)``, ``(N, P, K*K*T)``.
    """
    n, h, w, b, d = poses.shape
    positions, kk = index.shape
    flat = index.reshape(-1)
    children = poses.reshape(n, h * w, b, d).index_select(1, flat)
    child_act = activations.reshape(n, h * w, b).index_select(1, flat)
    return children.reshape(n, positions, kk * b, d), child_act.reshape(n, positions, kk * b)
