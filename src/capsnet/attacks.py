"""White-box adversarial attacks (FGSM, BIM) and their evaluation over an epsilon sweep.

The attacks work in the pixel space of the *stored* image, ``x`` in [0, 1]: the model sees
``preprocess(x)`` (a dataset's ``eval_transform``, e.g. padding to a canvas or per-image
standardisation), and the gradient flows through ``preprocess`` and the whole model,
routing included. Nothing is detached: :func:`capsnet.functional.dynamic_routing` and
:func:`~capsnet.functional.em_routing` backpropagate through every routing iteration by
default, and :func:`check_gradient_path` refuses models built with ``detach_inner=True``
(that variant would hide part of the gradient and fake robustness).

Attacks ([GSS15] FGSM, [KGB17] BIM), for an image ``x``, label ``y``, budget ``eps``:

* FGSM, untargeted: ``x' = clip01(x + eps * sign(grad_x L(x, y)))``
* FGSM, targeted at class t: ``x' = clip01(x - eps * sign(grad_x L(x, t)))``
* BIM: ``steps`` FGSM steps of size ``step_size`` (default ``eps / 4``, so the walk can
  reach the boundary of the ball and move along it), each followed by projection onto
  ``{x' : |x' - x|_inf <= eps} ∩ [0, 1]``.

Attack loss (``loss=``):

* ``"cross_entropy"`` (default): softmax cross-entropy on the model's ``scores``
  (capsule lengths / activations / CNN logits). It is never flat, so every example gets a
  gradient.
* ``"margin"`` / ``"spread"``: the capsule papers' training losses ([S17] eq. 4, [H18]
  eq. 3, spread margin 0.9). Both are exactly zero, with a zero gradient, for an example
  that satisfies its margins, and sign(0) = 0: FGSM then does not move the image at all.
  That is gradient masking, not robustness, so it is not the default; the evaluation reports
  ``zero_gradient_fraction`` so a flat loss is visible.
* ``"model"`` (in :func:`evaluate_attack` callers): the model's paper loss from
  :func:`capsnet.models.model_info`.

References:
    [GSS15] Goodfellow, Shlens, Szegedy. Explaining and Harnessing Adversarial Examples. ICLR 2015.
    [KGB17] Kurakin, Goodfellow, Bengio. Adversarial Examples in the Physical World. ICLR 2017.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from capsnet._checks import check_choice
from capsnet.objectives import LOSSES, class_loss

__all__ = [
    "ATTACK_LOSSES",
    "attack_loss",
    "fgsm",
    "bim",
    "random_targets",
    "check_gradient_path",
    "evaluate_attack",
]

ATTACK_LOSSES = ("cross_entropy", *(name for name in LOSSES if name != "cross_entropy"))
"""The attack losses (those of :func:`capsnet.objectives.class_loss`, default first)."""
METHODS = ("fgsm", "bim")

Preprocess = Callable[[Tensor], Tensor]


# --------------------------------------------------------------------------- losses


def attack_loss(
    scores: Tensor, labels: Tensor, loss: str = "cross_entropy", *, spread_margin: float = 0.9
) -> Tensor:
    """Per-example loss whose input gradient drives the attacks
    (:func:`capsnet.objectives.class_loss` with ``reduction="none"``).

    Args:
        scores: model scores (capsule lengths, activations or logits).
        labels: integer classes: the true ones (untargeted) or the targets (targeted).
        loss: ``"cross_entropy"`` (softmax cross-entropy on ``scores``), ``"margin"``
            ([S17] eq. 4 on lengths) or ``"spread"`` ([H18] eq. 3 with ``spread_margin``).
        spread_margin: the spread-loss margin m (the end of the training schedule, 0.9).

    Shape:
        - scores: ``(B, K)``; labels: ``(B,)``.
        - output: ``(B,)``.
    """
    check_choice("loss", loss, ATTACK_LOSSES)
    return class_loss(loss, scores, labels, margin=spread_margin, reduction="none")


def _check_images(images: Tensor, labels: Tensor) -> None:
    if not isinstance(images, Tensor) or not images.is_floating_point():
        raise TypeError("images must be a floating-point torch.Tensor with pixels in [0, 1]")
    if images.ndim != 4:
        raise ValueError(f"images must have shape (B, C, H, W), got {tuple(images.shape)}")
    if not isinstance(labels, Tensor) or labels.shape != images.shape[:1]:
        raise ValueError(
            f"labels must be a tensor of shape ({images.shape[0]},), got "
            f"{tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__}"
        )
    if images.numel() and (images.min() < 0 or images.max() > 1):
        raise ValueError(
            f"images must lie in [0, 1] (attacks clip to the pixel range), got "
            f"[{float(images.min()):.3g}, {float(images.max()):.3g}]"
        )


def _check_epsilon(epsilon: float) -> float:
    epsilon = float(epsilon)
    if not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"epsilon must lie in [0, 1] (L-inf budget in pixel units), got {epsilon}")
    return epsilon


def _input_gradient(
    model: nn.Module,
    x: Tensor,
    labels: Tensor,
    loss: str,
    preprocess: Preprocess | None,
    spread_margin: float,
) -> tuple[Tensor, Tensor]:
    """``(grad_x sum_b L_b, scores)``; example b's gradient depends only on example b."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        scores = model(preprocess(x) if preprocess is not None else x).scores
        total = attack_loss(scores, labels, loss, spread_margin=spread_margin).sum()
        (grad,) = torch.autograd.grad(total, x)
    return grad, scores.detach()


