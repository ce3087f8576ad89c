"""The per-device chunk size of EM routing (capsnet.functional._kernels.chunking)."""

from __future__ import annotations

import pytest
import torch

from capsnet.functional._kernels import chunking
from capsnet.functional._kernels import em as EM_KERNEL
from capsnet.functional._kernels.em import EMConfig, em_chunks


def _cache(root, *entries):
    """A fake sysfs cache directory: ``(level, type, size)`` per index."""
    for n, (level, kind, size) in enumerate(entries):
        d = root / f"index{n}"
        d.mkdir()
        (d / "level").write_text(f"{level}\n")
        (d / "type").write_text(f"{kind}\n")
        (d / "size").write_text(f"{size}\n")
    return root


def test_last_level_cache_is_the_highest_data_or_unified_level(tmp_path):
    root = _cache(
        tmp_path, (1, "Data", "32K"), (1, "Instruction", "64K"), (2, "Unified", "512K"),
        (3, "Unified", "32768K"),
    )  # fmt: skip
    assert chunking.last_level_cache_bytes(root) == 32 << 20


def test_last_level_cache_ignores_instruction_caches(tmp_path):
    root = _cache(tmp_path, (1, "Data", "48K"), (2, "Instruction", "4M"))
    assert chunking.last_level_cache_bytes(root) == 48 << 10


@pytest.mark.parametrize("contents", [None, "lots"])
def test_unreadable_caches_give_none(tmp_path, contents):
    if contents is not None:
        _cache(tmp_path, (2, "Unified", contents))
    assert (
        chunking.last_level_cache_bytes(tmp_path / "missing" if contents is None else tmp_path)
        is None
    )


@pytest.mark.parametrize(
    "llc,expected",
    [(32 << 20, 4 << 20), (512 << 20, 16 << 20), (2 << 20, 1 << 20), (None, 2 << 20)],
)
def test_cpu_rule_is_an_eighth_of_the_cache_clamped(monkeypatch, llc, expected):
    monkeypatch.setattr(chunking, "last_level_cache_bytes", lambda: llc)
    chunking.cpu_chunk_bytes.cache_clear()
    try:
        assert chunking.cpu_chunk_bytes() == expected
        assert chunking.chunk_bytes(torch.device("cpu")) == expected
    finally:
        chunking.cpu_chunk_bytes.cache_clear()


def test_environment_overrides_the_rule(monkeypatch):
    monkeypatch.setenv(chunking.CHUNK_ENV, "12345")
    assert chunking.chunk_bytes(torch.device("cpu")) == 12345
    assert chunking.chunk_bytes(torch.device("meta")) == 12345


@pytest.mark.parametrize("bad", ["-1", "0", "4MiB"])
def test_bad_environment_value_is_named(monkeypatch, bad):
    monkeypatch.setenv(chunking.CHUNK_ENV, bad)
    with pytest.raises(ValueError, match=f"{chunking.CHUNK_ENV} must be a positive number"):
        chunking.chunk_bytes(torch.device("cpu"))


def test_other_devices_route_in_one_chunk(monkeypatch):
    monkeypatch.delenv(chunking.CHUNK_ENV, raising=False)
    assert chunking.chunk_bytes(torch.device("meta")) == chunking.ONE_CHUNK


def _config():
    return EMConfig(lambdas=(1.0,), normalize_cost=False, var_floor=1e-4, eps=1e-8, geometry=None)


def test_em_chunks_follow_the_device_rule(monkeypatch):
    monkeypatch.setattr(EM_KERNEL, "EM_CHUNK_BYTES", None)
    monkeypatch.setenv(chunking.CHUNK_ENV, str(3 * 100))  # 3 rows of 100 bytes per chunk
    chunks = em_chunks(10, 100, _config(), torch.device("cpu"))
    assert [(c.start, c.stop) for c, _ in chunks] == [(0, 3), (3, 6), (6, 9), (9, 10)]
    monkeypatch.setenv(chunking.CHUNK_ENV, str(1 << 40))
    assert len(em_chunks(10, 100, _config(), torch.device("cpu"))) == 1


def test_forced_size_wins_over_the_device_rule(monkeypatch):
    monkeypatch.setenv(chunking.CHUNK_ENV, str(1 << 40))
    monkeypatch.setattr(EM_KERNEL, "EM_CHUNK_BYTES", 1)
    assert len(em_chunks(5, 100, _config(), torch.device("cpu"))) == 5
