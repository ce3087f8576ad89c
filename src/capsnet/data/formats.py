"""Parsers for the datasets' file formats (docs/spec.md §3), returning NumPy arrays.

* IDX (MNIST, Fashion-MNIST): big-endian ``00 00 <type> <ndim>`` magic, ``ndim`` big-endian
  int32 sizes, then the data.
* smallNORB binary matrix: little-endian int32 magic (``0x1E3D4C55`` uint8, ``...54``
  int32, ``...51`` float32, ``...53`` float64, ``...56`` int16), int32 ``ndim``, then
  ``max(3, ndim)`` int32 sizes (unused trailing ones are 1), then the data.
* affNIST MATLAB v5 batches: a struct ``affNISTdata`` with ``image`` (1600 x N uint8) and
  ``label_int`` (1 x N). Column ``n`` of ``image`` is image ``n`` flattened row by row
  (C order), as read by the public loaders (Python ``image.T.reshape(-1, 40, 40)``,
  MATLAB ``permute(reshape(image, 40, 40, []), [2 1 3])``). Needs SciPy (lazy import).
* CIFAR-10 python batches: pickled dicts, read with a restricted unpickler that only
  resolves the few NumPy globals an array pickle needs, so a file can never run code.
* Image files (PNG, JPEG, ...) through Pillow (lazy import).

Every parser raises :class:`~capsnet.data.sources.CorruptFileError` naming the file and
what is wrong (truncated, wrong magic, wrong shape) instead of returning garbage.
"""

from __future__ import annotations

import importlib
import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from capsnet.data.sources import CorruptFileError

__all__ = [
    "parse_idx",
    "parse_smallnorb",
    "smallnorb_header",
    "read_affnist_mat",
    "read_cifar_batch",
    "read_cifar_meta",
    "read_image",
    "IDX_IMAGES_MAGIC",
    "IDX_LABELS_MAGIC",
    "SMALLNORB_MAGIC",
]

IDX_IMAGES_MAGIC = 0x00000803
IDX_LABELS_MAGIC = 0x00000801
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

SMALLNORB_MAGIC = {
    0x1E3D4C55: "<u1",
    0x1E3D4C54: "<i4",
    0x1E3D4C51: "<f4",
    0x1E3D4C53: "<f8",
    0x1E3D4C56: "<i2",
}