# --------------------------------------------------------------------------- attacks


def fgsm(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    epsilon: float,
    *,
    targets: Tensor | None = None,
    loss: str = "cross_entropy",
    preprocess: Preprocess | None = None,
    spread_margin: float = 0.9,
) -> Tensor:
    """Fast gradient sign method [GSS15], untargeted or (with ``targets``) targeted.

    Untargeted: ``x + eps sign(grad L(x, labels))``; targeted: ``x - eps sign(grad L(x,
    targets))``; both clipped to [0, 1]. The model should be in eval mode.

    Args:
        model: returns :class:`capsnet.models.ModelOutput` from ``model(images)``.
        images: clean images in [0, 1].
        labels: true classes (used when untargeted).
        epsilon: L-inf budget in pixel units, in [0, 1].
        targets: target classes for a targeted attack, or None.
        loss: see :func:`attack_loss`.
        preprocess: differentiable map from images to model input (e.g. a dataset's
            ``eval_transform``), or None.
        spread_margin: margin of the spread loss.

    Returns:
        Adversarial images, detached, in [0, 1] and within ``epsilon`` of ``images``.

    Shape:
        - images: ``(B, C, H, W)``; labels, targets: ``(B,)``; output: ``(B, C, H, W)``.
    """
    _check_images(images, labels)
    epsilon = _check_epsilon(epsilon)
    if epsilon == 0.0:
        return images.detach().clone()
    goal = labels if targets is None else targets
    grad, _ = _input_gradient(model, images, goal, loss, preprocess, spread_margin)
    direction = grad.sign() if targets is None else -grad.sign()
    return (images.detach() + epsilon * direction).clamp_(0.0, 1.0)


