"""Test error over several training seeds, with intervals, and a paired comparison.

One training run is one draw: the same recipe with another seed lands a few tenths of a
point elsewhere on MNIST, points elsewhere on harder data. :func:`seed_comparison` takes
the runs of each model (one per seed, already trained), scores every run on the *same*
test images (a seeded random subset, or all of them), and reports per model the pooled
error with a 95 % bootstrap interval over images and seeds
(:func:`capsnet.stats.bootstrap_error`); against each further model, the paired
difference (seed k of the first model against seed k of the other, the same images),
McNemar's exact test and the relative reduction of errors
(:func:`capsnet.stats.paired_comparison`, :func:`capsnet.stats.relative_reduction`).

Which checkpoint each run contributes is the caller's choice (``capsnet experiment
seeds`` loads each run's ``best``, chosen on validation data by default, and records on
what each was selected; runs selected on the test set are flagged in the notes).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from capsnet import plots
from capsnet.devices import resolve_device
from capsnet.experiments.evaluation import Progress, check_dataset, evaluate_correct, with_progress
from capsnet.experiments.records import finish_record, make_record
from capsnet.stats import bootstrap_error, paired_comparison, relative_reduction

__all__ = ["seed_comparison"]


def seed_comparison(
    groups: Mapping[str, Sequence[nn.Module]],
    dataset: Any,
    out_dir: str | os.PathLike,
    *,
    runs: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    model_names: Mapping[str, str] | None = None,
    max_examples: int | None = None,
    batch_size: int = 256,
    resamples: int = 2000,
    device: Any = "cpu",
    progress: Progress = None,
) -> dict[str, Any]:
    """Pooled test error of each model's seeds, and the first model against the others.

    Args:
        groups: ``{label: [model of seed 1, model of seed 2, ...]}``; the first label is
            the model compared against every other one (e.g. capsules, then the CNN).
            Paired comparisons need the same number of seeds on both sides.
        dataset: the test set (``ImageDataset`` contract), the same for every model.
        out_dir: folder for ``seeds.json``, ``seeds.png`` and ``per_image.npz``
            (``{label: bool (seeds, images)}``).
        runs: ``{label: [description of each run]}`` stored in the record (run folder,
            training seed, checkpoint epoch, what the checkpoint was selected on).
        model_names: registry names, for the record.
        max_examples: a seeded random subset of this many test images (None: all).
        batch_size, device, progress: evaluation settings.
        resamples: bootstrap resamples.

    Returns:
        The record (also written as ``seeds.json``).
    """
    started = time.perf_counter()
    check_dataset(dataset)
    if not groups or any(len(models) == 0 for models in groups.values()):
        raise ValueError("groups must map every label to at least one model (one per seed)")
    device = resolve_device(device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = {label: list((runs or {}).get(label, [{}] * len(m))) for label, m in groups.items()}
    correct: dict[str, Any] = {}  # label -> bool (seeds, images)
    jobs = [(label, k, m) for label, models in groups.items() for k, m in enumerate(models)]
    per_run: dict[str, list[np.ndarray]] = {label: [] for label in groups}
    for label, _, model in with_progress(progress, jobs, desc="runs", unit="run"):
        ok = evaluate_correct(
            model, dataset, max_examples=max_examples, batch_size=batch_size, device=device
        ).numpy()
        per_run[label].append(ok)
    for label, arrays in per_run.items():
        correct[label] = np.stack(arrays)  # (seeds, images): the same images for every run
    np.savez_compressed(out_dir / "per_image.npz", **correct)
    images = int(next(iter(correct.values())).shape[1])
    boot = {"resamples": resamples}
    results: dict[str, Any] = {
        "test_images": images,
        "models": {
            label: {
                "error": bootstrap_error(ok, **boot).as_dict(),
                "per_seed": [
                    {**runs[label][k], "error": 100.0 * float(1.0 - ok[k].mean())}
                    for k in range(ok.shape[0])
                ],
                "seed_spread": float(100.0 * (1.0 - ok.mean(1)).std(ddof=1))
                if ok.shape[0] > 1
                else None,
            }
            for label, ok in correct.items()
        },
        "comparisons": {},
    }
    labels = list(groups)
    notes = [
        "Errors in %, with 95 % bootstrap intervals over test images and seeds (two-level: "
        "seeds, then images). Differences are paired: seed k of one model against seed k "
        "of the other, on the same images; McNemar's exact test pools every seed's images.",
    ]
    for other in labels[1:]:
        a, b = correct[labels[0]], correct[other]
        name = f"{labels[0]} - {other}"
        if a.shape != b.shape:
            notes.append(
                f"{name}: no paired comparison ({a.shape[0]} against {b.shape[0]} seeds; "
                "give both models the same number of runs)"
            )
            continue
        results["comparisons"][name] = {
            **paired_comparison(a, b, **boot).as_dict(),
            "relative_reduction": relative_reduction(a, b, **boot),
        }
    for label in labels:
        seeds = [r.get("seed") for r in runs[label] if r.get("seed") is not None]
        if len(set(seeds)) < len(seeds):
            notes.append(f"{label}: runs share a training seed ({seeds}); they are not independent")
    on_test = [
        f"{label} run {k + 1}"
        for label in labels
        for k, r in enumerate(runs[label])
        if r.get("selected_on") == "test"
    ]
    if on_test:
        notes.append(
            "checkpoints chosen on the test set (selected_on = test): "
            + ", ".join(on_test)
            + "; their test errors are optimistic"
        )
    figure = plots.plot_bars(
        {"test": {label: results["models"][label]["error"]["error"] / 100 for label in labels}},
        out_dir / "seeds.png",
        ylabel="test error",
        title=f"{images} test images, 95 % intervals over images and seeds",
        intervals={
            "test": {
                label: (
                    results["models"][label]["error"]["low"] / 100,
                    results["models"][label]["error"]["high"] / 100,
                )
                for label in labels
            }
        },
    )
    summary: list[dict[str, Any]] = [
        {
            "model": label,
            "seeds": len(r["per_seed"]),
            "test error % [95 %]": _interval_text(r["error"]),
            "per seed %": ", ".join(f"{row['error']:.2f}" for row in r["per_seed"]),
            "test images": images,
        }
        for label, r in results["models"].items()
    ]
    for name, comp in results["comparisons"].items():
        rr = comp["relative_reduction"]
        summary.append(
            {
                "model": name,
                "test error % [95 %]": f"{comp['difference']:+.2f} "
                f"[{comp['low']:+.2f}, {comp['high']:+.2f}] (McNemar p = {comp['p_value']:.3g}; "
                f"{100 * rr['reduction']:.0f} % fewer errors "
                f"[{100 * rr['low']:.0f}, {100 * rr['high']:.0f}])",
            }
        )
    record = make_record(
        "seeds",
        "Test error over training seeds",
        device=device,
        started=started,
        settings={"max_examples": max_examples, "resamples": resamples, "batch_size": batch_size},
        models={
            label: {
                "registry_name": (model_names or {}).get(label, label),
                "runs": len(groups[label]),
            }
            for label in labels
        },
        results=results,
        figures=[figure],
        summary=summary,
        notes=notes,
    )
    return finish_record(out_dir, record)


def _interval_text(est: Mapping[str, Any]) -> str:
    return f"{est['error']:.2f} [{est['low']:.2f}, {est['high']:.2f}]"
