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

import numpy as np
import torch
from torch import nn

from capsnet import attacks, objectives, plots, stats
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

__all__ = ["attack_experiment", "attack_seeds_experiment"]


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

    Every accuracy and targeted success rate gets a 95 % bootstrap interval over the test
    images; with two or more models, the first is compared with each later one (first
    minus later) on the same images and targets (paired bootstrap interval and McNemar's
    test, one row per attack and epsilon). Per-image outcomes go to ``per_image.npz``
    (``LABEL__METHOD__untargeted__correct``, ``...__targeted__correct`` and
    ``...__targeted__hit``, bool ``(epsilons, images)``), so runs of several training seeds
    can be pooled with :mod:`capsnet.stats`.

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
    per_image: dict[str, Any] = {}
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
                    per_image=True,
                )
                key = f"{label}__{method}__{'targeted' if tgt else 'untargeted'}"
                per_image[f"{key}__correct"] = run.pop("correct")
                run["accuracy_interval"] = [
                    _rate_interval(ok)[1] for ok in per_image[f"{key}__correct"]
                ]
                if tgt:
                    per_image[f"{key}__hit"] = run.pop("hit")
                    run["success_interval"] = [
                        _rate_interval(hit)[1] for hit in per_image[f"{key}__hit"]
                    ]
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
    out_dir.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out_dir / "per_image.npz", **per_image)
    comparisons = _paired_rows(list(models), methods, targeted, epsilons, per_image)
    summary += comparisons
    figure = plots.plot_attack_curves(
        results, out_dir / "attack.png", title="White-box attacks (gradients through routing)"
    )
    notes = [
        "Untargeted panels: accuracy on adversarial examples (all test examples). Targeted "
        "panels: fraction classified as a random other class (the same targets for all models).",
        "Gradients flow through every routing iteration (no detach, no stop-gradient).",
        "zero_gradient_fraction > 0 means the attack loss is flat for those examples "
        "(sign(0) = 0 leaves them unperturbed): a masked gradient, not robustness.",
        "Intervals: 95 % percentile bootstrap over the test images (one trained model "
        "each); comparison rows: the first model minus each later one, in points of error "
        "(untargeted) or of target success (targeted), paired on the same images, with "
        "McNemar's exact p.",
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
        results={**results, "comparisons": comparisons} if comparisons else results,
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


def _rate_interval(outcomes: np.ndarray) -> tuple[float, list[float]]:
    """The fraction of True ``outcomes`` ``(N,)`` or ``(seeds, N)`` and its bootstrap
    interval (over seeds, then images), in [0, 1]."""
    est = stats.bootstrap_error(~outcomes)  # the "error" of ~x is the rate of x, in %
    return est.error / 100.0, [est.low / 100.0, est.high / 100.0]


def _paired_rows(
    labels: Sequence[str],
    methods: Sequence[str],
    targeted: Sequence[bool],
    epsilons: Sequence[float],
    per_image: Mapping[str, np.ndarray],
) -> list[dict[str, Any]]:
    """The first model minus each later one (its baselines) on the same images:
    adversarial error (untargeted) or target success (targeted), in points, per attack and
    epsilon (negative: the first model is the more robust). The order of
    ``capsnet experiment seeds`` and of the viewpoint records."""
    rows = []
    first = labels[0]
    for other in labels[1:]:
        for method in methods:
            for tgt in targeted:
                kind = "targeted" if tgt else "untargeted"
                # stats compare errors: untargeted the error is ~correct; targeted the
                # "error" is a hit, so the difference is in target success
                field = "hit" if tgt else "correct"
                a = per_image[f"{first}__{method}__{kind}__{field}"]
                b = per_image[f"{other}__{method}__{kind}__{field}"]
                row: dict[str, Any] = {
                    "comparison": f"{first} - {other}",
                    "attack": method,
                    "targeted": tgt,
                    "metric": "target success (points)" if tgt else "error (points)",
                }
                for k, eps in enumerate(epsilons):
                    # the "correct" arrays of stats: untargeted correct, targeted not hit
                    ca, cb = (~a[k], ~b[k]) if tgt else (a[k], b[k])
                    cmp = stats.paired_comparison(ca, cb)
                    row[f"eps={eps:g}"] = (
                        f"{cmp.difference:+.1f} [{cmp.low:+.1f}, {cmp.high:+.1f}] "
                        f"p={cmp.p_value:.2g}"
                    )
                rows.append(row)
    return rows


def attack_seeds_experiment(
    model_seeds: Mapping[str, Sequence[nn.Module]],
    dataset: Any,
    out_dir: str | os.PathLike,
    *,
    device: torch.device | str = "cpu",
    **attack: Any,
) -> dict[str, Any]:
    """:func:`attack_experiment` once per training seed, then pooled over the seeds.

    Seed s attacks the s-th model of every label on the same images with the same targets
    (``out_dir/seed-S/``); the pooled record (``attack_seeds.json``, ``attack_seeds.png``)
    gives each rate with a 95 % bootstrap interval over seeds and images, and the first
    model minus each later one, paired seed by seed on the same images, with McNemar's test
    over the pooled discordant pairs.

    Args:
        model_seeds: ``{label: [model of seed 0, model of seed 1, ...]}``, the same number
            of seeds for every label.
        dataset, out_dir, device: as :func:`attack_experiment`.
        **attack: the other arguments of :func:`attack_experiment`.
    """
    if not isinstance(model_seeds, Mapping) or not model_seeds:
        raise ValueError("model_seeds must be a non-empty {label: [model per seed]} mapping")
    for label, models in model_seeds.items():
        check_models({f"{label}[{s}]": m for s, m in enumerate(models)})
    counts = {label: len(models) for label, models in model_seeds.items()}
    if len(set(counts.values())) != 1 or min(counts.values()) < 1:
        raise ValueError(f"every model needs the same number (>= 1) of seeds, got {counts}")
    out_dir = Path(out_dir)
    started = time.perf_counter()
    seeds = next(iter(counts.values()))
    labels = list(model_seeds)
    records, arrays = [], []
    for s in range(seeds):
        sub = out_dir / f"seed-{s}"
        records.append(
            attack_experiment(
                {label: model_seeds[label][s] for label in labels},
                dataset,
                sub,
                device=device,
                **attack,
            )  # fmt: skip
        )
        with np.load(sub / "per_image.npz") as npz:
            arrays.append({k: npz[k] for k in npz.files})
    pooled = {k: np.stack([a[k] for a in arrays], 1) for k in arrays[0]}  # (E, S, N)
    first = records[0]
    epsilons = first["settings"]["epsilons"]
    results: dict[str, list[dict[str, Any]]] = {}
    summary = []
    for label in labels:
        runs = []
        for r in first["results"][label]:
            kind = "targeted" if r["targeted"] else "untargeted"
            field = "hit" if r["targeted"] else "correct"
            outcomes = pooled[f"{label}__{r['method']}__{kind}__{field}"]
            rate, band = map(list, zip(*(_rate_interval(o) for o in outcomes), strict=True))
            metric = "success_rate" if r["targeted"] else "accuracy"
            runs.append({
                "method": r["method"], "targeted": r["targeted"], "loss": r["loss"],
                "epsilons": epsilons, "seeds": seeds, "num_examples": outcomes.shape[-1],
                metric: rate,
                ("success_interval" if r["targeted"] else "accuracy_interval"): band,
            })  # fmt: skip
            summary.append({
                "model": label, "attack": r["method"], "targeted": r["targeted"],
                "metric": f"{'target success' if r['targeted'] else 'accuracy'} %",
                **{
                    f"eps={e:g}": f"{100 * v:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"
                    for e, v, (lo, hi) in zip(epsilons, rate, band, strict=True)
                },
            })  # fmt: skip
        results[label] = runs
    methods = first["settings"]["methods"]
    targeted = first["settings"]["targeted"]
    comparisons = _paired_rows(labels, methods, targeted, epsilons, pooled)
    summary += comparisons
    figure = plots.plot_attack_curves(
        results,
        out_dir / "attack_seeds.png",
        title=f"White-box attacks, {seeds} seeds (95 % intervals over seeds and images)",
    )
    record = make_record(
        "attack_seeds",
        f"Adversarial robustness (FGSM / BIM) over {seeds} training seeds",
        device=resolve_device(device),
        started=started,
        settings={**first["settings"], "seeds": seeds},
        models={label: first["models"][label] for label in labels},
        results={
            **results,
            "comparisons": comparisons,
            "per_seed": [f"seed-{s}" for s in range(seeds)],
        },
        figures=[figure],
        summary=summary,
        notes=[
            *first["notes"][:3],
            f"Rates pool {seeds} seeds x {pooled[next(iter(pooled))].shape[-1]} test images "
            "(the same images and targets for every seed and model); intervals: 95 % "
            "bootstrap over seeds, then images. Comparison rows: the first model minus each "
            "later one, in points, seed s paired with seed s on the same images, McNemar's exact "
            "p over the pooled discordant pairs. Per-seed records: seed-S/attack.json.",
        ],
    )
    return finish_record(out_dir, record)
