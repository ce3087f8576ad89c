"""Probes of what a trained model computes: routing traces, dead capsules, equivariance.

* :func:`capture_routing` records every routing call of a model's capsule layers (to
  :func:`capsnet.functional.dynamic_routing`, :func:`~capsnet.functional.em_routing` or
  :func:`~capsnet.functional.conv_em_routing`: their inputs, outputs and settings) through
  the layers' routing hooks, without changing the results.
* :func:`routing_trace` re-runs a captured call with ``iterations = 1..r``: the couplings /
  assignments and parent means after each iteration, and the distance of every vote to its
  parent's mean ([H18] Fig. 2).
* :func:`capsule_activations` / :func:`dead_capsule_fraction`: activations of every capsule
  layer (forward hooks) and the fraction of capsules that never switch on.
* :func:`em_layer_statistics` / :func:`em_gradient_norms`: is EM alive? Per EM layer the
  spread and saturation of the output activations and the data mass per parent (routing
  hooks), and the gradient norm of the activation path against the pose path.
* :func:`fit_linear_map` / :func:`equivariance_residual`: how well one linear map explains
  how features move under a known image transform T (the claim ``f(Tx) = T' f(x)``).
* :func:`affine_images`: rotate / translate / scale a batch of images (bilinear).

Letters as in :mod:`capsnet.functional`: B batch, I children, O parents, D pose size,
N examples, F feature size.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from capsnet import functional as CF
from capsnet.layers.hooks import RoutingCall, RoutingLayer

__all__ = [
    "RoutingCall",
    "capture_routing",
    "routing_trace",
    "capsule_activations",
    "dead_capsule_fraction",
    "em_layer_statistics",
    "em_routing_layers",
    "em_gradient_norms",
    "fit_linear_map",
    "equivariance_residual",
    "linear_map_residual",
    "affine_images",
]


# --------------------------------------------------------------------------- capture


@dataclass
class _Capture:
    calls: list[RoutingCall] = field(default_factory=list)


@contextlib.contextmanager
def capture_routing(model: nn.Module | None = None, last_only: bool = False) -> Iterator[_Capture]:
    """Record the routing calls of ``model``'s capsule layers.

    Registers a routing hook (:meth:`capsnet.layers.RoutingLayer.register_routing_hook`) on
    every routing layer of ``model`` for the duration of the ``with`` block and removes
    them on exit. Results are unchanged; the hooks keep detached references. While hooked,
    a convolutional matrix-capsule layer computes its votes explicitly (so they can be
    recorded), which costs time and memory.

    Args:
        model: any module containing capsnet routing layers.
        last_only: keep only the latest call (the class capsule layer of a forward pass);
            saves memory when the convolutional capsule layers' votes are not needed.

    Yields:
        An object whose ``calls`` lists the :class:`RoutingCall` s in call order.

    Example::

        with capture_routing(model) as cap:
            model(images)
        last = cap.calls[-1]          # the class capsule layer
        trace = routing_trace(last)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            "capture_routing takes the model whose routing to record: "
            f"capture_routing(model, last_only=...), got {type(model).__name__}"
        )
    capture = _Capture()

    def record(_: nn.Module, call: RoutingCall) -> None:
        if last_only:
            capture.calls.clear()
        capture.calls.append(call)

    layers = [m for m in model.modules() if isinstance(m, RoutingLayer)]
    handles = [layer.register_routing_hook(record) for layer in layers]
    try:
        yield capture
    finally:
        for handle in handles:
            handle.remove()


# --------------------------------------------------------------------------- routing trace


