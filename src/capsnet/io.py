"""Atomic file writes: the one place that writes a file so it is never seen half-written.

Every writer in capsnet (checkpoints, ``config.json``, evaluation and experiment JSON, HTML
reports, figures, dataset downloads and caches) goes through :func:`atomic_path`: the data
goes to a temporary file with a unique name (:func:`tempfile.mkstemp`) in the destination's
folder, is flushed to disk and renamed onto the destination (:func:`os.replace`, atomic on
POSIX and Windows). A reader sees the old file or the new one, two writers of the same file
never share a temporary file, and a failed write leaves the destination untouched and no
temporary file behind.

An operating-system error while writing (disk full, read-only file system, permission
denied) becomes a :class:`RunDirError`: one line naming the path and the cause, which the
commands print as ``capsnet: error: ...``. :func:`check_writable` asks the question before
long work.

>>> from capsnet.io import atomic_write, write_json
>>> write_json("runs/demo/summary.json", {"accuracy": 0.99})  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "RunDirError",
    "os_error",
    "check_writable",
    "atomic_path",
    "atomic_write",
    "write_json",
    "write_flushed",
]

_CAUSES = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


class RunDirError(OSError, RuntimeError):
    """A file of a run (or any output) could not be written: disk full, read-only file
    system, permission denied, ... ``str(err)`` is one line naming the path and the cause;
    ``errno`` and ``filename`` are those of the underlying :class:`OSError`. It is also a
    :class:`RuntimeError`, so the commands report it as ``capsnet: error: ...``."""

    def __init__(self, message: str, *, errno_: int | None = None, filename: Any = None):
        super().__init__(message)
        self.errno = errno_
        self.filename = None if filename is None else str(filename)

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def os_error(err: OSError, path: str | os.PathLike, action: str = "write") -> RunDirError:
    """``err`` as a :class:`RunDirError`: ``cannot ACTION PATH: CAUSE (ERRNO)``."""
    if isinstance(err, RunDirError):
        return err
    code = err.errno
    cause = _CAUSES.get(code or 0) or (err.strerror or str(err) or type(err).__name__)
    name = errno.errorcode.get(code or 0)
    text = f"cannot {action} {path}: {cause}" + (f" ({name})" if name else "")
    return RunDirError(text, errno_=code, filename=path)


def check_writable(folder: str | os.PathLike) -> Path:
    """Make sure files can be created in ``folder`` (created if missing), before long work.

    Raises:
        RunDirError: the folder cannot be created or written (read-only, full, no access).
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".capsnet-write-check.", suffix=".tmp", dir=folder)
        try:
            os.write(fd, b"x")
        finally:
            os.close(fd)
            os.unlink(name)
    except OSError as err:
        raise os_error(err, folder, "write to") from err
    return folder


def write_flushed(path: str | os.PathLike, data: bytes | str) -> None:
    """Write ``data`` to ``path`` (in place, not atomic) and fsync it.

    For multi-file commits that rename several files themselves (see
    :func:`capsnet.checkpoint.save_checkpoint`); everything else uses :func:`atomic_write`.
    """
    raw = data.encode() if isinstance(data, str) else data
    try:
        with open(path, "wb") as fh:
            fh.write(raw)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as err:
        with contextlib.suppress(OSError):
            os.unlink(path)  # nothing half-written stays behind
        raise os_error(err, path) from err


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
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    except OSError as err:
        raise os_error(err, dest) from err
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if fsync:
            _fsync_file(tmp)
        os.replace(tmp, dest)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        # The caller's own errors (a failed download, ...) pass unchanged; the file
        # system's refusals become one line naming the file.
        if isinstance(err, OSError) and not isinstance(err, RunDirError) and err.errno in _CAUSES:
            raise os_error(err, dest) from err
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
