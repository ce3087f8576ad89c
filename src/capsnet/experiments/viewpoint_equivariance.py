"""3D viewpoint equivariance: does a linear map carry the pose at azimuth a to a + 20?

No paper reports this. [H18] §1 argues that a capsule's pose changes with the viewpoint by
a linear map, the same for every object; NORB-style data, whose azimuths are known exactly,
lets one test that for real 3D rotations rather than image-plane transforms. For every
image at azimuth a (any instance, elevation, lighting) there is the same object, elevation
and lighting at a + 20 degrees: a pair ``(f(x_a), f(x_{a+20}))`` of a model's features.
One linear map ``f(x_{a+20}) ≈ A f(x_a) + b`` is fitted on the pairs of the *training*
instances and tested on the pairs of the held-out instances
(:func:`capsnet.probes.linear_map_residual`), for the class capsule poses and, at equal
dimension (PCA), for a CNN's penultimate features.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from capsnet import plots, probes
from capsnet.devices import resolve_device
from capsnet.experiments.equivariance import CAPSULE_FEATURES, features_of
from capsnet.experiments.evaluation import (
    Progress,
    check_models,
    describe_models,
    eval_batches,
    model_input,
    with_progress,
)
from capsnet.experiments.records import finish_record, make_record
from capsnet.stats import seeded_subset

__all__ = ["azimuth_pairs", "viewpoint_equivariance_experiment"]

#: smallNORB azimuth codes run 0, 2, ..., 34 in steps of 10 degrees.
AZIMUTH_CODES = 36


def azimuth_pairs(labels: Tensor, info: Tensor, step_degrees: int = 20) -> tuple[Tensor, Tensor]:
    """Index pairs ``(i, j)``: image j shows image i's object, elevation and lighting at
    azimuth + ``step_degrees``.

    Args:
        labels: categories ``(N,)`` (instance numbers repeat across categories).
        info: smallNORB info ``(N, 4)``: instance, elevation, azimuth code (x 10 degrees),
            lighting.
        step_degrees: a multiple of 20 (the grid of smallNORB's azimuths).

    Returns:
        ``(i, j)``, two long tensors of equal length, sorted by ``i``.
    """
    if step_degrees % 20 or step_degrees <= 0:
        raise ValueError(f"step_degrees must be a positive multiple of 20, got {step_degrees}")
    if info.ndim != 2 or info.shape[1] != 4 or info.shape[0] != labels.shape[0]:
        raise ValueError(
            f"info must be (N, 4) with N = len(labels) = {labels.shape[0]}, got {tuple(info.shape)}"
        )
    step = step_degrees // 10
    rows = zip(labels.tolist(), info.tolist(), strict=True)
    keys = {
        (int(c), int(inst), int(elev), int(az), int(light)): n
        for n, (c, (inst, elev, az, light)) in enumerate(rows)
    }
    first, second = [], []
    for (c, inst, elev, az, light), n in keys.items():
        m = keys.get((c, inst, elev, (az + step) % AZIMUTH_CODES, light))
        if m is not None:
            first.append(n)
            second.append(m)
    order = torch.tensor(first).argsort() if first else torch.zeros(0, dtype=torch.long)
    return (
        torch.tensor(first, dtype=torch.long)[order],
        torch.tensor(second, dtype=torch.long)[order],
    )


def _pair_features(
    model: nn.Module,
    dataset: Any,
    pairs: tuple[Tensor, Tensor],
    batch_size: int,
    device: torch.device,
    progress: Progress,
    desc: str,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Features of the first and second image of every pair: ``{name: (P, F)}`` twice."""
    needed = torch.unique(torch.cat(pairs))
    feats: dict[str, list[Tensor]] = {}
    batches = eval_batches(dataset, batch_size=batch_size, indices=needed, device=device)
    for images, labels in with_progress(progress, batches, desc=desc, leave=False):
        for k, v in features_of(model, model_input(dataset, images), labels).items():
            feats.setdefault(k, []).append(v.cpu())
    position = torch.full((int(needed.max()) + 1,), -1, dtype=torch.long)
    position[needed] = torch.arange(len(needed))
    table = {k: torch.cat(v) for k, v in feats.items()}
    first = {k: v[position[pairs[0]]] for k, v in table.items()}
    second = {k: v[position[pairs[1]]] for k, v in table.items()}
    return first, second


@torch.no_grad()
def viewpoint_equivariance_experiment(
    models: Mapping[str, nn.Module],
    fit_dataset: Any,
    test_dataset: Any,
    out_dir: str | os.PathLike,
    *,
    step_degrees: int = 20,
    max_pairs: int | None = 4000,
    ridge: float | None = None,
    resamples: int = 1000,
    batch_size: int = 250,
    seed: int = 0,
    model_names: Mapping[str, str] | None = None,
    device: torch.device | str = "cpu",
    progress: Progress = None,
) -> dict[str, Any]:
    """Fit ``f(x_{a+step}) ≈ A f(x_a) + b`` on training instances, test on held-out ones.

    Args:
        models: ``{label: model}``; capsule models are probed on their class poses (all,
            and the true class's), other models on their penultimate features, also reduced
            by PCA to each capsule pose size (equal dimension).
        fit_dataset: NORB-style data (``labels``, ``info``) of the training instances.
        test_dataset: the same of the held-out instances.
        out_dir: experiment folder.
        step_degrees: the azimuth step (20 = the next view of the grid).
        max_pairs: a seeded random subset of pairs per dataset (None: all).
        ridge: None: chosen by cross-validation on the fit pairs.
        resamples: bootstrap resamples of the test pairs (the interval).
        batch_size, seed, model_names, device, progress: as in the other experiments.
    """
    check_models(models)
    for name, ds in (("fit_dataset", fit_dataset), ("test_dataset", test_dataset)):
        if getattr(ds, "info", None) is None:
            raise ValueError(
                f"{name} must be NORB-style data with viewpoint info (smallnorb or toynorb)"
            )
    out_dir = Path(out_dir)
    device = resolve_device(device)
    started = time.perf_counter()

    def pairs_of(ds: Any) -> tuple[Tensor, Tensor]:
        i, j = azimuth_pairs(torch.as_tensor(ds.labels), torch.as_tensor(ds.info), step_degrees)
        if len(i) == 0:
            raise ValueError(f"no image pairs {step_degrees} degrees apart in {ds!r}")
        keep = torch.from_numpy(seeded_subset(len(i), max_pairs, seed))
        return i[keep], j[keep]

    fit_pairs, test_pairs = pairs_of(fit_dataset), pairs_of(test_dataset)
    collected = {}
    for label, model in models.items():
        model.to(device).eval()
        collected[label] = (
            _pair_features(model, fit_dataset, fit_pairs, batch_size, device, progress, label),
            _pair_features(model, test_dataset, test_pairs, batch_size, device, progress, label),
        )
    pose_dims = sorted(
        {
            f.shape[1]
            for (fit_first, _), _ in collected.values()
            for k, f in fit_first.items()
            if k in CAPSULE_FEATURES
        }
    )
    results: dict[str, dict[str, Any]] = {}
    for label, ((p_fit, q_fit), (p_test, q_test)) in collected.items():
        per_feature: dict[str, Any] = {}
        for k in p_fit:
            variants: list[tuple[str, int | None]] = [(k, None)]
            if k not in CAPSULE_FEATURES:
                variants += [(f"{k}_pca{d}", d) for d in pose_dims if d < p_fit[k].shape[1]]
            for name, dim in variants:
                per_feature[name] = probes.linear_map_residual(
                    p_fit[k], q_fit[k], p_test[k], q_test[k],
                    ridge=ridge, dim=dim, resamples=resamples, seed=seed,
                )  # fmt: skip
        results[label] = per_feature
    values = {
        f"{label} / {k}": {"linear map": r["linear_residual"], "identity": r["identity_residual"]}
        for label, per_feature in results.items()
        for k, r in per_feature.items()
    }
    intervals = {
        f"{label} / {k}": {"linear map": (r["linear_residual_low"], r["linear_residual_high"])}
        for label, per_feature in results.items()
        for k, r in per_feature.items()
    }
    figures = [
        plots.plot_bars(
            values,
            out_dir / "viewpoint_equivariance.png",
            ylabel="held-out residual (1 - R^2)",
            title=f"Azimuth a -> a + {step_degrees} deg: one linear map, held-out instances",
            intervals=intervals,
        )
    ]
    summary = [
        {
            "model": label,
            "features": k,
            "dim": r["feature_dim"],
            "fit pairs": r["num_fit"],
            "test pairs": r["num_test"],
            "linear residual": f"{r['linear_residual']:.3g} [{r['linear_residual_low']:.3g}, "
            f"{r['linear_residual_high']:.3g}]",
            "identity residual": round(r["identity_residual"], 4),
        }
        for label, per_feature in results.items()
        for k, r in per_feature.items()
    ]
    record = make_record(
        "viewpoint_equivariance",
        f"3D equivariance: azimuth a -> a + {step_degrees} degrees",
        device=device,
        started=started,
        settings={
            "step_degrees": step_degrees,
            "max_pairs": max_pairs,
            "ridge": "cross-validated" if ridge is None else ridge,
            "resamples": resamples,
            "seed": seed,
            "fit_dataset": repr(fit_dataset),
            "test_dataset": repr(test_dataset),
        },
        models=describe_models(models, model_names),
        results=results,
        figures=figures,
        summary=summary,
        notes=[
            "One linear map from the features at azimuth a to those at a + step is fitted on "
            "the training instances' image pairs and tested on the held-out instances' pairs.",
            "linear residual: 1 - R^2 on the held-out pairs with a 95 % bootstrap interval; "
            "identity residual: the same for 'the features do not move' (invariance).",
            "Compare rows of equal dim: CNN features are reduced by PCA (fitted on the fit "
            "pairs) to each capsule pose size.",
        ],
    )
    return finish_record(out_dir, record)
