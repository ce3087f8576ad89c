"""affNIST: the official test set of Sabour et al. 2017's generalisation experiment.

affNIST (Tijmen Tieleman, cs.toronto.edu) warps each MNIST test digit 32 times with a
random affine map onto a 40x40 canvas: 320,000 test images in 32 MATLAB batches. Files,
in ``<root>/affnist`` (also ``<root>/affNIST`` or ``<root>``)::

    test_batches/1.mat ... test_batches/32.mat     (test_batches.zip, about 70 MB)
or  test.mat                                       (test.mat.zip, all 320,000 at once)

Each holds a struct ``affNISTdata`` with ``image`` (1600 x N uint8, one image per column,
each column a 40x40 image in row-major order) and ``label_int`` (1 x N); see
:func:`capsnet.data.formats.read_affnist_mat`. No official checksums are published, so
files are verified by format and shape (with ``verify=True``: 10,000 images per batch,
320,000 in all) and then checksummed on first use: the SHA-256 of every batch that passed
is recorded in ``<folder>/capsnet-sha256.json`` and checked on every later load, so a file
that changes afterwards (a torn copy, a flipped bit) is refused. ``download=True`` fetches
``test_batches.zip`` and extracts it safely.

Reading needs SciPy (imported lazily). The model sees the 40x40 images as they are; the
matching training input is ``mnist_shifted40``; ``affnist_generated`` is a self-generated
stand-in where affNIST cannot be downloaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from capsnet.data.dataset import ImageDataset
from capsnet.data.formats import read_affnist_mat
from capsnet.data.registry import register_dataset
from capsnet.data.sources import (
    CorruptFileError,
    DataError,
    DatasetNotFoundError,
    candidate_folders,
    download_file,
    resolve_root,
)
from capsnet.io import atomic_write

__all__ = ["AFFNIST_URLS", "find_affnist_batches", "download_affnist_test"]

AFFNIST_URLS = {
    "test_batches": "https://www.cs.toronto.edu/~tijmen/affNIST/32x/transformed/test_batches.zip",
    "test": "https://www.cs.toronto.edu/~tijmen/affNIST/32x/transformed/test.mat.zip",
}
_SUBDIRS = ("affnist", "affNIST")
_BATCHES = 32
_PER_BATCH = 10_000
_BATCH_RE = re.compile(r"^(\d+)\.mat$")


_CHECKSUMS = "capsnet-sha256.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _recorded_checksums(folder: Path) -> dict[str, str]:
    """The SHA-256 of each batch recorded when it was first verified (``{}`` if none)."""
    path = folder / _CHECKSUMS
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CorruptFileError(f"{path}: unreadable checksum record ({exc})") from exc
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise CorruptFileError(f"{path}: not a {{file: sha256}} record")
    return data


def _record_checksums(folder: Path, checksums: dict[str, str]) -> None:
    """Write the record; a read-only data folder just goes without one."""
    with contextlib.suppress(OSError):
        atomic_write(folder / _CHECKSUMS, json.dumps(checksums, indent=1, sort_keys=True))


def find_affnist_batches(root: Path) -> tuple[Path, list[Path]] | None:
    """The folder and ``.mat`` files of the affNIST test set under ``root``, or ``None``.

    Looks in ``<root>/affnist``, ``<root>/affNIST`` and ``<root>``, for
    ``test_batches/<i>.mat`` (sorted by ``i``), then ``test.mat``.
    """
    for folder in candidate_folders(root, _SUBDIRS):
        batch_dir = folder / "test_batches"
        if batch_dir.is_dir():
            numbered = [
                (int(m.group(1)), p)
                for p in batch_dir.iterdir()
                if p.is_file() and (m := _BATCH_RE.match(p.name))
            ]
            if numbered:
                return folder, [p for _, p in sorted(numbered)]
        if (folder / "test.mat").is_file():
            return folder, [folder / "test.mat"]
    return None


def _safe_extract_mats(archive: Path, dest: Path) -> list[Path]:
    """Extract the ``<i>.mat`` members of a zip into ``dest`` (flattened; nothing else)."""
    written = []
    try:
        with zipfile.ZipFile(archive) as zf:
            for member in zf.infolist():
                base = Path(member.filename).name
                if member.is_dir() or not (_BATCH_RE.match(base) or base == "test.mat"):
                    continue
                target = dest / base
                with zf.open(member) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out)
                written.append(target)
    except zipfile.BadZipFile as exc:
        raise CorruptFileError(f"{archive}: not a valid zip archive ({exc})") from exc
    if not written:
        raise CorruptFileError(f"{archive}: no affNIST .mat batches inside")
    return written


def download_affnist_test(root: Path, *, url: str | None = None, progress: bool = True) -> Path:
    """Download and extract ``test_batches.zip`` into ``<root>/affnist/test_batches``.

    The archive is downloaded to a temporary file, every batch extracted into a temporary
    folder and checked by format, and only then is the folder renamed into place.
    """
    dest_parent = root / _SUBDIRS[0]
    dest_parent.mkdir(parents=True, exist_ok=True)
    final = dest_parent / "test_batches"
    with tempfile.TemporaryDirectory(dir=dest_parent, prefix=".affnist-") as tmp:
        tmp_dir = Path(tmp)
        archive = download_file(
            [url or AFFNIST_URLS["test_batches"]], tmp_dir / "test_batches.zip", progress=progress
        )
        staged = tmp_dir / "test_batches"
        staged.mkdir()
        for path in _safe_extract_mats(archive, staged):
            read_affnist_mat(path)  # raises CorruptFileError on a bad batch
        if final.exists():
            shutil.rmtree(final)
        staged.rename(final)
    return final


@register_dataset(
    splits=("test",),
    input_size=(40, 40),
    in_channels=1,
    num_classes=10,
    paper="Sabour et al. 2017, affNIST generalisation (79 % CapsNet vs 66 % CNN)",
    description="official affNIST test set, 320,000 affine-warped MNIST digits, 40x40",
    download=True,
)
def affnist(
    split: str = "test",
    root=None,
    download: bool = False,
    *,
    batches: Sequence[int] | None = None,
    verify: bool = True,
    progress: bool = True,
) -> ImageDataset:
    """The official affNIST test set (split ``"test"``).

    Args:
        batches: 1-based batch numbers to load (e.g. ``[1]`` for the first 10,000
            images); default all. Only with the ``test_batches`` layout.
        verify: require the official sizes (10,000 images per batch; all 32 batches when
            ``batches`` is None).

    Extras: ``batch`` ``(N,)``: the 1-based batch each image came from.
    """
    root_path = resolve_root(root)
    found = find_affnist_batches(root_path)
    if found is None:
        if not download:
            folders = ", ".join(str(p) for p in candidate_folders(root_path, _SUBDIRS))
            raise DatasetNotFoundError(
                "affNIST test set not found. Looked for test_batches/1.mat ... 32.mat or "
                f"test.mat (MATLAB v5; no official checksums, verified by format) in: "
                f"{folders}\nStandard source: {AFFNIST_URLS['test_batches']} (unzip it in "
                f"{root_path / _SUBDIRS[0]}). Pass download=True (CLI: --download) to fetch "
                f"it, or point root= (CLI: --data-root) or $CAPSNET_DATA at the folder.\n"
                "Without affNIST, 'affnist_generated' builds an affNIST-style test set "
                "from MNIST."
            )
        download_affnist_test(root_path, progress=progress)
        found = find_affnist_batches(root_path)
        if found is None:  # pragma: no cover - the download just wrote them
            raise DataError("affNIST download finished but the batches are not found")
    folder, paths = found
    numbers = [int(m.group(1)) if (m := _BATCH_RE.match(p.name)) else 0 for p in paths]
    if batches is not None:
        wanted = [int(b) for b in batches]
        by_number = dict(zip(numbers, paths, strict=True))
        missing = [b for b in wanted if b not in by_number]
        if missing:
            raise DatasetNotFoundError(
                f"affNIST batches {missing} not found in {folder / 'test_batches'} "
                f"(present: {sorted(by_number)})"
            )
        numbers, paths = wanted, [by_number[b] for b in wanted]
    elif verify and numbers != [0] and numbers != list(range(1, _BATCHES + 1)):
        raise CorruptFileError(
            f"{folder / 'test_batches'}: expected batches 1..{_BATCHES}, found {numbers} "
            "(pass batches=[...] to load a subset, or verify=False)"
        )
    images, labels, batch_ids = [], [], []
    recorded = _recorded_checksums(folder) if verify else {}
    fresh: dict[str, str] = {}
    for number, path in zip(numbers, paths, strict=True):
        digest = _sha256(path) if verify else ""
        key = path.relative_to(folder).as_posix()
        if verify and key in recorded and recorded[key] != digest:
            raise CorruptFileError(
                f"{path}: SHA-256 {digest} differs from the {recorded[key]} recorded when it "
                f"was first verified ({folder / _CHECKSUMS}); the file changed since. Replace "
                "it (or delete the record to accept the new file)"
            )
        x, y = read_affnist_mat(path)
        expected = _PER_BATCH if number else _PER_BATCH * _BATCHES
        if verify and x.shape[0] != expected:
            raise CorruptFileError(f"{path}: {x.shape[0]} images, expected {expected}")
        if verify and key not in recorded:
            fresh[key] = digest
        images.append(x)
        labels.append(y)
        batch_ids.append(np.full(x.shape[0], number, dtype=np.int64))
    if fresh:
        _record_checksums(folder, {**recorded, **fresh})
    image_tensor = torch.from_numpy(np.concatenate(images)).unsqueeze(1)
    return ImageDataset(
        image_tensor,
        torch.from_numpy(np.concatenate(labels)),
        classes=[str(d) for d in range(10)],
        name="affnist",
        split=split,
        extras={"batch": torch.from_numpy(np.concatenate(batch_ids))},
        meta={
            "files": [str(p) for p in paths],
            "verified": verify,
            "checksums": f"none published; SHA-256 recorded on first use in {_CHECKSUMS}",
        },
    )
