"""Integration tests on the real MNIST / Fashion-MNIST files, skipped where absent.

MNIST is looked for in ``$CAPSNET_TEST_MNIST`` or ``<repo>/../shared/data/mnist``;
Fashion-MNIST in ``$CAPSNET_TEST_FASHION_MNIST`` or ``/usr/share/datasets/fashion-mnist``.
Expected counts: /work/shared/data/mnist/README.md.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import capsnet.data as data

REPO = Path(__file__).resolve().parents[2]
MNIST_DIR = Path(os.environ.get("CAPSNET_TEST_MNIST", REPO.parent / "shared" / "data" / "mnist"))
FASHION_DIR = Path(
    os.environ.get("CAPSNET_TEST_FASHION_MNIST", "/usr/share/datasets/fashion-mnist")
)


def _present(folder: Path) -> bool:
    return (folder / "train-images-idx3-ubyte.gz").is_file() or (
        folder / "train-images-idx3-ubyte"
    ).is_file()


needs_mnist = pytest.mark.skipif(not _present(MNIST_DIR), reason=f"no MNIST in {MNIST_DIR}")
needs_fashion = pytest.mark.skipif(
    not _present(FASHION_DIR), reason=f"no Fashion-MNIST in {FASHION_DIR}"
)

TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.mark.realdata
@needs_mnist
def test_full_mnist_verified_counts_and_labels():
    # root one level up with the standard "mnist" sub-folder, as on our machines
    train = data.create("mnist", "train", root=MNIST_DIR.parent)
    test = data.create("mnist", "test", root=MNIST_DIR)  # root = the folder itself
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert train.label_counts().tolist() == TRAIN_COUNTS
    assert test.label_counts().tolist() == TEST_COUNTS
    assert train.labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert test.labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert train.meta["verified"] is True
    loader = data.BatchLoader(train, 128, seed=0)
    assert len(loader) == 469
    for step, (x, y) in enumerate(loader):
        assert x.shape == (128, 1, 28, 28) and y.shape == (128,)
        if step == 5:
            break
    assert x.max() <= 1.0 and x.min() >= 0.0 and torch.isfinite(x).all()


@pytest.mark.realdata
@needs_fashion
def test_full_fashion_mnist_verified():
    test = data.create("fashion_mnist", "test", root=FASHION_DIR.parent)
    assert test.images.shape == (10000, 1, 28, 28)
    assert test.label_counts().tolist() == [1000] * 10
    train = data.create("fashion_mnist", "train", root=FASHION_DIR)
    assert len(train) == 60000 and train.label_counts().tolist() == [6000] * 10
