"""The registered ``toynorb`` dataset: smallNORB's protocol on rendered objects.

``toynorb`` is the smallNORB dataset (same files, parser, preprocessing, viewpoint splits
and options) read from ``<root>/toynorb`` (or ``<root>``), whose files are rendered here
the first time they are needed instead of downloaded (a few minutes; see
:mod:`capsnet.data.toynorb.generate`). A stand-in with the same protocol and exactly known
viewpoints, never to be reported as smallNORB.

The generated files are verified like downloads: their MD5s for the current
:data:`~capsnet.data.toynorb.objects.GENERATOR_VERSION` are class data, and a file that
fails them is refused with :class:`~capsnet.data.CorruptFileError` (with ``download=True``
the files are rendered again).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from capsnet.data.dataset import ImageDataset
from capsnet.data.registry import register_dataset
from capsnet.data.smallnorb import check_norb_options, norb_dataset, read_norb_files
from capsnet.data.sources import (
    CorruptFileError,
    DatasetNotFoundError,
    candidate_folders,
    find_folder,
    resolve_root,
)
from capsnet.data.toynorb.generate import TOYNORB_FILES, generate_toynorb
from capsnet.data.toynorb.objects import GENERATOR_VERSION

__all__ = ["toynorb", "toynorb_folder", "generate_files", "SUBDIRS", "FULL_SHAPE"]

SUBDIRS = ("toynorb",)
FULL_SHAPE = (24300, 2, 96, 96)  # dat of each split


def _all_files() -> list:
    return [spec for split in ("train", "test") for spec in TOYNORB_FILES[split].values()]


def toynorb_folder(root: str | Path | None = None) -> Path | None:
    """The folder under ``root`` that holds all six ToyNORB files, or ``None``."""
    return find_folder(resolve_root(root), SUBDIRS, _all_files())


def generate_files(
    root: str | Path | None = None,
    *,
    workers: int | None = None,
    verify: bool = True,
    progress: bool = True,
) -> Path:
    """Render the standard ToyNORB files into ``<root>/toynorb``; returns that folder."""
    folder = resolve_root(root) / SUBDIRS[0]
    generate_toynorb(folder, workers=workers, verify=verify, progress=progress)
    return folder


@register_dataset(
    splits=("train", "test", "test_familiar", "test_novel"),
    input_size=(32, 32),
    in_channels=1,
    num_classes=5,
    paper="Hinton et al. 2018 protocol on rendered toys (stand-in, not smallNORB)",
    description="ToyNORB: smallNORB's protocol on rendered toys, generated locally (+ viewpoints)",
    download=True,
    extra={"generate": generate_files, "source": "generated"},
)
def toynorb(
    split: str = "train",
    root=None,
    download: bool = False,
    *,
    viewpoint: str | None = None,
    channels: str = "left",
    size: int = 48,
    crop_size: int = 32,
    max_brightness: float = 32 / 255,
    contrast: tuple[float, float] = (0.5, 1.5),
    generate_missing: bool = True,
    workers: int | None = None,
    verify: bool = True,
    cache: bool = True,
    progress: bool = True,
) -> ImageDataset:
    """ToyNORB with smallNORB's preprocessing and splits (see ``capsnet.data.smallnorb``).

    Args:
        split: ``"train"``, ``"test"``, or with ``viewpoint``: ``"test_familiar"``,
            ``"test_novel"``.
        download: render the files again when one fails its checksum.
        viewpoint: ``None``, ``"azimuth"`` or ``"elevation"`` (novel-viewpoint splits).
        channels: ``"left"`` (default), ``"right"`` or ``"both"`` cameras.
        size, crop_size: downsampled and cropped sizes (48, 32).
        max_brightness, contrast: training brightness delta and contrast factor range.
        generate_missing: render missing files (both splits) into ``<root>/toynorb``;
            ``False`` raises :class:`~capsnet.data.DatasetNotFoundError` instead.
        workers: rendering processes (default: the available CPUs).
        verify: check the files' MD5s (and full shapes).

    Extras: ``info`` ``(N, 4)`` int64: instance, elevation, azimuth, lighting codes.
    """
    check_norb_options(split, viewpoint, size, crop_size)
    root_path = resolve_root(root)
    folder = toynorb_folder(root_path)
    if folder is None:
        if not generate_missing:
            raise DatasetNotFoundError(
                "ToyNORB not found. Looked for:\n"
                + "\n".join(f"  {spec.name}" for spec in _all_files())
                + "\nin: "
                + ", ".join(str(p) for p in candidate_folders(root_path, SUBDIRS))
                + f"\nGenerate it with `capsnet data generate toynorb --root {root_path}` "
                "or generate_missing=True (rendered locally, no download)."
            )
        folder = generate_files(root_path, workers=workers, verify=verify, progress=progress)
    source = "train" if split == "train" else "test"
    options: dict[str, Any] = dict(
        stem=f"toynorb-{source}", channels=channels, size=size, verify=verify, cache=cache,
        progress=progress, full_shape=FULL_SHAPE if verify else None,
    )  # fmt: skip
    try:
        loaded = read_norb_files(TOYNORB_FILES[source], folder, root_path, **options)
    except CorruptFileError as err:
        if not download:
            raise CorruptFileError(
                f"{err}\nToyNORB files are generated: render them again with "
                f"`capsnet data generate toynorb --root {root_path} --force` (or download=True)."
            ) from err
        folder = generate_files(root_path, workers=workers, verify=verify, progress=progress)
        loaded = read_norb_files(TOYNORB_FILES[source], folder, root_path, **options)
    images, labels, info, meta = loaded
    meta = {
        **meta,
        "generator_version": GENERATOR_VERSION,
        "note": "ToyNORB: rendered stand-in with smallNORB's protocol, not smallNORB",
    }
    return norb_dataset(
        images, labels, info, meta, name="toynorb", split=split, viewpoint=viewpoint,
        channels=channels, crop_size=crop_size, max_brightness=max_brightness,
        contrast=contrast,
    )  # fmt: skip
