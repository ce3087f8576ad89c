"""The JSON record every experiment writes, and how it is written.

One record per experiment run (:func:`make_record`): what was run (the command line, the
settings, the models), the experiment's numbers and the figures next to it, in plain JSON
types (tensors and paths converted, non-finite floats stored as ``null``). The
:mod:`capsnet.report` page reads these records; no paper section of its own.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from capsnet.io import atomic_write
from capsnet.provenance import environment

__all__ = ["make_record", "write_json"]


def _plain(x: Any) -> Any:
    """Tensors, numpy scalars, tuples and paths -> JSON-friendly plain Python types."""
    if isinstance(x, Tensor):
        return _plain(x.detach().cpu().tolist())
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, (bool, int, str)) or x is None:
        return x
    if hasattr(x, "item"):
        return _plain(x.item())
    raise TypeError(f"cannot store {type(x).__name__} in a JSON record")


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` (converted to plain types) as indented JSON, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, json.dumps(_plain(obj), indent=2, allow_nan=False) + "\n")


def make_record(
    experiment: str,
    title: str,
    *,
    settings: Mapping[str, Any],
    models: Mapping[str, Any],
    results: Any,
    figures: Sequence[str | os.PathLike],
    summary: Sequence[Mapping[str, Any]] = (),
    notes: Sequence[str] = (),
    device: Any = None,
    started: float | None = None,
) -> dict[str, Any]:
    """The JSON record every experiment writes (and :mod:`capsnet.report` reads).

    Keys: ``experiment`` (id), ``title``, ``created`` (UTC ISO time), ``command`` (the
    command line), ``settings``, ``models`` (label -> description), ``results`` (the
    experiment's numbers), ``summary`` (table rows for the report), ``figures`` (PNG file
    names next to the JSON), ``notes`` (caveats in words) and ``environment`` (git commit,
    capsnet / torch versions, device, CPU / GPU model, threads, load average and, given
    ``started`` = :func:`time.perf_counter` at the start, the wall time:
    :func:`capsnet.provenance.environment`).
    """
    from capsnet import __version__

    return _plain(
        {
            "experiment": experiment,
            "title": title,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "capsnet_version": __version__,
            "command": _command_line(),
            "settings": dict(settings),
            "models": dict(models),
            "results": results,
            "summary": list(summary),
            "figures": [Path(f).name for f in figures],
            "notes": list(notes),
            "environment": environment(
                device,
                wall_seconds=None if started is None else round(time.perf_counter() - started, 2),
            ),
        }
    )


def _command_line() -> str:
    """The command that is running, as the user would type it."""
    argv = list(sys.argv)
    if argv and Path(argv[0]).name in ("capsnet", "__main__.py", "cli.py", "experiment_cli.py"):
        argv[0] = "capsnet"
    return " ".join(argv)


def finish_record(out_dir: Path, record: dict[str, Any]) -> dict[str, Any]:
    write_json(out_dir / f"{record['experiment']}.json", record)
    return record
