"""Capsule math as pure functions: squash, routing, losses, coordinate addition.

Everything here is stateless: tensors in, tensors out, weights passed as arguments.
:mod:`capsnet.layers` wraps these in ``nn.Module`` s.

Letters used in shapes (defined once, used everywhere):

* ``B`` batch, ``I`` input (child) capsules, ``O`` output (parent) capsules,
  ``D`` pose size (16 for a 4x4 pose matrix or Sabour's class capsules, 8 for primary
  vector capsules), ``P`` parent positions of a convolutional capsule layer,
  ``K`` kernel size, ``H x W`` a capsule grid.
* ``...`` any number of leading batch dimensions.

Concrete example: Sabour's MNIST CapsNet routes ``u_hat`` of shape ``(128, 1152, 10, 16)``
(batch 128, 6*6*32 primary capsules, 10 digit capsules of 16D).

References:
    [S17] Sabour, Frosst, Hinton. Dynamic Routing Between Capsules. NeurIPS 2017.
    [H18] Hinton, Sabour, Frosst. Matrix Capsules with EM Routing. ICLR 2018.
    [G19] Gritzman. Avoiding Implementation Pitfalls of "Matrix Capsules with EM Routing".
    SPEC sections refer to ``shared/papers/SPEC.md`` of this project.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = [
    "squash",
    "dynamic_routing",
    "em_routing",
    "conv_em_routing",
    "conv_children_index",
    "conv_capsule_votes",
    "conv_matrix_capsules",
    "default_inverse_temperatures",
    "margin_loss",
    "spread_loss",
    "spread_margin",
    "reconstruction_loss",
    "coordinate_addition",
]

_LOG_2PI = math.log(2.0 * math.pi)


# --------------------------------------------------------------------------- checks


def _check_float(name: str, x: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def _check_ndim(name: str, x: Tensor, min_ndim: int, expected: str) -> None:
    if x.ndim < min_ndim:
        raise ValueError(
            f"{name} must have shape {expected} (at least {min_ndim} dims), "
            f"got shape {tuple(x.shape)}"
        )


def _compute_dtype(x: Tensor) -> torch.dtype:
    """Routing statistics are accumulated in at least float32.

    Note: under bfloat16/float16 autocast the votes arrive in half precision; sums of
    squares and log-densities over hundreds of children lose too much in 8 mantissa bits,
    so routing upcasts (one copy) and returns results in the input dtype.
    """
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"reduction must be one of 'mean', 'sum', 'none', got {reduction!r}")


def _targets_to_float(targets: Tensor, num_classes: int, scores: Tensor) -> Tensor:
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


# --------------------------------------------------------------------------- squash


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
    _check_float("s", s)
    compute = _compute_dtype(s)
    sf = s.to(compute)
    squared_norm = sf.pow(2).sum(dim=dim, keepdim=True)
    scale = torch.sqrt(squared_norm + eps) / (1.0 + squared_norm)
    return (sf * scale).to(s.dtype)


# --------------------------------------------------------------------------- dynamic routing


def dynamic_routing(
    u_hat: Tensor, iterations: int = 3, *, detach_inner: bool = False
) -> tuple[Tensor, Tensor]:
    """Routing-by-agreement, [S17] Procedure 1 (SPEC §1).

    ``b_ij = 0``; repeat: ``c_i = softmax_j(b_i)`` (over the *parents* j),
    ``s_j = sum_i c_ij u_hat_j|i``, ``v_j = squash(s_j)``, ``b_ij += u_hat_j|i . v_j``
    (the last update is skipped, it would not be used).

    Args:
        u_hat: prediction vectors ``u_hat_j|i = W_ij u_i``.
        iterations: routing iterations r >= 1 (the paper uses 3).
        detach_inner: if True, gradients flow only through the last iteration's weighted
            sum: the agreement updates of earlier iterations see ``u_hat.detach()``. This is a
            variant used by some implementations to save memory; the paper (and the
            default here) backpropagates through every iteration.

    Returns:
        ``(v, c)``: the output capsules and the coupling coefficients of the last iteration.

    Shape:
        - u_hat: ``(..., I, O, D)``, e.g. ``(128, 1152, 10, 16)``.
        - v: ``(..., O, D)``.
        - c: ``(..., I, O)``; every child's coefficients sum to 1 over O.
    """
    _check_float("u_hat", u_hat)
    _check_ndim("u_hat", u_hat, 3, "(..., in_caps, out_caps, dim)")
    if not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be an int >= 1, got {iterations!r}")
    return _dynamic_routing_fast(u_hat, iterations, bool(detach_inner))


def _dynamic_routing_plain(
    u_hat: Tensor, iterations: int, detach_inner: bool = False
) -> tuple[Tensor, Tensor]:
    """[S17] Procedure 1 written as plain autograd tensor code (the reference for the fast path).

    Same arguments and results as :func:`dynamic_routing` (no input checks).
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


def default_inverse_temperatures(iterations: int) -> list[float]:
    """The default inverse-temperature schedule lambda_1..lambda_r of :func:`em_routing`.

    [H18] gives no schedule. capsnet's default grows lambda linearly from 1 to
    ``min(r, 3)``: ``[1.0]``, ``[1.0, 2.0]``, ``[1.0, 2.0, 3.0]``, ``[1.0, 1.67, 2.33, 3.0]``
    for r = 1..4 (the choice of a popular implementation, SPEC §2). Pass
    ``inverse_temperatures`` explicitly for another schedule, e.g. the
    ``0.01 * (1 - 0.95 ** t)`` one attributed to the authors.
    """
    if not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be an int >= 1, got {iterations!r}")
    top = float(min(iterations, 3))
    if iterations == 1:
        return [1.0]
    return [1.0 + (top - 1.0) * t / (iterations - 1) for t in range(iterations)]


def _resolve_temperatures(
    iterations: int, inverse_temperatures: Sequence[float] | None
) -> list[float]:
    if not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be an int >= 1, got {iterations!r}")
    if inverse_temperatures is None:
        return default_inverse_temperatures(iterations)
    lambdas = [float(x) for x in inverse_temperatures]
    if len(lambdas) != iterations:
        raise ValueError(
            f"inverse_temperatures must hold one lambda per iteration ({iterations}), "
            f"got {len(lambdas)}"
        )
    return lambdas


