"""CIFAR-10 (python pickle batches) for the 32x32 RGB experiments.

Files: ``cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}`` in
``<root>/cifar10`` (or ``<root>``; the batch folder itself also works), read with a
restricted unpickler that cannot run code (:func:`capsnet.data.formats.read_cifar_batch`).
Each file is checked against the official MD5 (the archive's MD5 on download).

Preprocessing presets (``preprocessing=``):

* ``"standard"`` (default): train on random 32x32 crops of the zero-padded (4 px) image
  with random horizontal flips; test on the plain image. The common CIFAR recipe.
* ``"sabour"``: Sabour et al.'s official input pipeline: train on random 24x24 crops with
  flips, test on the centre 24x24 crop, both standardised per image. (The official code
  also jitters brightness and contrast *before* standardising, which the standardisation
  undoes, so those steps are omitted here.)
"""

from __future__ import annotations

import tarfile
import tempfile
from pathlib import Path

import numpy as np
import torch

from capsnet.data.dataset import ImageDataset
from capsnet.data.formats import read_cifar_batch, read_cifar_meta
from capsnet.data.registry import register_dataset
from capsnet.data.sources import (
    CorruptFileError,
    DatasetNotFoundError,
    check_md5,
    download_file,
    resolve_root,
)
from capsnet.data.transforms import CenterCrop, Compose, RandomCrop, RandomFlip, Standardize

__all__ = [
    "CIFAR10_URL",
    "CIFAR10_ARCHIVE_MD5",
    "CIFAR10_FILES",
    "find_cifar10",
    "download_cifar10",
]

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_FOLDER = "cifar-10-batches-py"
#: official MD5s of the files inside the archive.
CIFAR10_FILES = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
}
_SPLIT_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
_CLASSES = [
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


def _candidates(root: Path) -> list[Path]:
    return [
        root / "cifar10" / CIFAR10_FOLDER,
        root / "cifar-10" / CIFAR10_FOLDER,
        root / CIFAR10_FOLDER,
        root,
    ]


def find_cifar10(root: Path, split: str) -> Path | None:
    """The folder holding the split's batch files, or ``None``."""
    for folder in _candidates(root):
        if all((folder / name).is_file() for name in _SPLIT_FILES[split]):
            return folder
    return None


def download_cifar10(root: Path, *, url: str = CIFAR10_URL, progress: bool = True) -> Path:
    """Download the archive (MD5-checked), extract its batch files safely, verify each one,
    and move them into ``<root>/cifar10/cifar-10-batches-py``.
    """
    parent = root / "cifar10"
    parent.mkdir(parents=True, exist_ok=True)
    final = parent / CIFAR10_FOLDER
    with tempfile.TemporaryDirectory(dir=parent, prefix=".cifar10-") as tmp:
        tmp_dir = Path(tmp)
        archive = download_file(
            [url],
            tmp_dir / "cifar-10-python.tar.gz",
            md5=CIFAR10_ARCHIVE_MD5,
            md5_of="file",
            progress=progress,
        )
        staged = tmp_dir / CIFAR10_FOLDER
        staged.mkdir()
        try:
            with tarfile.open(archive, "r:gz") as tar:
                for member in tar.getmembers():
                    name = Path(member.name).name
                    if not member.isfile() or name not in CIFAR10_FILES:
                        continue
                    src = tar.extractfile(member)
                    if src is None:
                        continue
                    data = src.read()
                    check_md5(data, CIFAR10_FILES[name], Path(member.name), what="file")
                    (staged / name).write_bytes(data)
        except tarfile.TarError as exc:
            raise CorruptFileError(f"{archive}: not a valid tar.gz archive ({exc})") from exc
        missing = [n for n in CIFAR10_FILES if not (staged / n).is_file()]
        if missing:
            raise CorruptFileError(f"{archive}: missing {missing}")
        final.mkdir(exist_ok=True)
        for name in CIFAR10_FILES:
            (staged / name).replace(final / name)
    return final


def _not_found(root: Path, split: str) -> DatasetNotFoundError:
    names = "\n".join(f"  {n}  (MD5 {CIFAR10_FILES[n]})" for n in _SPLIT_FILES[split])
    folders = ", ".join(str(p) for p in _candidates(root))
    return DatasetNotFoundError(
        f"CIFAR-10 ({split}) not found. Looked for:\n{names}\nin: {folders}\n"
        f"Standard source: {CIFAR10_URL} (MD5 {CIFAR10_ARCHIVE_MD5}). Pass download=True "
        f"(CLI: --download) to fetch it into {root / 'cifar10'}, or point root= "
        "(CLI: --data-root) or $CAPSNET_DATA at the folder that holds it."
    )


@register_dataset(
    input_size=(32, 32),
    in_channels=3,
    num_classes=10,
    paper="Sabour et al. 2017 (CIFAR-10 10.6 %, 7-model ensemble)",
    description="CIFAR-10 32x32 RGB; train: pad-4 random crop + flip ('sabour': 24x24)",
    download=True,
)
def cifar10(
    split: str = "train",
    root=None,
    download: bool = False,
    *,
    preprocessing: str = "standard",
    padding: int = 4,
    verify: bool = True,
    progress: bool = True,
) -> ImageDataset:
    """CIFAR-10 50,000/10,000 (options: ``preprocessing="standard"|"sabour"``, ``padding``)."""
    if preprocessing not in ("standard", "sabour"):
        raise ValueError(f"preprocessing must be 'standard' or 'sabour', got {preprocessing!r}")
    root_path = resolve_root(root)
    folder = find_cifar10(root_path, split)
    if folder is None:
        if not download:
            raise _not_found(root_path, split)
        folder = download_cifar10(root_path, progress=progress)
    # Every file read is checked, batches.meta (the class names) included.
    meta_path = folder / "batches.meta"
    needed = [*_SPLIT_FILES[split], *(["batches.meta"] if meta_path.is_file() else [])]
    if verify:
        for name in needed:
            path = folder / name
            try:
                check_md5(path.read_bytes(), CIFAR10_FILES[name], path, what="file")
            except CorruptFileError:
                if not download:
                    raise
                folder = download_cifar10(root_path, progress=progress)
                meta_path = folder / "batches.meta"
    images, labels = [], []
    for name in _SPLIT_FILES[split]:
        x, y = read_cifar_batch(folder / name)
        images.append(x)
        labels.append(y)
    classes = read_cifar_meta(meta_path) if meta_path.is_file() else list(_CLASSES)
    if len(classes) != 10:
        raise CorruptFileError(f"{meta_path}: {len(classes)} class names, expected 10")
    if preprocessing == "standard":
        train = Compose([RandomCrop(32, padding=padding), RandomFlip()])
        evaluate = None
    else:
        train = Compose([RandomCrop(24), RandomFlip(), Standardize()])
        evaluate = Compose([CenterCrop(24), Standardize()])
    return ImageDataset(
        torch.from_numpy(np.concatenate(images)),
        torch.from_numpy(np.concatenate(labels)),
        classes=classes,
        name="cifar10",
        split=split,
        train_transform=train,
        eval_transform=evaluate,
        meta={"files": [str(folder / n) for n in needed], "verified": verify},
    )
