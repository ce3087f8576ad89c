"""Routing between capsule layers: the public entry points (docs/spec.md §1-2).

* :func:`dynamic_routing`: routing-by-agreement of vector capsules, [S17] Procedure 1.
* :func:`em_routing`: EM routing of matrix capsules, [H18] Procedure 1, for one group of
  children and their parents (a class capsule layer, or one receptive field).
* :func:`conv_em_routing`: EM routing of a convolutional capsule layer, each child
  normalised over every parent that contains it.

Each function checks its arguments, resolves the inverse-temperature schedule
(:func:`resolve_inverse_temperatures`, the one place that does) and calls a fast kernel
in :mod:`capsnet.functional._kernels`. The equations written out plainly, with autograd,
are in :mod:`capsnet.functional.reference`; the tests hold kernels == reference == float64
loops. The EM M-step and E-step that train are :func:`capsnet.functional._kernels.em.m_step`
and :func:`~capsnet.functional._kernels.em.e_step`.

Letters: ``B`` batch (any leading dims ``...``), ``I`` input (child) capsules, ``O`` output
(parent) capsules, ``D`` pose size, ``P`` parent positions, ``K`` kernel size, ``T`` child
capsule types per position. Example: Sabour's MNIST CapsNet routes ``u_hat`` of shape
``(128, 1152, 10, 16)``; the small matrix capsnet's class layer routes votes
``(32, 512, 10, 16)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from capsnet.functional._common import check_float, check_iterations, check_ndim
from capsnet.functional._kernels.dynamic import dynamic_routing_kernel
from capsnet.functional._kernels.em import em_routing_kernel, make_em_config
from capsnet.functional.em_variants import EMVariant, resolve_em_variant
from capsnet.functional.geometry import ConvGeometry, conv_children_index

__all__ = [
    "dynamic_routing",
    "em_routing",
    "conv_em_routing",
    "default_inverse_temperatures",
    "authors_inverse_temperatures",
    "resolve_inverse_temperatures",
]


def dynamic_routing(
    u_hat: Tensor, iterations: int = 3, *, detach_inner: bool = False
) -> tuple[Tensor, Tensor]:
    """Routing-by-agreement, [S17] Procedure 1 (docs/spec.md §1).

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
    check_float("u_hat", u_hat)
    check_ndim("u_hat", u_hat, 3, "(..., in_caps, out_caps, dim)")
    check_iterations(iterations)
    return dynamic_routing_kernel(u_hat, iterations, bool(detach_inner))


def default_inverse_temperatures(iterations: int) -> list[float]:
    """The default inverse-temperature schedule lambda_1..lambda_r of :func:`em_routing`.

    [H18] gives no schedule. capsnet's default grows lambda linearly from 1 to
    ``min(r, 3)``: ``[1.0]``, ``[1.0, 2.0]``, ``[1.0, 2.0, 3.0]``, ``[1.0, 1.67, 2.33, 3.0]``
    for r = 1..4 (the choice of a popular implementation, docs/spec.md §2). Pass
    ``inverse_temperatures`` explicitly for another schedule, e.g. the
    ``0.01 * (1 - 0.95 ** t)`` one attributed to the authors.
    """
    check_iterations(iterations)
    top = float(min(iterations, 3))
    if iterations == 1:
        return [1.0]
    return [1.0 + (top - 1.0) * t / (iterations - 1) for t in range(iterations)]


def authors_inverse_temperatures(iterations: int, final_lambda: float = 0.01) -> list[float]:
    """``lambda_t = final_lambda * (1 - 0.95 ** t)`` for t = 1..r.

    The schedule the authors quoted on OpenReview (docs/spec.md §2), used by the official code
    (``em_layers.update_em_routing``: ``final_beta * (1 - tf.pow(0.95, i + 1))``, with
    ``final_beta / 4`` in the class layer): ``[0.0005, 0.000975, 0.00142625]`` for r = 3.
    The EM variants with a ``final_lambda`` and the matrix layers use it.
    """
    check_iterations(iterations)
    return [final_lambda * (1.0 - 0.95**t) for t in range(1, iterations + 1)]


