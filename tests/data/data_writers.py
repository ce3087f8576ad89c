"""Writers of tiny dataset files in the real formats, for the data tests (no network).

IDX (MNIST), smallNORB binary matrices, affNIST MATLAB v5 batches, CIFAR-10 python
pickles and PNG image folders, each written exactly as the official files are laid out.
"""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np

MNIST_NAMES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX encoding of a uint8 array (magic 0x0000080<ndim>, big-endian sizes)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim])
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.tobytes()


def write_bytes(path: Path, content: bytes, *, gz: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(content, mtime=0))
    else:
        path.write_bytes(content)
    return path


def fake_digits(n: int, seed: int, size: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """``n`` blob images (content inside the central 20x20, like MNIST) and labels 0..9."""
    rng = np.random.default_rng(seed)
    images = np.zeros((n, size, size), dtype=np.uint8)
    m = (size - 20) // 2
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    for i in range(n):
        block = rng.integers(0, 256, (20, 20))
        block[rng.random((20, 20)) < 0.6] = 0
        images[i, m : m + 20, m : m + 20] = block
        images[i, m + 2 + labels[i], m + 2 : m + 12] = 255  # label-dependent stroke
    return images, labels.astype(np.uint8)


def write_mnist(
    folder: Path, *, n_train: int = 60, n_test: int = 20, gz: bool = True, seed: int = 0
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Write the four MNIST IDX files of a tiny fake MNIST into ``folder``."""
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images, labels = fake_digits(n, seed + (split == "test"))
        names = MNIST_NAMES[split]
        write_bytes(folder / names[0], idx_bytes(images), gz=gz)
        write_bytes(folder / names[1], idx_bytes(labels), gz=gz)
        out[split] = (images, labels)
    return out


SMALLNORB_STEMS = {
    "train": "smallnorb-5x46789x9x18x6x2x96x96-training",
    "test": "smallnorb-5x01235x9x18x6x2x96x96-testing",
}


def smallnorb_bytes(array: np.ndarray) -> bytes:
    """smallNORB binary matrix: LE int32 magic, ndim, max(3, ndim) sizes, data."""
    magic = {np.dtype(np.uint8): 0x1E3D4C55, np.dtype(np.int32): 0x1E3D4C54}[array.dtype]
    dims = list(array.shape) + [1] * max(0, 3 - array.ndim)
    header = magic.to_bytes(4, "little") + array.ndim.to_bytes(4, "little")
    header += b"".join(int(d).to_bytes(4, "little") for d in dims)
    return header + np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes()


def fake_smallnorb(
    *, size: int = 8, instances: tuple[int, ...] = (4,), seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every (category, instance, elevation, azimuth) with lighting 0: 5 x len(instances)
    x 9 x 18 stereo pairs of ``size`` x ``size`` images."""
    rng = np.random.default_rng(seed)
    rows = [
        (c, i, e, a, 0)
        for c in range(5)
        for i in instances
        for e in range(9)
        for a in range(0, 36, 2)
    ]
    table = np.array(rows, dtype=np.int32)
    cat = table[:, 0].copy()
    info = table[:, 1:].copy()  # instance, elevation, azimuth, lighting
    dat = rng.integers(0, 256, (len(rows), 2, size, size), dtype=np.uint8)
    return dat, cat, info


def write_smallnorb(folder: Path, split: str, dat, cat, info, *, gz: bool = False) -> None:
    stem = SMALLNORB_STEMS[split]
    write_bytes(folder / f"{stem}-dat.mat", smallnorb_bytes(dat), gz=gz)
    write_bytes(folder / f"{stem}-cat.mat", smallnorb_bytes(cat.astype(np.int32)), gz=gz)
    write_bytes(folder / f"{stem}-info.mat", smallnorb_bytes(info.astype(np.int32)), gz=gz)


def write_affnist_batch(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """An affNIST MATLAB v5 batch: struct affNISTdata with image (1600 x N, column n =
    image n in row-major order) and label_int (1 x N uint8)."""
    import scipy.io

    path.parent.mkdir(parents=True, exist_ok=True)
    n = images.shape[0]
    columns = np.ascontiguousarray(images.reshape(n, 1600).T, dtype=np.uint8)
    scipy.io.savemat(
        str(path),
        {
            "affNISTdata": {
                "image": columns,
                "label_int": labels.reshape(1, n).astype(np.uint8),
                "label_one_of_n": np.eye(10, dtype=np.uint8)[labels].T,
            }
        },
        format="5",
    )


CIFAR_CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]


def write_cifar(folder: Path, *, per_batch: int = 6, seed: int = 0) -> dict[str, np.ndarray]:
    """CIFAR-10 python batches (pickled dicts with bytes keys, uint8 (N, 3072) rows)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        obj = {
            b"batch_label": name.encode(),
            b"labels": labels,
            b"data": data,
            b"filenames": [f"img{i}.png".encode() for i in range(per_batch)],
        }
        (folder / name).write_bytes(pickle.dumps(obj, protocol=2))
        out[name] = data
    meta = {b"label_names": [c.encode() for c in CIFAR_CLASSES], b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return out


def write_png(path: Path, array: np.ndarray) -> None:
    """Save ``(H, W)`` (grayscale) or ``(H, W, 3)`` (RGB) uint8 as PNG."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
