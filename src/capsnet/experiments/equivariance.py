"""Equivariance probe: f(Tx) ≈ M_T f(x), a linear-map residual for known transforms T.

[S17] §1 and [H18] §1 argue that capsule poses change *equivariantly* with the viewpoint
(a linear map of the pose for a known transform), where CNN features aim at invariance.
:func:`equivariance_experiment` measures, per model and transform (translation, rotation),
how well one fitted linear map predicts the features of the transformed inputs
(:func:`capsnet.probes.equivariance_residual`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from capsnet import plots, probes
from capsnet.devices import resolve_device
from capsnet.experiments.evaluation import (
    TRANSFORM_UNITS,
    Progress,
    check_models,
    describe_models,
    eval_batches,
    image_transform,
    model_input,
    with_progress,
)
from capsnet.experiments.records import finish_record, make_record

__all__ = ["equivariance_experiment"]


CAPSULE_FEATURES = ("class_poses", "true_class_pose")


def features_of(model: nn.Module, x: Tensor, labels: Tensor) -> dict[str, Tensor]:
    poses = model(x).poses
    if poses.ndim == 3:  # capsules: (B, O, D)
        true = poses[torch.arange(len(labels)), labels]
        return {"class_poses": poses.flatten(1), "true_class_pose": true}
    return {"penultimate": poses.flatten(1)}


@torch.no_grad()
def equivariance_experiment(
    models: Mapping[str, nn.Module],
    dataset: Any,
    out_dir: str | os.PathLike,
    *,
    translations: Sequence[float] = (1, 2, 3, 4),
    rotations: Sequence[float] = (5, 10, 20, 30),
    max_examples: int = 5000,
    fit_fraction: float = 0.5,
    ridge: float | None = None,
    resamples: int = 1000,
    batch_size: int = 250,
    model_names: Mapping[str, str] | None = None,
    device: torch.device | str = "cpu",
    progress: Progress = None,
) -> dict[str, Any]:
    """Equivariance probe: how well one linear map predicts features of transformed inputs.

    For each transform T (horizontal translation by t pixels, rotation by a degrees) and
    each model, features ``P = f(x)`` and ``Q = f(Tx)`` of the same test inputs are
    compared with :func:`capsnet.probes.equivariance_residual`: the held-out
    ``linear_residual`` (1 - R^2 of the best linear map ``Q ≈ P A + b``) and the
    ``identity_residual`` (``A = I``: 0 for invariant features). Capsule models are probed
    on all class-capsule poses (``class_poses``, O*D values) and on the true class's
    capsule alone (``true_class_pose``, D values); CNNs on their penultimate features.

    A bigger feature vector gives the fitted map more freedom, so features larger than a
    capsule pose are also probed after PCA to each capsule pose size (``penultimate_pca16``,
    ``penultimate_pca160``): compare models at equal ``dim``. The ridge is chosen by 5-fold
    cross-validation on the fit half (``ridge=None``; a number fixes it), and every
    residual carries a 95 % bootstrap interval over the held-out examples.
    """
    check_models(models)
    out_dir = Path(out_dir)
    device = resolve_device(device)
    started = time.perf_counter()
    transforms = [("translation", float(t)) for t in translations] + [
        ("rotation", float(a)) for a in rotations
    ]
    collected: dict[str, tuple[dict[str, Tensor], dict[tuple[str, float], dict[str, Tensor]]]] = {}
    for label, model in models.items():
        model.to(device).eval()
        feats: dict[str, list[Tensor]] = {}
        moved: dict[tuple[str, float], dict[str, list[Tensor]]] = {t: {} for t in transforms}
        batches = eval_batches(
            dataset, batch_size=batch_size, max_examples=max_examples, device=device
        )
        for images, labels in with_progress(
            progress, batches, desc=f"{label} equivariance", leave=False
        ):
            x = model_input(dataset, images)
            for k, v in features_of(model, x, labels).items():
                feats.setdefault(k, []).append(v.cpu())
            for t in transforms:
                for k, v in features_of(model, image_transform(*t)(x), labels).items():
                    moved[t].setdefault(k, []).append(v.cpu())
        collected[label] = (
            {k: torch.cat(v) for k, v in feats.items()},
            {t: {k: torch.cat(v) for k, v in m.items()} for t, m in moved.items()},
        )
    # Equal dimension: other features are also probed in the PCA subspaces of the capsule
    # pose sizes (D for one class capsule, O*D for all), so no model wins by having more
    # coordinates for the fitted map to use.
    pose_dims = sorted(
        {
            f.shape[1]
            for feats_, _ in collected.values()
            for k, f in feats_.items()
            if k in CAPSULE_FEATURES
        }
    )
    options: dict[str, Any] = {"fit_fraction": fit_fraction, "ridge": ridge, "resamples": resamples}
    results: dict[str, dict[str, Any]] = {}
    for label, (feats_, moved_) in collected.items():
        per_feature: dict[str, Any] = {}
        for k, p in feats_.items():
            variants: list[tuple[str, int | None]] = [(k, None)]
            if k not in CAPSULE_FEATURES:
                variants += [(f"{k}_pca{d}", d) for d in pose_dims if d < p.shape[1]]
            for name, dim in variants:
                per_feature[name] = {
                    f"{kind} {value:g}": probes.equivariance_residual(
                        p, moved_[(kind, value)][k], dim=dim, **options
                    )
                    for kind, value in transforms
                }
        results[label] = per_feature
    figures = []
    for kind, values in (("translation", translations), ("rotation", rotations)):
        if not values:
            continue
        series, styles = {}, {}
        for label, per_feature in results.items():
            for k, table in per_feature.items():
                ys = [table[f"{kind} {float(v):g}"] for v in values]
                series[f"{label} / {k}: linear map"] = [y["linear_residual"] for y in ys]
                series[f"{label} / {k}: identity"] = [y["identity_residual"] for y in ys]
                styles[f"{label} / {k}: identity"] = ":"
        figures.append(
            plots.plot_lines(
                list(values),
                series,
                out_dir / f"equivariance_{kind}.png",
                xlabel=f"{kind} ({TRANSFORM_UNITS[kind]})",
                ylabel="held-out residual (1 - R^2)",
                title=f"Equivariance under {kind}: can one linear map predict f(Tx) from f(x)?",
                styles=styles,
                logy=True,
                legend_outside=True,
            )
        )
    summary = []
    for label, per_feature in results.items():
        for k, table in per_feature.items():
            first = next(iter(table.values()))
            row = {
                "model": label,
                "features": k,
                "dim": first["feature_dim"],
                "test images": first["num_test"],
            }
            row.update(
                {
                    t: f"{v['linear_residual']:.3g} [{v['linear_residual_low']:.3g}, "
                    f"{v['linear_residual_high']:.3g}]"
                    for t, v in table.items()
                }
            )
            summary.append(row)
    record = make_record(
        "equivariance",
        "Equivariance probe",
        device=device,
        started=started,
        settings={
            "translations": list(translations),
            "rotations": list(rotations),
            "max_examples": max_examples,
            "fit_fraction": fit_fraction,
            "ridge": "cross-validated" if ridge is None else ridge,
            "resamples": resamples,
        },
        models=describe_models(models, model_names),
        results=results,
        figures=figures,
        summary=summary,
        notes=[
            "Table: held-out linear_residual = |Q - (PA + b)|^2 / |Q - mean Q|^2 for the best "
            "linear map fitted on the other half of the examples (0 = exactly linear).",
            "identity_residual (dotted in the plots) is the same with A = I, b = 0: small "
            "means the features barely move (invariance), which a linear map also explains.",
            "A larger feature vector gives the fitted map more freedom: compare rows of equal "
            "`dim` (CNN features are also reduced by PCA to each capsule pose size).",
            "Brackets: 95 % bootstrap interval over the held-out examples; the ridge is "
            "chosen by 5-fold cross-validation on the fit half.",
        ],
    )
    return finish_record(out_dir, record)
