"""Novel-data error at matched familiar-data error: train, match epochs, compare ([H18] §5.2).

The protocol of [H18] §5.2 (also the fair form of [S17] §5.2): a capsule model and a CNN
are compared on novel data (unseen viewpoints, affine digits) when both make the *same*
error on familiar data. :func:`generalization_protocol` trains each model (several
seeds) through the public trainer (:func:`capsnet.train.train`) keeping weight snapshots
every quarter epoch, matches the models on *validation* data (familiar images held out
from training; :func:`matched_checkpoints`), and only then evaluates the matched
snapshots on the familiar and novel test sets, with bootstrap intervals and paired tests.
:mod:`capsnet.experiments.viewpoint` and :func:`capsnet.experiments.affnist_protocol`
are its two instances.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from capsnet import plots
from capsnet.devices import resolve_device
from capsnet.experiments.evaluation import evaluate_accuracy, evaluate_correct
from capsnet.experiments.records import finish_record, make_record, write_json
from capsnet.stats import bootstrap_error, paired_comparison, relative_reduction, seeded_subset

__all__ = ["matched_checkpoints", "generalization_protocol", "smoothed"]


def smoothed(errors: Sequence[float], window: int = 1) -> list[float]:
    """Centred running mean of a validation curve over ``window`` snapshots (odd).

    ``window`` 1 returns the curve itself. At the ends the window shrinks to the
    snapshots there are (the first of 5 with ``window`` 3 averages snapshots 0 and 1).
    """
    if window < 1 or window % 2 == 0:
        raise ValueError(f"window must be an odd number >= 1, got {window}")
    half = window // 2
    errors = [float(e) for e in errors]
    return [float(np.mean(errors[max(0, i - half) : i + half + 1])) for i in range(len(errors))]


def matched_checkpoints(
    familiar_errors: Mapping[str, Sequence[float]],
    target: float | None = None,
    *,
    smooth: int = 1,
) -> tuple[float, dict[str, int]]:
    """Pick, per model, the epoch whose familiar-view error matches a common level.

    The [H18] viewpoint protocol compares models at the same error on familiar views. The
    level is ``target`` or, by default, the larger of the models' best familiar errors (the
    best level every model reaches); each model's chosen epoch is the one whose error is
    closest to the level (the earliest on ties).

    ``smooth`` > 1 reads both on the curves' centred running means over that many
    snapshots (:func:`smoothed`). On a noisy curve the best raw value is biased low (the
    luckiest of many noisy readings), so a model whose curve jumps between snapshots is
    read below its typical error; the running mean damps that. (Not in the papers, which
    do not say how they matched; the ToyNORB run in docs/results.md shows the bias.)

    Args:
        familiar_errors: ``{label: [error after epoch 1, 2, ...]}``.
        target: the level; default as above.
        smooth: running-mean window in snapshots (odd; 1: the raw curves).

    Returns:
        ``(level, {label: epoch index (0-based)})``.
    """
    if not familiar_errors or any(len(v) == 0 for v in familiar_errors.values()):
        raise ValueError("familiar_errors must map every model to a non-empty list of errors")
    curves = {label: smoothed(errs, smooth) for label, errs in familiar_errors.items()}
    level = max(min(v) for v in curves.values()) if target is None else float(target)
    chosen = {
        label: min((abs(e - level), i) for i, e in enumerate(errs))[1]
        for label, errs in curves.items()
    }
    return level, chosen


def _train_run(config: Any, run_dir: Path, epochs: int, state: dict[str, Any]) -> None:
    """Train ``config`` into ``run_dir`` for ``epochs`` epochs through the public trainer.

    Resumable: a run whose last checkpoint exists continues (``resume=True``); a run the
    protocol already finished (``state["trained_epochs"] >= epochs``) is not touched.
    """
    from capsnet.checkpoint import list_checkpoints
    from capsnet.train import resume_config, train

    if state.get("trained_epochs", 0) >= epochs:
        return
    if list_checkpoints(run_dir):
        train(resume_config(run_dir, epochs=epochs), resume=True)
    else:
        train(dataclasses.replace(config, epochs=epochs, output_dir=str(run_dir)))
    state["trained_epochs"] = epochs


def _steps_per_epoch(run_dir: Path) -> int:
    """Training steps per epoch of a run (its ``metrics.jsonl`` start record)."""
    from capsnet.runlog import read_metrics

    for row in read_metrics(run_dir):
        if row.get("kind") == "start" and row.get("steps_per_epoch"):
            return int(row["steps_per_epoch"])
    raise RuntimeError(f"{run_dir / 'metrics.jsonl'} has no start record with steps_per_epoch")


def _snapshots(run_dir: Path) -> list[tuple[int, Path]]:
    """``(step, weights file)`` of the run's weight snapshots, by step."""
    found = []
    for path in run_dir.glob("snapshot-*.safetensors"):
        try:
            found.append((int(path.stem.split("-", 1)[1]), path))
        except ValueError:
            continue
    return sorted(found)