def _m_step(
    votes: Tensor,
    weights: Tensor,
    beta_u: Tensor,
    beta_a: Tensor,
    inverse_temperature: float,
    normalize_cost: bool,
    var_floor: float,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """M-step of [H18] Procedure 1 for every parent j of a group (SPEC §2).

    ``weights`` are ``R'_ij = R_ij * a_i``. Returns ``(mu, var, logit)`` where
    ``a_j = sigmoid(logit)``; shapes ``(..., O, D)``, ``(..., O, D)``, ``(..., O)``.
    """
    weight_sum = weights.sum(dim=-2)  # sum_i R'_ij: (..., O)
    denom = (weight_sum + eps).unsqueeze(-1)  # (..., O, 1)
    mu = torch.einsum("...io,...iod->...od", weights, votes) / denom
    var = torch.einsum("...io,...iod->...od", weights, (votes - mu.unsqueeze(-3)).pow(2)) / denom
    # Note: a variance floor (not in the paper) keeps log(sigma) finite when all votes of
    # a parent agree exactly or a parent has a single child ([G19] pitfall 2).
    var = var + var_floor
    # cost^h = (beta_u + log sigma^h) * sum_i R'_ij; log sigma = 0.5 log var.
    cost = ((beta_u.unsqueeze(-1) + 0.5 * torch.log(var)) * weight_sum.unsqueeze(-1)).sum(-1)
    if normalize_cost:
        # Note: not in [H18]. Popular implementations standardise the summed cost over the
        # parents of a group before the logistic, which keeps lambda * cost in a range
        # where the logistic is not saturated. Opt-in.
        mean = cost.mean(dim=-1, keepdim=True)
        std = (cost - mean).pow(2).mean(dim=-1, keepdim=True).add(eps).sqrt()
        cost = (cost - mean) / std
    logit = inverse_temperature * (beta_a - cost)
    return mu, var, logit


def _log_assignment_logits(votes: Tensor, mu: Tensor, var: Tensor, logit: Tensor) -> Tensor:
    """E-step numerator in log space: ``log a_j + sum_h log N(V_ij^h; mu_j^h, var_j^h)``.

    Shape: votes ``(..., I, O, D)``, mu/var ``(..., O, D)``, logit ``(..., O)`` ->
    ``(..., I, O)``.
    """
    mu_, var_ = mu.unsqueeze(-3), var.unsqueeze(-3)
    log_p = -0.5 * ((votes - mu_).pow(2) / var_).sum(-1)
    log_p = log_p - 0.5 * (torch.log(var) + _LOG_2PI).sum(-1).unsqueeze(-2)
    # log a_j = logsigmoid(logit): exact, and finite where a_j underflows to 0.
    return log_p + F.logsigmoid(logit).unsqueeze(-2)


def _check_em_inputs(
    votes: Tensor, activations: Tensor, beta_u: Tensor, beta_a: Tensor, batch_shape: str
) -> tuple[Tensor, Tensor]:
    _check_float("votes", votes)
    _check_float("activations", activations)
    _check_ndim("votes", votes, 3, f"({batch_shape}in_caps, out_caps, pose_dim)")
    if activations.shape != votes.shape[:-2]:
        raise ValueError(
            f"activations must have shape {tuple(votes.shape[:-2])} "
            f"(votes.shape[:-2] = ({batch_shape}in_caps)), got {tuple(activations.shape)}"
        )
    out_caps = votes.shape[-2]
    betas = []
    for name, beta in (("beta_u", beta_u), ("beta_a", beta_a)):
        if not isinstance(beta, Tensor):
            beta = torch.as_tensor(beta, dtype=votes.dtype, device=votes.device)
        _check_float(name, beta)
        try:
            torch.broadcast_shapes(beta.shape, (out_caps,))
        except RuntimeError:
            raise ValueError(
                f"{name} must be broadcastable to (out_caps,) = ({out_caps},), "
                f"got shape {tuple(beta.shape)}"
            ) from None
        betas.append(beta)
    return betas[0], betas[1]


def em_routing(
    votes: Tensor,
    activations: Tensor,
    beta_u: Tensor | float,
    beta_a: Tensor | float,
    iterations: int = 3,
    inverse_temperatures: Sequence[float] | None = None,
    *,
    normalize_cost: bool = False,
    var_floor: float = 1e-6,
    eps: float = 1e-8,
) -> tuple[Tensor, Tensor, Tensor]:
    """EM routing between one group of children and their parents, [H18] Procedure 1.

    For t = 1..r with inverse temperature lambda_t (SPEC §2)::

        M-step:  R'_ij = R_ij a_i
                 mu_j^h = sum_i R'_ij V_ij^h / sum_i R'_ij
                 (sigma_j^h)^2 = sum_i R'_ij (V_ij^h - mu_j^h)^2 / sum_i R'_ij
                 cost_j^h = (beta_u + log sigma_j^h) sum_i R'_ij
                 a_j = logistic(lambda_t (beta_a - sum_h cost_j^h))
        E-step:  R_ij = a_j p_ij / sum_k a_k p_ik,  p_ij = prod_h N(V_ij^h; mu_j^h, sigma_j^h)

    starting from ``R_ij = 1 / O``. The E-step runs in log space (a softmax over the
    parents of ``log a_j + log p_ij``) and is skipped after the last M-step.

    Args:
        votes: ``V_ij``, one vote per (child, parent), e.g. flattened 4x4 matrices.
        activations: child activations ``a_i`` in [0, 1]; they weight the M-step.
        beta_u: per-parent cost offset beta_u (learned, one per parent capsule type).
        beta_a: per-parent activation offset beta_a.
        iterations: routing iterations r >= 1.
        inverse_temperatures: one lambda per iteration; default
            :func:`default_inverse_temperatures`.
        normalize_cost: standardise the summed cost over the parents before the
            logistic (a stabilisation of popular implementations, not in the paper).
        var_floor: added to every variance; keeps ``log sigma`` finite for identical
            votes or a single child.
        eps: added to ``sum_i R'_ij`` in divisions; keeps all-zero activations finite.

    Returns:
        ``(poses, out_activations, assignments)``: the parents' means ``mu_j``, their
        activations ``a_j`` and the assignments ``R_ij`` used in the last M-step.

    Shape:
        - votes: ``(..., I, O, D)``, e.g. ``(32, 512, 5, 16)`` for class capsules.
        - activations: ``(..., I)``.
        - beta_u, beta_a: broadcastable to ``(O,)``.
        - poses: ``(..., O, D)``; out_activations: ``(..., O)``;
          assignments: ``(..., I, O)``, each child's row sums to 1.
    """
    beta_u, beta_a = _check_em_inputs(votes, activations, beta_u, beta_a, "..., ")
    lambdas = _resolve_temperatures(iterations, inverse_temperatures)
    return _em_routing_fast(
        votes, activations, beta_u, beta_a, lambdas, normalize_cost, var_floor, eps, None
    )


def _em_routing_plain(
    votes: Tensor,
    activations: Tensor,
    beta_u: Tensor,
    beta_a: Tensor,
    lambdas: Sequence[float],
    normalize_cost: bool = False,
    var_floor: float = 1e-6,
    eps: float = 1e-8,
) -> tuple[Tensor, Tensor, Tensor]:
    """[H18] Procedure 1 as plain autograd tensor code (the reference for the fast path).

    Same arguments and results as :func:`em_routing`, with the inverse temperatures
    resolved to a list and no input checks.
    """
    out_dtype = votes.dtype
    compute = _compute_dtype(votes)
    votes_c, act = votes.to(compute), activations.to(compute).unsqueeze(-1)  # act: (..., I, 1)
    beta_u, beta_a = beta_u.to(compute), beta_a.to(compute)

    assignments = votes_c.new_full(votes_c.shape[:-1], 1.0 / votes_c.shape[-2])  # (..., I, O)
    for t, lam in enumerate(lambdas):
        mu, var, logit = _m_step(
            votes_c, assignments * act, beta_u, beta_a, lam, normalize_cost, var_floor, eps
        )
        if t < len(lambdas) - 1:
            log_r = _log_assignment_logits(votes_c, mu, var, logit)
            assignments = torch.softmax(log_r, dim=-1)  # normalise over parents j
    return mu.to(out_dtype), torch.sigmoid(logit).to(out_dtype), assignments.to(out_dtype)


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


def conv_em_routing(
    votes: Tensor,
    activations: Tensor,
    beta_u: Tensor | float,
    beta_a: Tensor | float,
    *,
    in_size: tuple[int, int],
    kernel_size: int,
    stride: int,
    iterations: int = 3,
    inverse_temperatures: Sequence[float] | None = None,
    normalize_cost: bool = False,
    var_floor: float = 1e-6,
    eps: float = 1e-8,
) -> tuple[Tensor, Tensor, Tensor]:
    """EM routing of a convolutional capsule layer, children normalised over *all* parents.

    In a convolutional capsule layer a child at one input position falls in the receptive
    field of parents at several output positions. Here (the form of the official code and of
    [G19], pitfall 1) the E-step normalises each child's assignments over every parent
    capsule, at every output position and of every type, that it feeds; the M-step of each
    parent uses its K*K*B children exactly as in :func:`em_routing`. Each child starts with
    ``R = 1 / (number of parents it feeds)``. For the per-position simplification (each
    receptive field routed on its own) call :func:`em_routing` on the same tensors.

    Args:
        votes: votes of each parent position's K*K*B children, children ordered
            ``(kh, kw, b)`` (row-major), parent positions row-major over the output grid.
        activations: the activations of those children (gathered per parent position).
        beta_u, beta_a: broadcastable to ``(O,)``, O the parent capsule types.
        in_size: ``(H_in, W_in)`` of the child capsule grid.
        kernel_size, stride: of the (valid, unpadded) capsule convolution.
        iterations, inverse_temperatures, normalize_cost, var_floor, eps: as in
            :func:`em_routing`.

    Returns:
        ``(poses, out_activations, assignments)`` as in :func:`em_routing`, per parent
        position.

    Shape:
        - votes: ``(N, P, K*K*B, O, D)`` with ``P = H_out * W_out``.
        - activations: ``(N, P, K*K*B)``.
        - poses: ``(N, P, O, D)``; out_activations: ``(N, P, O)``;
          assignments: ``(N, P, K*K*B, O)`` (each child's entries over all the parents it
          feeds sum to 1).
    """
    beta_u, beta_a = _check_em_inputs(votes, activations, beta_u, beta_a, "N, P, ")
    if votes.ndim != 5:
        raise ValueError(f"votes must have shape (N, P, K*K*B, O, D), got {tuple(votes.shape)}")
    lambdas = _resolve_temperatures(iterations, inverse_temperatures)
    n, positions, children, out_caps, _ = votes.shape
    kk = kernel_size * kernel_size
    if children % kk:
        raise ValueError(
            f"votes.shape[2] must be K*K*B = {kk}*B for kernel_size={kernel_size}, got {children}"
        )
    in_types = children // kk
    index = conv_children_index(in_size, kernel_size, stride, device=votes.device)  # (P, KK)
    if index.shape[0] != positions:
        raise ValueError(
            f"in_size={tuple(in_size)}, kernel_size={kernel_size}, stride={stride} give "
            f"{index.shape[0]} parent positions, but votes.shape[1] = {positions}"
        )
    geometry = _ConvGeometry.create(index, in_types, in_size, n)
    return _em_routing_fast(
        votes, activations, beta_u, beta_a, lambdas, normalize_cost, var_floor, eps, geometry
    )


class _ConvGeometry(NamedTuple):
    """Which child capsule fills each (parent position, slot) of a capsule convolution.

    ``child_id (N, P*S)`` holds the flat id ``input position * B + input type`` of the child
    in slot ``s = (kh, kw, b)`` of parent position ``p``; ``S = K*K*B``.
    """

    child_id: Tensor
    num_children: int
    batch: int
    positions: int
    slots: int

    @staticmethod
    def create(index: Tensor, in_types: int, in_size: tuple[int, int], batch: int) -> _ConvGeometry:
        positions, kk = index.shape
        child_id = index[:, :, None] * in_types + torch.arange(in_types, device=index.device)
        child_id = child_id.reshape(1, positions * kk * in_types).expand(batch, -1)
        num_children = in_size[0] * in_size[1] * in_types
        return _ConvGeometry(child_id, num_children, batch, positions, kk * in_types)

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


def _check_conv_capsule_inputs(
    poses: Tensor, activations: Tensor, weight: Tensor, kernel_size: int, stride: int
) -> None:
    _check_float("poses", poses)
    _check_float("activations", activations)
    _check_float("weight", weight)
    if poses.ndim != 5 or poses.shape[-1] != 16:
        raise ValueError(
            f"poses must have shape (N, H, W, B, 16) (4x4 pose matrices), got {tuple(poses.shape)}"
        )
    if activations.shape != poses.shape[:-1]:
        raise ValueError(
            f"activations must have shape {tuple(poses.shape[:-1])} (poses.shape[:-1] = "
            f"(N, H, W, B)), got {tuple(activations.shape)}"
        )
    if not (isinstance(kernel_size, int) and kernel_size >= 1):
        raise ValueError(f"kernel_size must be an int >= 1, got {kernel_size!r}")
    if not (isinstance(stride, int) and stride >= 1):
        raise ValueError(f"stride must be an int >= 1, got {stride!r}")
    expected = (kernel_size * kernel_size, poses.shape[3])
    if weight.ndim != 5 or tuple(weight.shape[:2]) != expected or weight.shape[3:] != (4, 4):
        raise ValueError(
            f"weight must have shape (K*K, B, O, 4, 4) = ({expected[0]}, {expected[1]}, O, 4, 4) "
            f"for kernel_size={kernel_size} and B={poses.shape[3]} input types, "
            f"got {tuple(weight.shape)}"
        )


def _gather_children(poses: Tensor, activations: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
    """Each parent position's ``K*K*B`` children (order ``(kh, kw, b)``) and activations.

    ``index (P, K*K)`` from :func:`conv_children_index`. Shape: ``poses (N, H, W, B, D)``,
    ``activations (N, H, W, B)`` -> ``(N, P, K*K*B, D)``, ``(N, P, K*K*B)``.
    """
    n, h, w, b, d = poses.shape
    positions, kk = index.shape
    flat = index.reshape(-1)
    children = poses.reshape(n, h * w, b, d).index_select(1, flat)
    child_act = activations.reshape(n, h * w, b).index_select(1, flat)
    return children.reshape(n, positions, kk * b, d), child_act.reshape(n, positions, kk * b)


def conv_capsule_votes(
    poses: Tensor, activations: Tensor, weight: Tensor, kernel_size: int, stride: int
) -> tuple[Tensor, Tensor]:
    """Votes ``V = M W`` of a convolutional matrix-capsule layer, [H18] §3.

    Every parent position (a valid, unpadded capsule convolution) reads the ``K*K*B``
    children of its receptive field, ordered ``(kh, kw, b)``; each child's 4x4 pose ``M``
    is multiplied by the transformation matrix ``W`` of its (kernel offset, type) and each
    output type, shared across positions. The result is in the layout
    :func:`conv_em_routing` takes. :func:`conv_matrix_capsules` computes the same votes
    chunk by chunk inside the routing without storing them; use this function to look at
    them.

    Returns:
        ``(votes, child_activations)``.

    Shape:
        - poses: ``(N, H, W, B, 16)``; activations: ``(N, H, W, B)``;
          weight: ``(K*K, B, O, 4, 4)``.
        - votes: ``(N, P, K*K*B, O, 16)`` (a transposed view of parent-major memory
          ``(N, P, O, K*K*B, 16)``, which the routing kernels use without a copy);
          child_activations: ``(N, P, K*K*B)``; ``P = H_out * W_out``.
    """
    _check_conv_capsule_inputs(poses, activations, weight, kernel_size, stride)
    n, h, w, b, _ = poses.shape
    index = conv_children_index((h, w), kernel_size, stride, device=poses.device)  # (P, KK)
    positions, kk = index.shape
    children, child_act = _gather_children(poses, activations, index)
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
    normalize_cost: bool = False,
    var_floor: float = 1e-6,
    eps: float = 1e-8,
) -> tuple[Tensor, Tensor]:
    """A convolutional matrix-capsule layer, [H18] §3-4: votes and EM routing in one pass.

    The same function as :func:`conv_capsule_votes` followed by :func:`conv_em_routing`
    (``routing="faithful"``: each child normalised over every parent it feeds) or
    :func:`em_routing` on each receptive field (``routing="per_position"``), computed
    without ever storing the votes: on the CPU the examples are routed in chunks that fit
    in the caches, each chunk's votes are computed, routed and dropped, and the backward
    pass recomputes them. The vote tensor (``K*K*B*O*16`` numbers per parent position) is
    by far the largest tensor of a matrix-capsule network; not keeping it makes training
    faster and several times leaner (benchmarks/RESULTS.md). The results agree with the
    two-step form to float rounding (tests/test_functional.py).

    Args:
        poses, activations: the child capsule grid.
        weight: one 4x4 transformation matrix per (kernel offset, input type, output type).
        beta_u, beta_a: broadcastable to ``(O,)``.
        kernel_size, stride: of the valid, unpadded capsule convolution.
        iterations, inverse_temperatures, normalize_cost, var_floor, eps: as in
            :func:`em_routing`.
        routing: ``"faithful"`` or ``"per_position"`` (see above).

    Returns:
        ``(out_poses, out_activations)``.

    Shape:
        - poses: ``(N, H, W, B, 16)``; activations: ``(N, H, W, B)``;
          weight: ``(K*K, B, O, 4, 4)``.
        - out_poses: ``(N, H_out, W_out, O, 16)``; out_activations: ``(N, H_out, W_out, O)``,
          ``H_out = (H - K) // stride + 1``.
    """
    _check_conv_capsule_inputs(poses, activations, weight, kernel_size, stride)
    if routing not in ROUTING_MODES:
        raise ValueError(f"routing must be one of {ROUTING_MODES}, got {routing!r}")
    lambdas = _resolve_temperatures(iterations, inverse_temperatures)
    n, h, w, b, _ = poses.shape
    index = conv_children_index((h, w), kernel_size, stride, device=poses.device)  # (P, KK)
    positions, kk = index.shape
    h_out, w_out = (h - kernel_size) // stride + 1, (w - kernel_size) // stride + 1
    out_types = weight.shape[2]
    i = kk * b
    compute = _compute_dtype(poses)
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
    geometry = _ConvGeometry.create(index, b, (h, w), n) if routing == "faithful" else None
    config = _EMConfig(tuple(lambdas), bool(normalize_cost), float(var_floor), float(eps), geometry)
    # Gather the receptive fields (small: 1/O of the votes) and lay them out for the
    # vote products: children (N*P, K*K*B, 4, 4), W as (K*K*B, 4, O*4).
    children, child_act = _gather_children(poses.to(compute), activations.to(compute), index)
    children = children.reshape(n * positions, i, 4, 4)
    child_act = child_act.reshape(n * positions, i)
    w_mat = weight.to(compute).permute(0, 1, 3, 2, 4).reshape(i, 4, out_types * 4)
    if _needs_grad(children, child_act, w_mat, *betas):
        mu, logit = _ConvCapsulesEM.apply(children, child_act, w_mat, *betas, config)
    else:
        mu, logit, _ = _conv_capsules_forward(
            children, child_act, w_mat, *betas, config, keep_saved=False
        )
    out = poses.dtype
    return (
        mu.reshape(n, h_out, w_out, out_types, 16).to(out),
        torch.sigmoid(logit).reshape(n, h_out, w_out, out_types).to(out),
    )


def _conv_matrix_capsules_two_step(
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
    normalize_cost: bool = False,
    var_floor: float = 1e-6,
    eps: float = 1e-8,
) -> tuple[Tensor, Tensor]:
    """:func:`conv_matrix_capsules` as :func:`conv_capsule_votes` + a routing call.

    The tests' reference for the fused form, and what :func:`capsnet.probes.capture_routing`
    substitutes so that the routing call (votes, assignments) can be recorded.
    """
    if routing not in ROUTING_MODES:
        raise ValueError(f"routing must be one of {ROUTING_MODES}, got {routing!r}")
    votes, child_act = conv_capsule_votes(poses, activations, weight, kernel_size, stride)
    n, h, w = poses.shape[:3]
    h_out, w_out = (h - kernel_size) // stride + 1, (w - kernel_size) // stride + 1
    options = {
        "iterations": iterations,
        "inverse_temperatures": inverse_temperatures,
        "normalize_cost": normalize_cost,
        "var_floor": var_floor,
        "eps": eps,
    }
    if routing == "faithful":
        mu, act, _ = conv_em_routing(
            votes, child_act, beta_u, beta_a, in_size=(h, w), kernel_size=kernel_size,
            stride=stride, **options,
        )  # fmt: skip
    else:
        mu, act, _ = em_routing(votes, child_act, beta_u, beta_a, **options)
    out_types = weight.shape[2]
    return (
        mu.reshape(n, h_out, w_out, out_types, 16),
        act.reshape(n, h_out, w_out, out_types),
    )


def _conv_em_routing_plain(
    votes: Tensor,
    activations: Tensor,
    beta_u: Tensor,
    beta_a: Tensor,
    geometry: _ConvGeometry,
    lambdas: Sequence[float],
    normalize_cost: bool = False,
    var_floor: float = 1e-6,
    eps: float = 1e-8,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`conv_em_routing` as plain autograd tensor code (the reference for the fast path)."""
    out_caps = votes.shape[-2]
    out_dtype = votes.dtype
    compute = _compute_dtype(votes)
    votes_c, act = votes.to(compute), activations.to(compute).unsqueeze(-1)
    beta_u, beta_a = beta_u.to(compute), beta_a.to(compute)

    fan_out = geometry.fan_out(out_caps, compute)  # parents fed by each slot's child
    assignments = (1.0 / fan_out).unsqueeze(-1).expand(-1, -1, -1, out_caps)
    for t, lam in enumerate(lambdas):
        mu, var, logit = _m_step(
            votes_c, assignments * act, beta_u, beta_a, lam, normalize_cost, var_floor, eps
        )
        if t < len(lambdas) - 1:
            log_r = _log_assignment_logits(votes_c, mu, var, logit)  # (N, P, KKB, O)
            # A softmax over every parent the child feeds: subtract the child's max
            # (a constant, so detached) for stability, then normalise by the child's sum.
            shift = geometry.child_max(log_r.detach().amax(dim=-1)).unsqueeze(-1)
            unnorm = torch.exp(log_r - shift)
            assignments = unnorm / geometry.child_sum(unnorm.sum(-1)).unsqueeze(-1)
    return mu.to(out_dtype), torch.sigmoid(logit).to(out_dtype), assignments.to(out_dtype)


# --------------------------------------------------------------------------- fast routing
#
# The public routing functions above check their inputs and dispatch here. These kernels
# compute the same equations as the plain versions (``_dynamic_routing_plain``,
# ``_em_routing_plain``, ``_conv_em_routing_plain``, which the tests use as the reference)
# with three changes that only affect speed and memory:
#
# * Parent-major layout. Votes are routed as ``(G, O, I, D)`` (G = all batch dims): every
#   sum over children ``i`` and every sum over pose entries ``d`` is then one batched
#   matrix-vector product (``bmm``) on contiguous memory, with no transposed copies. The
#   public layout ``(..., I, O, D)`` is converted once on entry; the conversion is free when
#   the caller already stores votes parent-major (a transposed view of ``(..., O, I, D)``).
# * Buffers. Large temporaries are written into a few vote-sized work buffers that are
#   reused across iterations (on CPU a freshly allocated large tensor costs page faults).
# * Hand-written backward passes (``torch.autograd.Function``). Autograd would store
#   several vote-sized intermediates per routing iteration; these store the votes once,
#   plus the couplings / assignments of each iteration (1/D of the votes' size) and a few
#   per-parent statistics, and recompute ``V - mu`` when needed. The derivations follow the
#   forward equations line by line (comments name the forward quantity being differentiated).


def _parent_major(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``(..., I, O, D)`` -> contiguous ``(G, O, I, D)`` in ``dtype`` (one copy at most)."""
    xt = x.transpose(-3, -2)
    if xt.dtype != dtype or not xt.is_contiguous():
        xt = xt.to(dtype=dtype, memory_format=torch.contiguous_format, copy=True)
    return xt.reshape(-1, *xt.shape[-3:])


def _no_autocast(x: Tensor) -> torch.autocast:
    """Routing runs in its compute dtype (float32 for half inputs) even under autocast."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def _matvec(x: Tensor, y: Tensor) -> Tensor:
    """Batched matrix-vector product ``x (N, I, D) @ y (N, D)`` -> ``(N, 1, I)``.

    Written as ``y^T x^T`` (a row vector times a transposed matrix): for the small, many
    matrices of routing the BLAS kernel for that form is 2-3x faster on CPU than
    ``bmm(x, y[..., None])`` (benchmarks/RESULTS.md); the result has the same memory layout.
    """
    return torch.bmm(y.unsqueeze(1), x.transpose(1, 2))


def _needs_grad(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _squash_backward(s: Tensor, grad_v: Tensor, eps: float = 1e-8) -> Tensor:
    """Gradient of :func:`squash` (last dim) at ``s``.

    ``v = s f(n)`` with ``n = |s|^2``, ``f(n) = sqrt(n + eps) / (1 + n)``, so
    ``dL/ds = f grad_v + 2 s (grad_v . s) f'(n)``.
    """
    n = s.pow(2).sum(-1, keepdim=True)
    root = torch.sqrt(n + eps)
    f = root / (1.0 + n)
    df = (0.5 / root - f) / (1.0 + n)  # f'(n) = (1/(2 root) - root/(1+n)) / (1+n)
    return f * grad_v + 2.0 * df * (grad_v * s).sum(-1, keepdim=True) * s


def _dynamic_routing_forward(
    u: Tensor, iterations: int
) -> tuple[Tensor, Tensor, list[Tensor], list[Tensor], list[Tensor]]:
    """[S17] Procedure 1 on parent-major predictions ``u (G, O, I, D)``, no autograd.

    Returns ``v (G, O, D)``, ``c (G, O, I)`` and the per-iteration couplings, sums ``s``
    and outputs ``v`` (what the backward pass needs).
    """
    g, o, i, d = u.shape
    uf = u.view(g * o, i, d)
    logits = u.new_zeros(g, o, i)  # b_ij
    cs, ss, vs = [], [], []
    for t in range(iterations):
        c = torch.softmax(logits, dim=1)  # c_i = softmax_j(b_i), over parents (dim 1)
        s = torch.bmm(c.view(g * o, 1, i), uf).view(g, o, d)  # s_j = sum_i c_ij u_j|i
        v = squash(s)
        cs.append(c)
        ss.append(s)
        vs.append(v)
        if t < iterations - 1:
            logits += _matvec(uf, v.view(g * o, d)).view(g, o, i)  # b_ij += u_j|i . v_j
    return v, c, cs, ss, vs


class _DynamicRouting(torch.autograd.Function):
    """Dynamic routing with a hand-written backward pass (see the section comment)."""

    @staticmethod
    def forward(ctx, u: Tensor, iterations: int, detach_inner: bool):  # noqa: D102
        with _no_autocast(u):
            v, c, cs, ss, vs = _dynamic_routing_forward(u, iterations)
        ctx.iterations, ctx.detach_inner = iterations, detach_inner
        ctx.save_for_backward(u, *cs, *ss, *vs[:-1])
        ctx.set_materialize_grads(False)
        return v, c

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_v: Tensor | None, grad_c: Tensor | None):  # noqa: D102
        saved = ctx.saved_tensors  # unpacked once (activation checkpointing requires it)
        with _no_autocast(saved[0]):
            return _DynamicRouting._backward(ctx, saved, grad_v, grad_c)

    @staticmethod
    def _backward(ctx, saved: tuple[Tensor, ...], grad_v: Tensor | None, grad_c: Tensor | None):
        grad_v = None if grad_v is None else grad_v.contiguous()
        grad_c = None if grad_c is None else grad_c.contiguous()
        r = ctx.iterations
        u, cs, ss, vs = saved[0], saved[1 : r + 1], saved[r + 1 : 2 * r + 1], saved[2 * r + 1 :]
        g, o, i, d = u.shape
        uf = u.view(g * o, i, d)
        if grad_v is None:
            grad_v = u.new_zeros(g, o, d)
        if ctx.detach_inner:
            # Only the last weighted sum s = sum_i c_ij u_j|i sees u; c is a constant.
            grad_s = _squash_backward(ss[-1], grad_v)
            grad_u = torch.bmm(cs[-1].view(g * o, i, 1), grad_s.view(g * o, 1, d))
            return grad_u.view(g, o, i, d), None, None
        # d/du of sum_t [c^t . s^t-terms] + sum_t [a^t-terms]: collect the rank-one factors
        # (c^t (x) grad s^t and grad a^t (x) v^t) and form grad_u once at the end.
        left, right = [], []
        grad_b = None  # gradient w.r.t. the logits b^{t+1}
        for t in reversed(range(r)):
            if t == r - 1:
                grad_vt = grad_v
            else:
                # b^{t+1} = b^t + a^t with a^t_ji = u_j|i . v^t_j
                left.append(grad_b)
                right.append(vs[t])
                grad_vt = torch.bmm(grad_b.view(g * o, 1, i), uf).view(g, o, d)
            grad_s = _squash_backward(ss[t], grad_vt)  # v^t = squash(s^t)
            left.append(cs[t])  # s^t_j = sum_i c^t_ij u_j|i
            right.append(grad_s)
            if t == 0:
                break  # b^1 = 0 is a constant
            grad_ct = _matvec(uf, grad_s.view(g * o, d)).view(g, o, i)
            if t == r - 1 and grad_c is not None:
                grad_ct = grad_ct + grad_c
            c = cs[t]  # c^t = softmax over parents of b^t
            grad_soft = c * (grad_ct - (grad_ct * c).sum(dim=1, keepdim=True))
            grad_b = grad_soft if grad_b is None else grad_b + grad_soft
        a = torch.stack(left, dim=-1).view(g * o, i, len(left))
        b = torch.stack(right, dim=-2).view(g * o, len(right), d)
        return torch.bmm(a, b).view(g, o, i, d), None, None


def _dynamic_routing_fast(
    u_hat: Tensor, iterations: int, detach_inner: bool
) -> tuple[Tensor, Tensor]:
    batch_shape, (in_caps, out_caps, dim) = u_hat.shape[:-3], u_hat.shape[-3:]
    u = _parent_major(u_hat, _compute_dtype(u_hat))  # (G, O, I, D)
    if _needs_grad(u):
        v, c = _DynamicRouting.apply(u, iterations, detach_inner)
    else:
        with _no_autocast(u):
            v, c = _dynamic_routing_forward(u, iterations)[:2]
    v = v.reshape(*batch_shape, out_caps, dim).to(u_hat.dtype)
    c = c.transpose(1, 2).reshape(*batch_shape, in_caps, out_caps).to(u_hat.dtype)
    return v, c


class _EMConfig(NamedTuple):
    lambdas: tuple[float, ...]
    normalize_cost: bool
    var_floor: float
    eps: float
    geometry: _ConvGeometry | None


def _em_cost(s: Tensor, log_var: Tensor, beta_u: Tensor, normalize: bool, eps: float) -> Tensor:
    """``sum_h (beta_u + log sigma^h) sum_i R'_ij`` (optionally standardised): ``(G, O)``."""
    dim = log_var.shape[-1]
    cost = s * (beta_u * dim + 0.5 * log_var.sum(-1))
    if normalize:
        mean = cost.mean(dim=-1, keepdim=True)
        std = (cost - mean).pow(2).mean(dim=-1, keepdim=True).add(eps).sqrt()
        cost = (cost - mean) / std
    return cost


def _em_cost_backward(
    s: Tensor, log_var: Tensor, beta_u: Tensor, grad: Tensor, config: _EMConfig
) -> Tensor:
    """Gradient w.r.t. the raw cost of :func:`_em_cost` given ``grad`` w.r.t. its output."""
    if not config.normalize_cost:
        return grad
    cost = _em_cost(s, log_var, beta_u, False, config.eps)
    mean = cost.mean(dim=-1, keepdim=True)
    std = (cost - mean).pow(2).mean(dim=-1, keepdim=True).add(config.eps).sqrt()
    normed = (cost - mean) / std
    # Standardisation over the parents (as in layer norm without affine parameters).
    return (
        grad - grad.mean(dim=-1, keepdim=True) - normed * (grad * normed).mean(-1, keepdim=True)
    ) / std


def _e_step_normalize(log_r: Tensor, geometry: _ConvGeometry | None) -> Tensor:
    """Assignments from E-step logits ``(G, O, I)``, in place: a softmax over parents.

    For a capsule convolution, over every parent (all positions and types) of the child.
    """
    if geometry is None:
        return torch.softmax(log_r, dim=1)
    n, p, s = geometry.batch, geometry.positions, geometry.slots
    shift = geometry.child_max(log_r.amax(dim=1).view(n, p, s)).view(n * p, 1, s)
    unnorm = log_r.sub_(shift).exp_()
    return unnorm.div_(geometry.child_sum(unnorm.sum(dim=1).view(n, p, s)).view(n * p, 1, s))


def _em_forward(
    votes: Tensor, act: Tensor, beta_u: Tensor, beta_a: Tensor, config: _EMConfig
) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    """[H18] Procedure 1 on parent-major votes ``(G, O, I, D)``, no autograd.

    ``act (G, I)``, ``beta_u``, ``beta_a`` ``(G, O)``. Returns ``mu (G, O, D)``, the
    activation logits ``(G, O)``, the assignments of the last M-step ``(G, O, I)`` and the
    per-iteration tensors the backward pass needs.
    """
    g, o, i, d = votes.shape
    vf = votes.view(g * o, i, d)
    work = torch.empty_like(vf)  # (V - mu)^2, reused by every iteration
    geometry, eps = config.geometry, config.eps
    if geometry is None:
        assign = votes.new_full((1, 1, 1), 1.0 / o).expand(g, o, i)  # R_ij = 1 / O
    else:  # R_ij = 1 / (number of parents the child feeds)
        fan = geometry.fan_out(o, votes.dtype).view(g, 1, i)
        assign = (1.0 / fan).expand(g, o, i)
    a = act.unsqueeze(1)  # (G, 1, I)
    saved: list[Tensor] = []
    for t, lam in enumerate(config.lambdas):
        # M-step
        weights = assign * a  # R'_ij = R_ij a_i: (G, O, I)
        s = weights.sum(-1)  # sum_i R'_ij: (G, O)
        n = (s + eps).unsqueeze(-1)
        wf = weights.view(g * o, 1, i)
        mu = torch.bmm(wf, vf).view(g, o, d) / n
        torch.sub(vf, mu.view(g * o, 1, d), out=work).square_()  # (V_ij^h - mu_j^h)^2
        var_raw = torch.bmm(wf, work).view(g, o, d) / n
        var = var_raw + config.var_floor  # see _m_step on the floor
        log_var = var.log()
        logit = lam * (beta_a - _em_cost(s, log_var, beta_u, config.normalize_cost, eps))
        saved += [assign, mu, var_raw, logit]
        if t == len(config.lambdas) - 1:
            break
        # E-step: log a_j + sum_h log N(V_ij^h; mu_j^h, var_j^h), normalised over parents.
        inv_var = var.reciprocal()
        log_r = _matvec(work, inv_var.view(g * o, d)).view(g, o, i).mul_(-0.5)
        log_r += (F.logsigmoid(logit) - 0.5 * (log_var + _LOG_2PI).sum(-1)).unsqueeze(-1)
        assign = _e_step_normalize(log_r, geometry)
    return mu, logit, assign, saved


def _em_backward(
    votes: Tensor,
    act: Tensor,
    beta_u: Tensor,
    beta_a: Tensor,
    saved: Sequence[Tensor],
    config: _EMConfig,
    grad_mu: Tensor | None,
    grad_logit: Tensor | None,
    grad_assign: Tensor | None,
    out: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Backward pass of :func:`_em_forward`, iterations in reverse order.

    Returns the gradients w.r.t. ``votes (G, O, I, D)``, ``act (G, I)``, ``beta_u`` and
    ``beta_a`` ``(G, O)``.

    Every iteration t contributes ``R'_ij grad_p_j + 2 (V_ij - mu_j) (R'_ij grad_q_j +
    grad_e_ij / var_j)`` to ``dL/dV_ij``: a sum of outer products of per-child and per-parent
    factors, scaled elementwise by ``V``. The factors of all iterations are collected and
    ``dL/dV`` is formed once at the end with two batched matmuls, instead of a few
    vote-sized passes per iteration. ``V`` enters centred on the last parent means ``c``
    (``V - c``) so that no large terms cancel.
    """
    g, o, i, d = votes.shape
    go = g * o
    eps, floor, geometry = config.eps, config.var_floor, config.geometry
    last = len(config.lambdas) - 1
    centre = saved[4 * last + 1]  # mu of the last iteration: (G, O, D)
    vc = torch.sub(votes.view(go, i, d), centre.view(go, 1, d))  # V - c
    work = torch.empty_like(vc)  # (V - mu)^2 of the current iteration
    a = act.unsqueeze(1)
    grad_act = act.new_zeros(g, i)
    grad_bu = beta_u.new_zeros(g, o)
    grad_ba = beta_a.new_zeros(g, o)
    zeros_od = votes.new_zeros(g, o, d)
    grad_mu_t = grad_mu if grad_mu is not None else zeros_od
    grad_logit_t = grad_logit if grad_logit is not None else votes.new_zeros(g, o)
    grad_next = None  # gradient w.r.t. the assignments R^{t+1} computed by E-step t
    child_factors: list[Tensor] = []  # (G, O, I) each
    scale_factors: list[Tensor] = []  # (G, O, D): coefficient of (V - c) in dL/dV
    const_factors: list[Tensor] = []  # (G, O, D): the rest
    for t in reversed(range(len(config.lambdas))):
        lam = config.lambdas[t]
        assign, mu, var_raw, logit = saved[4 * t : 4 * t + 4]
        weights = assign * a
        s = weights.sum(-1)
        n = (s + eps).unsqueeze(-1)
        var = var_raw + floor
        log_var = var.log()
        inv_var = var.reciprocal()
        shift = mu - centre  # mu_t - c, so V - mu_t = (V - c) - shift
        torch.sub(vc, shift.view(go, 1, d), out=work).square_()
        grad_mu_acc, grad_var, grad_logit_acc = grad_mu_t, zeros_od, grad_logit_t
        if t < last:
            # E-step t: R^{t+1} = normalise_j(L_ij) with
            # L_ij = -0.5 E_ij - 0.5 sum_h (log var_j^h + log 2pi) + logsigmoid(logit_j),
            # E_ij = sum_h (V_ij^h - mu_j^h)^2 / var_j^h.
            r_next = saved[4 * (t + 1)]
            inner = (grad_next * r_next).sum(dim=1)  # (G, I)
            if geometry is not None:  # normalised over all of the child's parents
                n_, p_, s_ = geometry.batch, geometry.positions, geometry.slots
                inner = geometry.child_sum(inner.view(n_, p_, s_)).view(g, i)
            grad_l = r_next * (grad_next - inner.unsqueeze(1))  # (G, O, I)
            grad_e = grad_l * -0.5
            grad_l_sum = grad_l.sum(-1)  # (G, O)
            grad_logit_acc = grad_logit_acc + grad_l_sum * torch.sigmoid(-logit)
            ge = grad_e.view(go, 1, i)
            grad_inv_var = torch.bmm(ge, work).view(g, o, d)
            grad_var = -0.5 * grad_l_sum.unsqueeze(-1) * inv_var - grad_inv_var * inv_var * inv_var
            # sum_i grad_e_ij (V_ij - mu_j) = sum_i grad_e_ij (V_ij - c_j) - shift_j sum_i grad_e_ij
            ge_diff = torch.bmm(ge, vc).view(g, o, d) + shift * (0.5 * grad_l_sum).unsqueeze(-1)
            grad_mu_acc = grad_mu_acc - 2.0 * inv_var * ge_diff
            child_factors.append(grad_e)
            scale_factors.append(2.0 * inv_var)
            const_factors.append(-2.0 * shift * inv_var)
        # M-step t: logit = lam (beta_a - cost), cost = s (D beta_u + 0.5 sum_h log var^h)
        grad_ba += lam * grad_logit_acc
        grad_cost = _em_cost_backward(s, log_var, beta_u, -lam * grad_logit_acc, config)
        per_entry = beta_u * d + 0.5 * log_var.sum(-1)
        grad_s = grad_cost * per_entry
        grad_bu += grad_cost * s * d
        grad_var = grad_var + (0.5 * grad_cost * s).unsqueeze(-1) * inv_var  # log var
        # var = Q / n + floor, Q_j^h = sum_i R'_ij (V_ij^h - mu_j^h)^2
        grad_q = grad_var / n
        grad_n = -(grad_var * var_raw).sum(-1)
        # dQ/dmu = -2 sum_i R'_ij (V_ij - mu_j) = -2 mu_j eps exactly, as mu = P / (s + eps)
        grad_mu_acc = grad_mu_acc - 2.0 * eps * grad_q * mu
        # mu = P / n, P_j^h = sum_i R'_ij V_ij^h
        grad_p = grad_mu_acc / n
        grad_n = (grad_n - (grad_mu_acc * mu).sum(-1)) / n.squeeze(-1)
        grad_s = grad_s + grad_n  # n = s + eps
        # dP/dR' = V = (V - c) + c; dQ/dR' = (V - mu)^2
        grad_w = (grad_s + (grad_p * centre).sum(-1)).unsqueeze(-1)
        grad_w = grad_w + _matvec(vc, grad_p.view(go, d)).view(g, o, i)
        grad_w += _matvec(work, grad_q.view(go, d)).view(g, o, i)
        # dL/dV_ij += R'_ij grad_p_j + 2 (V_ij - mu_j) R'_ij grad_q_j
        child_factors.append(weights)
        scale_factors.append(2.0 * grad_q)
        const_factors.append(grad_p - 2.0 * shift * grad_q)
        # R'_ij = R_ij a_i
        grad_act += (grad_w * assign).sum(1)
        grad_next = grad_w * a
        if t == last and grad_assign is not None:
            grad_next = grad_next + grad_assign
        grad_mu_t = zeros_od
        grad_logit_t = votes.new_zeros(g, o)
    k = len(child_factors)
    left = torch.stack(child_factors, dim=-1).view(go, i, k)
    torch.bmm(left, torch.stack(scale_factors, dim=-2).view(go, k, d), out=work)
    grad_votes = torch.bmm(
        left,
        torch.stack(const_factors, dim=-2).view(go, k, d),
        out=None if out is None else out.view(go, i, d),
    )
    grad_votes.addcmul_(vc, work)
    return grad_votes.view(g, o, i, d), grad_act, grad_bu, grad_ba


# Rows of the parent-major votes (G, O, I, D) are routed in chunks of about this many bytes
# of votes: every iteration makes several passes over the votes, and a chunk that stays in
# the CPU caches between passes is routed ~2x faster than one that streams from memory
# (benchmarks/RESULTS.md). Chunks hold whole examples, so a capsule convolution's E-step,
# which couples all positions of an example, is unchanged. Does not change any result.
_EM_CHUNK_BYTES = 2 << 20


def _em_chunks(
    rows: int, row_bytes: int, config: _EMConfig, device: torch.device
) -> list[tuple[slice, _EMConfig]]:
    """Split ``rows`` rows of parent-major votes into cache-sized chunks of whole examples.

    ``row_bytes``: bytes of votes per row. Returns ``(row slice, config for the chunk)``.
    """
    geometry = config.geometry
    rows_per_example = 1 if geometry is None else geometry.positions
    examples = rows // rows_per_example
    if examples == 0:  # an empty batch: one empty chunk
        return [(slice(0, rows), config)]
    if device.type != "cpu":  # GPUs stream the whole tensor at once just fine
        per_chunk = examples
    else:
        per_chunk = max(1, min(examples, _EM_CHUNK_BYTES // max(1, row_bytes * rows_per_example)))
    chunks = []
    for start in range(0, examples, per_chunk):
        stop = min(examples, start + per_chunk)
        cfg = config
        if geometry is not None:
            cfg = config._replace(
                geometry=geometry._replace(
                    child_id=geometry.child_id[: stop - start], batch=stop - start
                )
            )
        chunks.append((slice(start * rows_per_example, stop * rows_per_example), cfg))
    return chunks


def _vote_rows(votes: Tensor) -> tuple[int, int]:
    """Rows of parent-major votes ``(G, O, I, D)`` and bytes per row."""
    return votes.shape[0], math.prod(votes.shape[1:]) * votes.element_size()


def _em_forward_chunked(
    chunk_votes: Callable[[slice], Tensor],
    chunks: list[tuple[slice, _EMConfig]],
    act: Tensor,
    beta_u: Tensor,
    beta_a: Tensor,
    keep_saved: bool = True,
    keep_assign: bool = True,
) -> tuple[Tensor, Tensor, Tensor | None, list[Tensor]]:
    """:func:`_em_forward` chunk by chunk (:func:`_em_chunks`), results concatenated.

    ``chunk_votes(rows)`` gives the parent-major votes of a chunk (a slice of stored votes,
    or votes computed on the spot). The first iteration's saved assignments (a constant
    expanded over parents) are kept as one row ``(G, 1, I)``; :func:`_saved_rows` expands
    them again. ``keep_saved=False`` (no backward pass) drops the saved tensors chunk by
    chunk and returns ``[]``; ``keep_assign=False`` returns ``None`` for the assignments.
    """
    mus, logits, assigns, saved_chunks = [], [], [], []
    for rows, cfg in chunks:
        votes = chunk_votes(rows)
        mu, logit, assign, saved = _em_forward(votes, act[rows], beta_u[rows], beta_a[rows], cfg)
        del votes
        saved[0] = saved[0][:, :1]
        mus.append(mu)
        logits.append(logit)
        assigns.append(assign if keep_assign else None)
        saved_chunks.append(saved if keep_saved else [])
    saved = [_cat(x) for x in zip(*saved_chunks, strict=True)]
    return _cat(mus), _cat(logits), _cat(assigns) if keep_assign else None, saved


def _saved_rows(saved: Sequence[Tensor], rows: slice, out_caps: int) -> list[Tensor]:
    """The saved tensors of one chunk, the first assignments expanded back over parents."""
    out = [x[rows] for x in saved]
    out[0] = out[0].expand(-1, out_caps, -1)
    return out


def _cat(parts: Sequence[Tensor]) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(list(parts))


class _EMRouting(torch.autograd.Function):
    """EM routing with a hand-written backward pass (see the section comment)."""

    @staticmethod
    def forward(ctx, votes, act, beta_u, beta_a, config: _EMConfig):  # noqa: D102
        with _no_autocast(votes):
            chunks = _em_chunks(*_vote_rows(votes), config, votes.device)
            mu, logit, assign, saved = _em_forward_chunked(
                lambda rows: votes[rows], chunks, act, beta_u, beta_a
            )
        ctx.config = config
        ctx.save_for_backward(votes, act, beta_u, beta_a, *saved)
        ctx.set_materialize_grads(False)
        return mu, logit, assign

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_mu, grad_logit, grad_assign):  # noqa: D102
        votes, act, beta_u, beta_a, *saved = ctx.saved_tensors
        grad_mu, grad_logit, grad_assign = (
            None if x is None else x.contiguous() for x in (grad_mu, grad_logit, grad_assign)
        )
        o = votes.shape[1]
        grad_votes = torch.empty_like(votes)
        grads: list[list[Tensor]] = [[], [], []]
        with _no_autocast(votes):
            for rows, cfg in _em_chunks(*_vote_rows(votes), ctx.config, votes.device):
                _, *rest = _em_backward(
                    votes[rows],
                    act[rows],
                    beta_u[rows],
                    beta_a[rows],
                    _saved_rows(saved, rows, o),
                    cfg,
                    *(None if x is None else x[rows] for x in (grad_mu, grad_logit, grad_assign)),
                    out=grad_votes[rows],
                )
                for acc, x in zip(grads, rest, strict=True):
                    acc.append(x)
        return (grad_votes, *(_cat(x) for x in grads), None)


def _conv_capsule_chunk_votes(children: Tensor, w_mat: Tensor) -> tuple[Tensor, Tensor]:
    """Parent-major votes ``(g, O, I, 16)`` of ``children (g, I, 4, 4)``, ``w_mat (I, 4, O*4)``.

    One batched matmul per child slot over all (parent position, pose row) pairs of the
    chunk, then one copy into the routing layout. Also returns the slot-major children
    ``(I, g*4, 4)`` that the matmul used (the backward pass needs them).
    """
    g, i = children.shape[:2]
    o = w_mat.shape[-1] // 4
    rows = children.transpose(0, 1).reshape(i, g * 4, 4)  # (I, (g, x), y)
    products = torch.bmm(rows, w_mat)  # (I, (g, x), (o, z))
    votes = products.view(i, g, 4, o, 4).permute(1, 3, 0, 2, 4).reshape(g, o, i, 16)
    return votes, rows


def _conv_capsules_forward(
    children: Tensor,
    act: Tensor,
    w_mat: Tensor,
    beta_u: Tensor,
    beta_a: Tensor,
    config: _EMConfig,
    keep_saved: bool = True,
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Votes + :func:`_em_forward`, chunk by chunk; returns ``mu``, ``logit``, saved tensors.

    ``keep_saved=False`` (no backward pass) keeps nothing of the chunks but the outputs.
    """
    with _no_autocast(children):
        chunks = _em_chunks(
            children.shape[0], _chunk_row_bytes(children, w_mat), config, children.device
        )
        mu, logit, _, saved = _em_forward_chunked(
            lambda rows: _conv_capsule_chunk_votes(children[rows], w_mat)[0],
            chunks, act, beta_u, beta_a, keep_saved=keep_saved, keep_assign=False,
        )  # fmt: skip
    return mu, logit, saved


def _chunk_row_bytes(children: Tensor, w_mat: Tensor) -> int:
    """Bytes of votes per row (parent position) of a capsule convolution."""
    return children.shape[1] * w_mat.shape[-1] * 4 * children.element_size()


class _ConvCapsulesEM(torch.autograd.Function):
    """Votes + EM routing of a capsule convolution, votes recomputed in the backward pass."""

    @staticmethod
    def forward(ctx, children, act, w_mat, beta_u, beta_a, config: _EMConfig):  # noqa: D102
        mu, logit, saved = _conv_capsules_forward(children, act, w_mat, beta_u, beta_a, config)
        ctx.config = config
        ctx.save_for_backward(children, act, w_mat, beta_u, beta_a, *saved)
        ctx.set_materialize_grads(False)
        return mu, logit

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_mu, grad_logit):  # noqa: D102
        children, act, w_mat, beta_u, beta_a, *saved = ctx.saved_tensors
        grad_mu, grad_logit = (None if x is None else x.contiguous() for x in (grad_mu, grad_logit))
        g, i = children.shape[:2]
        o = w_mat.shape[-1] // 4
        grad_children = torch.empty_like(children)
        grad_w = torch.zeros_like(w_mat)
        grads: list[list[Tensor]] = [[], [], []]
        with _no_autocast(children):
            chunks = _em_chunks(g, _chunk_row_bytes(children, w_mat), ctx.config, children.device)
            for rows, cfg in chunks:
                votes, slot_rows = _conv_capsule_chunk_votes(children[rows], w_mat)
                grad_votes, *rest = _em_backward(
                    votes, act[rows], beta_u[rows], beta_a[rows], _saved_rows(saved, rows, o), cfg,
                    None if grad_mu is None else grad_mu[rows],
                    None if grad_logit is None else grad_logit[rows],
                    None, out=votes,
                )  # fmt: skip
                for acc, x in zip(grads, rest, strict=True):
                    acc.append(x)
                # Back through V = M W: the slot-major layout of the forward products.
                n_rows = grad_votes.shape[0]
                grad_products = (
                    grad_votes.view(n_rows, o, i, 4, 4).permute(2, 0, 3, 1, 4)
                    .reshape(i, n_rows * 4, o * 4)
                )  # fmt: skip
                grad_w.baddbmm_(slot_rows.transpose(1, 2), grad_products)
                grad_rows = torch.bmm(grad_products, w_mat.transpose(1, 2))  # (I, (g, x), y)
                grad_children[rows] = grad_rows.view(i, n_rows, 4, 4).transpose(0, 1)
        grad_act, grad_bu, grad_ba = (_cat(x) for x in grads)
        return grad_children, grad_act, grad_w, grad_bu, grad_ba, None


