"""download=True for smallNORB, CIFAR-10 and affNIST, from local file:// 'mirrors'."""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
import zipfile

import numpy as np
import pytest
from data_writers import (
    SMALLNORB_STEMS,
    fake_smallnorb,
    smallnorb_bytes,
    write_affnist_batch,
    write_cifar,
)

import capsnet.data as data
from capsnet.data import affnist as affnist_module
from capsnet.data import cifar as cifar_module
from capsnet.data import smallnorb as norb_module
from capsnet.data.sources import CorruptFileError, RemoteFile


def test_smallnorb_download(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    dat, cat, info = fake_smallnorb(size=4)
    files = {}
    for kind, array in (("dat", dat), ("cat", cat), ("info", info)):
        name = f"{SMALLNORB_STEMS['test']}-{kind}.mat"
        content = smallnorb_bytes(array)
        (mirror / (name + ".gz")).write_bytes(gzip.compress(content))
        url = (mirror / (name + ".gz")).as_uri()
        files[kind] = RemoteFile(name, (url,), hashlib.md5(content).hexdigest())
    monkeypatch.setitem(norb_module.SMALLNORB_FILES, "test", files)
    root = tmp_path / "root"
    # verify=False only relaxes the official full-size shape check; downloads are always
    # checked against the file's MD5.
    kw = dict(root=root, size=4, crop_size=2, progress=False, verify=False)
    ds = data.create("smallnorb", "test", download=True, **kw)
    assert len(ds) == 810
    stored = sorted(p.name for p in (root / "smallnorb").iterdir())
    assert stored == sorted(f.name + ".gz" for f in files.values())


def _cifar_archive(tmp_path):
    folder = tmp_path / "build" / "cifar-10-batches-py"
    write_cifar(folder, per_batch=3)
    md5s = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in folder.iterdir()}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    archive = tmp_path / "cifar-10-python.tar.gz"
    archive.write_bytes(buffer.getvalue())
    return archive, md5s


def test_cifar10_download_verifies_archive_and_members(tmp_path, monkeypatch):
    archive, md5s = _cifar_archive(tmp_path)
    monkeypatch.setattr(cifar_module, "CIFAR10_FILES", md5s)
    digest = hashlib.md5(archive.read_bytes()).hexdigest()
    monkeypatch.setattr(cifar_module, "CIFAR10_ARCHIVE_MD5", digest)
    # the URL default is bound at definition time: patch the function's default
    defaults = {"url": archive.as_uri(), "progress": False}
    monkeypatch.setattr(cifar_module.download_cifar10, "__kwdefaults__", defaults)
    root = tmp_path / "root"
    ds = data.create("cifar10", "test", root=root, download=True, progress=False)
    assert len(ds) == 3 and ds.classes[-1] == "truck"
    stored = (root / "cifar10" / "cifar-10-batches-py").iterdir()
    assert sorted(p.name for p in stored) == sorted(md5s)
    # a wrong archive checksum leaves nothing behind
    monkeypatch.setattr(cifar_module, "CIFAR10_ARCHIVE_MD5", "0" * 32)
    other = tmp_path / "other"
    with pytest.raises(data.DataError, match="MD5"):
        data.create("cifar10", "test", root=other, download=True, progress=False)
    assert not (other / "cifar10" / "cifar-10-batches-py").exists()
    assert [p.name for p in (other / "cifar10").iterdir()] == []


def test_affnist_download_extracts_checked_batches(tmp_path, monkeypatch):
    pytest.importorskip("scipy")
    build = tmp_path / "build"
    rng = np.random.default_rng(0)
    for b in (1, 2):
        write_affnist_batch(
            build / f"{b}.mat", rng.integers(0, 256, (3, 40, 40), np.uint8), np.arange(3)
        )
    zpath = tmp_path / "test_batches.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for b in (1, 2):
            zf.write(build / f"{b}.mat", f"test_batches/{b}.mat")
        zf.writestr("../evil.mat", b"outside")  # never extracted outside the target
    monkeypatch.setitem(affnist_module.AFFNIST_URLS, "test_batches", zpath.as_uri())
    root = tmp_path / "root"
    ds = data.create("affnist", "test", root=root, download=True, verify=False, progress=False)
    assert len(ds) == 6 and ds.batch.tolist() == [1, 1, 1, 2, 2, 2]
    assert sorted(p.name for p in (root / "affnist" / "test_batches").iterdir()) == [
        "1.mat",
        "2.mat",
    ]
    assert not (root / "evil.mat").exists() and not (root / "affnist" / "evil.mat").exists()
    # a corrupt batch in the archive: the download fails and nothing is put in place
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("test_batches/1.mat", b"garbage")
    monkeypatch.setitem(affnist_module.AFFNIST_URLS, "test_batches", bad.as_uri())
    with pytest.raises(CorruptFileError, match="1.mat"):
        data.create("affnist", "test", root=tmp_path / "r2", download=True, progress=False)
    assert not (tmp_path / "r2" / "affnist" / "test_batches").exists()
