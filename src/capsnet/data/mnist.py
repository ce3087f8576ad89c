"""MNIST, Fashion-MNIST (IDX files) and ``mnist_shifted40`` (MNIST on a 40x40 canvas).

Files are the four standard IDX files, gzipped or not, in ``<root>/mnist`` (also
``<root>/MNIST/raw`` as torchvision lays them out, or ``<root>`` itself); Fashion-MNIST in
``<root>/fashion-mnist`` (Debian's ``/usr/share/datasets/fashion-mnist``). The
*uncompressed* content is checked against the official MD5s (docs/spec.md §3): mirrors gzip the
same bytes differently, so the ``.gz`` bytes cannot be checked.

Default training augmentation (Sabour et al. 2017): a random shift of up to 2 pixels in
each direction with zero fill (``max_shift``). ``mnist_shifted40`` is the training input
of Sabour's affNIST experiment: 28x28 digits placed at a random position on a black 40x40
canvas each time they are drawn (evaluation: centred), so one epoch is one pass over the
60,000 digits, each at a fresh position.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from capsnet.data.dataset import ImageDataset
from capsnet.data.formats import IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC, parse_idx
from capsnet.data.registry import register_dataset
from capsnet.data.sources import (
    CorruptFileError,
    RemoteFile,
    ensure_files,
    read_verified,
    resolve_root,
)
from capsnet.data.transforms import PlaceOnCanvas, RandomShift

__all__ = ["MNIST_FILES", "FASHION_MNIST_FILES", "load_idx_family", "MNIST_FAMILY"]

_MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
_FASHION_MIRRORS = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)


def _files(mirrors: tuple[str, ...], md5s: dict[str, str]) -> dict[str, RemoteFile]:
    sizes = {
        "train-images-idx3-ubyte": 47_040_016,
        "train-labels-idx1-ubyte": 60_008,
        "t10k-images-idx3-ubyte": 7_840_016,
        "t10k-labels-idx1-ubyte": 10_008,
    }
    return {
        name: RemoteFile(name, tuple(m + name + ".gz" for m in mirrors), md5, sizes[name])
        for name, md5 in md5s.items()
    }


MNIST_FILES = _files(
    _MNIST_MIRRORS,
    {
        "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
        "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
        "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
        "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
    },
)
FASHION_MNIST_FILES = _files(
    _FASHION_MIRRORS,
    {
        "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
        "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
        "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
    },
)

#: title, standard sub-folders of the data root, files, class names of each family.
MNIST_FAMILY = {
    "mnist": (
        "MNIST",
        ("mnist", "MNIST/raw", "MNIST"),
        MNIST_FILES,
        [str(d) for d in range(10)],
    ),
    "fashion_mnist": (
        "Fashion-MNIST",
        ("fashion-mnist", "fashion_mnist", "FashionMNIST/raw", "FashionMNIST"),
        FASHION_MNIST_FILES,
        [
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ],
    ),
}
_PREFIX = {"train": "train", "test": "t10k"}


def load_idx_family(
    family: str,
    split: str,
    root: str | Path | None = None,
    download: bool = False,
    *,
    verify: bool = True,
    progress: bool = True,
) -> tuple[Tensor, Tensor, list[str], dict]:
    """Decode one split of MNIST or Fashion-MNIST.

    Args:
        family: ``"mnist"`` or ``"fashion_mnist"``.
        split: ``"train"`` (60,000) or ``"test"`` (10,000).
        root: data root or the folder holding the files.
        download: fetch missing files (verified against the official MD5s).
        verify: check the official MD5s of the uncompressed content; ``False`` accepts
            any well-formed IDX files with these names (e.g. your own MNIST-format data).
        progress: progress bars for downloads.

    Returns:
        ``(images uint8 (N, 1, H, W), labels int64 (N,), classes, meta)``.
    """
    if family not in MNIST_FAMILY:
        raise ValueError(f"family must be one of {sorted(MNIST_FAMILY)}, got {family!r}")
    if split not in _PREFIX:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    title, subdirs, files, classes = MNIST_FAMILY[family]
    prefix = _PREFIX[split]
    wanted = [files[f"{prefix}-images-idx3-ubyte"], files[f"{prefix}-labels-idx1-ubyte"]]
    root_path = resolve_root(root)
    folder = ensure_files(
        f"{title} ({split})", root_path, subdirs, wanted, download=download, progress=progress
    )
    img_bytes, img_path = read_verified(
        wanted[0], folder, verify=verify, download=download, progress=progress
    )
    lab_bytes, lab_path = read_verified(
        wanted[1], folder, verify=verify, download=download, progress=progress
    )
    images = parse_idx(img_bytes, img_path, magic=IDX_IMAGES_MAGIC)
    labels = parse_idx(lab_bytes, lab_path, magic=IDX_LABELS_MAGIC)
    if images.dtype != "uint8" or labels.dtype != "uint8":
        raise CorruptFileError(f"{img_path}, {lab_path}: expected uint8 IDX data")
    if images.shape[0] != labels.shape[0]:
        raise CorruptFileError(
            f"{img_path} has {images.shape[0]} images but {lab_path} has {labels.shape[0]} labels"
        )
    if labels.size and int(labels.max()) >= len(classes):
        raise CorruptFileError(f"{lab_path}: label {int(labels.max())} outside 0..9")
    image_tensor = torch.from_numpy(images.copy()).unsqueeze(1)
    label_tensor = torch.from_numpy(labels.astype("int64"))
    meta = {"files": [str(img_path), str(lab_path)], "verified": bool(verify)}
    return image_tensor, label_tensor, list(classes), meta


def _idx_dataset(
    family: str, split: str, root, download, *, max_shift: int, verify: bool, progress: bool
) -> ImageDataset:
    images, labels, classes, meta = load_idx_family(
        family, split, root, download, verify=verify, progress=progress
    )
    return ImageDataset(
        images,
        labels,
        classes=classes,
        name=family,
        split=split,
        train_transform=RandomShift(max_shift),
        meta=meta,
    )


@register_dataset(
    input_size=(28, 28),
    in_channels=1,
    num_classes=10,
    paper="Sabour et al. 2017 (MNIST 0.25 %); Hinton et al. 2018 (MNIST 0.44 %)",
    description="MNIST digits 28x28; train: random shift up to max_shift=2 px",
    download=True,
)
def mnist(
    split: str = "train",
    root=None,
    download: bool = False,
    *,
    max_shift: int = 2,
    verify: bool = True,
    progress: bool = True,
) -> ImageDataset:
    """MNIST 60,000/10,000 (options: ``max_shift``, ``verify``)."""
    return _idx_dataset(
        "mnist", split, root, download, max_shift=max_shift, verify=verify, progress=progress
    )


@register_dataset(
    input_size=(28, 28),
    in_channels=1,
    num_classes=10,
    description="Fashion-MNIST 28x28; train: random shift up to max_shift=2 px",
    download=True,
)
def fashion_mnist(
    split: str = "train",
    root=None,
    download: bool = False,
    *,
    max_shift: int = 2,
    verify: bool = True,
    progress: bool = True,
) -> ImageDataset:
    """Fashion-MNIST 60,000/10,000 (options: ``max_shift``, ``verify``)."""
    return _idx_dataset(
        "fashion_mnist",
        split,
        root,
        download,
        max_shift=max_shift,
        verify=verify,
        progress=progress,
    )


@register_dataset(
    input_size=(40, 40),
    in_channels=1,
    num_classes=10,
    paper="Sabour et al. 2017, affNIST experiment (train input)",
    description="MNIST placed at a random position on a 40x40 canvas (test: centred)",
    download=True,
)
def mnist_shifted40(
    split: str = "train",
    root=None,
    download: bool = False,
    *,
    canvas: int = 40,
    max_shift: int | None = None,
    source: str = "mnist",
    verify: bool = True,
    progress: bool = True,
) -> ImageDataset:
    """MNIST digits on a ``canvas`` x ``canvas`` black background.

    Training draws a fresh random position each time (every position that keeps the
    digit inside, or within ``max_shift`` pixels of the centre); evaluation centres the
    digit (affNIST's "just centred" images). ``source="fashion_mnist"`` works too.
    """
    if source not in MNIST_FAMILY:
        raise ValueError(f"source must be one of {sorted(MNIST_FAMILY)}, got {source!r}")
    images, labels, classes, meta = load_idx_family(
        source, split, root, download, verify=verify, progress=progress
    )
    return ImageDataset(
        images,
        labels,
        classes=classes,
        name="mnist_shifted40",
        split=split,
        train_transform=PlaceOnCanvas(canvas, random=True, max_shift=max_shift),
        eval_transform=PlaceOnCanvas(canvas, random=False),
        meta={**meta, "source": source},
    )