def generalization_protocol(
    configs: Mapping[str, Any],
    out_dir: str | os.PathLike,
    *,
    familiar: tuple[str, str, Mapping[str, Any]],
    novel: tuple[str, str, Mapping[str, Any]],
    experiment: str,
    title: str,
    epochs: int | None = None,
    seeds: Sequence[int] = (0,),
    snapshots_per_epoch: int = 4,
    target_error: float | None = None,
    smooth: int = 1,
    val_per_seed: bool = False,
    max_examples: int | None = None,
    batch_size: int = 250,
    resamples: int = 2000,
    notes: Sequence[str] = (),
    device: torch.device | str = "auto",
) -> dict[str, Any]:
    """Train several models, compare them on novel data at matched familiar error.

    The rule, fixed before any comparison:

    1. every model is trained once per seed (:func:`capsnet.train.train`, into
       ``<out_dir>/runs/<label>/seed-<s>``), keeping ``snapshots_per_epoch`` weight
       snapshots per epoch;
    2. every snapshot is scored on the run's **validation** split (familiar data held out
       from training: :func:`capsnet.validation.split_validation`), never on a test set;
    3. per seed, the level to match is ``target_error`` or the larger of the models' best
       validation errors (the best level every model reaches); each model is read at the
       snapshot whose validation error is closest to it (:func:`matched_checkpoints`),
       both read on the curves' running means over ``smooth`` snapshots;
    4. only those snapshots are evaluated on the familiar and the novel **test** sets
       (the same seeded random images for every model), and reported with 95 % bootstrap
       intervals over images and seeds (:func:`capsnet.stats.bootstrap_error`); the first
       model is compared with each other one on the same images
       (:func:`capsnet.stats.paired_comparison`: the error difference, McNemar's test, and
       the relative reduction of novel errors).

    Interrupted runs continue where they stopped (``<run>/protocol.json`` keeps what was
    measured). [H18] §5.2 (:mod:`capsnet.experiments.viewpoint`) and [S17] §5.2
    (:func:`capsnet.experiments.affnist_protocol`) are its instances.

    Args:
        configs: ``{label: capsnet.config.RunConfig}``; the first is compared with the
            others. Their ``val_samples`` must not be 0 (matching needs validation data).
        out_dir: experiment folder (``<experiment>.json``, PNGs, ``per_image.npz``,
            ``runs/``).
        familiar: ``(dataset, split, dataset kwargs)`` of the familiar test set.
        novel: ``(dataset, split, dataset kwargs)`` of the novel test set.
        experiment, title: the record's id and title.
        epochs: epochs per model (default: each config's ``epochs``).
        seeds: training seeds (each model is trained once per seed).
        snapshots_per_epoch: matching resolution (4: quarter epochs).
        target_error: the validation error level to match (default: see rule 3).
        smooth: running-mean window of the validation curves, in snapshots (odd; 1: the
            raw curves). Noisy curves make the best raw snapshot a lucky one.
        val_per_seed: each training seed holds out its own validation data (the configs'
            ``val_seed`` set to None: drawn with the training seed), so that with few
            validation objects (``val_split = "instances"``: one per class) their choice
            averages out over the seeds instead of being the same for all of them.
        max_examples: test examples per test set, a seeded random subset (None: all).
        batch_size: evaluation batch size.
        resamples: bootstrap resamples of the intervals.
        notes: extra notes for the record (e.g. the paper's numbers).
        device: where the evaluations run (training uses each config's device).
    """
    from capsnet import data
    from capsnet.checkpoint import load
    from capsnet.validation import split_validation

    if not configs:
        raise ValueError("configs must hold at least one {label: RunConfig}")
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct ints, at least one, got {seeds}")
    if snapshots_per_epoch < 1:
        raise ValueError(f"snapshots_per_epoch must be >= 1, got {snapshots_per_epoch}")
    smoothed([0.0], smooth)  # checks the window before any training
    if val_per_seed:
        configs = {label: dataclasses.replace(c, val_seed=None) for label, c in configs.items()}
    for label, config in configs.items():
        if config.val_samples == 0:
            raise ValueError(
                f"configs[{label!r}] has val_samples=0: the protocol matches models on "
                "validation data, never on the test set; leave val_samples unset (a tenth "
                "of the training images) or give a number"
            )
    out_dir = Path(out_dir)
    device = resolve_device(device)
    started = time.perf_counter()
    first = next(iter(configs.values()))
    root, download = first.data_root, first.download  # the test sets are read up front

    def test_set(spec: tuple[str, str, Mapping[str, Any]]) -> Any:
        name, split, kwargs = spec
        return data.create(name, split=split, root=root, download=download, **dict(kwargs))

    novel_set = test_set(novel)
    familiar_set = test_set(familiar)
    evaluate: dict[str, Any] = {"batch_size": batch_size, "device": device}

    # Rules 1-2: train, score every snapshot on validation data.
    curves: dict[str, dict[int, dict[str, list[Any]]]] = {}
    val_sets: dict[tuple[str, int], Any] = {}
    for label, config in configs.items():
        total = epochs if epochs is not None else config.epochs
        cfg0 = dataclasses.replace(config, snapshots_per_epoch=snapshots_per_epoch)
        kw = {"root": cfg0.data_root, "download": cfg0.download, **cfg0.data_kwargs}
        train_set = data.create(cfg0.dataset, split="train", **kw)
        curves[label] = {}
        for seed in seeds:
            # the run's own validation images: with val_seed None they follow the seed
            val_set = split_validation(train_set, dataclasses.replace(cfg0, seed=seed))[1]
            val_sets[(label, seed)] = val_set
            run_dir = out_dir / "runs" / label / f"seed-{seed}"
            state_file = run_dir / "protocol.json"
            state: dict[str, Any] = {"val_error": {}}
            if state_file.is_file():
                state = json.loads(state_file.read_text(encoding="utf-8"))
            _train_run(dataclasses.replace(cfg0, seed=seed), run_dir, total, state)
            for step, path in _snapshots(run_dir):
                if str(step) not in state["val_error"]:
                    model = load(path, device=device)
                    acc = evaluate_accuracy(model, val_set, **evaluate)
                    state["val_error"][str(step)] = 1.0 - acc
            write_json(state_file, state)
            steps = sorted(int(k) for k in state["val_error"])
            if not steps:
                raise RuntimeError(f"{run_dir} holds no weight snapshots to match")
            per_epoch = _steps_per_epoch(run_dir)
            curves[label][seed] = {
                "step": steps,
                "epoch": [round(st / per_epoch, 4) for st in steps],
                "val_error": [state["val_error"][str(k)] for k in steps],
            }

    # Rule 3: per seed, the matched level and each model's snapshot.
    matched: dict[int, dict[str, Any]] = {}
    for seed in seeds:
        level, chosen = matched_checkpoints(
            {label: curves[label][seed]["val_error"] for label in configs},
            target_error,
            smooth=smooth,
        )
        matched[seed] = {"level": level, "index": chosen}

    # Rule 4: the chosen snapshots on the familiar and novel test sets.
    correct: dict[str, dict[str, list[np.ndarray]]] = {}
    per_seed: dict[str, list[dict[str, Any]]] = {}
    for label in configs:
        correct[label] = {"familiar": [], "novel": []}
        per_seed[label] = []
        for seed in seeds:
            c = curves[label][seed]
            i = matched[seed]["index"][label]
            path = (
                out_dir / "runs" / label / f"seed-{seed}" / f"snapshot-{c['step'][i]}.safetensors"
            )
            model = load(path, device=device)
            row: dict[str, Any] = {
                "seed": seed,
                "snapshot": path.name,
                "epoch": c["epoch"][i],
                "val_error": c["val_error"][i],
                "smoothed_val_error": smoothed(c["val_error"], smooth)[i],
                "matched_level": matched[seed]["level"],
            }
            for which, ds in (("familiar", familiar_set), ("novel", novel_set)):
                ok = evaluate_correct(model, ds, max_examples=max_examples, **evaluate).numpy()
                correct[label][which].append(ok)
                row[f"{which}_error"] = float(1.0 - ok.mean())
                if has_instances(ds):
                    row.setdefault("per_instance", {})[which] = per_instance_errors(
                        ok, ds, seeded_subset(len(ds.labels), max_examples)
                    )
            val_set = val_sets[(label, seed)]
            if has_instances(familiar_set) and has_instances(val_set):
                # what validation sees, object by object (val_instances per class with
                # val_split "instances"): is it typical of the test set's objects?
                ok = evaluate_correct(model, val_set, **evaluate).numpy()
                row["per_instance"]["val"] = per_instance_errors(ok, val_set, np.arange(len(ok)))
            per_seed[label].append(row)
    per_image: dict[str, Any] = {
        f"{label}__{which}": np.stack(arrays)
        for label, by in correct.items()
        for which, arrays in by.items()
    }
    np.savez_compressed(out_dir / "per_image.npz", **per_image)  # (seeds, images) each
    boot = {"resamples": resamples}
    results: dict[str, Any] = {
        "rule": "per seed: the level is the larger of the models' best validation errors "
        + ("" if target_error is None else f"(fixed: {target_error}) ")
        + "; each model at its snapshot closest to it"
        + ("" if smooth == 1 else f"; both on {smooth}-snapshot running means")
        + ("; validation data drawn per seed" if val_per_seed else ""),
        "smooth": smooth,
        "val_per_seed": val_per_seed,
        "seeds": seeds,
        "snapshots_per_epoch": snapshots_per_epoch,
        "test_images": {
            "familiar": int(correct[first_label(configs)]["familiar"][0].shape[0]),
            "novel": int(correct[first_label(configs)]["novel"][0].shape[0]),
        },
        "models": {
            label: {
                "familiar_error": bootstrap_error(
                    np.stack(correct[label]["familiar"]), **boot
                ).as_dict(),
                "novel_error": bootstrap_error(np.stack(correct[label]["novel"]), **boot).as_dict(),
                "per_seed": per_seed[label],
                "curves": {str(seed): curves[label][seed] for seed in seeds},
            }
            for label in configs
        },
        "comparisons": {},
    }
    labels = list(configs)
    for other in labels[1:]:
        a, b = labels[0], other
        results["comparisons"][f"{a} - {b}"] = {
            which: paired_comparison(
                np.stack(correct[a][which]), np.stack(correct[b][which]), **boot
            ).as_dict()
            for which in ("familiar", "novel")
        }
        results["comparisons"][f"{a} - {b}"]["novel_relative_reduction"] = relative_reduction(
            np.stack(correct[a]["novel"]), np.stack(correct[b]["novel"]), **boot
        )
    figures = [
        plots.plot_xy(
            {
                f"{label} seed {seed}": (
                    curves[label][seed]["epoch"],
                    smoothed(curves[label][seed]["val_error"], smooth),
                )
                for label in configs
                for seed in seeds
            },
            out_dir / f"{experiment}_validation.png",
            xlabel="epoch",
            ylabel="validation error (familiar, held out from training)"
            + ("" if smooth == 1 else f", {smooth}-snapshot running mean"),
            title="Matching on validation data: each model's snapshots over training",
            highlight={
                f"{label} seed {seed}": matched[seed]["index"][label]
                for label in configs
                for seed in seeds
            },
        ),
        plots.plot_bars(
            {
                which: {
                    label: results["models"][label][f"{which}_error"]["error"] / 100
                    for label in configs
                }
                for which in ("familiar", "novel")
            },
            out_dir / f"{experiment}.png",
            ylabel="test error",
            title=f"At matched validation error ({len(seeds)} seed(s), 95 % intervals)",
            intervals={
                which: {
                    label: (
                        results["models"][label][f"{which}_error"]["low"] / 100,
                        results["models"][label][f"{which}_error"]["high"] / 100,
                    )
                    for label in configs
                }
                for which in ("familiar", "novel")
            },
        ),
    ]
    summary = []
    for label in configs:
        r = results["models"][label]
        summary.append(
            {
                "model": label,
                "seeds": len(seeds),
                "matched val error %": ", ".join(
                    f"{100 * row['val_error']:.2f}" for row in r["per_seed"]
                ),
                "epochs": ", ".join(f"{row['epoch']:g}" for row in r["per_seed"]),
                "familiar test error %": _interval_text(r["familiar_error"]),
                "novel test error %": _interval_text(r["novel_error"]),
                "test images (familiar / novel)": f"{results['test_images']['familiar']} / "
                f"{results['test_images']['novel']}",
            }
        )
    for name, comp in results["comparisons"].items():
        rr = comp["novel_relative_reduction"]
        summary.append(
            {
                "model": name,
                "familiar test error %": f"{comp['familiar']['difference']:+.2f} "
                f"[{comp['familiar']['low']:+.2f}, {comp['familiar']['high']:+.2f}]",
                "novel test error %": f"{comp['novel']['difference']:+.2f} "
                f"[{comp['novel']['low']:+.2f}, {comp['novel']['high']:+.2f}] "
                f"(McNemar p = {comp['novel']['p_value']:.3g}; "
                f"{100 * rr['reduction']:.0f} % fewer novel errors "
                f"[{100 * rr['low']:.0f}, {100 * rr['high']:.0f}])",
            }
        )
    record = make_record(
        experiment,
        title,
        device=device,
        started=started,
        settings={
            "familiar": list(familiar),
            "novel": list(novel),
            "epochs": epochs,
            "seeds": seeds,
            "snapshots_per_epoch": snapshots_per_epoch,
            "target_error": target_error,
            "smooth": smooth,
            "val_per_seed": val_per_seed,
            "max_examples": max_examples,
            "resamples": resamples,
            "configs": {k: c.to_dict() for k, c in configs.items()},
        },
        models={
            label: {"registry_name": c.model, "run_dir": str(out_dir / "runs" / label)}
            for label, c in configs.items()
        },
        results=results,
        figures=figures,
        summary=summary,
        notes=[
            "Matching uses validation data only (familiar images held out from training); "
            "the test sets are evaluated once, at the matched snapshots.",
            "Errors in %, with 95 % bootstrap intervals over test images and seeds; "
            "differences are paired (same images, seed s against seed s).",
            *notes,
        ],
    )
    return finish_record(out_dir, record)


def has_instances(dataset: Any) -> bool:
    """NORB-style data: ``info[:, 0]`` is the object instance of every image."""
    info = getattr(dataset, "info", None)
    return isinstance(info, torch.Tensor) and info.dim() == 2


def per_instance_errors(correct: np.ndarray, dataset: Any, indices: np.ndarray) -> dict[str, float]:
    """Error in % of each object, ``{"<class>/<instance>": error}``, from per-image
    correctness ``(N,)`` of the images ``dataset[indices]``."""
    labels = np.asarray(dataset.labels)[indices]
    instances = dataset.info[:, 0].numpy()[indices]
    names = list(getattr(dataset, "classes", None) or range(int(labels.max()) + 1))
    out = {}
    for c in np.unique(labels):
        for i in np.unique(instances[labels == c]):
            mask = (labels == c) & (instances == i)
            out[f"{names[int(c)]}/{int(i)}"] = float(100.0 * (1.0 - correct[mask].mean()))
    return out


def first_label(configs: Mapping[str, Any]) -> str:
    return next(iter(configs))


def _interval_text(est: Mapping[str, Any]) -> str:
    return f"{est['error']:.2f} [{est['low']:.2f}, {est['high']:.2f}]"