def _em_routing_fast(
    votes: Tensor,
    activations: Tensor,
    beta_u: Tensor,
    beta_a: Tensor,
    lambdas: Sequence[float],
    normalize_cost: bool,
    var_floor: float,
    eps: float,
    geometry: _ConvGeometry | None,
) -> tuple[Tensor, Tensor, Tensor]:
    batch_shape, (in_caps, out_caps, dim) = votes.shape[:-3], votes.shape[-3:]
    compute = _compute_dtype(votes)
    try:
        bu = torch.broadcast_to(beta_u.to(compute), (*batch_shape, out_caps))
        ba = torch.broadcast_to(beta_a.to(compute), (*batch_shape, out_caps))
    except RuntimeError:  # betas with more dims than the votes' batch: plain path
        if geometry is None:
            return _em_routing_plain(
                votes, activations, beta_u, beta_a, lambdas, normalize_cost, var_floor, eps
            )
        return _conv_em_routing_plain(
            votes, activations, beta_u, beta_a, geometry, lambdas, normalize_cost, var_floor,
            eps,
        )  # fmt: skip
    v = _parent_major(votes, compute)  # (G, O, I, D)
    g = v.shape[0]
    act = activations.to(compute).reshape(g, in_caps)
    bu, ba = bu.reshape(g, out_caps), ba.reshape(g, out_caps)
    config = _EMConfig(tuple(lambdas), bool(normalize_cost), float(var_floor), float(eps), geometry)
    if _needs_grad(v, act, bu, ba):
        mu, logit, assign = _EMRouting.apply(v, act, bu, ba, config)
    else:
        with _no_autocast(v):
            mu, logit, assign, _ = _em_forward_chunked(
                lambda rows: v[rows],
                _em_chunks(*_vote_rows(v), config, v.device),
                act, bu, ba, keep_saved=False,
            )  # fmt: skip
    out = votes.dtype
    return (
        mu.reshape(*batch_shape, out_caps, dim).to(out),
        torch.sigmoid(logit).reshape(*batch_shape, out_caps).to(out),
        assign.transpose(1, 2).reshape(*batch_shape, in_caps, out_caps).to(out),
    )


