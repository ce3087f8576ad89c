"""Accuracy vs the size of a geometric transform of the test images.

Rotation, translation or scale beyond the training range: how gracefully each model's
accuracy falls off outside the viewpoints it saw (the papers' generalisation claims in
small, without retraining; [S17] §5.2 and [H18] §5.2 test it on affNIST and smallNORB).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from capsnet import plots
from capsnet.devices import resolve_device
from capsnet.experiments.evaluation import (
    TRANSFORM_UNITS,
    Progress,
    check_models,
    describe_models,
    evaluate_accuracy,
    image_transform,
    with_progress,
)
from capsnet.experiments.records import finish_record, make_record

__all__ = ["transform_sweep"]


def transform_sweep(
    models: Mapping[str, nn.Module],
    dataset: Any,
    out_dir: str | os.PathLike,
    *,
    kind: str = "rotation",
    values: Sequence[float] = (-60, -45, -30, -20, -10, 0, 10, 20, 30, 45, 60),
    train_range: tuple[float, float] | None = None,
    max_examples: int | None = 2000,
    batch_size: int = 250,
    model_names: Mapping[str, str] | None = None,
    device: torch.device | str = "cpu",
    progress: Progress = None,
) -> dict[str, Any]:
    """Accuracy vs the size of a geometric transform applied to the test images.

    Args:
        models: ``{label: model}``.
        dataset: the test set.
        out_dir: where ``<kind>_sweep.json`` and ``.png`` go.
        kind: ``"rotation"`` (degrees, counter-clockwise), ``"translation"`` (pixels to the
            right) or ``"scale"`` (zoom factor).
        values: the transform sizes.
        train_range: the range the models saw during training (shaded in the plot).
        max_examples, batch_size, model_names, device, progress: as in
            :func:`attack_experiment`.
    """
    check_models(models)
    image_transform(kind, 0.0)
    out_dir = Path(out_dir)
    device = resolve_device(device)
    started = time.perf_counter()
    accuracy: dict[str, list[float]] = {}
    for label, model in models.items():
        model.to(device)
        accuracy[label] = [
            evaluate_accuracy(
                model,
                dataset,
                transform=image_transform(kind, float(v)),
                batch_size=batch_size,
                max_examples=max_examples,
                device=device,
            )
            for v in with_progress(progress, list(values), desc=f"{label} {kind}", leave=False)
        ]
    name = f"{kind}_sweep"
    figure = plots.plot_lines(
        list(values),
        accuracy,
        out_dir / f"{name}.png",
        xlabel=f"{kind} ({TRANSFORM_UNITS[kind]})",
        ylabel="test accuracy",
        title=f"Accuracy vs {kind} of the test images",
        shade=train_range,
        ylim=(0.0, 1.02),
    )
    summary = [
        {"model": label, **{f"{v:g}": a for v, a in zip(values, acc, strict=True)}}
        for label, acc in accuracy.items()
    ]
    record = make_record(
        name,
        f"{kind.capitalize()} sweep",
        device=device,
        started=started,
        settings={
            "kind": kind,
            "values": list(values),
            "train_range": train_range,
            "max_examples": max_examples,
        },
        models=describe_models(models, model_names),
        results={"values": list(values), "accuracy": accuracy},
        figures=[figure],
        summary=summary,
        notes=[
            f"The {kind} is applied to the model input (after the dataset's eval transform), "
            "bilinear, zero fill."
        ],
    )
    return finish_record(out_dir, record)
