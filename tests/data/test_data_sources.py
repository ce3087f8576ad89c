"""Data root resolution, file lookup, checksums, atomic downloads (file:// URLs), caches."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import pytest
import torch
from data_writers import MNIST_NAMES, write_mnist

import capsnet.data as data
from capsnet.data import mnist as mnist_module
from capsnet.data.sources import (
    CorruptFileError,
    DataError,
    DatasetNotFoundError,
    RemoteFile,
    atomic_path,
    cache_key,
    cache_load,
    cache_save,
    download_file,
    resolve_root,
)


def test_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("CAPSNET_DATA", str(tmp_path / "env"))
    assert resolve_root(tmp_path / "arg") == tmp_path / "arg"
    assert resolve_root(None) == tmp_path / "env"
    monkeypatch.delenv("CAPSNET_DATA")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_root(None) == tmp_path / "home" / ".cache" / "capsnet"
    with pytest.raises(TypeError, match="root must be a path"):
        resolve_root(3)


def test_env_var_root_is_used(monkeypatch, mnist_root):
    root, _ = mnist_root
    monkeypatch.setenv("CAPSNET_DATA", str(root))
    assert len(data.create("mnist", "test", verify=False)) == 20


@pytest.mark.parametrize("layout", ["subfolder", "direct", "torchvision"])
def test_mnist_found_in_standard_layouts(tmp_path, layout):
    root = tmp_path / "r"
    folder = {"subfolder": root / "mnist", "direct": root, "torchvision": root / "MNIST" / "raw"}
    arrays = write_mnist(folder[layout], gz=layout != "torchvision")
    ds = data.create("mnist", "train", root=root, verify=False)
    assert ds.images.shape == (60, 1, 28, 28) and ds.images.dtype == torch.uint8
    torch.testing.assert_close(ds.images[:, 0], torch.from_numpy(arrays["train"][0]))
    torch.testing.assert_close(ds.labels, torch.from_numpy(arrays["train"][1]).long())


def test_not_found_message_names_files_folders_checksums_and_flag(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        data.create("mnist", "train", root=tmp_path / "empty")
    text = str(err.value)
    assert "train-images-idx3-ubyte[.gz]" in text and "train-labels-idx1-ubyte[.gz]" in text
    assert "6bbc9ace898e44ae57da46a324031adb" in text
    assert str(tmp_path / "empty" / "mnist") in text
    assert "download=True" in text and "--download" in text and "CAPSNET_DATA" in text
    assert "ossci-datasets" in text
    assert isinstance(err.value, RuntimeError)


def test_checksum_mismatch_is_reported(mnist_root):
    root, _ = mnist_root
    with pytest.raises(CorruptFileError) as err:
        data.create("mnist", "test", root=root)  # verify=True: tiny fake != official MD5
    text = str(err.value)
    assert "t10k-images-idx3-ubyte.gz" in text and "2646ac647ad5339dbf082846283269ea" in text
    assert "verify=False" in text


def test_truncated_file_is_an_error_and_nothing_is_cached(mnist_root):
    root, _ = mnist_root
    path = root / "mnist" / (MNIST_NAMES["test"][0] + ".gz")
    content = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(content[:-50]))
    with pytest.raises(CorruptFileError, match="truncated"):
        data.create("mnist", "test", root=root, verify=False)
    assert not (root / "processed").exists()


def _file_urls(tmp_path: Path, arrays_folder: Path, bad_md5: bool = False):
    """MNIST RemoteFiles served from a local 'mirror' folder through file:// URLs."""
    files = {}
    for name in sum(MNIST_NAMES.values(), ()):
        content = gzip.decompress((arrays_folder / (name + ".gz")).read_bytes())
        md5 = "0" * 32 if bad_md5 else hashlib.md5(content).hexdigest()
        url = (arrays_folder / (name + ".gz")).resolve().as_uri()
        files[name] = RemoteFile(name, ("file:///nonexistent/mirror/" + name + ".gz", url), md5)
    return files


