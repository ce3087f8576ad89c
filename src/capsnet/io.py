"""Atomic file writes: the one place that writes a file so it is never seen half-written.

Every writer in capsnet (checkpoints, ``config.json``, evaluation and experiment JSON, HTML
reports, figures, dataset downloads and caches) goes through :func:`atomic_path`: the data
goes to a temporary file with a unique name (:func:`tempfile.mkstemp`) in the destination's
folder, is flushed to disk and renamed onto the destination (:func:`os.replace`, atomic on
POSIX and Windows). A reader sees the old file or the new one, two writers of the same file
never share a temporary file, and a failed write leaves the destination untouched and no
temporary file behind.

>>> from capsnet.io import atomic_write, write_json
>>> write_json("runs/demo/summary.json", {"accuracy": 0.99})  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["atomic_path", "atomic_write", "write_json", "write_flushed"]


def write_flushed(path: str | os.PathLike, data: bytes | str) -> None:
    """Write ``data`` to ``path`` (in place, not atomic) and fsync it.

    For multi-file commits that rename several files themselves (see
    :func:`capsnet.checkpoint.save_checkpoint`); everything else uses :func:`atomic_write`.
    """
    raw = data.encode() if isinstance(data, str) else data
    with open(path, "wb") as fh:
        fh.write(raw)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_file(path: Path) -> None:
    with contextlib.suppress(OSError):  # e.g. a file system without fsync
        with open(path, "rb+") as fh:
            os.fsync(fh.fileno())


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike, *, fsync: bool = True) -> Iterator[Path]:
    """Yield a unique temporary path next to ``dest``; on success rename it onto ``dest``.

    The caller writes the temporary file (any way it likes: ``savefig``, a download, ...).
    The parent folder is created if needed. On any exception the temporary file is removed
    and ``dest`` is left untouched.

    Args:
        dest: the file to write.
        fsync: flush the temporary file to disk before the rename.

    Example::

        with atomic_path("runs/demo/curves.png") as tmp:
            fig.savefig(tmp, format="png")
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if fsync:
            _fsync_file(tmp)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` (bytes, or text as UTF-8) to ``path`` atomically; returns the path."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    if not isinstance(raw, bytes | bytearray | memoryview):
        raise TypeError(f"data must be bytes or str, got {type(data).__name__}")
    with atomic_path(path, fsync=False) as tmp:
        write_flushed(tmp, bytes(raw))
    return Path(path)


def write_json(
    path: str | os.PathLike, obj: Any, *, indent: int | None = 1, allow_nan: bool = True
) -> Path:
    """Write ``obj`` as JSON (``json.dumps(obj, indent=indent)``) atomically; returns the path.

    Args:
        path: the ``.json`` file.
        obj: JSON-serialisable data.
        indent: as in :func:`json.dumps`.
        allow_nan: False raises ``ValueError`` for NaN/inf instead of writing non-standard
            JSON.
    """
    return atomic_write(path, json.dumps(obj, indent=indent, allow_nan=allow_nan))