def routing_trace(call: RoutingCall, iterations: int | None = None) -> list[dict[str, Tensor]]:
    """Per-iteration state of a recorded routing call, by re-running it with 1..r iterations.

    Dynamic routing: after iteration t the couplings ``c`` used in it, the parents ``v`` and
    the parents' means ``m_j = sum_i c_ij u_hat_j|i / sum_i c_ij`` (the unsquashed centre
    the votes are compared with). EM routing: the assignments ``R`` used in the t-th M-step,
    the parents' means ``mu_j`` and activations. In both, ``distances[..., i, j] =
    |vote_ij - mean_j|`` and ``weights`` = the assignment of vote ij (``c_ij`` or
    ``R_ij a_i``), as in [H18] Fig. 2 (distances weighted by assignment probabilities).
    For EM the inverse-temperature schedule is cut to its first t entries.

    Args:
        call: from :func:`capture_routing`.
        iterations: how many iterations to trace (default: the call's own).

    Returns:
        One dict per iteration with ``assignments (..., I, O)``, ``means (..., O, D)``,
        ``activations (..., O)``, ``distances``, ``cosines`` and ``weights``, each
        ``(..., I, O)``.
    """
    r = call.iterations if iterations is None else int(iterations)
    if r < 1:
        raise ValueError(f"iterations must be >= 1, got {r}")
    args = dict(call.arguments)
    trace = []
    for t in range(1, r + 1):
        if call.kind == "dynamic":
            u_hat = args["u_hat"]
            v, c = CF.dynamic_routing(u_hat, iterations=t)
            mean = torch.einsum("...io,...iod->...od", c, u_hat) / c.sum(-2).unsqueeze(-1)
            votes, weights, acts = u_hat, c, v.norm(dim=-1)
        else:
            fn = CF.em_routing if call.kind == "em" else CF.conv_em_routing
            kwargs = {k: v for k, v in args.items() if k != "iterations"}
            lambdas = kwargs.get("inverse_temperatures")
            full = CF.resolve_inverse_temperatures(
                call.iterations, lambdas, kwargs.get("variant", "paper")
            )
            if t > len(full):
                raise ValueError(f"the call has {len(full)} inverse temperatures, asked for {t}")
            kwargs["inverse_temperatures"] = full[:t]
            mean, acts, c = fn(iterations=t, **kwargs)
            votes = args["votes"]
            weights = c * args["activations"].unsqueeze(-1)
        distances = (votes - mean.unsqueeze(-3)).norm(dim=-1)
        cosines = torch.nn.functional.cosine_similarity(votes, mean.unsqueeze(-3), dim=-1)
        trace.append(
            {
                "assignments": c,
                "means": mean,
                "activations": acts,
                "distances": distances,
                "cosines": cosines,
                "weights": weights,
            }
        )
    return trace


# --------------------------------------------------------------------------- dead capsules


def _capsule_layer_types() -> tuple[type[nn.Module], ...]:
    from capsnet import layers

    return (
        layers.PrimaryCapsules,
        layers.DenseCapsules,
        layers.PrimaryMatrixCapsules,
        layers.ConvMatrixCapsules,
        layers.ClassMatrixCapsules,
    )


