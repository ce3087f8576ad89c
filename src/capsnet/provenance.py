"""Where a result came from: code version, library versions, machine, load, threads.

:func:`environment` is recorded in every experiment record (and can be added to any
result JSON), so a number names the code and the machine it was measured on.
"""

from __future__ import annotations

import os
import platform
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

__all__ = ["environment", "git_commit", "cpu_model"]


@lru_cache(maxsize=1)
def git_commit() -> dict[str, Any]:
    """``{"commit": sha, "dirty": bool}`` of the checkout capsnet runs from, if it is one.

    An installed (non-editable) package has no repository: ``{"commit": None}``.
    """
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return {"commit": None, "dirty": None}
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
        status = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": sha, "dirty": bool(status.strip())}


@lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else :func:`platform.processor`)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def environment(device: torch.device | str | None = None, **extra: Any) -> dict[str, Any]:
    """The facts a result must name: code, versions, machine, device, threads and load.

    Args:
        device: the device the work ran on (its GPU name is recorded for CUDA).
        extra: more entries (e.g. ``seeds=[0, 1, 2]``, ``wall_seconds=812.4``).
    """
    from capsnet import __version__

    dev = torch.device(device) if device is not None else None
    gpu = None
    if dev is not None and dev.type == "cuda" and torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(dev)
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {
        **git_commit(),
        "capsnet": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(dev) if dev is not None else None,
        "gpu": gpu,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_average": load,
        **extra,
    }
