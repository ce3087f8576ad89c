"""EM routing ([H18] Procedure 1) on parent-major votes: the M-step and E-step that train.

:func:`m_step` and :func:`e_step` are the two steps of the paper's Procedure 1 as they run
in training (on votes laid out ``(G, O, I, D)``; see the package docstring);
:func:`em_forward` alternates them. :func:`em_backward` is their hand-written gradient,
and the rest runs them in cache-sized chunks of examples. The same equations written
plainly, in the public layout and with autograd, are
:func:`capsnet.functional.reference.em_routing`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from capsnet.functional._common import LOG_2PI, compute_dtype
from capsnet.functional._kernels.chunking import chunk_bytes
from capsnet.functional._kernels.common import matvec, needs_grad, no_autocast, parent_major
from capsnet.functional.em_variants import EMVariant
from capsnet.functional.geometry import ConvGeometry


class EMConfig(NamedTuple):
    """The options of one EM routing call, resolved (lambdas as a tuple, geometry built).

    The last six fields are the numeric choices of the EM variant
    (:class:`capsnet.functional.em_variants.EMVariant`), resolved for the call:
    ``cost_scale`` is the variant's data-mass factor ``mass_scale * O / I`` (or 1), and
    ``per_type`` says that a convolutional layer's E-step normalises each child over the
    positions of each parent type separately (``geometry`` is then built per type).
    """

    lambdas: tuple[float, ...]
    normalize_cost: bool
    var_floor: float
    eps: float
    geometry: ConvGeometry | None
    beta_a_scale: float = 1.0
    beta_u_scale: float = 1.0
    log_var_scale: float = 0.5
    cost_scale: float = 1.0
    mean_momentum: float = 0.0
    per_type: bool = False


def make_em_config(
    variant: EMVariant,
    lambdas: Sequence[float],
    normalize_cost: bool,
    var_floor: float | None,
    eps: float | None,
    geometry: ConvGeometry | None,
    *,
    in_caps: int,
    out_caps: int,
) -> EMConfig:
    """The :class:`EMConfig` of a call: ``variant``'s choices for ``in_caps`` children and
    ``out_caps`` parents per group; ``var_floor`` / ``eps`` None take the variant's."""
    cost_scale = 1.0
    if variant.mass_scale is not None:
        cost_scale = variant.mass_scale * out_caps / max(in_caps, 1)
    return EMConfig(
        lambdas=tuple(float(x) for x in lambdas),
        normalize_cost=bool(normalize_cost),
        var_floor=float(variant.var_floor if var_floor is None else var_floor),
        eps=float(variant.eps if eps is None else eps),
        geometry=geometry,
        beta_a_scale=float(variant.beta_a_scale),
        beta_u_scale=float(variant.beta_u_scale),
        log_var_scale=float(variant.log_var_scale),
        cost_scale=float(cost_scale),
        mean_momentum=float(variant.mean_momentum),
        per_type=geometry is not None and variant.conv_normalization == "per_type",
    )


def _em_cost(
    s: Tensor, log_var: Tensor, beta_u: Tensor, config: EMConfig, normalize: bool
) -> Tensor:
    """``cost_scale * s * (beta_u_scale * D * beta_u + log_var_scale * sum_h log var^h)``
    (optionally standardised over the parents): ``(G, O)``. Paper: ``sum_h (beta_u +
    log sigma^h) sum_i R'_ij``."""
    dim = log_var.shape[-1]
    per_entry = beta_u * (config.beta_u_scale * dim) + config.log_var_scale * log_var.sum(-1)
    cost = s * per_entry
    if config.cost_scale != 1.0:
        cost = cost * config.cost_scale
    if normalize:
        mean = cost.mean(dim=-1, keepdim=True)
        std = (cost - mean).pow(2).mean(dim=-1, keepdim=True).add(config.eps).sqrt()
        cost = (cost - mean) / std
    return cost


def _em_cost_backward(
    s: Tensor, log_var: Tensor, beta_u: Tensor, grad: Tensor, config: EMConfig
) -> Tensor:
    """Gradient w.r.t. the raw cost of :func:`_em_cost` given ``grad`` w.r.t. its output."""
    if not config.normalize_cost:
        return grad
    cost = _em_cost(s, log_var, beta_u, config, False)
    mean = cost.mean(dim=-1, keepdim=True)
    std = (cost - mean).pow(2).mean(dim=-1, keepdim=True).add(config.eps).sqrt()
    normed = (cost - mean) / std
    # Standardisation over the parents (as in layer norm without affine parameters).
    return (
        grad - grad.mean(dim=-1, keepdim=True) - normed * (grad * normed).mean(-1, keepdim=True)
    ) / std


