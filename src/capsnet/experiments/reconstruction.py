"""Reconstructions from the class capsules and pose-dimension perturbations ([S17] §5.1, Fig. 3-4).

The CapsNet decoder reconstructs the input from the longest class capsule; perturbing one
dimension of that capsule at a time shows what each dimension encodes (stroke thickness,
skew, width, ... in [S17] Fig. 4).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from capsnet import plots
from capsnet.devices import resolve_device
from capsnet.experiments.evaluation import (
    class_names,
    describe_models,
    eval_batches,
    model_input,
    pick_examples,
)
from capsnet.experiments.records import finish_record, make_record

__all__ = ["reconstruction_experiment"]


@torch.no_grad()
def reconstruction_experiment(
    model: nn.Module,
    dataset: Any,
    out_dir: str | os.PathLike,
    *,
    num_examples: int = 20,
    num_perturbed: int = 3,
    deltas: Sequence[float] = tuple(round(-0.25 + 0.05 * k, 2) for k in range(11)),
    label: str = "capsules",
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Reconstructions and class-capsule dimension perturbations ([S17] Fig. 3 and 4).

    The decoder gets the longest class capsule (the paper's test-time masking). For
    ``num_perturbed`` correctly classified test examples of distinct classes, each
    dimension d of the predicted class capsule is replaced by ``v_d + delta`` for each
    delta and decoded: one grid per example, rows = dimensions, columns = deltas.

    Args:
        model: a capsule model with ``reconstruct(poses, classes)`` (CapsNet with a decoder).
        dataset: the test set.
        out_dir: where ``reconstruction.json`` and the PNGs go.
        num_examples: examples in the input / reconstruction grid.
        num_perturbed: examples whose capsule dimensions are perturbed.
        deltas: the perturbations (paper: -0.25..0.25 in steps of 0.05).
        label: the model's name in the record.
        device: where to run.

    Results: the mean squared reconstruction error per image (sum over pixels) and, per
    perturbed example, each dimension's mean absolute pixel change over the deltas (how much
    the decoded image depends on that dimension).
    """
    if not callable(getattr(model, "reconstruct", None)) or getattr(model, "decoder", 1) is None:
        raise ValueError(
            f"{type(model).__name__} has no reconstruction decoder: reconstructions need a "
            "CapsNet built with reconstruction=True"
        )
    out_dir = Path(out_dir)
    device = resolve_device(device)
    started = time.perf_counter()
    model.to(device).eval()
    images, labels = next(eval_batches(dataset, batch_size=max(num_examples, 200), device=device))
    x = model_input(dataset, images)
    out = model(x)
    if out.reconstructions is None:
        raise ValueError("the model returned no reconstructions")
    preds = out.scores.argmax(-1)
    n = min(num_examples, x.shape[0])
    sq_err = (out.reconstructions - x).flatten(1).pow(2).sum(1)
    figures = [
        plots.plot_reconstructions(x[:n], out.reconstructions[:n], out_dir / "reconstructions.png")
    ]

    picks = pick_examples(labels, preds, num_perturbed)
    names = class_names(dataset)
    deltas = [float(d) for d in deltas]
    delta_t = torch.tensor(deltas, device=device, dtype=out.poses.dtype)
    pose_dim = out.poses.shape[-1]
    perturbed: list[dict[str, Any]] = []
    for i in picks:
        cls = int(preds[i])
        base = out.poses[i : i + 1]  # (1, O, D)
        grid = base.repeat(pose_dim * len(deltas), 1, 1).reshape(
            pose_dim, len(deltas), *base.shape[1:]
        )
        grid[torch.arange(pose_dim), :, cls, torch.arange(pose_dim)] += delta_t  # (D, S, O, D)
        flat = grid.reshape(-1, *base.shape[1:])
        # nn.Module.__getattr__ is typed Tensor | Module: mypy sees a maybe-Tensor (twice)
        decoded = model.reconstruct(flat, torch.full((flat.shape[0],), cls, device=device))  # type: ignore[operator]
        decoded = decoded.reshape(pose_dim, len(deltas), *decoded.shape[1:])
        reference = model.reconstruct(base, torch.tensor([cls], device=device))  # type: ignore[operator]
        sensitivity = (decoded - reference).abs().flatten(2).mean(-1).mean(-1)  # (D,)
        fig = plots.plot_pose_perturbation(
            decoded,
            deltas,
            out_dir / f"perturbation_{len(perturbed)}.png",
            title=f"test example {i}: class {names[cls]}, each of {pose_dim} dimensions perturbed",
        )
        figures.append(fig)
        perturbed.append(
            {
                "index": i,
                "label": int(labels[i]),
                "predicted": cls,
                "dimension_sensitivity": sensitivity,
            }
        )
    results = {
        "num_examples": int(x.shape[0]),
        "mean_squared_error": float(sq_err.mean()),
        "mean_squared_error_per_pixel": float(sq_err.mean() / x[0].numel()),
        "deltas": deltas,
        "perturbed": perturbed,
    }
    record = make_record(
        "reconstruction",
        "Reconstructions and pose perturbations",
        device=device,
        started=started,
        settings={"num_examples": n, "num_perturbed": num_perturbed, "deltas": deltas},
        models=describe_models({label: model}, None),
        results=results,
        figures=figures,
        summary=[
            {
                "model": label,
                "examples": int(x.shape[0]),
                "sum sq. error / image": results["mean_squared_error"],
            }
        ],
        notes=[
            "Decoder input: the longest class capsule, others masked (test-time masking).",
            "Perturbation grids: row d adds delta to dimension d of the predicted class "
            "capsule; columns are the deltas.",
        ],
    )
    return finish_record(out_dir, record)