def capsule_activations(model: nn.Module, images: Tensor) -> dict[str, Tensor]:
    """Activation of every capsule of every capsule layer of ``model`` for ``images``.

    Forward hooks on the :mod:`capsnet.layers` capsule modules record their outputs:
    vector capsules (``PrimaryCapsules``, ``DenseCapsules``) give their lengths, matrix
    capsules (``(poses, activations)`` outputs) their activations. Runs under ``no_grad``.

    Returns:
        ``{module name: (B, capsules)}`` in forward order (each capsule at each position
        counts once); empty for a model without capsule layers.

    Shape:
        - images: ``(B, C, H, W)``.
    """
    types = _capsule_layer_types()
    found: dict[str, Tensor] = {}
    handles = []

    def hook(name: str):
        def record(_module: nn.Module, _inputs: Any, output: Any) -> None:
            if isinstance(output, tuple):
                act = output[1]
            else:
                act = output.norm(dim=-1)
            found[name] = act.detach().flatten(1)

        return record

    for name, module in model.named_modules():
        if isinstance(module, types):
            handles.append(module.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            model(images)
    finally:
        for h in handles:
            h.remove()
    return found


def dead_capsule_fraction(
    activations: dict[str, Tensor], threshold: float = 0.01
) -> dict[str, float]:
    """Fraction of capsules per layer whose activation never exceeds ``threshold``.

    Args:
        activations: ``{layer: (N, capsules)}`` over a set of examples (e.g. concatenated
            :func:`capsule_activations` of many batches).
        threshold: "near zero"; for vector capsules the activation is the length.

    Returns:
        ``{layer: fraction in [0, 1]}``.
    """
    return {
        name: float((a.amax(dim=0) <= threshold).float().mean()) for name, a in activations.items()
    }


# --------------------------------------------------------------------------- is EM alive?


def em_routing_layers(model: nn.Module) -> list[tuple[str, RoutingLayer]]:
    """``(name, module)`` of every EM routing layer of ``model``, in module order."""
    from capsnet import layers

    types = (layers.ConvMatrixCapsules, layers.ClassMatrixCapsules)
    return [(name, m) for name, m in model.named_modules() if isinstance(m, types)]


@torch.no_grad()
def em_layer_statistics(
    model: nn.Module, images: Tensor, *, saturation: float = 0.01
) -> dict[str, dict[str, float]]:
    """Whether each EM layer of ``model`` is alive on ``images``, from its routing call.

    Per EM routing layer (:class:`~capsnet.layers.ConvMatrixCapsules`,
    :class:`~capsnet.layers.ClassMatrixCapsules`), recorded through its routing hooks:

    * ``activation_std``: the standard deviation of the output activations ``a_j`` over
      examples, positions and types (0: every parent says the same);
    * ``saturated``: the fraction of ``a_j`` below ``saturation`` or above
      ``1 - saturation`` (1: the logistic is flat everywhere, no gradient passes);
    * ``mass``: the mean data mass per parent, ``sum_i R_ij a_i`` of the last M-step
      ([H18] §3; the factor that scales the cost and so the logit).

    The layers compute their votes explicitly while hooked (see
    :func:`capture_routing`); keep the batch small (e.g. 32 images). Runs in eval mode
    under ``no_grad``; the model's mode is restored.

    Returns:
        ``{layer name: {"activation_std", "saturated", "mass"}}`` in forward order.

    Shape:
        - images: ``(B, C, H, W)``.
    """
    found: dict[str, dict[str, float]] = {}
    handles = []

    def hook(name: str):
        def record(_layer: nn.Module, call: RoutingCall) -> None:
            _, act, assign = call.outputs  # (..., O), (..., I, O)
            mass = (assign * call.arguments["activations"].unsqueeze(-1)).sum(-2)
            a = act.float()
            found[name] = {
                "activation_std": float(a.std()) if a.numel() > 1 else 0.0,
                "saturated": float(((a < saturation) | (a > 1 - saturation)).float().mean()),
                "mass": float(mass.float().mean()),
            }

        return record

    for name, layer in em_routing_layers(model):
        handles.append(layer.register_routing_hook(hook(name)))
    was_training = model.training
    try:
        model.eval()
        model(images)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return found


def em_gradient_norms(model: nn.Module) -> dict[str, dict[str, float]]:
    """Gradient norms of the activation path vs the pose path, per matrix-capsule layer.

    Reads the ``.grad`` of the parameters after a backward pass (missing gradients count
    as 0). For an EM layer the activation path is ``beta_a`` and the pose path is ``W``
    and ``beta_u``; for :class:`~capsnet.layers.PrimaryMatrixCapsules` they are the
    activation and the pose convolutions.

    Returns:
        ``{layer name: {"grad_activation", "grad_pose"}}``.
    """
    from capsnet import layers

    def norm(*params: Tensor) -> float:
        total = 0.0
        for p in params:
            if p.grad is not None:
                total += float(p.grad.detach().float().pow(2).sum())
        return math.sqrt(total)

    out: dict[str, dict[str, float]] = {}
    for name, m in model.named_modules():
        if isinstance(m, layers.PrimaryMatrixCapsules):
            act, pose = list(m.activation.parameters()), list(m.pose.parameters())
        elif isinstance(m, (layers.ConvMatrixCapsules, layers.ClassMatrixCapsules)):
            act, pose = [m.beta_a], [m.weight, m.beta_u]
        else:
            continue
        out[name] = {"grad_activation": norm(*act), "grad_pose": norm(*pose)}
    return out


# --------------------------------------------------------------------------- equivariance


def fit_linear_map(
    inputs: Tensor, targets: Tensor, *, bias: bool = True, ridge: float = 0.0
) -> tuple[Tensor, Tensor]:
    """Least-squares linear map ``targets ≈ inputs @ A + b`` (float64, optional ridge).

    Args:
        inputs: features ``P``.
        targets: features ``Q``.
        bias: fit the offset ``b`` too (not penalised by the ridge).
        ridge: L2 penalty ``ridge * |A|_F^2`` (0 for plain least squares).

    Returns:
        ``(A (F_in, F_out), b (F_out,))`` in float64.

    Shape:
        - inputs: ``(N, F_in)``; targets: ``(N, F_out)``.
    """
    if inputs.ndim != 2 or targets.ndim != 2 or inputs.shape[0] != targets.shape[0]:
        raise ValueError(
            f"inputs and targets must be (N, F_in) and (N, F_out), got {tuple(inputs.shape)} "
            f"and {tuple(targets.shape)}"
        )
    x, y = inputs.double(), targets.double()
    x_mean = x.mean(0) if bias else x.new_zeros(x.shape[1])
    y_mean = y.mean(0) if bias else y.new_zeros(y.shape[1])
    xc, yc = x - x_mean, y - y_mean
    if ridge > 0:
        gram = xc.T @ xc + ridge * torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
        a = torch.linalg.solve(gram, xc.T @ yc)
    else:
        a = torch.linalg.lstsq(xc, yc, driver="gelsd" if x.device.type == "cpu" else None).solution
    b = y_mean - x_mean @ a
    return a, b


RIDGE_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def pca_basis(features: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """Mean and the top ``dim`` principal directions of ``features (N, F)``: ``(F,), (F, dim)``."""
    x = features.double()
    mean = x.mean(0)
    _, _, vh = torch.linalg.svd(x - mean, full_matrices=False)
    if dim > vh.shape[0]:
        raise ValueError(f"dim ({dim}) exceeds the features' rank bound ({vh.shape[0]})")
    return mean, vh[:dim].T


def _residual(p: Tensor, q: Tensor, a: Tensor, b: Tensor, q_mean: Tensor) -> Tensor:
    """Per-example squared errors of the map and of the mean: ``(N,), (N,)`` stacked."""
    return torch.stack([(q - (p @ a + b)).pow(2).sum(1), (q - q_mean).pow(2).sum(1)])


def _cv_ridge(p: Tensor, q: Tensor, grid: Sequence[float], folds: int, seed: int) -> float:
    """The ridge (relative to the mean squared feature) with the least k-fold CV error."""
    n = p.shape[0]
    folds = max(2, min(folds, n))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))
    parts = order.chunk(folds)
    folds = len(parts)  # chunk may give fewer parts than asked for
    best, best_err = float(grid[0]), math.inf
    for rel in grid:
        err = 0.0
        for k in range(folds):
            held = parts[k]
            keep = torch.cat([parts[j] for j in range(folds) if j != k])
            scale = float(p[keep].pow(2).mean()) * len(keep)
            a, b = fit_linear_map(p[keep], q[keep], ridge=rel * scale)
            err += float((q[held] - (p[held] @ a + b)).pow(2).sum())
        if err < best_err:
            best, best_err = float(rel), err
    return best