# --------------------------------------------------------------------------- losses


def margin_loss(
    lengths: Tensor,
    targets: Tensor,
    m_plus: float = 0.9,
    m_minus: float = 0.1,
    lambda_: float = 0.5,
    reduction: str = "mean",
) -> Tensor:
    """Margin loss, [S17] eq. (4) (SPEC §1), on raw capsule lengths (no softmax).

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
    _check_float("lengths", lengths)
    _check_ndim("lengths", lengths, 2, "(B, num_classes)")
    t = _targets_to_float(targets, lengths.shape[-1], lengths)
    present = t * F.relu(m_plus - lengths).pow(2)
    absent = lambda_ * (1.0 - t) * F.relu(lengths - m_minus).pow(2)
    return _reduce((present + absent).sum(-1), reduction)


def spread_loss(
    activations: Tensor, targets: Tensor, margin: float, reduction: str = "mean"
) -> Tensor:
    """Spread loss, [H18] eq. (3) (SPEC §2).

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
    _check_float("activations", activations)
    _check_ndim("activations", activations, 2, "(B, num_classes)")
    t = _targets_to_float(targets, activations.shape[-1], activations)
    a_target = (activations * t).sum(-1, keepdim=True)  # (B, 1)
    per_class = F.relu(margin - (a_target - activations)).pow(2) * (1.0 - t)
    return _reduce(per_class.sum(-1), reduction)


