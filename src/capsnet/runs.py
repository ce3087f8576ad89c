"""A trained run, loaded: its model, config, dataset and class names.

A run directory written by ``capsnet train`` holds ``config.json``, ``best`` / ``last``
checkpoints (see :mod:`capsnet.checkpoint`), ``metrics.jsonl`` and ``evaluation.json``.
:func:`load_run` is the one way capsnet's commands (``evaluate``, ``experiment``,
``report``) and :func:`capsnet.load` open one; a lone ``.safetensors`` checkpoint works
too, since its metadata holds the model and the run config.

>>> run = load_run("runs/quickstart")  # doctest: +SKIP
>>> test = run.dataset("test")  # the run's dataset, with its data options
>>> run.model(images).scores  # (B, num_classes)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from capsnet._checks import check_choice
from capsnet.devices import resolve_device

__all__ = ["CHECKPOINTS", "Run", "load_run", "load_model", "run_dataset", "read_run_json"]

CHECKPOINTS = ("best", "last")
"""The checkpoints of a run directory ``which`` selects."""


@dataclass
class Run:
    """A trained model with what the commands need to know about it.

    Attributes:
        model: the model, in ``eval()`` mode on the requested device.
        name: its registry name (``capsnet.models.create(name, **model_kwargs)``).
        config: the resolved run config saved with the weights (``RunConfig.to_dict()``).
        run_dir: the run directory (for a lone checkpoint: its folder).
        weights: the ``.safetensors`` file loaded.
        which: the checkpoint asked for (``"best"`` or ``"last"``; a run directory without
            it falls back to the other, see ``weights``).
        model_kwargs: the constructor arguments.
        epoch, step: training progress at the checkpoint (None when unknown).
        label: shown in plots and tables (default: ``name``).
    """

    model: nn.Module
    name: str
    config: dict[str, Any]
    run_dir: Path
    weights: Path
    which: str = "best"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    epoch: int | None = None
    step: int | None = None
    label: str = ""

    def __post_init__(self) -> None:
        self.label = self.label or self.name

    @property
    def path(self) -> str:
        """The weights file as a string (the field name of the former ``LoadedRun``)."""
        return str(self.weights)

    @property
    def class_names(self) -> list[str] | None:
        """The class names recorded by training (``evaluation.json``), or None when the
        run has not finished; ``run.dataset().classes`` always has them."""
        evaluation = read_run_json(self.run_dir, "evaluation.json")
        classes = evaluation.get("classes")
        return [str(c) for c in classes] if isinstance(classes, list) else None

    def dataset(
        self,
        split: str | None = None,
        *,
        dataset: str | None = None,
        data_root: str | os.PathLike | None = None,
        download: bool = False,
        **kwargs: Any,
    ) -> Any:
        """The run's data: see :func:`run_dataset`."""
        return run_dataset(
            self, split, dataset=dataset, data_root=data_root, download=download, **kwargs
        )


def load_run(
    path: str | os.PathLike,
    *,
    which: str = "best",
    device: str | torch.device = "auto",
) -> Run:
    """Load a run directory or a ``.safetensors`` checkpoint written by capsnet.

    Args:
        path: the run directory, or one of its (or any capsnet) ``.safetensors`` files.
        which: in a run directory, ``"best"`` (``"last"`` when there is no best) or
            ``"last"`` (``"best"`` when there is no last).
        device: where to put the model (see :func:`capsnet.devices.resolve_device`).

    Raises:
        FileNotFoundError: ``path`` does not exist or holds no checkpoint.
        ValueError: ``which`` is not ``"best"`` / ``"last"``, or the file is not a capsnet
            checkpoint.
    """
    from capsnet.checkpoint import load, read_metadata

    check_choice("which", which, CHECKPOINTS)
    dev = resolve_device(device)
    meta = read_metadata(path, which)
    model = load(meta["path"], device=dev)
    p = Path(path)
    return Run(
        model=model,
        name=meta["model"],
        config=meta["config"],
        run_dir=p if p.is_dir() else p.parent,
        weights=Path(meta["path"]),
        which=which,
        model_kwargs=meta["model_kwargs"],
        epoch=meta["epoch"],
        step=meta["step"],
    )


def load_model(
    path: str | os.PathLike, *, which: str = "best", device: str | torch.device = "cpu"
) -> nn.Module:
    """A trained model, ready for inference (``eval()`` mode); this is :func:`capsnet.load`.

    Args:
        path: a run directory or a ``.safetensors`` checkpoint written by capsnet.
        which: in a run directory, ``"best"`` (default; ``"last"`` when there is no best)
            or ``"last"``.
        device: where to put the model (default: the CPU).

    Example::

        model = capsnet.load("runs/quickstart")
        scores = model(images).scores  # (B, num_classes)
    """
    return load_run(path, which=which, device=device).model


def run_dataset(
    run: Run,
    split: str | None = None,
    *,
    dataset: str | None = None,
    data_root: str | os.PathLike | None = None,
    download: bool = False,
    **kwargs: Any,
) -> Any:
    """The data a run was trained and tested on, or another dataset.

    Args:
        run: from :func:`load_run`.
        split: the split (default: the run's ``eval_split``, else ``"test"``).
        dataset: another registered dataset (default: the run's own). The run's
            ``data_kwargs`` apply only to its own dataset.
        data_root: the data folder (default: the run's ``data_root``).
        download: download missing files.
        **kwargs: more dataset options (override the run's ``data_kwargs``).

    Raises:
        ValueError: the run's config names no dataset and ``dataset`` is not given.
    """
    from capsnet import data

    config = run.config
    name = dataset or config.get("dataset")
    if not name:
        raise ValueError(f"{run.run_dir}: the checkpoint names no dataset; pass --dataset")
    options = dict(config.get("data_kwargs") or {}) if name == config.get("dataset") else {}
    options.update(kwargs)
    split = split or config.get("eval_split") or "test"
    root = data_root if data_root is not None else config.get("data_root")
    return data.create(name, split=split, root=root, download=download, **options)


def read_run_json(run_dir: str | os.PathLike, name: str) -> dict[str, Any]:
    """``run_dir/name`` (``config.json``, ``evaluation.json``, ...) as a dict; ``{}`` when
    the file is missing, unreadable or not a JSON object (for reports of partial runs)."""
    try:
        value = json.loads((Path(run_dir) / name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}
