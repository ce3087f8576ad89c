"""Your own data: image folders, ``.npz`` files and in-memory arrays.

* ``folder:PATH`` (``create("folder", path=PATH)``): one sub-folder per class holding PNG,
  JPEG, BMP, GIF, TIFF or WebP images, grayscale or colour. If ``PATH/train`` and
  ``PATH/test`` (or ``val``/``valid``/``validation``) exist they are the splits; otherwise a
  seeded, stratified ``holdout`` fraction (default 10 %) of every class is the test split.
  Classes are the sorted sub-folder names (the same indices in every split). Images are
  resized to ``input_size`` (default: the size of the first image) and kept grayscale
  when every image is grey (R = G = B), else RGB (``channels=1|3`` forces it). Decoded
  tensors are cached, keyed by the files' names, sizes and modification times.
* ``npz:PATH``: a NumPy ``.npz`` with ``x_train``/``y_train`` and ``x_test``/``y_test`` (or
  ``train_images``/``train_labels``, ...; plain ``images``/``labels`` for the train split),
  images as ``(N, H, W)``, ``(N, C, H, W)`` or ``(N, H, W, C)``, uint8 or float in [0, 1];
  optional ``classes``. Loaded with ``allow_pickle=False``.
* :func:`from_arrays`: NumPy arrays or tensors in memory.

All three take the same batched augmentation presets (``augment=``): ``"shift"`` (random
shift up to ``max_shift`` px, the MNIST recipe; default), ``"crop_flip"`` (random crop
after ``padding`` px of zeros + horizontal flip, the CIFAR recipe), ``"flip"``, ``"none"``;
and ``standardize=True`` adds per-image standardisation to training and evaluation.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from capsnet.data.dataset import ImageDataset, as_uint8_images
from capsnet.data.formats import read_image
from capsnet.data.registry import register_dataset
from capsnet.data.sources import (
    CorruptFileError,
    DatasetNotFoundError,
    cache_key,
    cache_load,
    cache_save,
    resolve_root,
)
from capsnet.data.transforms import (
    Compose,
    Identity,
    RandomCrop,
    RandomFlip,
    RandomShift,
    Standardize,
    Transform,
)

__all__ = ["IMAGE_EXTENSIONS", "augmentation", "from_arrays", "scan_image_folder"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
_SPLIT_DIRS = {"train": ("train", "training"), "test": ("test", "val", "valid", "validation")}
AUGMENTATIONS = ("shift", "crop_flip", "flip", "none")


def augmentation(
    augment: str,
    input_size: tuple[int, int],
    *,
    max_shift: int = 2,
    padding: int = 4,
    standardize: bool = False,
) -> tuple[Transform, Transform]:
    """``(train_transform, eval_transform)`` for an augmentation preset (module docstring)."""
    if augment == "shift":
        train: Transform = RandomShift(max_shift)
    elif augment == "crop_flip":
        train = Compose([RandomCrop(input_size, padding=padding), RandomFlip()])
    elif augment == "flip":
        train = RandomFlip()
    elif augment == "none":
        train = Identity()
    else:
        raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {augment!r}")
    if standardize:
        return Compose([train, Standardize()]), Standardize()
    return train, Identity()


def from_arrays(
    images: Any,
    labels: Any,
    *,
    classes: Sequence[str] | None = None,
    name: str = "arrays",
    split: str = "train",
    augment: str = "shift",
    max_shift: int = 2,
    padding: int = 4,
    standardize: bool = False,
) -> ImageDataset:
    """An :class:`ImageDataset` from in-memory arrays or tensors.

    Args:
        images: ``(N, H, W)``, ``(N, C, H, W)`` or ``(N, H, W, C)``; uint8 0..255 or float
            in [0, 1].
        labels: ``(N,)`` integer class indices.
        classes: class names (default ``"0"``, ``"1"``, ... up to the largest label).
        augment, max_shift, padding, standardize: augmentation preset (module docstring).

    Returns:
        The dataset (images stored as uint8 ``(N, C, H, W)``).
    """
    tensor = as_uint8_images(images)
    if isinstance(labels, np.ndarray):
        labels = torch.from_numpy(np.asarray(labels))
    labels = torch.as_tensor(labels)
    if labels.is_floating_point() or labels.dim() != 1:
        raise TypeError(
            f"labels must be a 1-D integer array, got {labels.dtype} {tuple(labels.shape)}"
        )
    labels = labels.to(torch.int64)
    if classes is None:
        top = int(labels.max()) + 1 if labels.numel() else 1
        classes = [str(i) for i in range(top)]
    size = (tensor.shape[2], tensor.shape[3])
    train, evaluate = augmentation(
        augment, size, max_shift=max_shift, padding=padding, standardize=standardize
    )
    return ImageDataset(
        tensor,
        labels,
        classes=list(classes),
        name=name,
        split=split,
        train_transform=train,
        eval_transform=evaluate,
    )


def _is_image(path: Path) -> bool:
    hidden = path.name.startswith(".")
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not hidden


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(
        (p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")),
        key=lambda p: p.name,
    )


def scan_image_folder(folder: Path, classes: Sequence[str]) -> tuple[list[Path], list[int]]:
    """Image files of ``folder/<class>/...`` (recursively), sorted, with label indices."""
    files, labels = [], []
    for index, name in enumerate(classes):
        class_dir = folder / name
        if not class_dir.is_dir():
            continue
        found = sorted(p for p in class_dir.rglob("*") if _is_image(p))
        files += found
        labels += [index] * len(found)
    return files, labels


def _split_folders(path: Path) -> dict[str, Path]:
    out = {}
    for split, names in _SPLIT_DIRS.items():
        for name in names:
            if (path / name).is_dir():
                out[split] = path / name
                break
    return out


def _decode(
    files: list[Path], size: tuple[int, int] | None, channels: int | None, progress: bool
) -> Tensor:
    if not files:
        raise DatasetNotFoundError("no images found")
    if size is None:
        first = read_image(files[0], mode="RGB", size=None)
        size = (first.shape[1], first.shape[2])
    mode = "L" if channels == 1 else "RGB"
    c = 1 if channels == 1 else 3
    out = np.empty((len(files), c, size[0], size[1]), dtype=np.uint8)
    for i, path in enumerate(
        tqdm(files, desc="decoding images", disable=None if progress else True, leave=False)
    ):
        out[i] = read_image(path, mode=mode, size=size)
    images = torch.from_numpy(out)
    if channels is None:
        grey = bool((images[:, 0] == images[:, 1]).all() and (images[:, 1] == images[:, 2]).all())
        if grey:
            images = images[:, :1].contiguous()
    return images


@register_dataset(
    input_size=None,
    in_channels=None,
    num_classes=None,
    description="your images: PATH/<class>/*.png|jpg (PATH/train, PATH/test optional)",
)
def folder(
    split: str = "train",
    root=None,
    download: bool = False,
    *,
    path: str | os.PathLike | None = None,
    input_size: int | Sequence[int] | None = None,
    channels: int | None = None,
    holdout: float = 0.1,
    holdout_seed: int = 0,
    augment: str = "shift",
    max_shift: int = 2,
    padding: int = 4,
    standardize: bool = False,
    cache: bool = True,
    progress: bool = True,
    image_size: int | Sequence[int] | None = None,
) -> ImageDataset:
    """Images in class sub-folders (see the module docstring); ``create("folder:PATH")``.

    ``input_size`` resizes every image to ``(H, W)`` (an int: square); ``image_size`` is its
    former name (deprecated).
    """
    if image_size is not None:
        if input_size is not None:
            raise TypeError("pass input_size (image_size is its deprecated former name)")
        warnings.warn("folder: image_size is deprecated; use input_size", DeprecationWarning, 2)
        input_size = image_size
    if path is None:
        raise ValueError("the folder dataset needs a path: create('folder:PATH') or path=PATH")
    base = Path(path).expanduser()
    if not base.is_dir():
        raise DatasetNotFoundError(f"image folder {base} does not exist")
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be None, 1 or 3, got {channels!r}")
    if not 0.0 <= holdout < 1.0:
        raise ValueError(f"holdout must be in [0, 1), got {holdout}")
    size: tuple[int, int] | None = None
    if input_size is not None:
        dims = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        if len(dims) != 2 or min(dims) < 1:
            raise ValueError(f"input_size must be a positive int or (H, W), got {input_size!r}")
        size = (dims[0], dims[1])
    splits = _split_folders(base)
    if splits:
        if split not in splits:
            raise DatasetNotFoundError(
                f"{base}: no folder for split {split!r} (looked for "
                f"{', '.join(_SPLIT_DIRS[split])}); found {sorted(splits)}"
            )
        class_names = sorted({d.name for f in splits.values() for d in _class_dirs(f)})
        source = splits[split]
    else:
        class_names = [d.name for d in _class_dirs(base)]
        source = base
    if not class_names:
        raise DatasetNotFoundError(f"{base}: no class sub-folders (expected PATH/<class>/*.png)")
    files, labels = scan_image_folder(source, class_names)
    if not files:
        raise DatasetNotFoundError(
            f"{source}: no images with extensions {', '.join(IMAGE_EXTENSIONS)} in class folders"
        )
    root_path = resolve_root(root)
    key = cache_key("folder", str(source.resolve()), size, channels, files=files)
    images = None
    if cache:
        hit = cache_load(root_path, "folder", key)
        if hit is not None and "images" in hit:
            images = hit["images"]
    if images is None:
        try:
            images = _decode(files, size, channels, progress)
        except ValueError as exc:  # differing sizes without input_size
            raise CorruptFileError(
                f"{source}: images have different sizes; pass input_size= to resize ({exc})"
            ) from exc
        if cache:
            cache_save(root_path, "folder", key, {"images": images})
    label_tensor = torch.tensor(labels, dtype=torch.int64)
    stored = (images.shape[2], images.shape[3])
    train, evaluate = augmentation(
        augment, stored, max_shift=max_shift, padding=padding, standardize=standardize
    )
    dataset = ImageDataset(
        images,
        label_tensor,
        classes=class_names,
        name="folder",
        split=split,
        train_transform=train,
        eval_transform=evaluate,
        extras={},
        meta={"path": str(base), "files": [str(p) for p in files]},
    )
    if splits:
        return dataset
    if holdout == 0.0:
        if split == "test":
            raise DatasetNotFoundError(
                f"{base} has no test/ folder and holdout=0: nothing to test on"
            )
        return dataset
    test_mask = torch.zeros(len(dataset), dtype=torch.bool)
    g = torch.Generator().manual_seed(holdout_seed)
    for c in range(len(class_names)):
        members = torch.nonzero(label_tensor == c).flatten()
        take = int(round(holdout * members.numel()))
        chosen = members[torch.randperm(members.numel(), generator=g)[:take]]
        test_mask[chosen] = True
    keep = torch.nonzero(test_mask if split == "test" else ~test_mask).flatten()
    out = dataset.subset(keep)
    out.meta["files"] = [dataset.meta["files"][i] for i in keep.tolist()]
    out.meta["holdout"] = holdout
    return out


_NPZ_KEYS = {
    "train": (
        ("x_train", "y_train"),
        ("train_images", "train_labels"),
        ("images", "labels"),
        ("x", "y"),
    ),
    "test": (("x_test", "y_test"), ("test_images", "test_labels")),
}


@register_dataset(
    input_size=None,
    in_channels=None,
    num_classes=None,
    description="your arrays: PATH.npz with x_train/y_train, x_test/y_test (optional classes)",
)
def npz(
    split: str = "train",
    root=None,
    download: bool = False,
    *,
    path: str | os.PathLike | None = None,
    augment: str = "shift",
    max_shift: int = 2,
    padding: int = 4,
    standardize: bool = False,
) -> ImageDataset:
    """Arrays from a ``.npz`` file (see the module docstring); ``create("npz:PATH")``."""
    if path is None:
        raise ValueError("the npz dataset needs a path: create('npz:PATH') or path=PATH")
    file = Path(path).expanduser()
    if not file.is_file():
        raise DatasetNotFoundError(f"npz file {file} does not exist")
    try:
        archive = np.load(file, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise CorruptFileError(f"{file}: not a readable .npz ({exc})") from exc
    with archive:
        keys = set(archive.files)
        pair = next((p for p in _NPZ_KEYS[split] if p[0] in keys and p[1] in keys), None)
        if pair is None:
            options = " or ".join("/".join(p) for p in _NPZ_KEYS[split])
            raise DatasetNotFoundError(
                f"{file}: no arrays for split {split!r} (expected {options}); has {sorted(keys)}"
            )
        images, labels = archive[pair[0]], archive[pair[1]]
        classes = [str(c) for c in archive["classes"].tolist()] if "classes" in keys else None
    dataset = from_arrays(
        images,
        labels.reshape(-1),
        classes=classes,
        name="npz",
        split=split,
        augment=augment,
        max_shift=max_shift,
        padding=padding,
        standardize=standardize,
    )
    dataset.meta["path"] = str(file)
    return dataset
