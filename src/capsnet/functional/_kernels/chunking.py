"""How many bytes of votes EM routing works on at a time, chosen per device.

Every EM iteration makes several passes over the votes (weighted sums, ``(V - mu)^2``,
the E-step's products), so on a CPU a chunk of examples whose votes and work buffers stay
in the cache between passes routes faster than one that streams from memory: unchunked,
the small and paper-size matrix capsnets train 1.5-2x slower (benchmarks/RESULTS.md,
"Chunk size"). A GPU streams the whole tensor at once just fine; there chunks only bound
the temporary memory of a very large batch.

* CPU: an eighth of the last-level cache (a chunk's votes, its work buffer and the conv
  layer's matmul output then fit in it together), clamped to 1-16 MiB; 2 MiB where the
  caches cannot be read (the size measured best on the machine of the first tuning).
* CUDA: 1/16 of the GPU's memory (one chunk for any usual batch).
* Other devices: one chunk.
* ``CAPSNET_EM_CHUNK_BYTES`` (bytes, a positive integer) overrides the rule on every
  device; ``benchmarks/chunk_sweep.py`` measures which size is fastest on a machine.

No choice changes a result: chunks hold whole examples, and the tests compare one chunk
with one example per chunk.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

__all__ = ["CHUNK_ENV", "chunk_bytes", "cpu_chunk_bytes", "last_level_cache_bytes"]

CHUNK_ENV = "CAPSNET_EM_CHUNK_BYTES"
FALLBACK_CPU_BYTES = 2 << 20
MIN_CPU_BYTES, MAX_CPU_BYTES = 1 << 20, 16 << 20
ONE_CHUNK = 1 << 62
_CPU_CACHE_DIR = Path("/sys/devices/system/cpu/cpu0/cache")


def _parse_cache_size(text: str) -> int:
    """``"32768K"`` / ``"1M"`` / ``"512"`` (sysfs cache sizes) -> bytes."""
    text = text.strip().upper()
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if text and text[-1] in units:
        return int(text[:-1]) * units[text[-1]]
    return int(text)


def last_level_cache_bytes(cache_dir: Path = _CPU_CACHE_DIR) -> int | None:
    """Size of the largest-level data (or unified) cache of CPU 0, from Linux's sysfs.

    None where it cannot be read (another OS, a container hiding sysfs, odd contents).
    """
    best: tuple[int, int] | None = None  # (level, bytes)
    try:
        for index in sorted(cache_dir.glob("index*")):
            kind = (index / "type").read_text().strip()
            if kind not in ("Data", "Unified"):
                continue
            level = int((index / "level").read_text())
            size = _parse_cache_size((index / "size").read_text())
            if size > 0 and (best is None or level > best[0]):
                best = (level, size)
    except (OSError, ValueError):
        return None
    return None if best is None else best[1]


@functools.cache
def cpu_chunk_bytes() -> int:
    """The CPU rule (module docstring): last-level cache / 8, clamped to 1-16 MiB."""
    llc = last_level_cache_bytes()
    if llc is None:
        return FALLBACK_CPU_BYTES
    return max(MIN_CPU_BYTES, min(MAX_CPU_BYTES, llc // 8))


@functools.cache
def _cuda_chunk_bytes(index: int) -> int:
    return max(1, torch.cuda.get_device_properties(index).total_memory // 16)


def _override() -> int | None:
    text = os.environ.get(CHUNK_ENV)
    if text is None or not text.strip():
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise ValueError(f"{CHUNK_ENV} must be a positive number of bytes, got {text!r}")
    return value


def chunk_bytes(device: torch.device) -> int:
    """Bytes of votes per chunk of examples for EM routing on ``device``."""
    override = _override()
    if override is not None:
        return override
    if device.type == "cpu":
        return cpu_chunk_bytes()
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _cuda_chunk_bytes(index)
    return ONE_CHUNK