def bim(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    epsilon: float,
    *,
    steps: int = 10,
    step_size: float | None = None,
    targets: Tensor | None = None,
    loss: str = "cross_entropy",
    preprocess: Preprocess | None = None,
    spread_margin: float = 0.9,
) -> Tensor:
    """Basic iterative method [KGB17]: projected FGSM steps inside the epsilon ball.

    ``x_0 = x``; ``x_{n+1} = Proj(x_n ± step_size sign(grad L(x_n)))`` where ``Proj`` clips
    to ``[x - eps, x + eps] ∩ [0, 1]``; + for untargeted, - (towards ``targets``) for
    targeted.

    Args:
        model, images, labels, epsilon, targets, loss, preprocess, spread_margin: as in
            :func:`fgsm`.
        steps: number of iterations (>= 1).
        step_size: per-step size; default ``epsilon / 4`` (with 10 steps the walk can cover
            the ball 2.5 times; [KGB17] used 1/255 per step and ``min(eps*255 + 4,
            1.25 eps*255)`` steps).

    Returns:
        Adversarial images, detached, in [0, 1] and within ``epsilon`` of ``images``.

    Shape:
        - images: ``(B, C, H, W)``; labels, targets: ``(B,)``; output: ``(B, C, H, W)``.
    """
    _check_images(images, labels)
    epsilon = _check_epsilon(epsilon)
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    alpha = epsilon / 4.0 if step_size is None else float(step_size)
    if alpha < 0:
        raise ValueError(f"step_size must be >= 0, got {step_size}")
    clean = images.detach()
    if epsilon == 0.0:
        return clean.clone()
    lower, upper = (clean - epsilon).clamp(min=0.0), (clean + epsilon).clamp(max=1.0)
    goal = labels if targets is None else targets
    sign = 1.0 if targets is None else -1.0
    x = clean.clone()
    for _ in range(steps):
        grad, _ = _input_gradient(model, x, goal, loss, preprocess, spread_margin)
        x = torch.minimum(torch.maximum(x + sign * alpha * grad.sign(), lower), upper)
    return x


def random_targets(labels: Tensor, num_classes: int, generator: torch.Generator) -> Tensor:
    """A uniformly random class different from each label (the targets of targeted attacks).

    Shape:
        - labels: ``(B,)``; output: ``(B,)`` with ``output != labels`` everywhere.
    """
    if num_classes < 2:
        raise ValueError(f"targeted attacks need num_classes >= 2, got {num_classes}")
    offset = torch.randint(1, num_classes, labels.shape, generator=generator)
    return (labels + offset.to(labels.device)) % num_classes


def check_gradient_path(model: nn.Module) -> None:
    """Refuse models whose routing detaches part of the gradient.

    Raises:
        ValueError: some submodule has ``detach_inner=True`` (see
            :func:`capsnet.functional.dynamic_routing`): white-box attacks on it would
            underestimate its vulnerability.
    """
    for name, module in model.named_modules():
        if getattr(module, "detach_inner", False) is True:
            raise ValueError(
                f"module {name or type(model).__name__!r} routes with detach_inner=True; "
                "attacks need the full gradient through routing. Rebuild it with "
                "detach_inner=False (the weights are the same)."
            )


# --------------------------------------------------------------------------- evaluation


