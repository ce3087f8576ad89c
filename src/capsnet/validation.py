"""Validation splits: what a training run holds out from its training data.

The trainer scores every checkpoint on this split to pick the best one, and the
matched-error experiments (:mod:`capsnet.experiments.generalization`) read it to match
models, so that no choice is made on a test set. Two kinds (``RunConfig.val_split``):
``"images"``, a seeded random subset of the training images, and ``"instances"``, whole
objects of NORB-style data (``val_instances`` per class), because the NORB test sets show
unseen objects.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from capsnet.config import RunConfig

__all__ = ["split_validation", "held_out_instances", "default_val_samples"]


def default_val_samples(train_images: int) -> int:
    """The validation split when ``val_samples`` is None: 10 % of the training images, at
    most 5000 (at least 1 when there are 10 or more images)."""
    return min(5000, train_images // 10)


def split_validation(ds: Any, cfg: RunConfig) -> tuple[Any, Any]:
    """``(train subset, validation subset or None)`` of the training set ``ds`` for ``cfg``.

    ``cfg.val_split == "images"``: fixed random subsets for ``val_samples``
    (:func:`default_val_samples` when None) and ``train_samples``, drawn with ``val_seed``
    (the same validation images for every training seed; the training seed itself when
    ``val_seed`` is None). ``"instances"``: :func:`held_out_instances`. What the trainer
    holds out, so experiments can evaluate a run on exactly its validation images.
    """
    seed = cfg.seed if cfg.val_seed is None else cfg.val_seed
    gen = torch.Generator().manual_seed(seed)
    if cfg.val_split == "instances":
        held = held_out_instances(ds, gen, per_class=cfg.val_instances)
        val, rest = held.nonzero().view(-1), (~held).nonzero().view(-1)
        if cfg.val_samples is not None and cfg.val_samples < len(val):
            val = val[torch.randperm(len(val), generator=gen)[: cfg.val_samples]].sort().values
        rest = rest[torch.randperm(len(rest), generator=gen)]
    else:
        n_val = default_val_samples(len(ds)) if cfg.val_samples is None else cfg.val_samples
        if not n_val and not cfg.train_samples:
            return ds, None
        if n_val >= len(ds):
            raise ValueError(f"val_samples {n_val} >= {len(ds)} training images")
        perm = torch.randperm(len(ds), generator=gen)
        val, rest = perm[:n_val].sort().values, perm[n_val:]
    if cfg.train_samples:
        rest = rest[: cfg.train_samples]
    val_ds = ds.subset(val) if len(val) else None
    return ds.subset(rest.sort().values), val_ds


def held_out_instances(ds: Any, generator: torch.Generator, per_class: int = 1) -> Tensor:
    """``(N,)`` bool: the images of ``per_class`` object instances of every class.

    For NORB-style data, whose ``info[:, 0]`` is the instance of every image: validation
    on *other views of the training objects* says little about the test set's unseen
    objects (docs/results.md, the ToyNORB viewpoint run), so ``val_split = "instances"``
    holds out whole objects, drawn with ``generator``. Every class must keep at least one
    instance for training.
    """
    info = getattr(ds, "info", None)
    if not isinstance(info, Tensor) or info.dim() != 2:
        raise ValueError(
            "val_split 'instances' needs a dataset with an instance id per image (an info "
            "extra, as smallnorb and toynorb have); use val_split 'images' for this dataset"
        )
    labels, instance = ds.labels, info[:, 0]
    held = torch.zeros(len(labels), dtype=torch.bool)
    for c in labels.unique().tolist():
        of_class = labels == c
        ids = instance[of_class].unique()
        if len(ids) <= per_class:
            raise ValueError(
                f"val_split 'instances' with val_instances {per_class} needs at least "
                f"{per_class + 1} instances of every class; class {c} ({ds.classes[c]}) has "
                f"{len(ids)} in the training set"
            )
        if per_class == 1:  # the draw of every run made before val_instances existed
            picks = ids[torch.randint(len(ids), (1,), generator=generator)]
        else:
            picks = ids[torch.randperm(len(ids), generator=generator)[:per_class]]
        held |= of_class & torch.isin(instance, picks)
    return held
