"""File-format parsers: round trips on real-format files and clear errors on bad ones."""

from __future__ import annotations

import gzip
import pickle

import numpy as np
import pytest
from data_writers import (
    idx_bytes,
    smallnorb_bytes,
    write_affnist_batch,
    write_cifar,
    write_png,
)

from capsnet.data.formats import (
    IDX_IMAGES_MAGIC,
    IDX_LABELS_MAGIC,
    parse_idx,
    parse_smallnorb,
    read_affnist_mat,
    read_cifar_batch,
    read_cifar_meta,
    read_image,
)
from capsnet.data.sources import CorruptFileError, read_file_bytes

# -- IDX ---------------------------------------------------------------------------------


def test_idx_round_trip_images_and_labels():
    images = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    labels = np.array([7, 0, 9], dtype=np.uint8)
    got = parse_idx(idx_bytes(images), "x", magic=IDX_IMAGES_MAGIC)
    np.testing.assert_array_equal(got, images)
    np.testing.assert_array_equal(parse_idx(idx_bytes(labels), "y", magic=IDX_LABELS_MAGIC), labels)


def test_idx_header_is_big_endian_and_magic_checked():
    content = idx_bytes(np.zeros((2, 3, 3), np.uint8))
    assert content[:4] == bytes([0, 0, 8, 3]) and content[4:8] == (2).to_bytes(4, "big")
    with pytest.raises(CorruptFileError, match="expected 0x00000801"):
        parse_idx(content, "imgs.idx", magic=IDX_LABELS_MAGIC)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\x00\x00", "too short"),
        (b"\x12\x34\x56\x78" + b"\x00" * 20, "bad IDX magic"),
        (bytes([0, 0, 8, 3]) + (5).to_bytes(4, "big"), "truncated IDX header"),
    ],
)
def test_idx_rejects_garbage(content, message):
    with pytest.raises(CorruptFileError, match=message):
        parse_idx(content, "some/file")


def test_idx_truncated_data_names_file_and_sizes():
    content = idx_bytes(np.zeros((10, 28, 28), np.uint8))[:-100]
    with pytest.raises(CorruptFileError) as err:
        parse_idx(content, "train-images-idx3-ubyte", magic=IDX_IMAGES_MAGIC)
    text = str(err.value)
    assert "train-images-idx3-ubyte" in text and "(10, 28, 28)" in text and "truncated" in text


def test_gzip_detected_by_magic_and_truncated_gzip_is_an_error(tmp_path):
    raw = idx_bytes(np.ones((4, 2, 2), np.uint8))
    good = tmp_path / "a.gz"
    good.write_bytes(gzip.compress(raw))
    assert read_file_bytes(good) == raw
    plain = tmp_path / "plain"
    plain.write_bytes(raw)
    assert read_file_bytes(plain) == raw
    bad = tmp_path / "b.gz"
    bad.write_bytes(gzip.compress(raw)[:-12])
    with pytest.raises(CorruptFileError, match="b.gz"):
        read_file_bytes(bad)
    fake = tmp_path / "c.gz"
    fake.write_bytes(b"not gzip at all")
    with pytest.raises(CorruptFileError, match="gzip magic"):
        read_file_bytes(fake)


# -- smallNORB ---------------------------------------------------------------------------


def test_smallnorb_round_trip_dat_cat_info():
    dat = np.random.default_rng(0).integers(0, 256, (3, 2, 4, 4), dtype=np.uint8)
    cat = np.array([0, 4, 2], dtype=np.int32)
    info = np.array([[4, 0, 0, 0], [6, 8, 34, 5], [9, 3, 10, 2]], dtype=np.int32)
    np.testing.assert_array_equal(parse_smallnorb(smallnorb_bytes(dat), "d", ndim=4), dat)
    # rank-1 and rank-2 matrices store max(3, ndim) sizes (padding 1s)
    cat_bytes = smallnorb_bytes(cat)
    assert len(cat_bytes) == 8 + 12 + 12
    np.testing.assert_array_equal(parse_smallnorb(cat_bytes, "c", dtype="<i4", ndim=1), cat)
    np.testing.assert_array_equal(parse_smallnorb(smallnorb_bytes(info), "i", ndim=2), info)


def test_smallnorb_errors():
    good = smallnorb_bytes(np.zeros((2, 2, 3, 3), np.uint8))
    with pytest.raises(CorruptFileError, match="bad smallNORB magic"):
        parse_smallnorb(b"\x00\x00\x00\x00" + good[4:], "f.mat")
    with pytest.raises(CorruptFileError, match="truncated or corrupt"):
        parse_smallnorb(good[:-5], "f.mat")
    with pytest.raises(CorruptFileError, match="expected <i4"):
        parse_smallnorb(good, "f.mat", dtype="<i4")
    with pytest.raises(CorruptFileError, match="rank 4, expected 1"):
        parse_smallnorb(good, "f.mat", ndim=1)
    with pytest.raises(CorruptFileError, match="too short"):
        parse_smallnorb(b"\x55\x4c", "f.mat")