def m_step(
    votes: Tensor,
    weights: Tensor,
    beta_u: Tensor,
    beta_a: Tensor,
    inverse_temperature: float,
    config: EMConfig,
    work: Tensor,
    mu_prev: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """M-step of [H18] Procedure 1 for every parent j (docs/spec.md §2)::

        R'_ij = R_ij a_i                                          (``weights``, given)
        mu_j^h = sum_i R'_ij V_ij^h / sum_i R'_ij
        (sigma_j^h)^2 = sum_i R'_ij (V_ij^h - mu_j^h)^2 / sum_i R'_ij
        cost_j = sum_h (beta_u + log sigma_j^h) sum_i R'_ij
        a_j = logistic(lambda (beta_a - cost_j))

    in the paper's form; other EM variants scale the terms and damp the mean
    (:mod:`capsnet.functional.em_variants`: ``mu = (1 - m) mean + m mu_prev``, ``cost =
    cost_scale s (beta_u_scale D beta_u + log_var_scale sum_h log var^h)``, ``logit =
    lambda (beta_a_scale beta_a - cost)``).

    Args:
        votes: ``V (G, O, I, D)``, parent-major.
        weights: ``R'_ij (G, O, I)``.
        beta_u, beta_a: ``(G, O)``.
        inverse_temperature: lambda of this iteration.
        config: the options (the variant's scales, cost standardisation, variance floor,
            eps).
        work: a ``(G*O, I, D)`` buffer; left holding ``(V_ij^h - mu_j^h)^2`` for the E-step.
        mu_prev: the previous iteration's means ``(G, O, D)`` (None: zeros); used only
            with a mean momentum.

    Returns:
        ``(mu, var_raw, log_var, logit)``: means ``(G, O, D)``, variances before the
        floor, ``log`` of the floored variances, and the activation logits ``(G, O)``
        (``a_j = sigmoid(logit)``).
    """
    g, o, i, d = votes.shape
    vf, wf = votes.view(g * o, i, d), weights.view(g * o, 1, i)
    mass = weights.sum(-1)  # sum_i R'_ij: (G, O)
    n = (mass + config.eps).unsqueeze(-1)  # Note: + eps keeps all-zero activations finite
    mu = torch.bmm(wf, vf).view(g, o, d) / n
    if config.mean_momentum:
        # Note: not in [H18]; the official code's damped centre (em_variants "official").
        mu = mu * (1.0 - config.mean_momentum)
        if mu_prev is not None:
            mu = mu + config.mean_momentum * mu_prev
    torch.sub(vf, mu.view(g * o, 1, d), out=work).square_()  # (V_ij^h - mu_j^h)^2
    var_raw = torch.bmm(wf, work).view(g, o, d) / n
    # Note: a variance floor (not in the paper) keeps log(sigma) finite when all votes of
    # a parent agree exactly or a parent has a single child ([G19] pitfall 2).
    log_var = (var_raw + config.var_floor).log()
    cost = _em_cost(mass, log_var, beta_u, config, config.normalize_cost)
    logit = inverse_temperature * (config.beta_a_scale * beta_a - cost)
    return mu, var_raw, log_var, logit


def e_step(work: Tensor, log_var: Tensor, logit: Tensor, config: EMConfig) -> Tensor:
    """E-step of [H18] Procedure 1 (docs/spec.md §2): the new assignments ``R (G, O, I)``::

        R_ij = a_j p_ij / sum_k a_k p_ik,  p_ij = prod_h N(V_ij^h; mu_j^h, (sigma_j^h)^2)

    computed in log space: ``log a_j + log p_ij`` normalised over the parents of child i
    (a softmax; for a capsule convolution over every parent, at every position and of
    every type, that the child feeds, or, with ``config.per_type``, over the positions of
    each parent type separately). ``work (G*O, I, D)`` holds ``(V - mu)^2`` from
    :func:`m_step` and is overwritten; ``log_var (G, O, D)``, ``logit (G, O)``.
    """
    g, o, d = log_var.shape
    i = work.shape[1]
    inv_var = torch.exp(-log_var)
    log_r = matvec(work, inv_var.view(g * o, d)).view(g, o, i).mul_(-0.5)
    # log a_j = logsigmoid(logit): exact, and finite where a_j underflows to 0.
    log_r += (F.logsigmoid(logit) - 0.5 * (log_var + LOG_2PI).sum(-1)).unsqueeze(-1)
    return _e_step_normalize(log_r, config)


def _e_step_normalize(log_r: Tensor, config: EMConfig) -> Tensor:
    """Assignments from E-step logits ``(G, O, I)``, in place: a softmax over parents.

    For a capsule convolution, over every parent (all positions and types) of the child,
    or (``per_type``) over all positions of each parent type.
    """
    geometry = config.geometry
    if geometry is None:
        return torch.softmax(log_r, dim=1)
    n, p, s = geometry.batch, geometry.positions, geometry.slots
    if config.per_type:  # slots are (parent type, child slot) pairs
        flat = log_r.view(n, p, s)
        unnorm = flat.sub_(geometry.child_max(flat)).exp_()
        return unnorm.div_(geometry.child_sum(unnorm)).view(log_r.shape)
    shift = geometry.child_max(log_r.amax(dim=1).view(n, p, s)).view(n * p, 1, s)
    unnorm = log_r.sub_(shift).exp_()
    return unnorm.div_(geometry.child_sum(unnorm.sum(dim=1).view(n, p, s)).view(n * p, 1, s))


def em_forward(
    votes: Tensor, act: Tensor, beta_u: Tensor, beta_a: Tensor, config: EMConfig
) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    """[H18] Procedure 1 on parent-major votes ``(G, O, I, D)``, no autograd.

    Starts from ``R_ij = 1 / O`` (for a capsule convolution normalised over all parents,
    1 / the number of parents the child feeds) and alternates :func:`m_step` and
    :func:`e_step`; the E-step after the last M-step is skipped.

    ``act (G, I)``, ``beta_u``, ``beta_a`` ``(G, O)``. Returns ``mu (G, O, D)``, the
    activation logits ``(G, O)``, the assignments of the last M-step ``(G, O, I)`` and the
    per-iteration tensors the backward pass needs.
    """
    g, o, i, d = votes.shape
    work = torch.empty(g * o, i, d, dtype=votes.dtype, device=votes.device)
    geometry = config.geometry
    if geometry is None or config.per_type:
        assign = votes.new_full((1, 1, 1), 1.0 / o).expand(g, o, i)  # R_ij = 1 / O
    else:  # R_ij = 1 / (number of parents the child feeds)
        fan = geometry.fan_out(o, votes.dtype).view(g, 1, i)
        assign = (1.0 / fan).expand(g, o, i)
    a = act.unsqueeze(1)  # (G, 1, I)
    saved: list[Tensor] = []
    last = len(config.lambdas) - 1
    mu: Tensor | None = None  # the previous centre (the official variant damps towards it)
    for t, lam in enumerate(config.lambdas):
        mu, var_raw, log_var, logit = m_step(
            votes, assign * a, beta_u, beta_a, lam, config, work, mu
        )
        saved += [assign, mu, var_raw, logit]
        if t < last:
            assign = e_step(work, log_var, logit, config)
    assert mu is not None  # at least one iteration
    return mu, logit, assign, saved


def em_backward(
    votes: Tensor,
    act: Tensor,
    beta_u: Tensor,
    beta_a: Tensor,
    saved: Sequence[Tensor],
    config: EMConfig,
    grad_mu: Tensor | None,
    grad_logit: Tensor | None,
    grad_assign: Tensor | None,
    out: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Backward pass of :func:`em_forward`, iterations in reverse order.

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
    momentum = config.mean_momentum
    cost_scale, u_scale, lv_scale = config.cost_scale, config.beta_u_scale, config.log_var_scale
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
        var = var_raw + floor  # the floor of m_step
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
            assert grad_next is not None  # set by iteration t + 1
            inner = grad_next * r_next  # (G, O, I)
            if geometry is not None and config.per_type:  # per type, over all positions
                n_, p_, s_ = geometry.batch, geometry.positions, geometry.slots
                inner = geometry.child_sum(inner.view(n_, p_, s_)).view(g, o, i)
            else:
                inner = inner.sum(dim=1)  # (G, I)
                if geometry is not None:  # normalised over all of the child's parents
                    n_, p_, s_ = geometry.batch, geometry.positions, geometry.slots
                    inner = geometry.child_sum(inner.view(n_, p_, s_)).view(g, i)
                inner = inner.unsqueeze(1)
            grad_l = r_next * (grad_next - inner)  # (G, O, I)
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
        # M-step t: logit = lam (beta_a_scale beta_a - cost),
        # cost = cost_scale s (beta_u_scale D beta_u + log_var_scale sum_h log var^h)
        grad_ba += (lam * config.beta_a_scale) * grad_logit_acc
        grad_cost = _em_cost_backward(s, log_var, beta_u, -lam * grad_logit_acc, config)
        grad_cost = grad_cost * cost_scale
        per_entry = beta_u * (u_scale * d) + lv_scale * log_var.sum(-1)
        grad_s = grad_cost * per_entry
        grad_bu += grad_cost * s * (u_scale * d)
        grad_var = grad_var + (lv_scale * grad_cost * s).unsqueeze(-1) * inv_var  # log var
        # var = Q / n + floor, Q_j^h = sum_i R'_ij (V_ij^h - mu_j^h)^2
        grad_q = grad_var / n
        grad_n = -(grad_var * var_raw).sum(-1)
        if momentum:
            # mu = (1 - m) P / n + m mu_prev: dQ/dmu = -2 (P - s mu), P = n * mean
            mu_prev = saved[4 * (t - 1) + 1] if t > 0 else zeros_od
            mean = (mu - momentum * mu_prev) / (1.0 - momentum)
            grad_mu_acc = grad_mu_acc - 2.0 * grad_q * (s.unsqueeze(-1) * (mean - mu) + eps * mean)
            grad_mean = (1.0 - momentum) * grad_mu_acc
            grad_mu_t = momentum * grad_mu_acc  # to mu of iteration t - 1
        else:
            # dQ/dmu = -2 sum_i R'_ij (V_ij - mu_j) = -2 mu_j eps exactly, as mu = P / (s + eps)
            grad_mu_acc = grad_mu_acc - 2.0 * eps * grad_q * mu
            mean, grad_mean = mu, grad_mu_acc
            grad_mu_t = zeros_od
        # mean = P / n, P_j^h = sum_i R'_ij V_ij^h
        grad_p = grad_mean / n
        grad_n = (grad_n - (grad_mean * mean).sum(-1)) / n.squeeze(-1)
        grad_s = grad_s + grad_n  # n = s + eps
        # dP/dR' = V = (V - c) + c; dQ/dR' = (V - mu)^2
        grad_w = (grad_s + (grad_p * centre).sum(-1)).unsqueeze(-1)
        grad_w = grad_w + matvec(vc, grad_p.view(go, d)).view(g, o, i)
        grad_w += matvec(work, grad_q.view(go, d)).view(g, o, i)
        # dL/dV_ij += R'_ij grad_p_j + 2 (V_ij - mu_j) R'_ij grad_q_j
        child_factors.append(weights)
        scale_factors.append(2.0 * grad_q)
        const_factors.append(grad_p - 2.0 * shift * grad_q)
        # R'_ij = R_ij a_i
        grad_act += (grad_w * assign).sum(1)
        grad_next = grad_w * a
        if t == last and grad_assign is not None:
            grad_next = grad_next + grad_assign
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


# Rows of the parent-major votes (G, O, I, D) are routed in chunks of whole examples, of
# about ``chunking.chunk_bytes(device)`` bytes of votes (a share of the CPU's cache; on a
# GPU a share of its memory): see :mod:`.chunking`. A capsule convolution's E-step couples
# the positions of one example only, so chunks of whole examples change no result.
# ``EM_CHUNK_BYTES`` (None: the device's rule) is for tests and benchmarks that force a size.
EM_CHUNK_BYTES: int | None = None


def em_chunks(
    rows: int, row_bytes: int, config: EMConfig, device: torch.device
) -> list[tuple[slice, EMConfig]]:
    """Split ``rows`` rows of parent-major votes into chunks of whole examples.

    ``row_bytes``: bytes of votes per row. Returns ``(row slice, config for the chunk)``.
    """
    geometry = config.geometry
    rows_per_example = 1 if geometry is None else geometry.positions
    examples = rows // rows_per_example
    if examples == 0:  # an empty batch: one empty chunk
        return [(slice(0, rows), config)]
    budget = EM_CHUNK_BYTES if EM_CHUNK_BYTES is not None else chunk_bytes(device)
    per_chunk = max(1, min(examples, budget // max(1, row_bytes * rows_per_example)))
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


def vote_rows(votes: Tensor) -> tuple[int, int]:
    """Rows of parent-major votes ``(G, O, I, D)`` and bytes per row."""
    return votes.shape[0], math.prod(votes.shape[1:]) * votes.element_size()


def em_forward_chunked(
    chunk_votes: Callable[[slice], Tensor],
    chunks: list[tuple[slice, EMConfig]],
    act: Tensor,
    beta_u: Tensor,
    beta_a: Tensor,
    keep_saved: bool = True,
    keep_assign: bool = True,
) -> tuple[Tensor, Tensor, Tensor | None, list[Tensor]]:
    """:func:`em_forward` chunk by chunk (:func:`em_chunks`), results concatenated.

    ``chunk_votes(rows)`` gives the parent-major votes of a chunk (a slice of stored votes,
    or votes computed on the spot). The first iteration's saved assignments (a constant
    expanded over parents) are kept as one row ``(G, 1, I)``; :func:`saved_rows` expands
    them again. ``keep_saved=False`` (no backward pass) drops the saved tensors chunk by
    chunk and returns ``[]``; ``keep_assign=False`` returns ``None`` for the assignments.
    """
    mus, logits, assigns, saved_chunks = [], [], [], []
    for rows, cfg in chunks:
        votes = chunk_votes(rows)
        mu, logit, assign, saved = em_forward(votes, act[rows], beta_u[rows], beta_a[rows], cfg)
        del votes
        saved[0] = saved[0][:, :1]
        mus.append(mu)
        logits.append(logit)
        if keep_assign:
            assigns.append(assign)
        saved_chunks.append(saved if keep_saved else [])
    saved = [cat_rows(x) for x in zip(*saved_chunks, strict=True)]
    return cat_rows(mus), cat_rows(logits), cat_rows(assigns) if keep_assign else None, saved


def saved_rows(saved: Sequence[Tensor], rows: slice, out_caps: int) -> list[Tensor]:
    """The saved tensors of one chunk, the first assignments expanded back over parents."""
    out = [x[rows] for x in saved]
    out[0] = out[0].expand(-1, out_caps, -1)
    return out


def cat_rows(parts: Sequence[Tensor]) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(list(parts))


class _EMRouting(torch.autograd.Function):
    """EM routing with a hand-written backward pass (see the section comment)."""

    @staticmethod
    def forward(ctx, votes, act, beta_u, beta_a, config: EMConfig):  # noqa: D102
        with no_autocast(votes):
            chunks = em_chunks(*vote_rows(votes), config, votes.device)
            mu, logit, assign, saved = em_forward_chunked(
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
        with no_autocast(votes):
            for rows, cfg in em_chunks(*vote_rows(votes), ctx.config, votes.device):
                _, *rest = em_backward(
                    votes[rows],
                    act[rows],
                    beta_u[rows],
                    beta_a[rows],
                    saved_rows(saved, rows, o),
                    cfg,
                    *(None if x is None else x[rows] for x in (grad_mu, grad_logit, grad_assign)),
                    out=grad_votes[rows],
                )
                for acc, x in zip(grads, rest, strict=True):
                    acc.append(x)
        return (grad_votes, *(cat_rows(x) for x in grads), None)


def em_routing_kernel(
    votes: Tensor, activations: Tensor, beta_u: Tensor, beta_a: Tensor, config: EMConfig
) -> tuple[Tensor, Tensor, Tensor]:
    """EM routing of votes in the public layout ``(..., I, O, D)``, checked arguments.

    ``activations (..., I)``; ``beta_u``, ``beta_a`` broadcastable to ``(..., O)``.
    Returns ``(poses (..., O, D), activations (..., O), assignments (..., I, O))``.
    """
    batch_shape, (in_caps, out_caps, dim) = votes.shape[:-3], votes.shape[-3:]
    compute = compute_dtype(votes)
    bu = torch.broadcast_to(beta_u.to(compute), (*batch_shape, out_caps))
    ba = torch.broadcast_to(beta_a.to(compute), (*batch_shape, out_caps))
    v = parent_major(votes, compute)  # (G, O, I, D)
    g = v.shape[0]
    act = activations.to(compute).reshape(g, in_caps)
    bu, ba = bu.reshape(g, out_caps), ba.reshape(g, out_caps)
    if needs_grad(v, act, bu, ba):
        mu, logit, assign = _EMRouting.apply(v, act, bu, ba, config)
    else:
        with no_autocast(v):
            mu, logit, assign, _ = em_forward_chunked(
                lambda rows: v[rows],
                em_chunks(*vote_rows(v), config, v.device),
                act, bu, ba, keep_saved=False,
            )  # fmt: skip
    out = votes.dtype
    return (
        mu.reshape(*batch_shape, out_caps, dim).to(out),
        torch.sigmoid(logit).reshape(*batch_shape, out_caps).to(out),
        assign.transpose(1, 2).reshape(*batch_shape, in_caps, out_caps).to(out),
    )
