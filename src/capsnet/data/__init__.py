"""capsnet.data: every dataset of both papers, fast batched augmentation, a batch loader.

Quick start::

    import capsnet.data as data

    train = data.create("mnist", "train", root="/work/shared/data")  # or download=True
    loader = data.BatchLoader(train, batch_size=128, seed=0, device="auto")
    for epoch in range(10):
        loader.set_epoch(epoch)
        for images, labels in loader:  # float32 (128, 1, 28, 28), int64 (128,)
            ...

Datasets (:func:`list_datasets`): ``mnist``, ``fashion_mnist``, ``smallnorb``, ``affnist``,
``mnist_shifted40``, ``affnist_generated``, ``multimnist``, ``toynorb`` (rendered
locally), ``cifar10``, ``folder:PATH``, ``npz:PATH``; and :func:`from_arrays` for arrays
in memory. Each split is one uint8 tensor in memory; augmentation runs on whole batches
on the model's device. Data root: ``root=`` > ``$CAPSNET_DATA`` > ``~/.cache/capsnet``.
See ``docs/data.md``.
"""

from __future__ import annotations

# The dataset modules register themselves on import.
from capsnet.data import affnist, cifar, custom, generated, mnist, smallnorb, toynorb, transforms
from capsnet.data.custom import from_arrays
from capsnet.data.dataset import ImageDataset, as_uint8_images, to_float
from capsnet.data.generated import MultiMNISTDataset
from capsnet.data.loader import BatchLoader, derive_seed, resolve_device
from capsnet.data.registry import (
    DatasetInfo,
    create,
    dataset_info,
    list_datasets,
    register_dataset,
)
from capsnet.data.smallnorb import viewpoint_mask
from capsnet.data.sources import (
    DEFAULT_ROOT,
    ENV_VAR,
    CorruptFileError,
    DataError,
    DatasetNotFoundError,
    resolve_root,
)

__all__ = [
    "ImageDataset",
    "MultiMNISTDataset",
    "BatchLoader",
    "DatasetInfo",
    "create",
    "list_datasets",
    "dataset_info",
    "register_dataset",
    "from_arrays",
    "viewpoint_mask",
    "resolve_root",
    "resolve_device",
    "derive_seed",
    "to_float",
    "as_uint8_images",
    "transforms",
    "DataError",
    "DatasetNotFoundError",
    "CorruptFileError",
    "ENV_VAR",
    "DEFAULT_ROOT",
    "affnist",
    "cifar",
    "custom",
    "generated",
    "mnist",
    "smallnorb",
    "toynorb",
]