def resolve_inverse_temperatures(
    iterations: int,
    inverse_temperatures: Sequence[float] | None,
    variant: str | EMVariant = "paper",
) -> list[float]:
    """lambda_1..lambda_r for ``iterations`` routing iterations: the given list, checked,
    or the schedule of ``variant``: :func:`default_inverse_temperatures` for ``"paper"``,
    ``final_lambda * (1 - 0.95 ** t)`` for a variant with a ``final_lambda``
    (:mod:`capsnet.functional.em_variants`). Every EM function resolves its schedule here.
    """
    check_iterations(iterations)
    if inverse_temperatures is None:
        final = resolve_em_variant(variant).final_lambda
        if final is None:
            return default_inverse_temperatures(iterations)
        return authors_inverse_temperatures(iterations, final)
    lambdas = [float(x) for x in inverse_temperatures]
    if len(lambdas) != iterations:
        raise ValueError(
            f"inverse_temperatures must hold one lambda per iteration ({iterations}), "
            f"got {len(lambdas)}"
        )
    return lambdas


def _check_em_inputs(
    votes: Tensor,
    activations: Tensor,
    beta_u: Tensor | float,
    beta_a: Tensor | float,
    batch_shape: str,
) -> tuple[Tensor, Tensor]:
    check_float("votes", votes)
    check_float("activations", activations)
    check_ndim("votes", votes, 3, f"({batch_shape}in_caps, out_caps, pose_dim)")
    if activations.shape != votes.shape[:-2]:
        raise ValueError(
            f"activations must have shape {tuple(votes.shape[:-2])} "
            f"(votes.shape[:-2] = ({batch_shape}in_caps)), got {tuple(activations.shape)}"
        )
    # One beta per parent, optionally per example: broadcastable to (*batch, out_caps)
    # without adding dimensions (a beta with more dims than the votes' batch is refused).
    target = (*votes.shape[:-3], votes.shape[-2])
    betas = []
    for name, beta in (("beta_u", beta_u), ("beta_a", beta_a)):
        if not isinstance(beta, Tensor):
            beta = torch.as_tensor(beta, dtype=votes.dtype, device=votes.device)
        check_float(name, beta)
        try:
            ok = torch.broadcast_shapes(beta.shape, target) == torch.Size(target)
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(
                f"{name} must be broadcastable to ({batch_shape}out_caps) = {target} "
                f"(usually shape (out_caps,) = ({target[-1]},)), got shape {tuple(beta.shape)}"
            )
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
    variant: str | EMVariant = "paper",
    normalize_cost: bool = False,
    var_floor: float | None = None,
    eps: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """EM routing between one group of children and their parents, [H18] Procedure 1.

    For t = 1..r with inverse temperature lambda_t (docs/spec.md §2)::

        M-step:  R'_ij = R_ij a_i
                 mu_j^h = sum_i R'_ij V_ij^h / sum_i R'_ij
                 (sigma_j^h)^2 = sum_i R'_ij (V_ij^h - mu_j^h)^2 / sum_i R'_ij
                 cost_j^h = (beta_u + log sigma_j^h) sum_i R'_ij
                 a_j = logistic(lambda_t (beta_a - sum_h cost_j^h))
        E-step:  R_ij = a_j p_ij / sum_k a_k p_ik,  p_ij = prod_h N(V_ij^h; mu_j^h, sigma_j^h)

    starting from ``R_ij = 1 / O``. The E-step runs in log space (a softmax over the
    parents of ``log a_j + log p_ij``) and is skipped after the last M-step. That is the
    ``"paper"`` variant; ``variant`` selects another reading of the same procedure, with
    the official code's or [G19]'s choices of scales, mean damping, variance floor, data
    mass normalisation and schedule (:mod:`capsnet.functional.em_variants`,
    docs/em_variants.md).

    Args:
        votes: ``V_ij``, one vote per (child, parent), e.g. flattened 4x4 matrices.
        activations: child activations ``a_i`` in [0, 1]; they weight the M-step.
        beta_u: per-parent cost offset beta_u (learned, one per parent capsule type).
        beta_a: per-parent activation offset beta_a.
        iterations: routing iterations r >= 1.
        inverse_temperatures: one lambda per iteration; default: the variant's schedule
            (:func:`resolve_inverse_temperatures`; :func:`default_inverse_temperatures`
            for ``"paper"``).
        variant: a name of :data:`capsnet.functional.em_variants.EM_VARIANTS`
            (``"paper"``, ``"official"``, ``"gritzman"``) or an
            :class:`~capsnet.functional.em_variants.EMVariant`.
        normalize_cost: standardise the summed cost over the parents before the
            logistic (a stabilisation of popular implementations, not in the paper).
        var_floor: added to every variance; keeps ``log sigma`` finite for identical
            votes or a single child. None: the variant's (1e-6 for ``"paper"``).
        eps: added to ``sum_i R'_ij`` in divisions; keeps all-zero activations finite.
            None: the variant's (1e-8 for ``"paper"``).

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
    em_variant = resolve_em_variant(variant)
    lambdas = resolve_inverse_temperatures(iterations, inverse_temperatures, em_variant)
    in_caps, out_caps = votes.shape[-3], votes.shape[-2]
    config = make_em_config(
        em_variant, lambdas, normalize_cost, var_floor, eps, None,
        in_caps=in_caps, out_caps=out_caps,
    )  # fmt: skip
    return em_routing_kernel(votes, activations, beta_u, beta_a, config)


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
    variant: str | EMVariant = "paper",
    normalize_cost: bool = False,
    var_floor: float | None = None,
    eps: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """EM routing of a convolutional capsule layer, children normalised over *all* parents.

    In a convolutional capsule layer a child at one input position falls in the receptive
    field of parents at several output positions. Here (the form of [G19], pitfall 1, and
    of IBM's code: ``em_routing.py`` ``e_step``, ``utils.softmax_across_parents``) the
    E-step normalises each child's assignments over every parent capsule, at every output
    position and of every type, that it feeds; the M-step of each parent uses its K*K*T
    children exactly as in :func:`em_routing`. Each child starts with
    ``R = 1 / (number of parents it feeds)`` (IBM's ``utils.init_rr``). The
    ``"official"`` variant instead normalises over the positions of each parent type
    separately and starts from ``R = 1 / O``, as the official code's
    ``update_conv_routing`` does (docs/em_variants.md). For the per-position
    simplification (each receptive field routed on its own) call :func:`em_routing` on
    the same tensors.

    Args:
        votes: votes of each parent position's K*K*T children, children ordered
            ``(kh, kw, t)`` (row-major), parent positions row-major over the output grid.
        activations: the activations of those children (gathered per parent position).
        beta_u, beta_a: broadcastable to ``(O,)``, O the parent capsule types.
        in_size: ``(H_in, W_in)`` of the child capsule grid.
        kernel_size, stride: of the (valid, unpadded) capsule convolution.
        iterations, inverse_temperatures, variant, normalize_cost, var_floor, eps: as in
            :func:`em_routing`.

    Returns:
        ``(poses, out_activations, assignments)`` as in :func:`em_routing`, per parent
        position.

    Shape:
        - votes: ``(N, P, K*K*T, O, D)`` with ``P = H_out * W_out``.
        - activations: ``(N, P, K*K*T)``.
        - poses: ``(N, P, O, D)``; out_activations: ``(N, P, O)``;
          assignments: ``(N, P, K*K*T, O)`` (each child's entries over all the parents it
          feeds sum to 1; ``"per_type"`` variants: over the positions of each type).
    """
    beta_u, beta_a = _check_em_inputs(votes, activations, beta_u, beta_a, "N, P, ")
    if votes.ndim != 5:
        raise ValueError(f"votes must have shape (N, P, K*K*T, O, D), got {tuple(votes.shape)}")
    em_variant = resolve_em_variant(variant)
    lambdas = resolve_inverse_temperatures(iterations, inverse_temperatures, em_variant)
    n, positions, children, out_caps, _ = votes.shape
    kk = kernel_size * kernel_size
    if children % kk:
        raise ValueError(
            f"votes.shape[2] must be K*K*T = {kk}*T for kernel_size={kernel_size}, got {children}"
        )
    in_types = children // kk
    index = conv_children_index(in_size, kernel_size, stride, device=votes.device)  # (P, KK)
    if index.shape[0] != positions:
        raise ValueError(
            f"in_size={tuple(in_size)}, kernel_size={kernel_size}, stride={stride} give "
            f"{index.shape[0]} parent positions, but votes.shape[1] = {positions}"
        )
    per_type = em_variant.conv_normalization == "per_type"
    geometry = ConvGeometry.create(index, in_types, in_size, n, out_caps if per_type else None)
    config = make_em_config(
        em_variant, lambdas, normalize_cost, var_floor, eps, geometry,
        in_caps=children, out_caps=out_caps,
    )  # fmt: skip
    return em_routing_kernel(votes, activations, beta_u, beta_a, config)