def linear_map_residual(
    fit_inputs: Tensor,
    fit_targets: Tensor,
    test_inputs: Tensor,
    test_targets: Tensor,
    *,
    ridge: float | None = None,
    dim: int | None = None,
    folds: int = 5,
    resamples: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """Fit ``Q ≈ P A + b`` on one set of pairs, report how well it predicts another.

    * ``linear_residual``: ``|Q - (P A + b)|^2 / |Q - mean(Q)|^2`` on the test pairs
      (1 - R^2, the mean taken on the fit pairs): 0 means the map predicts exactly, 1 that
      it explains nothing beyond the mean; with a 95 % bootstrap interval over the test
      pairs (``linear_residual_low`` / ``_high``);
    * ``identity_residual``: the same with ``A = I, b = 0``: 0 means the features did not
      move (invariance);
    * ``relative_change``: ``|Q - P| / |P|``, how much the features moved at all.

    Args:
        fit_inputs, fit_targets: ``P`` and ``Q`` of the pairs the map is fitted on.
        test_inputs, test_targets: held-out pairs.
        ridge: ridge penalty relative to the mean squared feature; None chooses it from
            :data:`RIDGE_GRID` by ``folds``-fold cross-validation on the fit pairs.
        dim: project ``P`` and ``Q`` onto the top ``dim`` principal components of the fit
            pairs' ``P`` first (the same projection for both), so that models with
            different feature sizes are compared at equal dimension; None keeps all.
        folds: cross-validation folds for the ridge.
        resamples: bootstrap resamples of the test pairs.
        seed: seeds the folds and the bootstrap.

    Shape:
        - fit_inputs, fit_targets: ``(N_fit, F)``; test_inputs, test_targets: ``(N_test, F)``.
    """
    pairs = ((fit_inputs, fit_targets), (test_inputs, test_targets))
    if any(x.ndim != 2 or x.shape != y.shape for x, y in pairs) or (
        fit_inputs.shape[1] != test_inputs.shape[1]
    ):
        raise ValueError(
            "inputs and targets must be (N, F) pairs of equal shape and feature size, got "
            f"{[tuple(t.shape) for pair in pairs for t in pair]}"
        )
    n_fit = fit_inputs.shape[0]
    if n_fit < 2 or test_inputs.shape[0] < 1:
        raise ValueError(
            f"need at least 2 fit and 1 held-out example, got {n_fit} and {test_inputs.shape[0]}"
        )
    p, q = fit_inputs.double(), fit_targets.double()
    p_test, q_test = test_inputs.double(), test_targets.double()
    if dim is not None and dim < p.shape[1]:
        # at most as many directions as the fit pairs span (feature_dim reports the size)
        mean, basis = pca_basis(p, min(dim, n_fit))
        p, q = (p - mean) @ basis, (q - mean) @ basis
        p_test, q_test = (p_test - mean) @ basis, (q_test - mean) @ basis
    rel = _cv_ridge(p, q, RIDGE_GRID, folds, seed) if ridge is None else ridge
    scale = float(p.pow(2).mean()) * n_fit
    a, b = fit_linear_map(p, q, ridge=rel * scale)
    errors = _residual(p_test, q_test, a, b, q.mean(0))  # (2, N_test)
    spread = float(errors[1].sum()) or math.inf
    g = torch.Generator().manual_seed(seed + 2)
    idx = torch.randint(0, errors.shape[1], (resamples, errors.shape[1]), generator=g)
    boot = errors[0][idx].sum(1) / errors[1][idx].sum(1).clamp_min(1e-300)
    low, high = torch.quantile(boot, torch.tensor([0.025, 0.975], dtype=boot.dtype)).tolist()
    return {
        "linear_residual": float(errors[0].sum()) / spread,
        "linear_residual_low": float(low),
        "linear_residual_high": float(high),
        "identity_residual": float((q_test - p_test).pow(2).sum()) / spread,
        "relative_change": float((q_test - p_test).norm() / p_test.norm().clamp_min(1e-12)),
        "ridge": rel,
        "num_fit": n_fit,
        "num_test": int(test_inputs.shape[0]),
        "feature_dim": int(p.shape[1]),
        "original_dim": int(fit_inputs.shape[1]),
    }


def equivariance_residual(
    features: Tensor,
    transformed: Tensor,
    *,
    fit_fraction: float = 0.5,
    seed: int = 0,
    **options: Any,
) -> dict[str, float]:
    """How well one linear map predicts features of transformed inputs from the originals.

    The examples are split at random (``seed``) into a fit part (``fit_fraction``) and a
    held-out part, and :func:`linear_map_residual` fits on the first and reports on the
    second; ``options``: its ``ridge``, ``dim``, ``folds``, ``resamples``.

    Args:
        features: ``P = f(x)``.
        transformed: ``Q = f(Tx)`` for the same examples in the same order.

    Shape:
        - features, transformed: ``(N, F)``.
    """
    if features.shape != transformed.shape or features.ndim != 2:
        raise ValueError(
            f"features and transformed must both be (N, F), got {tuple(features.shape)} and "
            f"{tuple(transformed.shape)}"
        )
    n = features.shape[0]
    n_fit = int(round(n * fit_fraction))
    if n_fit < 2 or n - n_fit < 1:
        raise ValueError(f"need at least 2 fit and 1 held-out example, got N={n}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    fit, test = perm[:n_fit], perm[n_fit:]
    return linear_map_residual(
        features[fit], transformed[fit], features[test], transformed[test], seed=seed, **options
    )


# --------------------------------------------------------------------------- transforms


def affine_images(
    images: Tensor,
    *,
    angle: float = 0.0,
    translate: tuple[float, float] = (0.0, 0.0),
    scale: float = 1.0,
) -> Tensor:
    """Rotate (about the centre), scale and translate a batch of images; bilinear, zero fill.

    Args:
        images: the batch.
        angle: rotation in degrees, counter-clockwise as displayed (row 0 at the top).
        translate: ``(dx, dy)`` in pixels, right and down.
        scale: zoom factor (> 1 enlarges the content).

    Shape:
        - images: ``(B, C, H, W)``; output: same.
    """
    if images.ndim != 4 or not images.is_floating_point():
        raise ValueError(f"images must be a float (B, C, H, W) tensor, got {tuple(images.shape)}")
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    _, _, h, w = images.shape
    rad = math.radians(angle)
    cos, sin = math.cos(rad) / scale, math.sin(rad) / scale
    # Output pixel p samples the input at L (p - t), L = R^-1 / scale, in normalised
    # (x right, y down) coordinates; a counter-clockwise turn on screen is clockwise in
    # (x, y-down). For non-square images L is conjugated by the pixel -> [-1, 1] scaling
    # so the rotation is a rotation in pixel units.
    linear = torch.tensor([[cos, -sin * h / w], [sin * w / h, cos]], dtype=torch.float64)
    shift = torch.tensor([2.0 * translate[0] / w, 2.0 * translate[1] / h], dtype=torch.float64)
    theta = torch.cat([linear, -(linear @ shift)[:, None]], dim=1)
    theta = theta.to(dtype=images.dtype, device=images.device)
    grid = F.affine_grid(
        theta.expand(images.shape[0], 2, 3), list(images.shape), align_corners=False
    )
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
