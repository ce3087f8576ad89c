"""Every registered dataset on tiny real-format files: contents, splits, transforms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from data_writers import (
    fake_smallnorb,
    write_affnist_batch,
    write_cifar,
    write_mnist,
    write_png,
    write_smallnorb,
)

import capsnet.data as data
from capsnet.data import CorruptFileError, DatasetNotFoundError
from capsnet.data.smallnorb import AZIMUTH_FAMILIAR, ELEVATION_FAMILIAR

# -- registry ----------------------------------------------------------------------------


def test_registry_names_info_and_errors(mnist_root):
    names = data.list_datasets()
    for name in ["mnist", "fashion_mnist", "smallnorb", "affnist", "mnist_shifted40",
                 "affnist_generated", "multimnist", "cifar10", "folder", "npz"]:  # fmt: skip
        assert name in names
    info = data.dataset_info("smallnorb")
    assert info.input_size == (32, 32) and info.num_classes == 5 and "test_novel" in info.splits
    assert data.dataset_info("folder:/x").name == "folder"
    with pytest.raises(ValueError, match="Did you mean 'mnist'"):
        data.create("mnsit")
    with pytest.raises(ValueError, match="valid: train, test"):
        data.create("mnist", "validation")
    root, _ = mnist_root
    ds = data.create("MNIST", "train", root=root, verify=False, max_shift=None, limit=7)
    assert len(ds) == 7 and ds.train_transform.max_shift == 2  # None keeps the default


def test_mnist_dataset_contract(mnist_root):
    root, arrays = mnist_root
    ds = data.create("mnist", "test", root=root, verify=False, max_shift=3)
    assert ds.images.shape == (20, 1, 28, 28) and ds.images.dtype == torch.uint8
    assert ds.labels.dtype == torch.int64 and ds.classes == [str(i) for i in range(10)]
    assert (ds.num_classes, ds.in_channels, ds.input_size) == (10, 1, (28, 28))
    assert ds.train_transform.max_shift == 3
    image, label = ds[3]
    torch.testing.assert_close(image[0], torch.from_numpy(arrays["test"][0][3]).float() / 255)
    assert label == int(arrays["test"][1][3])
    torch.testing.assert_close(ds.label_counts().sum(), torch.tensor(20))


def test_fashion_mnist_subfolder(tmp_path):
    write_mnist(tmp_path / "fashion-mnist", n_train=10, n_test=10)
    ds = data.create("fashion_mnist", "train", root=tmp_path, verify=False)
    assert len(ds) == 10 and ds.classes[0] == "T-shirt/top" and ds.classes[9] == "Ankle boot"


def test_mnist_shifted40(mnist_root):
    root, arrays = mnist_root
    ds = data.create("mnist_shifted40", "train", root=root, verify=False)
    assert ds.input_size == (40, 40) and ds.images.shape[-1] == 28
    x = ds.images[:8].float() / 255
    centred = ds.eval_transform(x)
    torch.testing.assert_close(centred[:, :, 6:34, 6:34], x)
    moved = ds.train_transform(x, torch.Generator().manual_seed(0))
    assert moved.shape == (8, 1, 40, 40)
    torch.testing.assert_close(moved.sum((1, 2, 3)), x.sum((1, 2, 3)))
    batch = next(iter(data.BatchLoader(ds, 4)))[0]
    assert batch.shape == (4, 1, 40, 40)


# -- smallNORB ---------------------------------------------------------------------------


@pytest.fixture
def norb_root(tmp_path):
    root = tmp_path / "root"
    train = fake_smallnorb(size=8, instances=(4,), seed=0)
    test = fake_smallnorb(size=8, instances=(0,), seed=1)
    write_smallnorb(root / "smallnorb", "train", *train, gz=True)
    write_smallnorb(root / "smallnorb", "test", *test)
    return root, train, test


NORB = dict(verify=False, size=4, crop_size=2)


def test_smallnorb_contents_and_preprocessing(norb_root):
    root, (dat, cat, info), _ = norb_root
    ds = data.create("smallnorb", "train", root=root, **NORB)
    assert len(ds) == 5 * 9 * 18 and ds.classes == ["animal", "human", "airplane", "truck", "car"]
    assert ds.images.shape == (810, 1, 4, 4) and ds.input_size == (2, 2)
    # 2x2 area downsampling of the left camera
    expected = torch.from_numpy(dat[:, :1]).float().view(810, 1, 4, 2, 4, 2).mean((3, 5))
    torch.testing.assert_close(ds.images.float(), expected.round(), atol=0, rtol=0)
    torch.testing.assert_close(ds.labels, torch.from_numpy(cat).long())
    torch.testing.assert_close(ds.info, torch.from_numpy(info).long())
    x = ds.images[:6].float() / 255
    ev = ds.eval_transform(x)
    assert ev.shape == (6, 1, 2, 2)
    std = (x - x.mean((1, 2, 3), keepdim=True)) / x.std((1, 2, 3), correction=0, keepdim=True)
    torch.testing.assert_close(ev, std[:, :, 1:3, 1:3], atol=1e-5, rtol=1e-5)
    tr = ds.train_transform(x, torch.Generator().manual_seed(0))
    assert tr.shape == (6, 1, 2, 2) and torch.isfinite(tr).all()
    both = data.create("smallnorb", "test", root=root, channels="both", **NORB)
    assert both.in_channels == 2 and both.images.shape[1] == 2


def test_smallnorb_viewpoint_splits_exact_sets(norb_root):
    root = norb_root[0]
    az_train = data.create("smallnorb", "train", root=root, viewpoint="azimuth", **NORB)
    az_fam = data.create("smallnorb", "test_familiar", root=root, viewpoint="azimuth", **NORB)
    az_nov = data.create("smallnorb", "test_novel", root=root, viewpoint="azimuth", **NORB)
    degrees = lambda ds: set((ds.info[:, 2] * 10).tolist())  # noqa: E731
    assert degrees(az_train) == degrees(az_fam) == {300, 320, 340, 0, 20, 40}
    assert degrees(az_nov) == set(range(60, 290, 20))
    assert len(az_fam) + len(az_nov) == 810 and len(az_train) == 810 // 3
    assert (az_train.info[:, 0] == 4).all() and (az_fam.info[:, 0] == 0).all()  # right files
    el_train = data.create("smallnorb", "train", root=root, viewpoint="elevation", **NORB)
    el_nov = data.create("smallnorb", "test_novel", root=root, viewpoint="elevation", **NORB)
    elev_deg = lambda ds: set((30 + 5 * ds.info[:, 1]).tolist())  # noqa: E731
    assert elev_deg(el_train) == {30, 35, 40}
    assert elev_deg(el_nov) == {45, 50, 55, 60, 65, 70}
    assert set(AZIMUTH_FAMILIAR) == {0, 2, 4, 30, 32, 34} and ELEVATION_FAMILIAR == (0, 1, 2)
    whole = data.create("smallnorb", "test", root=root, viewpoint="azimuth", **NORB)
    assert len(whole) == 810
    # images, labels and info are sliced together
    novel = data.viewpoint_mask(whole.info, "azimuth", familiar=False)
    assert torch.equal(az_nov.labels, whole.labels[novel])
    assert torch.equal(az_nov.images, whole.images[novel])
    assert az_nov.label_counts().tolist() == [12 * 9] * 5
    with pytest.raises(ValueError, match="needs viewpoint"):
        data.create("smallnorb", "test_novel", root=root, **NORB)


def test_smallnorb_cache_and_checks(norb_root):
    root = norb_root[0]
    first = data.create("smallnorb", "test", root=root, **NORB)
    assert first.meta["cache"] is False and any((root / "processed").iterdir())
    again = data.create("smallnorb", "test", root=root, **NORB)
    assert again.meta["cache"] is True and torch.equal(again.images, first.images)
    with pytest.raises(CorruptFileError, match="MD5"):
        data.create("smallnorb", "test", root=root, size=4, crop_size=2, cache=False)


def test_smallnorb_bad_info_and_missing(tmp_path, norb_root):
    dat, cat, info = fake_smallnorb(size=4)
    info[0, 2] = 35  # azimuth codes are even 0..34
    write_smallnorb(tmp_path / "bad", "train", dat, cat, info)
    with pytest.raises(CorruptFileError, match="azimuth outside"):
        data.create("smallnorb", "train", root=tmp_path / "bad", verify=False, size=4,
                    crop_size=2)  # fmt: skip
    assert not (tmp_path / "bad" / "processed").exists()  # nothing cached from a bad read
    with pytest.raises(DatasetNotFoundError, match="training-dat.mat"):
        data.create("smallnorb", "train", root=tmp_path / "nothing")


# -- affNIST -----------------------------------------------------------------------------


def test_affnist_batches(tmp_path):
    pytest.importorskip("scipy")
    rng = np.random.default_rng(0)
    folder = tmp_path / "affnist" / "test_batches"
    written = {}
    for b in (1, 2, 10):
        images = rng.integers(0, 256, (4, 40, 40), dtype=np.uint8)
        labels = rng.integers(0, 10, 4)
        write_affnist_batch(folder / f"{b}.mat", images, labels)
        written[b] = (images, labels)
    ds = data.create("affnist", "test", root=tmp_path, verify=False)
    assert ds.images.shape == (12, 1, 40, 40) and ds.input_size == (40, 40)
    assert ds.batch.tolist() == [1] * 4 + [2] * 4 + [10] * 4  # numeric, not string, order
    np.testing.assert_array_equal(ds.images[8:, 0].numpy(), written[10][0])
    np.testing.assert_array_equal(ds.labels[:4].numpy(), written[1][1])
    sub = data.create("affnist", "test", root=tmp_path, batches=[2], verify=False)
    np.testing.assert_array_equal(sub.images[:, 0].numpy(), written[2][0])
    with pytest.raises(CorruptFileError, match="expected batches 1..32"):
        data.create("affnist", "test", root=tmp_path)
    with pytest.raises(DatasetNotFoundError, match=r"\[5\]"):
        data.create("affnist", "test", root=tmp_path, batches=[5])


def test_affnist_single_file_and_missing(tmp_path):
    pytest.importorskip("scipy")
    images = np.zeros((3, 40, 40), np.uint8)
    images[:, 0, 39] = 200
    write_affnist_batch(tmp_path / "test.mat", images, np.array([1, 2, 3]))
    ds = data.create("affnist", "test", root=tmp_path, verify=False)
    assert ds.images[:, 0, 0, 39].tolist() == [200] * 3 and ds.labels.tolist() == [1, 2, 3]
    with pytest.raises(DatasetNotFoundError) as err:
        data.create("affnist", "test", root=tmp_path / "none")
    assert "test_batches.zip" in str(err.value) and "affnist_generated" in str(err.value)


# -- generated ---------------------------------------------------------------------------


def test_affnist_generated_deterministic_and_inside(mnist_root):
    root, _ = mnist_root
    a = data.create("affnist_generated", "test", root=root, verify=False, seed=3, progress=False)
    b = data.create("affnist_generated", "test", root=root, verify=False, seed=3, progress=False)
    c = data.create("affnist_generated", "test", root=root, verify=False, seed=4, progress=False)
    assert a.images.shape == (20, 1, 40, 40) and a.input_size == (40, 40)
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)
    src = data.create("mnist", "test", root=root, verify=False)
    assert torch.equal(a.labels, src.labels[a.source_index])
    ratio = a.images.float().sum((1, 2, 3)) / src.images.float().sum((1, 2, 3))
    det = torch.linalg.det(a.affine)
    torch.testing.assert_close(ratio, det, atol=0.05, rtol=0.05)  # nothing cut off
    assert "self-generated" in a.meta["note"]
    two = data.create("affnist_generated", "test", root=root, verify=False, seed=3, copies=2)
    assert len(two) == 40 and torch.equal(two.images[:20], a.images)
    assert two.source_index.tolist() == list(range(20)) * 2
    assert not torch.equal(two.images[20:], a.images)


def test_multimnist_determinism_and_labels(mnist_root):
    root, _ = mnist_root
    kw = dict(root=root, verify=False, pairs_per_digit=3, progress=False)
    ds = data.create("multimnist", "train", seed=1, **kw)
    again = data.create("multimnist", "train", seed=1, **kw)
    other = data.create("multimnist", "train", seed=2, **kw)
    assert isinstance(ds, data.MultiMNISTDataset)
    assert ds.images.shape == (180, 1, 36, 36) and ds.input_size == (36, 36)
    assert torch.equal(ds.images, again.images) and torch.equal(ds.labels2, again.labels2)
    assert not torch.equal(ds.images, other.images)
    src = data.create("mnist", "train", root=root, verify=False)
    assert (ds.labels != ds.labels2).all()
    assert torch.equal(ds.labels, src.labels[ds.pairs[:, 0]])
    assert torch.equal(ds.labels2, src.labels[ds.pairs[:, 1]])
    assert torch.equal(ds.pairs[:, 0], torch.arange(60).repeat_interleave(3))
    # each digit shifted by at most 4 px from the centred position (4, 4)
    assert ((ds.positions - 4).abs() <= 4).all()
    parts = ds.components()
    assert parts.shape == (180, 2, 1, 36, 36)
    merged = (parts[:, 0].int() + parts[:, 1].int()).clamp(max=255).to(torch.uint8)
    assert torch.equal(merged, ds.images)
    for k in (0, 77, 179):
        for j in (0, 1):
            r, c = ds.positions[k, j].tolist()
            assert torch.equal(
                parts[k, j, 0, r : r + 28, c : c + 28], src.images[ds.pairs[k, j], 0]
            )
            assert parts[k, j].sum() == src.images[ds.pairs[k, j]].sum()
    hot = ds.multi_hot(torch.tensor([0, 1]))
    assert hot.sum(1).tolist() == [2.0, 2.0]
    test = data.create("multimnist", "test", seed=1, **kw)
    assert len(test) == 60
    sub = ds.subset(torch.tensor([5, 6]))
    assert torch.equal(sub.components(), parts[5:7])


# -- CIFAR-10 ----------------------------------------------------------------------------


def test_cifar10_batches_and_presets(tmp_path):
    written = write_cifar(tmp_path / "cifar10" / "cifar-10-batches-py", per_batch=4)
    ds = data.create("cifar10", "train", root=tmp_path, verify=False)
    assert ds.images.shape == (20, 3, 32, 32) and ds.classes[1] == "automobile"
    assert torch.equal(ds.images[4:8].reshape(4, -1), torch.from_numpy(written["data_batch_2"]))
    x = ds.images[:5].float() / 255
    assert ds.train_transform(x, torch.Generator().manual_seed(0)).shape == (5, 3, 32, 32)
    sab = data.create("cifar10", "test", root=tmp_path, verify=False, preprocessing="sabour")
    assert sab.input_size == (24, 24) and len(sab) == 4
    assert sab.eval_transform(x).shape == (5, 3, 24, 24)
    with pytest.raises(CorruptFileError, match="c99cafc152244af753f735de768cd75f"):
        data.create("cifar10", "train", root=tmp_path)
    with pytest.raises(DatasetNotFoundError, match="cifar-10-python.tar.gz"):
        data.create("cifar10", "train", root=tmp_path / "none")


# -- your own data -----------------------------------------------------------------------


def test_image_folder_with_holdout(tmp_path):
    pytest.importorskip("PIL")
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog", "emu"):
        for i in range(10):
            write_png(tmp_path / "imgs" / cls / f"{i}.png", rng.integers(0, 256, (6, 5), np.uint8))
    path = tmp_path / "imgs"
    train = data.create(f"folder:{path}", "train", input_size=(8, 8))
    test = data.create(f"folder:{path}", "test", input_size=(8, 8))
    assert train.classes == ["cat", "dog", "emu"] and train.in_channels == 1
    assert train.images.shape[1:] == (1, 8, 8) and len(train) == 27 and len(test) == 3
    assert test.label_counts().tolist() == [1, 1, 1]  # stratified
    assert not set(train.meta["files"]) & set(test.meta["files"])
    cached = data.create(f"folder:{path}", "train", input_size=(8, 8))
    assert torch.equal(cached.images, train.images)
    with pytest.raises(DatasetNotFoundError, match="nothing to test"):
        data.create("folder", "test", path=path, holdout=0.0, input_size=8)


def test_image_folder_train_test_subfolders_rgb(tmp_path):
    pytest.importorskip("PIL")
    rng = np.random.default_rng(1)
    for split, n in (("train", 4), ("test", 2)):
        for cls in ("a", "b"):
            for i in range(n):
                write_png(
                    tmp_path / split / cls / f"{i}.png", rng.integers(0, 256, (5, 5, 3), np.uint8)
                )
    train = data.create("folder", "train", path=tmp_path, augment="crop_flip", padding=1)
    test = data.create("folder", "test", path=tmp_path)
    assert train.in_channels == 3 and len(train) == 8 and len(test) == 4
    assert train.input_size == (5, 5) and test.classes == ["a", "b"]
    x, _ = next(iter(data.BatchLoader(train, 8)))
    assert x.shape == (8, 3, 5, 5)


def test_npz_dataset(tmp_path):
    path = tmp_path / "mine.npz"
    np.savez(
        path,
        x_train=np.random.default_rng(0).random((6, 7, 7), dtype=np.float32),
        y_train=np.arange(6) % 3,
        x_test=np.zeros((2, 7, 7, 3), np.uint8),
        y_test=np.array([0, 2]),
        classes=np.array(["x", "y", "z"]),
    )
    train = data.create(f"npz:{path}", "train")
    test = data.create(f"npz:{path}", "test")
    assert train.images.shape == (6, 1, 7, 7) and train.classes == ["x", "y", "z"]
    assert test.images.shape == (2, 3, 7, 7)
    with pytest.raises(ValueError, match="path"):
        data.create("npz")


def test_affnist_checksummed_on_first_use(tmp_path, monkeypatch):
    pytest.importorskip("scipy")
    import json

    import capsnet.data.affnist as A

    monkeypatch.setattr(A, "_PER_BATCH", 4)  # tiny batches pass the size check
    rng = np.random.default_rng(1)
    folder = tmp_path / "affnist" / "test_batches"
    for b in (1, 2):
        write_affnist_batch(
            folder / f"{b}.mat", rng.integers(0, 256, (4, 40, 40), dtype=np.uint8), np.arange(4)
        )
    data.create("affnist", "test", root=tmp_path, batches=[1, 2])
    record = json.loads((tmp_path / "affnist" / "capsnet-sha256.json").read_text())
    assert set(record) == {"test_batches/1.mat", "test_batches/2.mat"}
    assert all(len(v) == 64 for v in record.values())
    data.create("affnist", "test", root=tmp_path, batches=[1, 2])  # unchanged: loads
    write_affnist_batch(  # the file changes after it was first verified
        folder / "2.mat", rng.integers(0, 256, (4, 40, 40), dtype=np.uint8), np.arange(4)
    )
    with pytest.raises(CorruptFileError, match=r"2\.mat: SHA-256 .* differs"):
        data.create("affnist", "test", root=tmp_path, batches=[1, 2])
    data.create("affnist", "test", root=tmp_path, batches=[1, 2], verify=False)  # opt out


def test_image_size_is_the_former_name_of_input_size(tmp_path):
    ds = data.ImageDataset(
        torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.tensor([0, 1]), classes=["a", "b"]
    )
    assert ds.image_size == ds.input_size == (4, 4)
    with pytest.warns(DeprecationWarning, match="input_size"):
        assert data.dataset_info("mnist").image_size == (28, 28)