def evaluate_attack(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    *,
    num_classes: int,
    epsilons: Sequence[float],
    method: str = "fgsm",
    targeted: bool = False,
    loss: str = "cross_entropy",
    steps: int = 10,
    step_size_fraction: float = 0.25,
    preprocess: Preprocess | None = None,
    spread_margin: float = 0.9,
    seed: int = 0,
    progress: Callable[[Iterable[Any]], Iterable[Any]] | None = None,
    per_image: bool = False,
) -> dict[str, Any]:
    """Accuracy and attack success rate of one model over an epsilon sweep.

    For every batch the same targets (seeded by ``seed``) are used at every epsilon. FGSM
    needs one gradient per batch (the direction does not depend on epsilon); BIM needs
    ``steps`` gradients per batch and epsilon.

    Args:
        model: the model; put in eval mode here (and restored afterwards).
        batches: iterable of ``(images in [0, 1], labels)``; the images are what
            ``preprocess`` expects.
        num_classes: number of classes (for targets).
        epsilons: the sweep, each in [0, 1]; 0 gives the clean numbers.
        method: ``"fgsm"`` or ``"bim"``.
        targeted: attack towards a random other class instead of away from the label.
        loss: see :func:`attack_loss`.
        steps, step_size_fraction: BIM iterations and step size as a fraction of epsilon.
        preprocess: differentiable image -> model input map, or None.
        spread_margin: margin of the spread loss.
        seed: seeds the target classes.
        progress: optional wrapper around the batch iterator (e.g. ``tqdm``).
        per_image: also return, per epsilon and example, whether the adversarial image is
            still classified correctly (``"correct"``) and, targeted, whether it hit the
            target (``"hit"``): NumPy bool arrays ``(E, N)``, for intervals and paired tests
            (:mod:`capsnet.stats`).

    Returns:
        Plain-typed dict: ``method``, ``targeted``, ``loss``, ``epsilons``, ``num_examples``,
        ``clean_accuracy`` and per-epsilon lists ``accuracy`` (adversarial accuracy on all
        examples), ``success_rate`` (untargeted: fraction of clean-correct examples now
        misclassified; targeted: fraction classified as the target),
        ``zero_gradient_fraction`` (examples whose first input gradient is exactly zero, so
        FGSM leaves them unchanged: a flat loss, see the module docstring) and
        ``mean_linf`` (mean L-inf size of the perturbations).

    Shape:
        - batches: ``(B, C, H, W)`` images, ``(B,)`` labels.
    """
    check_choice("method", method, METHODS)
    check_choice("loss", loss, ATTACK_LOSSES)
    eps_list = [_check_epsilon(e) for e in epsilons]
    if not eps_list:
        raise ValueError("epsilons must hold at least one value")
    check_gradient_path(model)
    generator = torch.Generator().manual_seed(seed)
    n_eps = len(eps_list)
    correct = [0] * n_eps
    hits = [0] * n_eps  # untargeted: flipped clean-correct examples; targeted: hit the target
    linf = [0.0] * n_eps
    clean_correct = total = zero_grad = 0
    correct_rows: list[list[Tensor]] = [[] for _ in eps_list]  # per_image: (B,) per batch
    hit_rows: list[list[Tensor]] = [[] for _ in eps_list]

    was_training = model.training
    model.eval()
    try:
        iterator = progress(batches) if progress is not None else batches
        for images, labels in iterator:
            _check_images(images, labels)
            targets = random_targets(labels, num_classes, generator) if targeted else None
            goal = labels if targets is None else targets
            grad, clean_scores = _input_gradient(
                model, images, goal, loss, preprocess, spread_margin
            )
            clean_ok = clean_scores.argmax(-1) == labels
            clean_correct += int(clean_ok.sum())
            total += labels.shape[0]
            zero_grad += int((grad.flatten(1).abs().amax(1) == 0).sum())
            direction = grad.sign() if targets is None else -grad.sign()
            for k, eps in enumerate(eps_list):
                if eps == 0.0:
                    adv = images
                elif method == "fgsm":
                    adv = (images + eps * direction).clamp(0.0, 1.0)
                else:
                    adv = bim(
                        model,
                        images,
                        labels,
                        eps,
                        steps=steps,
                        step_size=step_size_fraction * eps,
                        targets=targets,
                        loss=loss,
                        preprocess=preprocess,
                        spread_margin=spread_margin,
                    )
                with torch.no_grad():
                    x_in = preprocess(adv) if preprocess is not None else adv
                    pred = model(x_in).scores.argmax(-1)
                ok = pred == labels
                correct[k] += int(ok.sum())
                if targets is None:
                    hits[k] += int((clean_ok & ~ok).sum())
                else:
                    hit = pred == targets
                    hits[k] += int(hit.sum())
                    if per_image:
                        hit_rows[k].append(hit.cpu())
                if per_image:
                    correct_rows[k].append(ok.cpu())
                linf[k] += float((adv - images).flatten(1).abs().amax(1).sum())
    finally:
        model.train(was_training)
    if total == 0:
        raise ValueError("batches yielded no examples")
    success_base = total if targeted else max(clean_correct, 1)
    arrays: dict[str, Any] = {}
    if per_image:
        arrays["correct"] = torch.stack([torch.cat(r) for r in correct_rows]).numpy()
        if targeted:
            arrays["hit"] = torch.stack([torch.cat(r) for r in hit_rows]).numpy()
    return {
        "method": method,
        "targeted": bool(targeted),
        "loss": loss,
        "steps": steps if method == "bim" else 1,
        "step_size_fraction": step_size_fraction if method == "bim" else 1.0,
        "epsilons": eps_list,
        "num_examples": total,
        "clean_accuracy": clean_correct / total,
        "accuracy": [c / total for c in correct],
        "success_rate": [h / success_base for h in hits],
        "zero_gradient_fraction": zero_grad / total,
        "mean_linf": [x / total for x in linf],
        **arrays,
    }
