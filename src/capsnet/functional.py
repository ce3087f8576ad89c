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
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "squash",
    "dynamic_routing",
    "em_routing",
    "conv_em_routing",
    "conv_children_index",
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
        raise ValueError(
            f"votes must have shape (N, P, K*K*B, O, D), got {tuple(votes.shape)}"
        )
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
    # Flat child id (input position, input type) of every (parent position, k, b) slot.
    child_id = (index[:, :, None] * in_types + torch.arange(in_types, device=votes.device))
    child_id = child_id.reshape(1, positions * children).expand(n, -1)  # (N, P*KK*B)
    num_children = in_size[0] * in_size[1] * in_types

    def child_sum(x: Tensor) -> Tensor:
        """Sum over all slots of the same child, broadcast back to the slots: (N, P, KKB)."""
        flat = x.reshape(n, positions * children)
        total = flat.new_zeros(n, num_children).scatter_add_(1, child_id, flat)
        return total.gather(1, child_id).reshape(n, positions, children)

    out_dtype = votes.dtype
    compute = _compute_dtype(votes)
    votes_c, act = votes.to(compute), activations.to(compute).unsqueeze(-1)
    beta_u, beta_a = beta_u.to(compute), beta_a.to(compute)

    fan_out = child_sum(votes_c.new_ones(n, positions, children)) * out_caps  # parents fed
    assignments = (1.0 / fan_out).unsqueeze(-1).expand(-1, -1, -1, out_caps)
    for t, lam in enumerate(lambdas):
        mu, var, logit = _m_step(
            votes_c, assignments * act, beta_u, beta_a, lam, normalize_cost, var_floor, eps
        )
        if t < len(lambdas) - 1:
            log_r = _log_assignment_logits(votes_c, mu, var, logit)  # (N, P, KKB, O)
            # A softmax over every parent the child feeds: subtract the child's max
            # (a constant, so detached) for stability, then normalise by the child's sum.
            slot_max = log_r.detach().amax(dim=-1).reshape(n, positions * children)
            child_max = slot_max.new_full((n, num_children), -torch.inf).scatter_reduce_(
                1, child_id, slot_max, reduce="amax"
            )
            shift = child_max.gather(1, child_id).reshape(n, positions, children, 1)
            unnorm = torch.exp(log_r - shift)
            assignments = unnorm / child_sum(unnorm.sum(-1)).unsqueeze(-1)
    return mu.to(out_dtype), torch.sigmoid(logit).to(out_dtype), assignments.to(out_dtype)


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


def coordinate_addition(votes: Tensor, height: int, width: int) -> Tensor:
    """Coordinate addition, [H18] §3 (SPEC §2 convention).

    For a child capsule at grid position (row, col) of an ``height x width`` grid, adds
    ``(row + 0.5) / height`` to vote element 0 and ``(col + 0.5) / width`` to element 1 (the
    first two entries of the flattened 4x4 vote). Returns a new tensor.

    Args:
        votes: votes of the class capsule layer; the child axis enumerates
            ``(row, col, type)`` in row-major order, i.e. ``I = height * width * types``.
        height, width: the child capsule grid; any (also rectangular) size.

    Shape:
        - votes: ``(..., I, O, D)`` with ``D >= 2``; output: same.
    """
    _check_float("votes", votes)
    _check_ndim("votes", votes, 3, "(..., in_caps, out_caps, pose_dim)")
    in_caps, pose_dim = votes.shape[-3], votes.shape[-1]
    if height < 1 or width < 1 or in_caps % (height * width):
        raise ValueError(
            f"votes.shape[-3] (in_caps = {in_caps}) must be height*width*types for "
            f"height={height}, width={width}"
        )
    if pose_dim < 2:
        raise ValueError(f"votes.shape[-1] (pose_dim) must be >= 2, got {pose_dim}")
    types = in_caps // (height * width)
    rows = (torch.arange(height, device=votes.device, dtype=votes.dtype) + 0.5) / height
    cols = (torch.arange(width, device=votes.device, dtype=votes.dtype) + 0.5) / width
    offset = votes.new_zeros(height, width, types, pose_dim)
    offset[..., 0] = rows[:, None, None]
    offset[..., 1] = cols[None, :, None]
    return votes + offset.reshape(in_caps, 1, pose_dim)
