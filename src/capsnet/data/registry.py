"""Dataset registry: ``create(name, split, root, download, **kwargs)`` builds any dataset.

Dataset modules register a factory with :func:`register_dataset` and metadata
(:class:`DatasetInfo`) that callers can read without loading anything: the model's
``input_size``, ``in_channels`` and ``num_classes`` for a dataset's default settings.

``"folder:PATH"`` and ``"npz:PATH"`` are shorthands for ``create("folder", path=PATH)`` and
``create("npz", path=PATH)``, so your own data is reachable from the command line
(``--dataset folder:PATH``).
"""

from __future__ import annotations

import difflib
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capsnet.data.dataset import ImageDataset

__all__ = ["DatasetInfo", "register_dataset", "create", "list_datasets", "dataset_info"]


@dataclass(frozen=True)
class DatasetInfo:
    """Metadata of a registered dataset (for its default keyword arguments).

    Attributes:
        name: registry name.
        factory: ``factory(split, root, download, **kwargs) -> ImageDataset``.
        splits: accepted split names.
        input_size: ``(H, W)`` the model sees (the models' ``input_size``), or ``None``
            when it depends on the data. (``image_size``: its former name, deprecated.)
        in_channels: image channels, or ``None`` when it depends on the data.
        num_classes: classes, or ``None`` when it depends on the data.
        paper: the experiment(s) it feeds.
        description: one line for ``capsnet datasets``.
        download: whether ``download=True`` can fetch it from a public source.
    """

    name: str
    factory: Callable[..., ImageDataset]
    splits: tuple[str, ...] = ("train", "test")
    input_size: tuple[int, int] | None = None
    in_channels: int | None = None
    num_classes: int | None = None
    paper: str = ""
    description: str = ""
    download: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def image_size(self) -> tuple[int, int] | None:
        """Deprecated name of :attr:`input_size`."""
        warnings.warn("DatasetInfo.image_size is deprecated; use input_size", DeprecationWarning, 2)
        return self.input_size


_REGISTRY: dict[str, DatasetInfo] = {}
_PATH_PREFIXES = ("folder", "npz")


def register_dataset(name: str | None = None, **metadata: Any) -> Callable:
    """Decorator registering ``factory(split, root, download, **kwargs)`` under ``name``."""

    def decorator(factory: Callable[..., ImageDataset]) -> Callable[..., ImageDataset]:
        key = name or factory.__name__
        if key in _REGISTRY:
            raise ValueError(f"dataset {key!r} is already registered")
        if "image_size" in metadata:  # the former name
            metadata["input_size"] = metadata.pop("image_size")
        _REGISTRY[key] = DatasetInfo(name=key, factory=factory, **metadata)
        return factory

    return decorator


def _normalise(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def _split_name(name: str) -> tuple[str, dict[str, Any]]:
    """``"folder:PATH"`` -> ``("folder", {"path": PATH})``; other names unchanged."""
    if not isinstance(name, str):
        raise TypeError(f"dataset name must be a str, got {type(name).__name__}")
    head, sep, tail = name.partition(":")
    # A Windows drive letter ("C:\\...") is not a prefix; only known prefixes are split.
    if sep and _normalise(head) in _PATH_PREFIXES:
        if not tail:
            raise ValueError(f"{name!r}: give a path after '{head}:', e.g. '{head}:/data/mine'")
        return _normalise(head), {"path": tail}
    return _normalise(name), {}


def dataset_info(name: str) -> DatasetInfo:
    """Metadata of a registered dataset (``"folder:PATH"`` gives the ``folder`` entry)."""
    key, _ = _split_name(name)
    _ensure_loaded()
    if key not in _REGISTRY:
        close = difflib.get_close_matches(key, _REGISTRY, n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(
            f"unknown dataset {name!r}.{hint} Available: {', '.join(list_datasets())}, "
            "or folder:PATH / npz:PATH for your own data"
        )
    return _REGISTRY[key]


def list_datasets() -> list[str]:
    """Sorted names of all registered datasets (``folder`` and ``npz`` take a path)."""
    _ensure_loaded()
    return sorted(_REGISTRY)


def create(
    name: str,
    split: str = "train",
    root: str | os.PathLike | None = None,
    download: bool = False,
    **kwargs: Any,
) -> ImageDataset:
    """Build a dataset split by name.

    Keyword arguments whose value is ``None`` are dropped so callers (the CLI, configs)
    can pass every option and let the dataset keep its defaults.

    Args:
        name: a name from :func:`list_datasets`, or ``"folder:PATH"`` / ``"npz:PATH"``.
        split: ``"train"``, ``"test"``, or a dataset-specific split (see
            ``dataset_info(name).splits``; e.g. smallNORB's ``"test_novel"``).
        root: data root (default ``$CAPSNET_DATA``, else ``~/.cache/capsnet``); may also
            point straight at the folder holding the dataset's files.
        download: fetch missing files from the standard public source (verified, atomic).
        **kwargs: dataset options (e.g. ``max_shift=2`` for MNIST, ``viewpoint="azimuth"``
            for smallNORB, ``limit=1000`` to keep the first examples only).

    Returns:
        The split as an :class:`~capsnet.data.ImageDataset`.

    Raises:
        ValueError: unknown dataset or split, or bad options.
        capsnet.data.DatasetNotFoundError: files missing and ``download`` is false.
        capsnet.data.CorruptFileError: a file fails its checksum or format checks.
    """
    key, implied = _split_name(name)
    info = dataset_info(key)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    for k, v in implied.items():
        if k in kwargs and str(kwargs[k]) != str(v):
            raise ValueError(f"{name!r} already gives {k}={v!r}; got {k}={kwargs[k]!r} too")
        kwargs[k] = v
    if not isinstance(split, str):
        raise TypeError(f"split must be a str, got {type(split).__name__}")
    limit = kwargs.pop("limit", None)
    if info.splits and split not in info.splits:
        raise ValueError(
            f"unknown split {split!r} for dataset {info.name!r}; valid: {', '.join(info.splits)}"
        )
    dataset = info.factory(split=split, root=root, download=bool(download), **kwargs)
    if limit is not None:
        if not isinstance(limit, int) or limit < 0:
            raise ValueError(f"limit must be a non-negative int, got {limit!r}")
        if limit < len(dataset):
            dataset = dataset.subset(range(limit))
            dataset.meta["limit"] = limit
    return dataset


def _ensure_loaded() -> None:
    # The dataset modules register themselves on import.
    from capsnet.data import affnist, cifar, custom, generated, mnist, smallnorb, toynorb  # noqa: F401


def path_argument(path: str | os.PathLike) -> Path:
    """A user-given path, expanded (``~``)."""
    return Path(path).expanduser()
