"""Hostile dataset files: gzip bombs are refused while decompressing (memory stays
bounded), and every CIFAR-10 file read, batches.meta included, is checksummed."""

from __future__ import annotations

import hashlib
import tracemalloc
import zlib

import pytest
from data_writers import write_cifar

from capsnet import data
from capsnet.data import cifar as cifar_module
from capsnet.data.sources import CorruptFileError, read_file_bytes

_BOMB_MB = 128


@pytest.fixture(scope="module")
def bomb(tmp_path_factory):
    """About 130 KB of gzip that expands to 128 MB of zeros."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.gz"
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: gzip container
    zeros = bytes(1 << 20)
    with open(path, "wb") as fh:
        for _ in range(_BOMB_MB):
            fh.write(packer.compress(zeros))
        fh.write(packer.flush())
    assert path.stat().st_size < 1 << 20
    return path


def _peak(fn):
    tracemalloc.start()
    try:
        with pytest.raises(CorruptFileError) as err:
            fn()
        return tracemalloc.get_traced_memory()[1], str(err.value)
    finally:
        tracemalloc.stop()


def test_gzip_bomb_refused_at_the_expected_size(bomb, tmp_path):
    """A file spec's size caps the decompression: the images file (read first) is refused
    after its 7.8 MB, long before the bomb's 128 MB."""
    folder = tmp_path / "mnist"
    folder.mkdir()
    target = folder / "t10k-labels-idx1-ubyte.gz"
    target.write_bytes(bomb.read_bytes())
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(bomb.read_bytes())
    peak, message = _peak(lambda: data.create("mnist", "test", root=tmp_path))
    assert "t10k-" in message and "decompresses to more than" in message
    assert peak < 40 << 20, f"peak {peak / 2**20:.0f} MiB"


def test_gzip_bomb_refused_by_ratio_without_a_known_size(bomb):
    peak, message = _peak(lambda: read_file_bytes(bomb))
    assert str(bomb) in message and "decompression bomb" in message
    assert peak < (_BOMB_MB << 20) * 3 // 4, f"peak {peak / 2**20:.0f} MiB"


def test_small_gzip_files_still_read(tmp_path):
    path = tmp_path / "f.gz"
    path.write_bytes(zlib.compress(b"x" * 1000, wbits=31))
    assert read_file_bytes(path, expected_size=1000) == b"x" * 1000
    with pytest.raises(CorruptFileError, match="more than 999 bytes"):
        read_file_bytes(path, expected_size=999)


def test_cifar_batches_meta_is_checksummed(tmp_path, monkeypatch):
    folder = tmp_path / "cifar10" / "cifar-10-batches-py"
    write_cifar(folder, per_batch=2)
    md5s = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in folder.iterdir()}
    monkeypatch.setattr(cifar_module, "CIFAR10_FILES", md5s)
    assert data.create("cifar10", "test", root=tmp_path).classes[0] == "airplane"
    meta = folder / "batches.meta"
    meta.write_bytes(meta.read_bytes().replace(b"airplane", b"AIRPLANE"))
    with pytest.raises(CorruptFileError, match="batches.meta"):
        data.create("cifar10", "test", root=tmp_path)
