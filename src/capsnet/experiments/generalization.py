"""Novel-data error at matched familiar-data error: train, match epochs, compare ([H18] §5.2).

The protocol of [H18] §5.2 (also the fair form of [S17] §5.2): a capsule model and a CNN
are compared on novel data (unseen viewpoints, affine digits) when both make the *same*
error on familiar data. :func:`generalization_protocol` trains each model one epoch at a
time through the public trainer (:func:`capsnet.train.train`, ``resume=True`` to go on),
records familiar and novel error after every epoch, and reads each model at the epoch
closest to a common familiar error level (:func:`matched_checkpoints`).
:mod:`capsnet.experiments.viewpoint` and :func:`capsnet.experiments.affnist_protocol`
are its two instances.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from capsnet import plots
from capsnet.devices import resolve_device
from capsnet.experiments.evaluation import evaluate_accuracy
from capsnet.experiments.records import finish_record, make_record, write_json

__all__ = ["matched_checkpoints", "generalization_protocol"]


def matched_checkpoints(
    familiar_errors: Mapping[str, Sequence[float]], target: float | None = None
) -> tuple[float, dict[str, int]]:
    """Pick, per model, the epoch whose familiar-view error matches a common level.

    The [H18] viewpoint protocol compares models at the same error on familiar views. The
    level is ``target`` or, by default, the larger of the models' best familiar errors (the
    best level every model reaches); each model's chosen epoch is the one whose error is
    closest to the level (the earliest on ties).

    Args:
        familiar_errors: ``{label: [error after epoch 1, 2, ...]}``.
        target: the level; default as above.

    Returns:
        ``(level, {label: epoch index (0-based)})``.
    """
    if not familiar_errors or any(len(v) == 0 for v in familiar_errors.values()):
        raise ValueError("familiar_errors must map every model to a non-empty list of errors")
    level = max(min(v) for v in familiar_errors.values()) if target is None else float(target)
    chosen = {
        label: min((abs(e - level), i) for i, e in enumerate(errs))[1]
        for label, errs in familiar_errors.items()
    }
    return level, chosen


def _train_epochs(
    config: Any,
    run_dir: Path,
    epochs: int,
    on_epoch: Callable[[int, dict[str, Any]], None],
    done: int,
) -> None:
    """Train ``config`` into ``run_dir`` one epoch at a time, calling ``on_epoch`` after each.

    Resumable: epochs ``1..done`` are skipped; a checkpoint already past ``done`` (a crash
    between training and ``on_epoch``) is resumed without training again.
    """
    from capsnet.checkpoint import checkpoint_exists
    from capsnet.train import resume_config, train

    for epoch in range(done + 1, epochs + 1):
        if checkpoint_exists(run_dir, "last"):
            result = train(resume_config(run_dir, epochs=epoch), resume=True)
        else:
            cfg = dataclasses.replace(config, epochs=epoch, output_dir=str(run_dir))
            result = train(cfg)
        on_epoch(epoch, result.final)


def generalization_protocol(
    configs: Mapping[str, Any],
    out_dir: str | os.PathLike,
    *,
    familiar: tuple[str, str, Mapping[str, Any]],
    novel: tuple[str, str, Mapping[str, Any]],
    experiment: str,
    title: str,
    epochs: int | None = None,
    target_error: float | None = None,
    max_examples: int | None = None,
    batch_size: int = 250,
    notes: Sequence[str] = (),
    device: torch.device | str = "auto",
) -> dict[str, Any]:
    """Train several models, compare them on novel data at matched familiar-data error.

    Each model is trained (with :func:`capsnet.train.train`, one epoch at a time, into
    ``<out_dir>/runs/<label>``) by its config, whose ``eval_split`` should be the familiar
    test split. After every epoch the trainer's evaluation gives the familiar error and the
    last checkpoint is evaluated on the novel test set. Then :func:`matched_checkpoints`
    picks, per model, the epoch closest to the common familiar error level, and the novel
    errors there are compared ([H18] §5.2 protocol). Interrupted runs continue where they
    stopped (per-epoch errors are kept in ``<run>/protocol.json``).

    Args:
        configs: ``{label: capsnet.config.RunConfig}``.
        out_dir: experiment folder (``<experiment>.json``, PNGs, ``runs/``).
        familiar: ``(dataset, split, dataset kwargs)`` of the familiar test set (for the
            record; the trainer evaluates ``config.eval_split``).
        novel: ``(dataset, split, dataset kwargs)`` of the novel test set.
        experiment, title: the record's id and title.
        epochs: epochs per model (default: each config's ``epochs``).
        target_error: the familiar error level to match (default: the best level every
            model reaches).
        max_examples: novel test examples evaluated per epoch (None: all).
        batch_size: novel evaluation batch size.
        notes: extra notes for the record (e.g. the paper's numbers).
        device: where the novel evaluation runs (training uses each config's device).
    """
    from capsnet import data
    from capsnet.checkpoint import load

    if not configs:
        raise ValueError("configs must hold at least one {label: RunConfig}")
    out_dir = Path(out_dir)
    device = resolve_device(device)
    started = time.perf_counter()
    novel_name, novel_split, novel_kwargs = novel
    first = next(iter(configs.values()))
    root, download = first.data_root, first.download  # the novel set is read before training
    novel_set = data.create(
        novel_name, split=novel_split, root=root, download=download, **dict(novel_kwargs)
    )
    curves: dict[str, dict[str, list[float]]] = {}
    for label, config in configs.items():
        run_dir = out_dir / "runs" / label
        state_file = run_dir / "protocol.json"
        state: dict[str, list[float]] = {"familiar_error": [], "novel_error": []}
        if state_file.is_file():
            state = json.loads(state_file.read_text(encoding="utf-8"))

        def on_epoch(_epoch: int, final: dict[str, Any], run_dir=run_dir, state=state) -> None:
            model = load(run_dir, which="last", device=device)
            novel_acc = evaluate_accuracy(
                model, novel_set, batch_size=batch_size, max_examples=max_examples, device=device
            )
            state["familiar_error"].append(float(final["error"]))
            state["novel_error"].append(1.0 - novel_acc)
            write_json(run_dir / "protocol.json", state)

        total = epochs if epochs is not None else config.epochs
        _train_epochs(config, run_dir, total, on_epoch, done=len(state["familiar_error"]))
        curves[label] = {k: state[k][:total] for k in ("familiar_error", "novel_error")}
    level, chosen = matched_checkpoints(
        {k: v["familiar_error"] for k, v in curves.items()}, target_error
    )
    results: dict[str, Any] = {
        "matched_familiar_error": level,
        "models": {
            label: {
                "epoch": chosen[label] + 1,
                "familiar_error": curves[label]["familiar_error"][chosen[label]],
                "novel_error": curves[label]["novel_error"][chosen[label]],
                "curves": curves[label],
            }
            for label in curves
        },
    }
    figures = [
        plots.plot_xy(
            {k: (v["familiar_error"], v["novel_error"]) for k, v in curves.items()},
            out_dir / f"{experiment}_tradeoff.png",
            xlabel="familiar test error",
            ylabel="novel test error",
            title="Novel vs familiar error over training (one point per epoch)",
            highlight=chosen,
            vline=level,
        ),
        plots.plot_bars(
            {
                "familiar": {k: v["familiar_error"] for k, v in results["models"].items()},
                "novel": {k: v["novel_error"] for k, v in results["models"].items()},
            },
            out_dir / f"{experiment}.png",
            ylabel="test error",
            title=f"At matched familiar error ({100 * level:.2f} %)",
        ),
    ]
    summary = [
        {
            "model": label,
            "epoch": r["epoch"],
            "familiar error": r["familiar_error"],
            "novel error": r["novel_error"],
        }
        for label, r in results["models"].items()
    ]
    record = make_record(
        experiment,
        title,
        device=device,
        started=started,
        settings={
            "familiar": list(familiar),
            "novel": list(novel),
            "epochs": epochs,
            "target_error": target_error,
            "max_examples": max_examples,
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
            "Each model is read at the epoch whose familiar error is closest to the matched "
            "level (the best level every model reaches, unless a target is given).",
            *notes,
        ],
    )
    return finish_record(out_dir, record)
