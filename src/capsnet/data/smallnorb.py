"""smallNORB (docs/spec.md §3) with the EM-routing paper's preprocessing and viewpoint splits.

Files (binary matrix format, gzipped or not) in ``<root>/smallnorb`` (or ``<root>``)::

    smallnorb-5x46789x9x18x6x2x96x96-training-{dat,cat,info}.mat[.gz]
    smallnorb-5x01235x9x18x6x2x96x96-testing-{dat,cat,info}.mat[.gz]

``dat``: 24,300 stereo pairs 2 x 96 x 96 uint8; ``cat``: category 0..4 (animal, human,
airplane, truck, car); ``info``: instance, elevation 0..8 (30 to 70 degrees in steps of 5),
azimuth 0, 2, ..., 34 (x 10 degrees), lighting 0..5.

Preprocessing (Hinton et al. 2018, docs/spec.md §2): each image is downsampled 96 -> 48 (2x2 area
average, done once at load time and stored as uint8), standardised per image to zero mean
and unit variance, then a random 32x32 crop with random brightness and contrast for
training, the centre 32x32 crop for testing. The paper gives no brightness/contrast
amounts; the defaults are the TensorFlow values of the popular open reproduction
(``max_brightness=32/255``, ``contrast=(0.5, 1.5)``), applied after standardisation as the
paper orders the steps (applied before, standardisation would undo them).

Novel viewpoints (Hinton et al. 2018, section 5.2): ``viewpoint="azimuth"`` trains on
azimuths 300, 320, 340, 0, 20, 40 degrees (codes 30, 32, 34, 0, 2, 4) and tests on the
rest (60..280 degrees); ``viewpoint="elevation"`` trains on the 3 lowest elevations
(30, 35, 40 degrees; codes 0, 1, 2) and tests on the 6 higher ones. With a viewpoint,
split ``"train"`` is the familiar part of the training set, ``"test_familiar"`` and
``"test_novel"`` the two parts of the test set, ``"test"`` the whole test set.

Decoded, downsampled tensors are cached (``<root>/processed`` or
``~/.cache/capsnet/processed``), so later loads skip decompression and checksums.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from capsnet.data.dataset import ImageDataset
from capsnet.data.formats import parse_smallnorb
from capsnet.data.registry import register_dataset
from capsnet.data.sources import (
    CorruptFileError,
    DatasetNotFoundError,
    RemoteFile,
    cache_key,
    cache_load,
    cache_save,
    ensure_files,
    locate,
    read_verified,
    resolve_root,
)
from capsnet.data.transforms import (
    CenterCrop,
    Compose,
    RandomBrightness,
    RandomContrast,
    RandomCrop,
    Standardize,
)

__all__ = [
    "SMALLNORB_FILES",
    "SMALLNORB_CLASSES",
    "AZIMUTH_FAMILIAR",
    "ELEVATION_FAMILIAR",
    "viewpoint_mask",
    "load_smallnorb",
]

_BASE = "https://cs.nyu.edu/~ylclab/data/norb-v1.0-small/"
_STEMS = {
    "train": "smallnorb-5x46789x9x18x6x2x96x96-training",
    "test": "smallnorb-5x01235x9x18x6x2x96x96-testing",
}
# MD5s of the uncompressed files as published by open smallNORB loaders (several agree);
# not an official list from the dataset's authors.
_MD5 = {
    "train": {
        "dat": "8138a0902307b32dfa0025a36dfa45ec",
        "cat": "fd5120d3f770ad57ebe620eb61a0b633",
        "info": "19faee774120001fc7e17980d6960451",
    },
    "test": {
        "dat": "e9920b7f7b2869a8f1a12e945b2c166c",
        "cat": "fd5120d3f770ad57ebe620eb61a0b633",
        "info": "7c5b871cc69dcadec1bf6a18141f5edc",
    },
}
_SIZES = {"dat": 24 + 24300 * 2 * 96 * 96, "cat": 20 + 24300 * 4, "info": 20 + 24300 * 16}

SMALLNORB_FILES = {
    split: {
        kind: RemoteFile(
            f"{stem}-{kind}.mat", (f"{_BASE}{stem}-{kind}.mat.gz",), _MD5[split][kind], _SIZES[kind]
        )
        for kind in ("dat", "cat", "info")
    }
    for split, stem in _STEMS.items()
}
SMALLNORB_CLASSES = ["animal", "human", "airplane", "truck", "car"]
_SUBDIRS = ("smallnorb", "smallNORB", "small_norb")

#: azimuth codes (x 10 degrees) of the familiar views: 300, 320, 340, 0, 20, 40 degrees.
AZIMUTH_FAMILIAR = (30, 32, 34, 0, 2, 4)
#: elevation codes of the familiar views: 30, 35, 40 degrees.
ELEVATION_FAMILIAR = (0, 1, 2)
_INFO_COLUMNS = ("instance", "elevation", "azimuth", "lighting")
_CHANNELS = {"left": [0], "right": [1], "both": [0, 1]}


def viewpoint_mask(info: Tensor, viewpoint: str, familiar: bool = True) -> Tensor:
    """Which examples have a familiar (or novel) viewpoint in the EM paper's experiment.

    Args:
        info: ``(N, 4)`` smallNORB info (instance, elevation, azimuth, lighting).
        viewpoint: ``"azimuth"`` or ``"elevation"``.
        familiar: select the training viewpoints (``True``) or the novel ones.

    Returns:
        ``(N,)`` bool.
    """
    values: tuple[int, ...]
    if viewpoint == "azimuth":
        column, values = 2, AZIMUTH_FAMILIAR
    elif viewpoint == "elevation":
        column, values = 1, ELEVATION_FAMILIAR
    else:
        raise ValueError(f"viewpoint must be 'azimuth' or 'elevation', got {viewpoint!r}")
    mask = torch.isin(info[:, column], torch.tensor(values, dtype=info.dtype))
    return mask if familiar else ~mask


def _downsample(dat: Tensor, size: int) -> Tensor:
    """uint8 ``(N, C, H, W)`` -> uint8 ``(N, C, size, size)`` by area averaging, in chunks."""
    if dat.shape[-1] == size and dat.shape[-2] == size:
        return dat.clone()
    out = torch.empty(dat.shape[0], dat.shape[1], size, size, dtype=torch.uint8)
    for start in range(0, dat.shape[0], 2048):
        chunk = dat[start : start + 2048].float()
        small = F.interpolate(chunk, size=(size, size), mode="area")
        out[start : start + 2048] = small.round_().clamp_(0, 255).to(torch.uint8)
    return out


def load_smallnorb(
    split: str,
    root: str | Path | None = None,
    download: bool = False,
    *,
    channels: str = "left",
    size: int = 48,
    verify: bool = True,
    cache: bool = True,
    progress: bool = True,
) -> tuple[Tensor, Tensor, Tensor, dict]:
    """Decode a smallNORB split, select camera channels and downsample.

    Args:
        split: ``"train"`` or ``"test"``.
        root: data root or the folder holding the files.
        download: fetch missing files from cs.nyu.edu.
        channels: ``"left"``, ``"right"`` or ``"both"`` (stereo as 2 channels).
        size: downsampled size (48 in the paper).
        verify: check the published MD5s (and full-size shapes).
        cache: reuse / write the decoded tensors cache.

    Returns:
        ``(images uint8 (N, C, size, size), labels int64 (N,), info int64 (N, 4), meta)``.
    """
    if split not in _STEMS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if channels not in _CHANNELS:
        raise ValueError(f"channels must be one of {sorted(_CHANNELS)}, got {channels!r}")
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    files = SMALLNORB_FILES[split]
    root_path = resolve_root(root)
    folder = ensure_files(
        f"smallNORB ({split})",
        root_path,
        _SUBDIRS,
        list(files.values()),
        download=download,
        progress=progress,
    )
    return read_norb_files(
        files,
        folder,
        root_path,
        stem=f"smallnorb-{split}",
        channels=channels,
        size=size,
        verify=verify,
        cache=cache,
        download=download,
        progress=progress,
        full_shape=(24300, 2, 96, 96) if verify else None,
    )


def read_norb_files(
    files: dict[str, RemoteFile],
    folder: Path,
    root_path: Path,
    *,
    stem: str,
    channels: str = "left",
    size: int = 48,
    verify: bool = True,
    cache: bool = True,
    download: bool = False,
    progress: bool = True,
    full_shape: tuple[int, ...] | None = None,
) -> tuple[Tensor, Tensor, Tensor, dict]:
    """Decode one split's ``dat``/``cat``/``info`` files in the smallNORB format.

    Shared by smallNORB and the datasets written in its format (ToyNORB).

    Args:
        files: ``{"dat": spec, "cat": spec, "info": spec}``.
        folder: the folder holding them.
        root_path: the data root (for the decoded-tensor cache).
        stem: cache file stem, e.g. ``"smallnorb-train"``.
        channels, size, verify, cache, download, progress: as in :func:`load_smallnorb`.
        full_shape: the ``dat`` shape required (``None``: any).

    Returns:
        ``(images uint8 (N, C, size, size), labels int64 (N,), info int64 (N, 4), meta)``.
    """
    if channels not in _CHANNELS:
        raise ValueError(f"channels must be one of {sorted(_CHANNELS)}, got {channels!r}")
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    paths: list[Path] = []
    for k in ("dat", "cat", "info"):
        path = locate(files[k], folder)
        if path is None:  # ensure_files has found or fetched every file
            raise DatasetNotFoundError(f"{files[k].name}[.gz] not found in {folder}")
        paths.append(path)
    key = cache_key(*stem.rsplit("-", 1), channels, size, verify, files=paths)
    if cache:
        hit = cache_load(root_path, stem, key)
        if hit is not None and {"images", "labels", "info"} <= hit.keys():
            meta = {"files": [str(p) for p in paths], "cache": True, "verified": verify}
            return hit["images"], hit["labels"], hit["info"], meta
    content = {}
    for kind in ("dat", "cat", "info"):
        content[kind] = read_verified(
            files[kind], folder, verify=verify, download=download, progress=progress
        )
    dat = parse_smallnorb(*content["dat"], dtype="<u1", ndim=4)
    cat = parse_smallnorb(*content["cat"], dtype="<i4", ndim=1)
    info = parse_smallnorb(*content["info"], dtype="<i4", ndim=2)
    dat_path, info_path = content["dat"][1], content["info"][1]
    n = dat.shape[0]
    if dat.shape[1] != 2:
        raise CorruptFileError(f"{dat_path}: expected stereo pairs (N, 2, H, W), got {dat.shape}")
    if cat.shape[0] != n or info.shape[0] != n:
        raise CorruptFileError(
            f"{folder}: {n} images, {cat.shape[0]} categories, {info.shape[0]} info rows"
        )
    if info.shape[1] != 4:
        raise CorruptFileError(f"{info_path}: info must have 4 columns, got {info.shape[1]}")
    if n and (cat.min() < 0 or cat.max() > 4):
        raise CorruptFileError(f"{content['cat'][1]}: categories outside 0..4")
    limits = ((0, 9), (0, 8), (0, 34), (0, 5))
    for column, (lo, hi) in enumerate(limits):
        if n and (info[:, column].min() < lo or info[:, column].max() > hi):
            raise CorruptFileError(f"{info_path}: {_INFO_COLUMNS[column]} outside {lo}..{hi}")
    if full_shape is not None and dat.shape != tuple(full_shape):
        raise CorruptFileError(f"{dat_path}: shape {dat.shape}, expected {tuple(full_shape)}")
    images = _downsample(torch.from_numpy(dat[:, _CHANNELS[channels]]), size)
    del dat, content
    labels = torch.from_numpy(cat.astype("int64"))
    info_t = torch.from_numpy(info.astype("int64"))
    if cache:
        cache_save(root_path, stem, key, {"images": images, "labels": labels, "info": info_t})
    meta = {"files": [str(p) for p in paths], "cache": False, "verified": verify}
    return images, labels, info_t, meta


def norb_dataset(
    images: Tensor,
    labels: Tensor,
    info: Tensor,
    meta: dict,
    *,
    name: str,
    split: str,
    viewpoint: str | None,
    channels: str,
    crop_size: int,
    max_brightness: float,
    contrast: tuple[float, float],
) -> ImageDataset:
    """A smallNORB-format split with the paper's preprocessing and viewpoint selection."""
    dataset = ImageDataset(
        images,
        labels,
        classes=SMALLNORB_CLASSES,
        name=name,
        split=split,
        train_transform=Compose(
            [
                Standardize(),
                RandomCrop(crop_size),
                RandomBrightness(max_brightness),
                RandomContrast(*contrast),
            ]
        ),
        eval_transform=Compose([Standardize(), CenterCrop(crop_size)]),
        extras={"info": info},
        meta={**meta, "channels": channels, "viewpoint": viewpoint, "info_columns": _INFO_COLUMNS},
    )
    if viewpoint is not None and split != "test":
        familiar = split in ("train", "test_familiar")
        keep = torch.nonzero(viewpoint_mask(info, viewpoint, familiar)).flatten()
        dataset = dataset.subset(keep)
    return dataset