def test_download_from_mirror_is_verified_and_atomic(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    write_mnist(mirror)
    title, subdirs, _, classes = mnist_module.MNIST_FAMILY["mnist"]
    files = _file_urls(tmp_path, mirror)
    monkeypatch.setitem(mnist_module.MNIST_FAMILY, "mnist", (title, subdirs, files, classes))
    root = tmp_path / "root"
    with pytest.raises(DatasetNotFoundError):
        data.create("mnist", "train", root=root)
    ds = data.create("mnist", "train", root=root, download=True, progress=False)
    assert len(ds) == 60
    written = sorted(p.name for p in (root / "mnist").iterdir())
    assert written == ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"]
    # Verified against the (patched) MD5s on every later load too.
    assert len(data.create("mnist", "train", root=root)) == 60


def test_failed_verification_leaves_no_file(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    write_mnist(mirror)
    title, subdirs, _, classes = mnist_module.MNIST_FAMILY["mnist"]
    files = _file_urls(tmp_path, mirror, bad_md5=True)
    monkeypatch.setitem(mnist_module.MNIST_FAMILY, "mnist", (title, subdirs, files, classes))
    root = tmp_path / "root"
    with pytest.raises(DataError) as err:
        data.create("mnist", "test", root=root, download=True, progress=False)
    assert "nonexistent" in str(err.value) and "MD5" in str(err.value)
    folder = root / "mnist"
    assert not folder.exists() or list(folder.iterdir()) == []


def test_corrupt_file_is_replaced_when_download_is_asked(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    write_mnist(mirror)
    title, subdirs, _, classes = mnist_module.MNIST_FAMILY["mnist"]
    files = _file_urls(tmp_path, mirror)
    monkeypatch.setitem(mnist_module.MNIST_FAMILY, "mnist", (title, subdirs, files, classes))
    root = tmp_path / "root"
    data.create("mnist", "test", root=root, download=True, progress=False)
    images = root / "mnist" / "t10k-images-idx3-ubyte.gz"
    good = images.read_bytes()
    images.write_bytes(gzip.compress(b"\x00\x00\x08\x03" + b"\x00" * 40))
    with pytest.raises(CorruptFileError):
        data.create("mnist", "test", root=root)
    ds = data.create("mnist", "test", root=root, download=True, progress=False)
    assert len(ds) == 20 and images.read_bytes() == good


def test_download_file_errors_list_every_mirror(tmp_path):
    with pytest.raises(DataError) as err:
        download_file(["file:///no/such/a.gz", "file:///no/such/b.gz"], tmp_path / "x.gz")
    assert "a.gz" in str(err.value) and "b.gz" in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_keeps_destination_on_failure(tmp_path):
    dest = tmp_path / "file.bin"
    dest.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(dest) as tmp:
        tmp.write_bytes(b"half-written")
        raise RuntimeError("interrupted")
    assert dest.read_bytes() == b"old" and list(tmp_path.iterdir()) == [dest]
    with atomic_path(dest) as tmp:
        tmp.write_bytes(b"new")
    assert dest.read_bytes() == b"new" and list(tmp_path.iterdir()) == [dest]


def test_cache_round_trip_and_key_changes_with_files(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"abc")
    key = cache_key("x", 1, files=[src])
    tensors = {"images": torch.arange(6, dtype=torch.uint8).view(1, 1, 2, 3)}
    assert cache_load(tmp_path, "stem", key) is None
    assert cache_save(tmp_path, "stem", key, tensors) is not None
    torch.testing.assert_close(cache_load(tmp_path, "stem", key)["images"], tensors["images"])
    src.write_bytes(b"abcd")
    assert cache_key("x", 1, files=[src]) != key
    assert cache_key("x", 2, files=[src]) != cache_key("x", 1, files=[src])
