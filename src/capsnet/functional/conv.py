"""Convolutional matrix-capsule layers, [H18] §3-4: votes and their EM routing.

:func:`conv_capsule_votes` computes the votes of a capsule convolution (to look at them);
:func:`conv_matrix_capsules` computes votes and routing in one pass without storing the
votes (what the layers train with). Letters as in :mod:`capsnet.functional.routing`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from capsnet.functional._common import check_float, compute_dtype
from capsnet.functional._kernels.common import needs_grad
from capsnet.functional._kernels.conv import ConvCapsulesEM, conv_capsules_forward
from capsnet.functional._kernels.em import make_em_config
from capsnet.functional.em_variants import EMVariant, resolve_em_variant
from capsnet.functional.geometry import ConvGeometry, conv_children_index, gather_children
from capsnet.functional.routing import resolve_inverse_temperatures

__all__ = ["ROUTING_MODES", "conv_capsule_votes", "conv_matrix_capsules"]


def _check_conv_capsule_inputs(
    poses: Tensor, activations: Tensor, weight: Tensor, kernel_size: int, stride: int
) -> None:
    check_float("poses", poses)
    check_float("activations", activations)
    check_float("weight", weight)
    if poses.ndim != 5 or poses.shape[-1] != 16:
        raise ValueError(
            f"poses must have shape (N, H, W, T, 16) (4x4 pose matrices), got {tuple(poses.shape)}"
        )
    if activations.shape != poses.shape[:-1]:
        raise ValueError(
            f"activations must have shape {tuple(poses.shape[:-1])} (poses.shape[:-1] = "
            f"(N, H, W, T)), got {tuple(activations.shape)}"
        )
    if not (isinstance(kernel_size, int) and kernel_size >= 1):
        raise ValueError(f"kernel_size must be an int >= 1, got {kernel_size!r}")
    if not (isinstance(stride, int) and stride >= 1):
        raise ValueError(f"stride must be an int >= 1, got {stride!r}")
    expected = (kernel_size * kernel_size, poses.shape[3])
    if weight.ndim != 5 or tuple(weight.shape[:2]) != expected or weight.shape[3:] != (4, 4):
        raise ValueError(
            f"weight must have shape (K*K, T, O, 4, 4) = ({expected[0]}, {expected[1]}, O, 4, 4) "
            f"for kernel_size={kernel_size} and T={poses.shape[3]} input types, "
            f"got {tuple(weight.shape)}"
        )


def conv_capsule_votes(
    poses: Tensor, activations: Tensor, weight: Tensor, kernel_size: int, stride: int
) -> tuple[Tensor, Tensor]:
    """Votes ``V = M W`` of a convolutional matrix-capsule layer, [H18] §3.

    Every parent position (a valid, unpadded capsule convolution) reads the ``K*K*T``
    children of its receptive field, ordered ``(kh, kw, t)``; each child's 4x4 pose ``M``
    is multiplied by the transformation matrix ``W`` of its (kernel offset, type) and each
    output type, shared across positions. The result is in the layout
    :func:`conv_em_routing` takes. :func:`conv_matrix_capsules` computes the same votes
    chunk by chunk inside the routing without storing them; use this function to look at
    them.

    Returns:
        ``(votes, child_activations)``.

    Shape:
        - poses: ``(N, H, W, T, 16)``; activations: ``(N, H, W, T)``;
          weight: ``(K*K, T, O, 4, 4)``.
        - votes: ``(N, P, K*K*T, O, 16)`` (a transposed view of parent-major memory
          ``(N, P, O, K*K*T, 16)``, which the routing kernels use without a copy);
          child_activations: ``(N, P, K*K*T)``; ``P = H_out * W_out``.
    """
    _check_conv_capsule_inputs(poses, activations, weight, kernel_size, stride)
    n, h, w, b, _ = poses.shape
    index = conv_children_index((h, w), kernel_size, stride, device=poses.device)  # (P, KK)
    positions, kk = index.shape
    children, child_act = gather_children(poses, activations, index)
    children = children.reshape(n, positions, kk, b, 4, 4)
    out_types = weight.shape[2]
    votes = torch.einsum("npkbxy,kboyz->npokbxz", children, weight)
    votes = votes.reshape(n, positions, out_types, kk * b, 16).transpose(2, 3)
    return votes, child_act


ROUTING_MODES = ("faithful", "per_position")


def conv_matrix_capsules(
    poses: Tensor,
    activations: Tensor,
    weight: Tensor,
    beta_u: Tensor | float,
    beta_a: Tensor | float,
    *,
    kernel_size: int,
    stride: int,
    iterations: int = 3,
    inverse_temperatures: Sequence[float] | None = None,
    routing: str = "faithful",
    variant: str | EMVariant = "paper",
    normalize_cost: bool = False,
    var_floor: float | None = None,
    eps: float | None = None,
) -> tuple[Tensor, Tensor]:
    """A convolutional matrix-capsule layer, [H18] §3-4: votes and EM routing in one pass.

    The same function as :func:`conv_capsule_votes` followed by :func:`conv_em_routing`
    (``routing="faithful"``: each child normalised over every parent it feeds) or
    :func:`em_routing` on each receptive field (``routing="per_position"``), computed
    without ever storing the votes: on the CPU the examples are routed in chunks that fit
    in the caches, each chunk's votes are computed, routed and dropped, and the backward
    pass recomputes them. The vote tensor (``K*K*T*O*16`` numbers per parent position) is
    by far the largest tensor of a matrix-capsule network; not keeping it makes training
    faster and several times leaner (benchmarks/RESULTS.md). The results agree with the
    two-step form to float rounding (tests/functional/test_functional_conv.py).

    Args:
        poses, activations: the child capsule grid.
        weight: one 4x4 transformation matrix per (kernel offset, input type, output type).
        beta_u, beta_a: broadcastable to ``(O,)``.
        kernel_size, stride: of the valid, unpadded capsule convolution.
        iterations, inverse_temperatures, variant, normalize_cost, var_floor, eps: as in
            :func:`em_routing` (``variant`` also decides how ``"faithful"`` routing
            normalises a child over parents at several positions, see
            :func:`conv_em_routing`).
        routing: ``"faithful"`` or ``"per_position"`` (see above).

    Returns:
        ``(out_poses, out_activations)``.

    Shape:
        - poses: ``(N, H, W, T, 16)``; activations: ``(N, H, W, T)``;
          weight: ``(K*K, T, O, 4, 4)``.
        - out_poses: ``(N, H_out, W_out, O, 16)``; out_activations: ``(N, H_out, W_out, O)``,
          ``H_out = (H - K) // stride + 1``.
    """
    _check_conv_capsule_inputs(poses, activations, weight, kernel_size, stride)
    if routing not in ROUTING_MODES:
        raise ValueError(f"routing must be one of {ROUTING_MODES}, got {routing!r}")
    em_variant = resolve_em_variant(variant)
    lambdas = resolve_inverse_temperatures(iterations, inverse_temperatures, em_variant)
    n, h, w, b, _ = poses.shape
    index = conv_children_index((h, w), kernel_size, stride, device=poses.device)  # (P, KK)
    positions, kk = index.shape
    h_out, w_out = (h - kernel_size) // stride + 1, (w - kernel_size) // stride + 1
    out_types = weight.shape[2]
    i = kk * b
    compute = compute_dtype(poses)
    betas = []
    for name, beta in (("beta_u", beta_u), ("beta_a", beta_a)):
        beta = torch.as_tensor(beta, device=poses.device)
        try:
            beta = torch.broadcast_to(beta.to(compute), (out_types,))
        except RuntimeError:
            raise ValueError(
                f"{name} must be broadcastable to (O,) = ({out_types},), "
                f"got shape {tuple(beta.shape)}"
            ) from None
        betas.append(beta.expand(n * positions, out_types))
    geometry = None
    if routing == "faithful":
        per_type = em_variant.conv_normalization == "per_type"
        geometry = ConvGeometry.create(index, b, (h, w), n, out_types if per_type else None)
    config = make_em_config(
        em_variant, lambdas, normalize_cost, var_floor, eps, geometry,
        in_caps=i, out_caps=out_types,
    )  # fmt: skip
    # Gather the receptive fields (small: 1/O of the votes) and lay them out for the
    # vote products: children (N*P, K*K*T, 4, 4), W as (K*K*T, 4, O*4).
    children, child_act = gather_children(poses.to(compute), activations.to(compute), index)
    children = children.reshape(n * positions, i, 4, 4)
    child_act = child_act.reshape(n * positions, i)
    w_mat = weight.to(compute).permute(0, 1, 3, 2, 4).reshape(i, 4, out_types * 4)
    if needs_grad(children, child_act, w_mat, *betas):
        mu, logit = ConvCapsulesEM.apply(children, child_act, w_mat, *betas, config)
    else:
        mu, logit, _ = conv_capsules_forward(
            children, child_act, w_mat, betas[0], betas[1], config, keep_saved=False
        )
    out = poses.dtype
    return (
        mu.reshape(n, h_out, w_out, out_types, 16).to(out),
        torch.sigmoid(logit).reshape(n, h_out, w_out, out_types).to(out),
    )
