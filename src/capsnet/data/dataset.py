"""``ImageDataset``: a whole split as one uint8 tensor in memory, plus its transforms.

Every capsnet dataset is an :class:`ImageDataset`: ``images`` uint8 ``(N, C, H, W)``,
``labels`` int64 ``(N,)``, class names, and two batched transforms on float tensors in
[0, 1]: ``train_transform(x, generator)`` (augmentation + preprocessing) and
``eval_transform(x)`` (preprocessing only). :class:`~capsnet.data.BatchLoader` uses them;
indexing ``dataset[i]`` applies ``eval_transform`` to one image for code that expects a
plain ``torch.utils.data.Dataset``.

Per-example side information (smallNORB's ``info``, MultiMNIST's ``labels2``) lives in
``extras`` and is also reachable as an attribute (``dataset.labels2``); :meth:`subset`
slices it together with the images.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from capsnet.data.transforms import Identity, Transform

__all__ = ["ImageDataset", "to_float", "as_uint8_images"]


def to_float(images: Tensor) -> Tensor:
    """uint8 images ``(..., C, H, W)`` -> float32 in [0, 1] (same device)."""
    return images.to(torch.float32).div_(255.0)


def as_uint8_images(images: Any, *, name: str = "images") -> Tensor:
    """Convert arrays/tensors of images to a uint8 ``(N, C, H, W)`` tensor.

    Accepts ``(N, H, W)``, ``(N, C, H, W)`` or channels-last ``(N, H, W, C)`` with C in
    {1, 3, 4} (detected when the last axis is small and the second is not), as uint8
    (0..255) or float (0..1, rounded to the nearest level).
    """
    if isinstance(images, np.ndarray):
        tensor = torch.from_numpy(np.ascontiguousarray(images))
    elif isinstance(images, Tensor):
        tensor = images.detach().cpu()
    else:
        raise TypeError(f"{name} must be a numpy array or a tensor, got {type(images).__name__}")
    if tensor.dim() == 3:
        tensor = tensor.unsqueeze(1)
    if tensor.dim() != 4:
        raise ValueError(
            f"{name} must have shape (N, H, W), (N, C, H, W) or (N, H, W, C), "
            f"got {tuple(tensor.shape)}"
        )
    if tensor.shape[-1] in (1, 3, 4) and tensor.shape[1] not in (1, 3, 4):
        tensor = tensor.permute(0, 3, 1, 2)
    if tensor.dtype == torch.uint8:
        return tensor.contiguous()
    if tensor.is_floating_point():
        if tensor.numel() and (tensor.min() < 0 or tensor.max() > 1):
            raise ValueError(
                f"float {name} must be in [0, 1], got range "
                f"[{float(tensor.min()):.3g}, {float(tensor.max()):.3g}]"
            )
        return (tensor * 255).round_().to(torch.uint8).contiguous()
    if tensor.dtype in (torch.int16, torch.int32, torch.int64, torch.bool):
        if tensor.numel() and (tensor.min() < 0 or tensor.max() > 255):
            raise ValueError(f"integer {name} must be in 0..255")
        return tensor.to(torch.uint8).contiguous()
    raise TypeError(f"{name} must be uint8, integer or float, got {tensor.dtype}")


class ImageDataset(Dataset):
    """A dataset split held in memory as uint8, with batched train/eval transforms.

    Args:
        images: uint8 ``(N, C, H, W)``.
        labels: int64 ``(N,)`` class indices in ``[0, len(classes))``.
        classes: class names (index = label).
        name: registry name, e.g. ``"mnist"``.
        split: split name, e.g. ``"train"``.
        train_transform: augmentation + preprocessing (default: none).
        eval_transform: preprocessing only (default: none); must map the stored size to
            the same size as ``train_transform``.
        extras: per-example tensors with leading size N (e.g. ``{"labels2": ...}``).
        meta: free-form information (source files, generator seed, ...).

    Attributes:
        images, labels, classes, num_classes, in_channels, input_size (the ``(H, W)`` the
        model sees, i.e. after ``eval_transform``: the models' ``input_size``; formerly
        ``image_size``, still readable), train_transform, eval_transform, extras (names),
        meta.

    Shape:
        - ``images``: ``(N, C, H, W)`` uint8; ``labels``: ``(N,)`` int64.
        - ``train_transform(x, generator)`` / ``eval_transform(x)``: float ``(B, C, H, W)``
          in [0, 1] -> ``(B, C, *input_size)``.
        - ``dataset[i]``: ``(eval_transform(image) (C, *input_size) float32, int label)``.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        *,
        classes: Sequence[str],
        name: str = "custom",
        split: str = "train",
        train_transform: Transform | None = None,
        eval_transform: Transform | None = None,
        extras: Mapping[str, Tensor] | None = None,
        meta: Mapping[str, Any] | None = None,
    ):
        if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
            got = (
                f"{images.dtype} {tuple(images.shape)}"
                if isinstance(images, Tensor)
                else type(images).__name__
            )
            raise TypeError(f"images must be a uint8 tensor (N, C, H, W), got {got}")
        if not isinstance(labels, Tensor) or labels.dim() != 1:
            raise TypeError("labels must be a 1-D tensor (N,)")
        if labels.shape[0] != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        classes = [str(c) for c in classes]
        if not classes:
            raise ValueError("classes must not be empty")
        labels = labels.to(torch.int64)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= len(classes)):
            raise ValueError(
                f"labels must be in [0, {len(classes)}), got range "
                f"[{int(labels.min())}, {int(labels.max())}]"
            )
        self.images = images
        self.labels = labels
        self.classes = classes
        self.name = name
        self.split = split
        self.train_transform = train_transform or Identity()
        self.eval_transform = eval_transform or Identity()
        for t in (self.train_transform, self.eval_transform):
            if not isinstance(t, Transform):
                raise TypeError(f"transforms must be Transform objects, got {type(t).__name__}")
        stored = (images.shape[2], images.shape[3])
        train_size = self.train_transform.output_size(stored)
        self.input_size: tuple[int, int] = self.eval_transform.output_size(stored)
        if train_size != self.input_size:
            raise ValueError(
                f"train_transform gives {train_size} images but eval_transform {self.input_size}"
            )
        self.meta = dict(meta or {})
        self.extras: list[str] = []
        for key, value in (extras or {}).items():
            if not isinstance(value, Tensor) or value.shape[:1] != images.shape[:1]:
                raise ValueError(f"extra {key!r} must be a tensor with leading size N")
            if hasattr(self, key):
                raise ValueError(f"extra name {key!r} clashes with an attribute")
            setattr(self, key, value)
            self.extras.append(key)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return int(self.images.shape[1])

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        if not isinstance(index, (int, np.integer)):
            raise TypeError(f"index must be an int, got {type(index).__name__}")
        image = to_float(self.images[index].unsqueeze(0))
        return self.eval_transform(image)[0], int(self.labels[index])

    def subset(self, indices: Tensor | Sequence[int]) -> ImageDataset:
        """A new dataset with the examples at ``indices`` (extras sliced alike)."""
        index = torch.as_tensor(indices, dtype=torch.long)
        if index.dim() != 1:
            raise ValueError("indices must be 1-D")
        out = copy.copy(self)
        out.images = self.images[index]
        out.labels = self.labels[index]
        for key in self.extras:
            setattr(out, key, getattr(self, key)[index])
        out.meta = dict(self.meta)
        return out

    @property
    def image_size(self) -> tuple[int, int]:
        """The former name of :attr:`input_size` (kept readable for a release)."""
        return self.input_size

    def label_counts(self) -> Tensor:
        """Number of examples per class, ``(num_classes,)`` int64."""
        return torch.bincount(self.labels, minlength=self.num_classes)

    def __repr__(self) -> str:
        return (
            f"ImageDataset(name={self.name!r}, split={self.split!r}, n={len(self)}, "
            f"stored={tuple(self.images.shape[1:])}, input_size={self.input_size}, "
            f"classes={self.num_classes}, train_transform={self.train_transform!r}, "
            f"eval_transform={self.eval_transform!r})"
        )