# -- affNIST -----------------------------------------------------------------------------


def test_affnist_mat_layout_round_trip(tmp_path):
    pytest.importorskip("scipy")
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (5, 40, 40), dtype=np.uint8)
    images[0] = 0
    images[0, 3, 30] = 255  # an asymmetric marker: row 3, column 30
    labels = np.array([3, 1, 4, 1, 5])
    path = tmp_path / "1.mat"
    write_affnist_batch(path, images, labels)
    got, got_labels = read_affnist_mat(path)
    assert got.dtype == np.uint8 and got.shape == (5, 40, 40)
    np.testing.assert_array_equal(got, images)
    assert got[0, 3, 30] == 255 and got[0, 30, 3] == 0
    np.testing.assert_array_equal(got_labels, labels)


def test_affnist_mat_errors(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    garbage = tmp_path / "garbage.mat"
    garbage.write_bytes(b"this is not a MATLAB file" * 10)
    with pytest.raises(CorruptFileError, match="garbage.mat"):
        read_affnist_mat(garbage)
    other = tmp_path / "other.mat"
    scipy_io.savemat(str(other), {"something": np.zeros((2, 2))})
    with pytest.raises(CorruptFileError, match="no variable 'affNISTdata'"):
        read_affnist_mat(other)
    wrong = tmp_path / "wrong.mat"
    scipy_io.savemat(
        str(wrong),
        {"affNISTdata": {"image": np.zeros((784, 3), np.uint8), "label_int": np.zeros((1, 3))}},
    )
    with pytest.raises(CorruptFileError, match=r"\(1600, N\)"):
        read_affnist_mat(wrong)
    missing = tmp_path / "missing.mat"
    scipy_io.savemat(str(missing), {"affNISTdata": {"image": np.zeros((1600, 3), np.uint8)}})
    with pytest.raises(CorruptFileError, match="missing 'label_int'"):
        read_affnist_mat(missing)


# -- CIFAR -------------------------------------------------------------------------------


def test_cifar_batch_round_trip(tmp_path):
    written = write_cifar(tmp_path, per_batch=4)
    images, labels = read_cifar_batch(tmp_path / "data_batch_2")
    assert images.shape == (4, 3, 32, 32) and images.dtype == np.uint8
    np.testing.assert_array_equal(images.reshape(4, -1), written["data_batch_2"])
    assert labels.dtype == np.int64 and labels.shape == (4,)
    assert read_cifar_meta(tmp_path / "batches.meta")[:2] == ["airplane", "automobile"]


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned",))


def test_cifar_restricted_unpickler_refuses_code(tmp_path):
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": _Evil(), b"labels": [0]}, protocol=2))
    with pytest.raises(CorruptFileError, match="refusing to load global"):
        read_cifar_batch(path)


def test_cifar_truncated_and_wrong_content(tmp_path):
    write_cifar(tmp_path, per_batch=3)
    path = tmp_path / "test_batch"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CorruptFileError, match="test_batch"):
        read_cifar_batch(path)
    other = tmp_path / "other"
    other.write_bytes(pickle.dumps({b"data": np.zeros((2, 10), np.uint8), b"labels": [1, 2]}))
    with pytest.raises(CorruptFileError, match="3072"):
        read_cifar_batch(other)


# -- images ------------------------------------------------------------------------------


def test_read_image_gray_rgb_and_resize(tmp_path):
    pytest.importorskip("PIL")
    gray = np.arange(48, dtype=np.uint8).reshape(6, 8)
    write_png(tmp_path / "g.png", gray)
    got = read_image(tmp_path / "g.png", mode="L", size=None)
    assert got.shape == (1, 6, 8)
    np.testing.assert_array_equal(got[0], gray)
    rgb = np.zeros((6, 8, 3), np.uint8)
    rgb[..., 2] = 200
    write_png(tmp_path / "c.png", rgb)
    got = read_image(tmp_path / "c.png", mode="RGB", size=(3, 4))
    assert got.shape == (3, 3, 4) and (got[2] == 200).all() and (got[0] == 0).all()
    (tmp_path / "bad.png").write_bytes(b"\x89PNG but not really")
    with pytest.raises(CorruptFileError, match="bad.png"):
        read_image(tmp_path / "bad.png", mode="L", size=None)
