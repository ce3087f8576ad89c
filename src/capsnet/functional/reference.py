"""The routing equations written plainly: the file to read beside the papers.

Plain autograd tensor code in the public layout ``(..., I, O, D)``, one line per equation
of [S17] Procedure 1 and [H18] Procedure 1 (docs/spec.md §1-2). Nothing here is fast and
no production path runs it: it is what the tests and benchmarks hold the fast kernels of
:mod:`capsnet.functional._kernels` against (kernels == reference == float64 loops, in
tests/functional/). No argument checks; ``lambdas`` is the resolved list of inverse
temperatures (:func:`capsnet.functional.resolve_inverse_temperatures`).

Letters as in :mod:`capsnet.functional.routing`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from capsnet.functional._common import LOG_2PI, compute_dtype
from capsnet.functional.em_variants import EM_VARIANTS, EMVariant, resolve_em_variant
from capsnet.functional.geometry import ConvGeometry, conv_children_index, gather_children
from capsnet.functional.squash import squash

__all__ = [
    "dynamic_routing",
    "m_step",
    "e_step_logits",
    "em_routing",
    "conv_em_routing",
    "conv_capsule_votes",
    "conv_matrix_capsules",
]


def dynamic_routing(
    u_hat: Tensor, iterations: int, detach_inner: bool = False
) -> tuple[Tensor, Tensor]:
    """Routing-by-agreement, [S17] Procedure 1 (docs/spec.md §1)::

        b_ij = 0
        repeat r times:
            c_i = softmax_j(b_i)                 (over the parents j)
            s_j = sum_i c_ij u_hat_j|i
            v_j = squash(s_j)
            b_ij += u_hat_j|i . v_j              (skipped after the last iteration)

    Same arguments and results as :func:`capsnet.functional.dynamic_routing`.
    """
    u_agree = u_hat.detach() if detach_inner else u_hat
    logits = u_hat.new_zeros(u_hat.shape[:-1])  # b_ij: (..., I, O)
    for t in range(iterations):
        c = torch.softmax(logits, dim=-1)  # over parents j
        last = t == iterations - 1
        u = u_hat if last else u_agree
        s = torch.einsum("...io,...iod->...od", c, u)  # (..., O, D)
        v = squash(s)
        if not last:
            logits = logits + torch.einsum("...iod,...od->...io", u_agree, v)
    return v, c


# --------------------------------------------------------------------------- EM routing


def m_step(
    votes: Tensor,
    weights: Tensor,
    beta_u: Tensor,
    beta_a: Tensor,
    inverse_temperature: float,
    normalize_cost: bool,
    var_floor: float,
    eps: float,
    variant: EMVariant = EM_VARIANTS["paper"],
    mu_prev: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """M-step of [H18] Procedure 1 for every parent j of a group (docs/spec.md §2).

    ``weights`` are ``R'_ij = R_ij * a_i``. Returns ``(mu, var, logit)`` where
    ``a_j = sigmoid(logit)``; shapes ``(..., O, D)``, ``(..., O, D)``, ``(..., O)``.
    ``variant`` scales the terms and damps the mean (:mod:`capsnet.functional.em_variants`);
    ``mu_prev`` is the previous iteration's mean (None: zeros).
    """
    n_in, n_out, dim = votes.shape[-3:]
    weight_sum = weights.sum(dim=-2)  # sum_i R'_ij: (..., O)
    denom = (weight_sum + eps).unsqueeze(-1)  # (..., O, 1)
    mu = torch.einsum("...io,...iod->...od", weights, votes) / denom
    if variant.mean_momentum:
        # Note: not in [H18]; the official code's damped centre.
        previous = torch.zeros_like(mu) if mu_prev is None else mu_prev
        mu = (1.0 - variant.mean_momentum) * mu + variant.mean_momentum * previous
    var = torch.einsum("...io,...iod->...od", weights, (votes - mu.unsqueeze(-3)).pow(2)) / denom
    # Note: a variance floor (not in the paper) keeps log(sigma) finite when all votes of
    # a parent agree exactly or a parent has a single child ([G19] pitfall 2).
    var = var + var_floor
    # cost^h = (beta_u + log sigma^h) * sum_i R'_ij; log sigma = 0.5 log var (paper).
    per_entry = variant.beta_u_scale * beta_u.unsqueeze(-1) + variant.log_var_scale * torch.log(var)
    cost = (per_entry * weight_sum.unsqueeze(-1)).sum(-1)
    if variant.mass_scale is not None:
        # Note: [G19]'s data-mass normalisation: the cost times mass_scale * O / I.
        cost = cost * (variant.mass_scale * n_out / n_in)
    if normalize_cost:
        # Note: not in [H18]. Popular implementations standardise the summed cost over the
        # parents of a group before the logistic, which keeps lambda * cost in a range
        # where the logistic is not saturated. Opt-in.
        mean = cost.mean(dim=-1, keepdim=True)
        std = (cost - mean).pow(2).mean(dim=-1, keepdim=True).add(eps).sqrt()
        cost = (cost - mean) / std
    logit = inverse_temperature * (variant.beta_a_scale * beta_a - cost)
    return mu, var, logit


def e_step_logits(votes: Tensor, mu: Tensor, var: Tensor, logit: Tensor) -> Tensor:
    """E-step numerator in log space: ``log a_j + sum_h log N(V_ij^h; mu_j^h, var_j^h)``.

    Shape: votes ``(..., I, O, D)``, mu/var ``(..., O, D)``, logit ``(..., O)`` ->
    ``(..., I, O)``.
    """
    mu_, var_ = mu.unsqueeze(-3), var.unsqueeze(-3)
    log_p = -0.5 * ((votes - mu_).pow(2) / var_).sum(-1)
    log_p = log_p - 0.5 * (torch.log(var) + LOG_2PI).sum(-1).unsqueeze(-2)
    # log a_j = logsigmoid(logit): exact, and finite where a_j underflows to 0.
    return log_p + F.logsigmoid(logit).unsqueeze(-2)


def em_routing(
    votes: Tensor,
    activations: Tensor,
    beta_u: Tensor,
    beta_a: Tensor,
    lambdas: Sequence[float],
    normalize_cost: bool = False,
    var_floor: float | None = None,
    eps: float | None = None,
    *,
    variant: str | EMVariant = "paper",
) -> tuple[Tensor, Tensor, Tensor]:
    """EM routing, [H18] Procedure 1 (docs/spec.md §2): ``R_ij = 1 / O``, then for each
    lambda an M-step (:func:`m_step`) and, except after the last, an E-step
    (:func:`e_step_logits`, a softmax over the parents j).

    Same arguments (``lambdas`` resolved) and results as
    :func:`capsnet.functional.em_routing`.
    """
    variant = resolve_em_variant(variant)
    var_floor = variant.var_floor if var_floor is None else var_floor
    eps = variant.eps if eps is None else eps
    out_dtype = votes.dtype
    compute = compute_dtype(votes)
    votes_c, act = votes.to(compute), activations.to(compute).unsqueeze(-1)  # act: (..., I, 1)
    beta_u, beta_a = beta_u.to(compute), beta_a.to(compute)

    assignments = votes_c.new_full(votes_c.shape[:-1], 1.0 / votes_c.shape[-2])  # (..., I, O)
    mu: Tensor | None = None
    for t, lam in enumerate(lambdas):
        mu, var, logit = m_step(
            votes_c, assignments * act, beta_u, beta_a, lam, normalize_cost, var_floor, eps,
            variant, mu,
        )  # fmt: skip
        if t < len(lambdas) - 1:
            log_r = e_step_logits(votes_c, mu, var, logit)
            assignments = torch.softmax(log_r, dim=-1)  # normalise over parents j
    assert mu is not None  # at least one iteration
    return mu.to(out_dtype), torch.sigmoid(logit).to(out_dtype), assignments.to(out_dtype)


def conv_em_routing(
    votes: Tensor,
    activations: Tensor,
    beta_u: Tensor,
    beta_a: Tensor,
    lambdas: Sequence[float],
    *,
    in_size: tuple[int, int],
    kernel_size: int,
    stride: int,
    variant: str | EMVariant = "paper",
    normalize_cost: bool = False,
    var_floor: float | None = None,
    eps: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """EM routing of a capsule convolution, each child normalised over all its parents.

    Same arguments (``lambdas`` resolved) and results as
    :func:`capsnet.functional.conv_em_routing`: votes ``(N, P, K*K*T, O, D)``. The E-step's
    softmax runs over every parent, at every position and of every type, that a child
    feeds; each child starts with ``R = 1 / (number of parents it feeds)``. With a
    ``"per_type"`` variant (the official code) the softmax runs over the positions of
    each parent type separately and each child starts with ``R = 1 / O``.
    """
    variant = resolve_em_variant(variant)
    var_floor = variant.var_floor if var_floor is None else var_floor
    eps = variant.eps if eps is None else eps
    per_type = variant.conv_normalization == "per_type"
    index = conv_children_index(in_size, kernel_size, stride, device=votes.device)
    types = votes.shape[2] // index.shape[1]
    geometry = ConvGeometry.create(index, types, in_size, votes.shape[0])
    out_caps = votes.shape[-2]
    out_dtype = votes.dtype
    compute = compute_dtype(votes)
    votes_c, act = votes.to(compute), activations.to(compute).unsqueeze(-1)
    beta_u, beta_a = beta_u.to(compute), beta_a.to(compute)

    if per_type:
        assignments = votes_c.new_full(votes_c.shape[:-1], 1.0 / out_caps)
    else:
        fan_out = geometry.fan_out(out_caps, compute)  # parents fed by each slot's child
        assignments = (1.0 / fan_out).unsqueeze(-1).expand(-1, -1, -1, out_caps)
    mu: Tensor | None = None
    for t, lam in enumerate(lambdas):
        mu, var, logit = m_step(
            votes_c, assignments * act, beta_u, beta_a, lam, normalize_cost, var_floor, eps,
            variant, mu,
        )  # fmt: skip
        if t < len(lambdas) - 1:
            log_r = e_step_logits(votes_c, mu, var, logit)  # (N, P, KKT, O)
            # A softmax over every parent the child feeds (per_type: over every position
            # of one parent type): subtract the child's max (a constant, so detached) for
            # stability, then normalise by the child's sum.
            if per_type:
                slots = log_r.transpose(-1, -2)  # (N, P, O, KKT): one "child" per (child, o)
                shift = torch.stack(
                    [geometry.child_max(slots[:, :, j].detach()) for j in range(out_caps)], 2
                )
                unnorm = torch.exp(slots - shift)
                total = torch.stack(
                    [geometry.child_sum(unnorm[:, :, j]) for j in range(out_caps)], 2
                )
                assignments = (unnorm / total).transpose(-1, -2)
            else:
                shift = geometry.child_max(log_r.detach().amax(dim=-1)).unsqueeze(-1)
                unnorm = torch.exp(log_r - shift)
                assignments = unnorm / geometry.child_sum(unnorm.sum(-1)).unsqueeze(-1)
    assert mu is not None  # at least one iteration
    return mu.to(out_dtype), torch.sigmoid(logit).to(out_dtype), assignments.to(out_dtype)


def conv_capsule_votes(
    poses: Tensor, activations: Tensor, weight: Tensor, kernel_size: int, stride: int
) -> tuple[Tensor, Tensor]:
    """Votes ``V = M W`` of a convolutional matrix-capsule layer, [H18] §3.

    Same results as :func:`capsnet.functional.conv_capsule_votes`: ``poses (N, H, W, T, 16)``,
    ``activations (N, H, W, T)``, ``weight (K*K, T, O, 4, 4)`` -> votes
    ``(N, P, K*K*T, O, 16)`` and child activations ``(N, P, K*K*T)``.
    """
    n, h, w, types, _ = poses.shape
    index = conv_children_index((h, w), kernel_size, stride, device=poses.device)  # (P, KK)
    positions, kk = index.shape
    children, child_act = gather_children(poses, activations, index)  # (N, P, KK*T, 16)
    m = children.reshape(n, positions, kk, types, 4, 4)
    votes = torch.einsum("npktxy,ktoyz->npktoxz", m, weight)  # V = M W per (child, parent)
    return votes.reshape(n, positions, kk * types, weight.shape[2], 16), child_act


def conv_matrix_capsules(
    poses: Tensor,
    activations: Tensor,
    weight: Tensor,
    beta_u: Tensor,
    beta_a: Tensor,
    lambdas: Sequence[float],
    *,
    kernel_size: int,
    stride: int,
    routing: str = "faithful",
    variant: str | EMVariant = "paper",
    normalize_cost: bool = False,
    var_floor: float | None = None,
    eps: float | None = None,
) -> tuple[Tensor, Tensor]:
    """A convolutional matrix-capsule layer: :func:`conv_capsule_votes`, then EM routing.

    ``routing="faithful"``: :func:`conv_em_routing` (each child normalised over every parent
    it feeds); ``"per_position"``: :func:`em_routing` on each receptive field. Same results
    as :func:`capsnet.functional.conv_matrix_capsules`: ``(N, H_out, W_out, O, 16)`` poses
    and ``(N, H_out, W_out, O)`` activations.
    """
    votes, child_act = conv_capsule_votes(poses, activations, weight, kernel_size, stride)
    n, h, w = poses.shape[:3]
    h_out, w_out = (h - kernel_size) // stride + 1, (w - kernel_size) // stride + 1
    options: dict[str, Any] = {
        "normalize_cost": normalize_cost,
        "var_floor": var_floor,
        "eps": eps,
        "variant": variant,
    }
    if routing == "faithful":
        mu, act, _ = conv_em_routing(
            votes, child_act, beta_u, beta_a, lambdas, in_size=(h, w), kernel_size=kernel_size,
            stride=stride, **options,
        )  # fmt: skip
    else:
        mu, act, _ = em_routing(votes, child_act, beta_u, beta_a, lambdas, **options)
    out_types = weight.shape[2]
    return mu.reshape(n, h_out, w_out, out_types, 16), act.reshape(n, h_out, w_out, out_types)