def spread_margin(
    epoch: float, start: float = 0.2, stop: float = 0.9, step_per_epoch: float = 0.1
) -> float:
    """Spread-loss margin schedule: ``min(stop, start + step_per_epoch * epoch)``.

    [H18] states only that m grows from 0.2 to 0.9; +0.1 per epoch is the common choice.
    ``epoch`` may be fractional (``step / steps_per_epoch``).
    """
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    return float(min(stop, start + step_per_epoch * epoch))


def reconstruction_loss(recon: Tensor, images: Tensor, reduction: str = "mean") -> Tensor:
    """Sum of squared pixel differences per image, [S17] §4.1 (SPEC §1).

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
    _check_float("recon", recon)
    _check_float("images", images)
    if recon.shape[0] != images.shape[0] or recon[0].numel() != images[0].numel():
        raise ValueError(
            f"recon and images must hold the same batch and pixels per example, got "
            f"{tuple(recon.shape)} and {tuple(images.shape)}"
        )
    diff = recon.reshape(recon.shape[0], -1) - images.reshape(images.shape[0], -1)
    return _reduce(diff.pow(2).sum(-1), reduction)


# --------------------------------------------------------------------------- coordinates


def coordinate_addition(
    votes: Tensor, height: int, width: int, elements: tuple[int, int] = (0, 1)
) -> Tensor:
    """Coordinate addition, [H18] §3 (SPEC §2 convention).

    For a child capsule at grid position (row, col) of an ``height x width`` grid, adds
    ``(row + 0.5) / height`` to vote element ``elements[0]`` and ``(col + 0.5) / width`` to
    element ``elements[1]``. Returns a new tensor.

    Note:
        SPEC §2 (our contract) names the first two entries of the flattened 4x4 vote,
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
    _check_float("votes", votes)
    _check_ndim("votes", votes, 3, "(..., in_caps, out_caps, pose_dim)")
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