def parse_idx(content: bytes, path: Path | str, *, magic: int | None = None) -> np.ndarray:
    """Decode an (uncompressed) IDX file.

    Args:
        content: the file's bytes.
        path: shown in error messages.
        magic: expected magic number, e.g. :data:`IDX_IMAGES_MAGIC` (``None``: any valid).

    Returns:
        The array with the header's shape, native byte order (``uint8`` for MNIST).

    Raises:
        CorruptFileError: short header, wrong magic, unknown type, or a size that does not
            match the header (truncated or padded file).
    """
    if len(content) < 4:
        raise CorruptFileError(f"{path}: {len(content)} bytes, too short for an IDX header")
    got = int.from_bytes(content[:4], "big")
    if content[0] != 0 or content[1] != 0 or content[2] not in _IDX_TYPES or content[3] == 0:
        raise CorruptFileError(f"{path}: bad IDX magic 0x{got:08X} (not an IDX file)")
    if magic is not None and got != magic:
        raise CorruptFileError(f"{path}: IDX magic 0x{got:08X}, expected 0x{magic:08X}")
    ndim = content[3]
    header = 4 + 4 * ndim
    if len(content) < header:
        raise CorruptFileError(f"{path}: truncated IDX header ({len(content)} bytes)")
    dims = tuple(int.from_bytes(content[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_TYPES[content[2]])
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(content) != expected:
        raise CorruptFileError(
            f"{path}: IDX header says shape {dims} ({expected:,} bytes with the header) "
            f"but the file has {len(content):,} bytes (truncated or corrupt)"
        )
    array = np.frombuffer(content, dtype=dtype, offset=header).reshape(dims)
    return array.astype(dtype.newbyteorder("="), copy=False)


def parse_smallnorb(
    content: bytes, path: Path | str, *, dtype: str | None = None, ndim: int | None = None
) -> np.ndarray:
    """Decode a smallNORB binary matrix file (``-dat``, ``-cat`` or ``-info``).

    Args:
        content: the (uncompressed) file's bytes.
        path: shown in error messages.
        dtype: expected element type (``"<u1"`` for -dat, ``"<i4"`` for -cat/-info) or
            ``None`` for any.
        ndim: expected number of dimensions (4 for -dat, 1 for -cat, 2 for -info).

    Returns:
        The matrix with its ``ndim`` leading sizes (trailing padding sizes dropped).

    Raises:
        CorruptFileError: unknown magic, unexpected type/rank, or wrong data size.
    """
    if len(content) < 8:
        raise CorruptFileError(f"{path}: {len(content)} bytes, too short for a smallNORB header")
    magic = int.from_bytes(content[:4], "little")
    if magic not in SMALLNORB_MAGIC:
        raise CorruptFileError(
            f"{path}: bad smallNORB magic 0x{magic:08X} (expected one of "
            + ", ".join(f"0x{m:08X}" for m in SMALLNORB_MAGIC)
            + ")"
        )
    rank = int.from_bytes(content[4:8], "little", signed=True)
    if not 1 <= rank <= 16:
        raise CorruptFileError(f"{path}: implausible smallNORB rank {rank}")
    stored = max(3, rank)
    header = 8 + 4 * stored
    if len(content) < header:
        raise CorruptFileError(f"{path}: truncated smallNORB header ({len(content)} bytes)")
    dims = tuple(
        int.from_bytes(content[8 + 4 * i : 12 + 4 * i], "little", signed=True) for i in range(rank)
    )
    if any(d < 0 for d in dims):
        raise CorruptFileError(f"{path}: negative size in smallNORB header {dims}")
    kind = SMALLNORB_MAGIC[magic]
    if dtype is not None and kind != dtype:
        raise CorruptFileError(f"{path}: smallNORB element type {kind}, expected {dtype}")
    if ndim is not None and rank != ndim:
        raise CorruptFileError(f"{path}: smallNORB matrix of rank {rank}, expected {ndim}")
    np_dtype = np.dtype(kind)
    expected = header + int(np.prod(dims, dtype=np.int64)) * np_dtype.itemsize
    if len(content) != expected:
        raise CorruptFileError(
            f"{path}: header says shape {dims} ({expected:,} bytes with the header) but the "
            f"file has {len(content):,} bytes (truncated or corrupt)"
        )
    array = np.frombuffer(content, dtype=np_dtype, offset=header).reshape(dims)
    return array.astype(np_dtype.newbyteorder("="), copy=False)


def smallnorb_header(shape: tuple[int, ...], dtype: str) -> bytes:
    """The header of a smallNORB binary matrix file (the inverse of :func:`parse_smallnorb`).

    Args:
        shape: the matrix's sizes, e.g. ``(24300, 2, 96, 96)``.
        dtype: element type, one of ``"<u1"``, ``"<i4"``, ``"<f4"``, ``"<f8"``, ``"<i2"``.

    Returns:
        Magic, rank and ``max(3, rank)`` sizes (trailing ones 1), little-endian int32; the
        data follows in C order.
    """
    magic = {v: k for k, v in SMALLNORB_MAGIC.items()}
    if dtype not in magic:
        raise ValueError(f"dtype must be one of {sorted(magic)}, got {dtype!r}")
    if not 1 <= len(shape) <= 16:
        raise ValueError(f"rank must be in 1..16, got shape {shape}")
    dims = list(shape) + [1] * max(0, 3 - len(shape))
    words = [magic[dtype], len(shape), *dims]
    return b"".join(int(w).to_bytes(4, "little") for w in words)


def _import_scipy_io() -> Any:
    try:
        return importlib.import_module("scipy.io")
    except ImportError as exc:
        raise ImportError(
            "reading affNIST .mat files needs SciPy: pip install scipy "
            "(or pip install 'capsnet[dev]')"
        ) from exc


def read_affnist_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one affNIST MATLAB batch (e.g. ``test_batches/1.mat`` or ``test.mat``).

    Returns:
        ``(images, labels)``: ``images`` uint8 ``(N, 40, 40)``, ``labels`` int64 ``(N,)``.

    Raises:
        CorruptFileError: not a MATLAB v5 file, no ``affNISTdata`` struct, or fields of the
            wrong shape/type.
        ImportError: SciPy is not installed.
    """
    sio = _import_scipy_io()
    try:
        mat = sio.loadmat(str(path), variable_names=["affNISTdata"], squeeze_me=False)
    except NotImplementedError as exc:  # MATLAB v7.3 (HDF5) files
        raise CorruptFileError(f"{path}: unsupported MATLAB file version ({exc})") from exc
    except Exception as exc:  # scipy raises ValueError/TypeError/OSError on garbage
        raise CorruptFileError(f"{path}: not a readable MATLAB .mat file ({exc})") from exc
    if "affNISTdata" not in mat:
        raise CorruptFileError(f"{path}: no variable 'affNISTdata' (not an affNIST batch)")
    struct = mat["affNISTdata"]
    names = struct.dtype.names or ()
    for key in ("image", "label_int"):
        if key not in names:
            raise CorruptFileError(f"{path}: affNISTdata has fields {list(names)}, missing {key!r}")
    image = np.asarray(struct["image"].reshape(-1)[0])
    label = np.asarray(struct["label_int"].reshape(-1)[0])
    if image.ndim != 2 or image.shape[0] != 1600:
        raise CorruptFileError(
            f"{path}: affNISTdata.image has shape {image.shape}, expected (1600, N)"
        )
    count = image.shape[1]
    label = label.reshape(-1)
    if label.shape[0] != count:
        raise CorruptFileError(
            f"{path}: {count} images but {label.shape[0]} labels in affNISTdata.label_int"
        )
    if image.dtype != np.uint8:
        if image.size and (image.min() < 0 or image.max() > 255):
            raise CorruptFileError(f"{path}: affNISTdata.image values outside 0..255")
        image = image.astype(np.uint8)
    if label.size and (label.min() < 0 or label.max() > 9):
        raise CorruptFileError(f"{path}: affNISTdata.label_int values outside 0..9")
    # Column n is image n in C order: (1600, N) -> (N, 1600) -> (N, 40, 40).
    images = np.ascontiguousarray(image.T).reshape(count, 40, 40)
    return images, label.astype(np.int64)


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals a pickled NumPy array needs; anything else is refused."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        if module == "_codecs":
            import codecs

            return codecs.encode
        if name == "_reconstruct":
            for candidate in ("numpy._core.multiarray", "numpy.core.multiarray"):
                try:
                    return importlib.import_module(candidate)._reconstruct
                except (ImportError, AttributeError):
                    continue
        return getattr(np, name)


def _unpickle(path: Path) -> dict:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CorruptFileError(f"cannot read {path}: {exc}") from exc
    try:
        obj = _RestrictedUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except pickle.UnpicklingError as exc:
        raise CorruptFileError(f"{path}: not a CIFAR python batch ({exc})") from exc
    except Exception as exc:  # EOFError, ValueError, ... on truncated/garbage input
        raise CorruptFileError(f"{path}: truncated or corrupt pickle ({exc!r})") from exc
    if not isinstance(obj, dict):
        raise CorruptFileError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def read_cifar_batch(path: Path, *, label_key: str = "labels") -> tuple[np.ndarray, np.ndarray]:
    """Read a CIFAR python batch (``data_batch_1`` ... ``test_batch``).

    Returns:
        ``(images, labels)``: ``images`` uint8 ``(N, 3, 32, 32)`` (the file's channel-major
        rows), ``labels`` int64 ``(N,)``.
    """
    obj = _unpickle(path)
    if "data" not in obj or label_key not in obj:
        raise CorruptFileError(
            f"{path}: keys {sorted(map(str, obj))}, expected 'data' and {label_key!r}"
        )
    data = obj["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise CorruptFileError(f"{path}: 'data' must be a 2-D uint8 array")
    if data.shape[1] != 3 * 32 * 32:
        raise CorruptFileError(f"{path}: 'data' rows have {data.shape[1]} values, expected 3072")
    labels = np.asarray(obj[label_key], dtype=np.int64).reshape(-1)
    if labels.shape[0] != data.shape[0]:
        raise CorruptFileError(f"{path}: {data.shape[0]} images but {labels.shape[0]} labels")
    return data.reshape(-1, 3, 32, 32), labels


def read_cifar_meta(path: Path, *, key: str = "label_names") -> list[str]:
    """Class names from ``batches.meta``."""
    obj = _unpickle(path)
    names = obj.get(key)
    if not isinstance(names, list):
        raise CorruptFileError(f"{path}: no list {key!r}")
    return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]


def read_image(path: Path, *, mode: str, size: tuple[int, int] | None) -> np.ndarray:
    """Decode an image file with Pillow.

    Args:
        path: PNG, JPEG, BMP, GIF, TIFF or WebP file.
        mode: ``"L"`` (grayscale) or ``"RGB"``.
        size: ``(H, W)`` to resize to (bilinear), or ``None`` to keep the size.

    Returns:
        uint8 ``(C, H, W)`` with C = 1 for ``"L"``, 3 for ``"RGB"``.
    """
    try:
        from PIL import Image
    except ImportError as exc:
        raise ImportError("reading image folders needs Pillow: pip install pillow") from exc
    try:
        with Image.open(path) as opened:
            img = opened.convert(mode)
            if size is not None and img.size != (size[1], size[0]):
                img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            array = np.asarray(img, dtype=np.uint8)
    except (OSError, Image.DecompressionBombError, ValueError) as exc:
        raise CorruptFileError(f"{path}: cannot decode image ({exc})") from exc
    if array.ndim == 2:
        array = array[None]
    else:
        array = array.transpose(2, 0, 1)
    return np.ascontiguousarray(array)


def image_mode(path: Path) -> str:
    """Pillow mode of an image file without decoding its pixels."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.mode
    except OSError as exc:
        raise CorruptFileError(f"{path}: cannot decode image ({exc})") from exc
