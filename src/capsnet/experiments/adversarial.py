"""White-box adversarial attacks on several models at once ([H18] §6).

[H18] §6 claims matrix capsules with EM routing resist white-box FGSM and BIM better than a
baseline CNN. :func:`attack_experiment` sweeps the L-inf budget for each model with
:func:`capsnet.attacks.evaluate_attack` (gradients through every routing iteration),
untargeted and targeted, with a chosen attack loss per model.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from capsnet import attacks, objectives, plots
from capsnet.devices import resolve_device
from capsnet.experiments.evaluation import (
    Progress,
    check_models,
    describe_models,
    eval_batches,
    preprocess_of,
    with_progress,
)
from capsnet.experiments.records import finish_record, make_record

__all__ = ["attack_experiment"]


def attack_experiment(
    models: Mapping[str, nn.Module],
    dataset: Any,
    out_dir: str | os.PathLike,
    *,
    epsilons: Sequence[float] = (0.0, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3),
    methods: Sequence[str] = ("fgsm", "bim"),
    targeted: Sequence[bool] = (False, True),
    losses: Mapping[str, str] | str = "cross_entropy",
    model_names: Mapping[str, str] | None = None,
    steps: int = 10,
    step_size_fraction: float = 0.25,
    max_examples: int | None = 1000,
    batch_size: int = 100,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: Progress = None,
) -> dict[str, Any]:
    """White-box FGSM / BIM sweeps for several models on one test set; one plot.

    Args:
        models: ``{label: model}``, e.g. a capsule model and its baseline CNN.
        dataset: the test set (``ImageDataset``-like).
        out_dir: where ``attack.json`` and ``attack.png`` go.
        epsilons: L-inf budgets in pixel units ([0, 1] images).
        methods: any of ``"fgsm"``, ``"bim"``.
        targeted: which of untargeted (False) / targeted (True) to run.
        losses: the attack loss for every model, or per label; see
            :func:`capsnet.attacks.attack_loss`. ``"model"`` means the model's paper loss
            from ``model_names`` (``capsnet.models.model_info(name).loss``).
        model_names: ``{label: registry name}``, needed for ``losses="model"``.
        steps, step_size_fraction: BIM iterations and step size (fraction of epsilon).
        max_examples: a seeded random subset of this many test examples (None: all).
        batch_size: examples per batch.
        seed: seeds the targets of targeted attacks (same for every model).
        device: where to run.
        progress: e.g. ``tqdm.tqdm`` for progress bars.
    """
    check_models(models)
    out_dir = Path(out_dir)
    device = resolve_device(device)
    started = time.perf_counter()
    results: dict[str, list[dict[str, Any]]] = {}
    summary = []
    attack_losses = _resolve_losses(models, losses, model_names)  # checked before any work
    for label, model in models.items():
        loss = attack_losses[label]
        model.to(device)
        runs = []
        for method in methods:
            for tgt in targeted:
                batches = eval_batches(
                    dataset, batch_size=batch_size, max_examples=max_examples, device=device
                )
                desc = f"{label} {method}{' targeted' if tgt else ''}"
                run = attacks.evaluate_attack(
                    model,
                    with_progress(progress, batches, desc=desc, leave=False),
                    num_classes=dataset.num_classes,
                    epsilons=epsilons,
                    method=method,
                    targeted=tgt,
                    loss=loss,
                    steps=steps,
                    step_size_fraction=step_size_fraction,
                    preprocess=preprocess_of(dataset),
                    seed=seed,
                )
                runs.append(run)
                metric = "success_rate" if tgt else "accuracy"
                row = {
                    "model": label,
                    "attack": method,
                    "targeted": tgt,
                    "loss": loss,
                    "metric": "target success" if tgt else "accuracy",
                    "zero-grad": run["zero_gradient_fraction"],
                }
                row.update(
                    {f"eps={e:g}": v for e, v in zip(run["epsilons"], run[metric], strict=True)}
                )
                summary.append(row)
        results[label] = runs
    figure = plots.plot_attack_curves(
        results, out_dir / "attack.png", title="White-box attacks (gradients through routing)"
    )
    notes = [
        "Untargeted panels: accuracy on adversarial examples (all test examples). Targeted "
        "panels: fraction classified as a random other class (the same targets for all models).",
        "Gradients flow through every routing iteration (no detach, no stop-gradient).",
        "zero_gradient_fraction > 0 means the attack loss is flat for those examples "
        "(sign(0) = 0 leaves them unperturbed): a masked gradient, not robustness.",
    ]
    record = make_record(
        "attack",
        "Adversarial robustness (FGSM / BIM)"
        + ("" if losses == "cross_entropy" else f", attack loss: {_loss_names(losses)}"),
        device=device,
        started=started,
        settings={
            "epsilons": list(epsilons),
            "methods": list(methods),
            "targeted": list(targeted),
            "steps": steps,
            "step_size_fraction": step_size_fraction,
            "max_examples": max_examples,
            "seed": seed,
            "dataset": getattr(dataset, "name", type(dataset).__name__),
        },
        models=describe_models(models, model_names),
        results=results,
        figures=[figure],
        summary=summary,
        notes=notes,
    )
    return finish_record(out_dir, record)


def _resolve_losses(
    models: Mapping[str, nn.Module],
    losses: Mapping[str, str] | str,
    model_names: Mapping[str, str] | None,
) -> dict[str, str]:
    """``{label: attack loss}``, with ``"model"`` replaced by the model's paper loss."""
    resolved = {}
    for label in models:
        loss = losses if isinstance(losses, str) else losses.get(label, "cross_entropy")
        if loss == "model":
            name = (model_names or {}).get(label)
            if name is None:
                raise ValueError(f"losses='model' needs model_names[{label!r}] (a registry name)")
            loss = objectives.resolve_loss("model", name)
        if loss not in attacks.ATTACK_LOSSES:
            raise ValueError(
                f"attack loss for {label!r} must be one of "
                f"{', '.join(map(repr, (*attacks.ATTACK_LOSSES, 'model')))}, got {loss!r}"
            )
        resolved[label] = loss
    return resolved


def _loss_names(losses: Mapping[str, str] | str) -> str:
    if isinstance(losses, str):
        return "each model's paper loss" if losses == "model" else losses
    return ", ".join(f"{k}: {v}" for k, v in losses.items())
