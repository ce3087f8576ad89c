"""Trained models on a test set: batches, model input, accuracy (optionally under a transform).

Shared by every experiment. Datasets follow the :class:`capsnet.data.ImageDataset`
contract (``images`` uint8 ``(N, C, H, W)``, ``labels``, ``classes``, ``num_classes``,
``eval_transform``); models return a :class:`capsnet.models.ModelOutput`. The model sees
``eval_transform(x)`` of the stored image ``x`` in [0, 1], and a geometric transform T
(rotation, translation, scale) is applied to that model input: ``T(eval_transform(x))``,
so a 28x28 digit padded onto a 40x40 canvas rotates without clipping. No paper section of
its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from capsnet import probes
from capsnet.data.dataset import to_float
from capsnet.stats import seeded_subset

__all__ = [
    "Progress",
    "preprocess_of",
    "class_names",
    "eval_batches",
    "evaluate_correct",
    "evaluate_accuracy",
]

Progress = Callable[..., Any] | None


def check_dataset(dataset: Any) -> None:
    for attr in ("images", "labels", "num_classes"):
        if not hasattr(dataset, attr):
            raise TypeError(
                f"dataset must follow the capsnet.data.ImageDataset contract (images, labels, "
                f"num_classes, eval_transform); {type(dataset).__name__} has no {attr!r}"
            )


def preprocess_of(dataset: Any) -> Callable[[Tensor], Tensor] | None:
    """The dataset's ``eval_transform`` (stored image in [0, 1] -> model input), if any."""
    return getattr(dataset, "eval_transform", None)


def class_names(dataset: Any) -> list[str]:
    names = getattr(dataset, "classes", None)
    return [str(c) for c in names] if names else [str(k) for k in range(dataset.num_classes)]


def eval_batches(
    dataset: Any,
    *,
    batch_size: int = 256,
    max_examples: int | None = None,
    indices: Tensor | Sequence[int] | None = None,
    device: torch.device | str = "cpu",
    subset_seed: int = 0,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Stored images as float in [0, 1] with their labels, without augmentation.

    Args:
        dataset: an ``ImageDataset``-like object.
        batch_size: examples per batch.
        max_examples: evaluate a seeded random subset of this many (of ``indices``), in
            index order (:func:`capsnet.stats.seeded_subset`); None: all of them.
        indices: which examples (default all).
        device: where the batches go.
        subset_seed: the seed of that subset (the same seed gives the same images).

    Yields:
        ``(images (B, C, H, W) float32 in [0, 1], labels (B,) int64)``.
    """
    check_dataset(dataset)
    idx = torch.arange(len(dataset.labels)) if indices is None else torch.as_tensor(indices)
    if max_examples is not None:
        idx = idx[torch.from_numpy(seeded_subset(len(idx), int(max_examples), subset_seed))]
    for start in range(0, len(idx), batch_size):
        chunk = idx[start : start + batch_size]
        images = dataset.images[chunk]
        if images.dtype == torch.uint8:
            images = to_float(images)
        labels = torch.as_tensor(dataset.labels)[chunk].long()
        yield images.to(device), labels.to(device)


def model_input(dataset: Any, images: Tensor) -> Tensor:
    pre = preprocess_of(dataset)
    return pre(images) if pre is not None else images


@torch.no_grad()
def evaluate_correct(
    model: nn.Module,
    dataset: Any,
    *,
    transform: Callable[[Tensor], Tensor] | None = None,
    batch_size: int = 256,
    max_examples: int | None = None,
    indices: Tensor | Sequence[int] | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Per-image correctness of ``model`` on ``dataset`` (eval mode): a bool ``(N,)``.

    The model sees ``transform(eval_transform(x))``; the images are those of
    :func:`eval_batches` (a seeded random subset of ``max_examples``), in index order, so
    two models evaluated with the same arguments are scored on the same images (what
    :func:`capsnet.stats.paired_comparison` needs).
    """
    was_training = model.training
    model.eval()
    parts = []
    try:
        for images, labels in eval_batches(
            dataset,
            batch_size=batch_size,
            max_examples=max_examples,
            indices=indices,
            device=device,
        ):
            x = model_input(dataset, images)
            if transform is not None:
                x = transform(x)
            parts.append((model(x).scores.argmax(-1) == labels).cpu())
    finally:
        model.train(was_training)
    if not parts:
        raise ValueError("no examples to evaluate")
    return torch.cat(parts)


def evaluate_accuracy(model: nn.Module, dataset: Any, **kwargs: Any) -> float:
    """Accuracy of ``model`` on ``dataset``: the mean of :func:`evaluate_correct` (same
    arguments)."""
    return float(evaluate_correct(model, dataset, **kwargs).float().mean())


def with_progress(progress: Progress, iterable: Any, **kwargs: Any) -> Any:
    return progress(iterable, **kwargs) if progress is not None else iterable


def check_models(models: Mapping[str, nn.Module]) -> None:
    if not isinstance(models, Mapping) or not models:
        raise ValueError("models must be a non-empty {label: model} mapping")
    for label, m in models.items():
        if not isinstance(m, nn.Module):
            raise TypeError(f"models[{label!r}] must be an nn.Module, got {type(m).__name__}")


def describe_models(models: Mapping[str, nn.Module], names: Mapping[str, str] | None) -> dict:
    """The record's ``models`` entry: class, registry name and parameter count per label."""
    return {
        label: {
            "class": type(m).__name__,
            "registry_name": (names or {}).get(label),
            "parameters": sum(p.numel() for p in m.parameters()),
        }
        for label, m in models.items()
    }


def pick_examples(labels: Tensor, preds: Tensor, count: int) -> list[int]:
    """Up to ``count`` correctly classified examples of distinct classes, then any."""
    picked: list[int] = []
    seen: set[int] = set()
    for i in range(len(labels)):
        if preds[i] == labels[i] and int(labels[i]) not in seen:
            picked.append(i)
            seen.add(int(labels[i]))
            if len(picked) == count:
                return picked
    rest = [i for i in range(len(labels)) if i not in picked]
    return picked + rest[: count - len(picked)]


TRANSFORMS = ("rotation", "translation", "scale")


def image_transform(kind: str, value: float) -> Callable[[Tensor], Tensor]:
    """The transform T of model inputs ``(B, C, H, W)`` that sweeps and equivariance apply."""
    if kind == "rotation":
        return lambda x: probes.affine_images(x, angle=value)
    if kind == "translation":
        return lambda x: probes.affine_images(x, translate=(value, 0.0))
    if kind == "scale":
        return lambda x: probes.affine_images(x, scale=value)
    raise ValueError(f"kind must be one of {', '.join(map(repr, TRANSFORMS))}, got {kind!r}")


TRANSFORM_UNITS = {"rotation": "degrees", "translation": "pixels (right)", "scale": "zoom factor"}
