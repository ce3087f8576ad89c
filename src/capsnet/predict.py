"""``capsnet predict RUN IMAGE...``: classify image files with a trained run.

Each image is decoded with Pillow (:func:`capsnet.data.formats.read_image`, as image
folders are), converted to the run's channels (grayscale ``L`` or ``RGB``), resized to the
size the run's dataset stores its images at, scaled to [0, 1] and passed through the
dataset's evaluation preprocessing (``eval_transform``: e.g. MNIST none, smallNORB
per-image standardisation and the centre crop, ``mnist_shifted40`` the 40x40 canvas), so
a file sees the same pipeline as the run's test images.

Where the preprocessing and class names come from, first found wins:

1. the checkpoint's metadata: ``class_names`` and ``preprocessing`` (see
   :func:`preprocessing_metadata`, the keys the trainer stores);
2. the run's own dataset, when its files are at hand (its ``eval_transform``, stored image
   size and ``classes``); class names also from ``Run.class_names`` (``evaluation.json``);
3. the model's constructor arguments (``in_channels``, ``input_size``) with no
   preprocessing but the [0, 1] scaling, the registry's class names for the run's dataset,
   and finally ``"0"`` ... ``"K-1"``.

>>> from capsnet.predict import predict_files
>>> predict_files("runs/quickstart", ["digit.png"], top_k=3)  # doctest: +SKIP
[{'file': 'digit.png', 'prediction': '7', 'top': [{'class': '7', 'index': 7, 'score': 0.98}, ...]}]
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "Preprocessing",
    "preprocessing_metadata",
    "resolve_preprocessing",
    "image_files",
    "load_images",
    "predict_files",
]


@dataclass
class Preprocessing:
    """How an image file becomes a model input.

    Attributes:
        in_channels: 1 (grayscale) or 3 (RGB).
        stored_size: ``(H, W)`` the file is resized to (the dataset's stored size).
        transform: the dataset's ``eval_transform`` (float ``(B, C, H, W)`` in [0, 1] in).
        classes: class names, index = class.
        source: where these came from (``"checkpoint"``, ``"dataset"``, ``"model"``).
    """

    in_channels: int
    stored_size: tuple[int, int]
    transform: Any
    classes: list[str]
    source: str


def preprocessing_metadata(dataset: Any) -> dict[str, str]:
    """The checkpoint metadata entries that let :func:`predict_files` classify files
    without the dataset: ``class_names`` (JSON list) and ``preprocessing`` (JSON object
    with the dataset name, stored image size, model input size, channels and the
    ``eval_transform`` as :func:`~capsnet.data.transforms.transform_spec`).

    Args:
        dataset: the run's evaluation :class:`~capsnet.data.ImageDataset`.
    """
    from capsnet.data.transforms import transform_spec

    spec = {
        "dataset": dataset.name,
        "stored_size": [int(s) for s in dataset.images.shape[-2:]],
        "input_size": [int(s) for s in dataset.input_size],
        "in_channels": int(dataset.in_channels),
        "eval_transform": transform_spec(dataset.eval_transform),
        "eval_transform_repr": repr(dataset.eval_transform),
    }
    return {"class_names": json.dumps(list(dataset.classes)), "preprocessing": json.dumps(spec)}


def _checkpoint_metadata(weights: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(weights), "pt") as fh:
            return dict(fh.metadata() or {})
    except Exception:  # noqa: BLE001 - load_run has read it already; no extras then
        return {}


def _json(text: str | None) -> Any:
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None


def _pair(value: Any) -> tuple[int, int] | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, list | tuple) and len(value) == 2:
        return (int(value[0]), int(value[1]))
    return None


def _fallback_classes(run: Any, num_classes: int) -> list[str]:
    names = run.class_names
    if isinstance(names, list) and len(names) == num_classes:
        return [str(n) for n in names]
    try:
        from capsnet.data import dataset_info

        info = dataset_info(str(run.config.get("dataset", "")))
        found = getattr(info, "classes", None) or info.extra.get("classes")
    except (ValueError, TypeError, AttributeError):
        found = None
    if isinstance(found, list | tuple) and len(found) == num_classes:
        return [str(n) for n in found]
    return [str(i) for i in range(num_classes)]


def resolve_preprocessing(run: Any, *, data_root: str | os.PathLike | None = None) -> Preprocessing:
    """The :class:`Preprocessing` of a loaded run (the order is in the module docstring)."""
    from capsnet.data.transforms import Identity, transform_from_spec

    kwargs = run.model_kwargs
    num_classes = int(kwargs.get("num_classes") or 0)
    meta = _checkpoint_metadata(run.weights)
    spec = _json(meta.get("preprocessing"))
    names = _json(meta.get("class_names"))
    if isinstance(spec, dict) and spec.get("eval_transform") is not None:
        size = _pair(spec.get("stored_size"))
        if size is not None:
            if not (isinstance(names, list) and (not num_classes or len(names) == num_classes)):
                names = _fallback_classes(run, num_classes)
            return Preprocessing(
                int(spec.get("in_channels") or kwargs.get("in_channels") or 1),
                size,
                transform_from_spec(spec["eval_transform"]),
                [str(n) for n in names],
                "checkpoint",
            )
    from capsnet.data import DataError

    try:
        dataset = run.dataset(data_root=data_root, limit=1)
    except (DataError, ValueError, TypeError, OSError, ImportError) as err:
        note = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(
            f"capsnet: note: the run's dataset is not at hand ({note}); images are only "
            "scaled to [0, 1], without the dataset's own preprocessing",
            file=sys.stderr,
        )
    else:
        classes = list(dataset.classes)
        if num_classes and len(classes) != num_classes:
            classes = _fallback_classes(run, num_classes)
        return Preprocessing(
            int(dataset.in_channels),
            (int(dataset.images.shape[-2]), int(dataset.images.shape[-1])),
            dataset.eval_transform,
            classes,
            "dataset",
        )
    size = _pair(kwargs.get("input_size")) or (28, 28)
    channels = int(kwargs.get("in_channels") or 1)
    return Preprocessing(channels, size, Identity(), _fallback_classes(run, num_classes), "model")


def image_files(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """The image files named by ``paths``: files as given, folders searched (recursively,
    sorted) for PNG, JPEG, BMP, GIF, TIFF and WebP files.

    Raises:
        FileNotFoundError: a path does not exist, or a folder holds no images.
    """
    from capsnet.data.custom import IMAGE_EXTENSIONS

    out: list[Path] = []
    for item in paths:
        path = Path(item).expanduser()
        if path.is_dir():
            found = sorted(
                p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
            )
            if not found:
                raise FileNotFoundError(
                    f"{path}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in this folder"
                )
            out += found
        elif path.is_file():
            out.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such image file or folder")
    return out


def load_images(files: Sequence[Path], prep: Preprocessing) -> torch.Tensor:
    """Decode ``files`` into one uint8 batch ``(N, C, H, W)`` at ``prep.stored_size``.

    Raises:
        ValueError: the run's model takes neither 1 nor 3 channels, or a grayscale image
            is given to an RGB model.
        capsnet.data.CorruptFileError: a file is not a readable image.
    """
    from capsnet.data.formats import image_mode, read_image

    if prep.in_channels not in (1, 3):
        raise ValueError(
            f"the run's model takes {prep.in_channels}-channel images; image files give "
            "1 (grayscale) or 3 (RGB) channels"
        )
    mode = "L" if prep.in_channels == 1 else "RGB"
    images = []
    for path in files:
        if mode == "RGB" and image_mode(path) in ("1", "L", "LA", "I", "I;16", "F"):
            raise ValueError(
                f"{path}: a grayscale image, but the run's model takes 3-channel (RGB) images"
            )
        images.append(torch.from_numpy(read_image(path, mode=mode, size=prep.stored_size).copy()))
    return torch.stack(images)


def predict_files(
    run: str | os.PathLike | Any,
    paths: Sequence[str | os.PathLike],
    *,
    top_k: int = 3,
    which: str = "best",
    device: str = "auto",
    batch_size: int = 64,
    data_root: str | os.PathLike | None = None,
) -> list[dict[str, Any]]:
    """Classify image files (or folders of them) with a trained run.

    Args:
        run: a run directory / ``.safetensors`` checkpoint, or a loaded
            :class:`~capsnet.runs.Run`.
        paths: image files and folders.
        top_k: classes reported per image (at most the number of classes).
        which: ``"best"`` or ``"last"`` checkpoint.
        device: see :func:`capsnet.devices.resolve_device`.
        batch_size: images per forward pass.
        data_root: where the run's dataset is, if its preprocessing is needed from it.

    Returns:
        One dict per image: ``file``, ``prediction`` (class name) and ``top`` (a list of
        ``{"class", "index", "score"}``, best first). Scores are the model's class scores
        (capsule lengths or activations), softmax probabilities for CNNs.

    Raises:
        ValueError: bad ``top_k`` / ``batch_size``, or images the model cannot take.
        FileNotFoundError: a missing file or an empty folder.
        capsnet.data.CorruptFileError: an unreadable image.
    """
    from capsnet.data.dataset import to_float
    from capsnet.models import model_info
    from capsnet.runs import Run, load_run

    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be an int >= 1, got {top_k!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    loaded = run if isinstance(run, Run) else load_run(run, which=which, device=device)
    files = image_files(paths)
    prep = resolve_preprocessing(loaded, data_root=data_root)
    images = load_images(files, prep)
    dev = next(iter(loaded.model.parameters())).device
    softmax = model_info(loaded.name).loss == "cross_entropy"
    scores = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            x = prep.transform(to_float(images[start : start + batch_size]).to(dev))
            s = loaded.model(x).scores.float()
            scores.append((s.softmax(dim=-1) if softmax else s).cpu())
    all_scores = torch.cat(scores)
    k = min(top_k, all_scores.shape[1])
    values, indices = all_scores.topk(k, dim=1)
    classes = prep.classes
    results = []
    for path, vals, idx in zip(files, values.tolist(), indices.tolist(), strict=True):
        top = [
            {"class": classes[i] if i < len(classes) else str(i), "index": i, "score": v}
            for v, i in zip(vals, idx, strict=True)
        ]
        results.append({"file": str(path), "prediction": top[0]["class"], "top": top})
    return results