def check_norb_options(split: str, viewpoint: str | None, size: int, crop_size: int) -> None:
    """The argument checks shared by the smallNORB-format datasets."""
    if viewpoint is None and split in ("test_familiar", "test_novel"):
        raise ValueError(f"split {split!r} needs viewpoint='azimuth' or 'elevation'")
    if viewpoint is not None and viewpoint not in ("azimuth", "elevation"):
        raise ValueError(f"viewpoint must be None, 'azimuth' or 'elevation', got {viewpoint!r}")
    if crop_size > size:
        raise ValueError(f"crop_size {crop_size} larger than size {size}")


@register_dataset(
    splits=("train", "test", "test_familiar", "test_novel"),
    input_size=(32, 32),
    in_channels=1,
    num_classes=5,
    paper="Hinton et al. 2018 (smallNORB 1.8 %; novel viewpoints)",
    description="smallNORB 5 classes, 96->48 px, standardised, 32x32 crops (+ viewpoints)",
    download=True,
)
def smallnorb(
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
    verify: bool = True,
    cache: bool = True,
    progress: bool = True,
) -> ImageDataset:
    """smallNORB with the paper's preprocessing (see the module docstring).

    Args:
        split: ``"train"``, ``"test"``, or with ``viewpoint``: ``"test_familiar"``,
            ``"test_novel"``.
        viewpoint: ``None``, ``"azimuth"`` or ``"elevation"`` (novel-viewpoint splits).
        channels: ``"left"`` (default), ``"right"`` or ``"both"`` cameras.
        size, crop_size: downsampled and cropped sizes (48, 32).
        max_brightness, contrast: training brightness delta and contrast factor range.

    Extras: ``info`` ``(N, 4)`` int64: instance, elevation, azimuth, lighting codes.
    """
    check_norb_options(split, viewpoint, size, crop_size)
    source = "train" if split == "train" else "test"
    images, labels, info, meta = load_smallnorb(
        source,
        root,
        download,
        channels=channels,
        size=size,
        verify=verify,
        cache=cache,
        progress=progress,
    )
    return norb_dataset(
        images,
        labels,
        info,
        meta,
        name="smallnorb",
        split=split,
        viewpoint=viewpoint,
        channels=channels,
        crop_size=crop_size,
        max_brightness=max_brightness,
        contrast=contrast,
    )
