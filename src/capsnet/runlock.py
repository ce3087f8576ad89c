"""One writer per run directory: an exclusive lock on ``<run>/.lock``.

``capsnet train`` (fresh or ``--resume``; rank 0 under torchrun) holds the lock for the
whole run, so a second training with the same ``--output-dir`` or a ``--resume`` of a run
that is still training is refused with the holder's PID and host, instead of two
processes mixing their metrics, checkpoints and ``config.json``.

The lock is :func:`fcntl.flock` on ``.lock``, which the operating system releases when the
holding process dies, however it dies; the file holds JSON naming the holder (PID, host,
start time, command). A lock file left by a dead process is therefore never in the way.
Where ``flock`` is unavailable (Windows, some network file systems) the JSON alone decides:
a holder on this host whose PID no longer runs is stale and replaced.

>>> with RunLock("runs/demo"):  # doctest: +SKIP
...     ...  # train
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

from capsnet.io import os_error

__all__ = ["RunLock", "RunLockedError", "read_holder", "is_locked_elsewhere", "LOCK_NAME"]

LOCK_NAME = ".lock"


class RunLockedError(RuntimeError):
    """The run directory is in use by another process (the message names its PID and host)."""

    def __init__(self, message: str, holder: dict[str, Any]) -> None:
        super().__init__(message)
        self.holder = holder


def read_holder(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The JSON of ``run_dir/.lock`` (``pid``, ``host``, ``started``, ``command``), or ``{}``."""
    try:
        value = json.loads((Path(run_dir) / LOCK_NAME).read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


def _describe(run_dir: Path, holder: dict[str, Any]) -> str:
    pid, host = holder.get("pid", "?"), holder.get("host", "?")
    since = holder.get("started")
    when = f" since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))}" if since else ""
    text = f"{run_dir} is in use by another capsnet process (PID {pid} on {host}{when})"
    if host == socket.gethostname() and isinstance(pid, int) and not _pid_alive(pid):
        text += "; that PID is gone, but a process it started still holds the lock"
    return (
        text + "; wait for it to finish or stop it, or choose another --output-dir "
        f"(a run directory has one writer; holder details in {run_dir / LOCK_NAME})"
    )


class RunLock:
    """An exclusive, non-blocking lock on a run directory (a context manager).

    Args:
        run_dir: the run directory (created if missing).

    Raises (from :meth:`acquire`):
        RunLockedError: another live process holds the lock.
        capsnet.io.RunDirError: the lock file cannot be written (read-only, disk full).
    """

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> RunLock:
        if self._fd is not None:
            return self
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise os_error(err, self.run_dir, "create") from err
        for _ in range(10):  # retry if a releasing holder unlinked the file under us
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                raise os_error(err, self.path) from err
            try:
                locked = self._flock(fd)
            except BaseException:
                os.close(fd)
                raise
            if not locked:
                os.close(fd)
                holder = read_holder(self.run_dir)
                raise RunLockedError(_describe(self.run_dir, holder), holder)
            # The file we locked must still be the one at the path.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except OSError:
                same = False
            if same:
                break
            os.close(fd)
        else:  # pragma: no cover - only under a storm of concurrent lockers
            raise RunLockedError(f"{self.run_dir}: could not take {self.path}", {})
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": round(time.time(), 3),
            "command": " ".join(sys.argv),
        }
        try:
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(holder).encode())
            os.fsync(fd)
        except OSError as err:
            os.close(fd)
            raise os_error(err, self.path) from err
        self._fd = fd
        _HELD.add(str(self.run_dir.resolve()))
        return self

    def _flock(self, fd: int) -> bool:
        """Lock ``fd``; False when another process holds it."""
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                return False
            except OSError:  # no flock here (some network file systems): use the PID
                pass
        holder = read_holder(self.run_dir)
        pid, host = holder.get("pid"), holder.get("host")
        if not isinstance(pid, int) or pid == os.getpid():
            return True
        if host == socket.gethostname():
            return not _pid_alive(pid)
        return False  # a holder on another host: cannot tell whether it runs

    def release(self) -> None:
        """Give the lock back (and remove the lock file); a no-op when not held."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        _HELD.discard(str(self.run_dir.resolve()))
        with contextlib.suppress(OSError):
            os.unlink(self.path)  # before unlocking: a waiter re-checks the path
        with contextlib.suppress(OSError):
            os.close(fd)  # closing releases the flock

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


_HELD: set[str] = set()


def is_locked_elsewhere(run_dir: str | os.PathLike) -> bool:
    """Whether another process (not this one) holds ``run_dir``'s lock right now."""
    run_dir = Path(run_dir)
    if str(run_dir.resolve()) in _HELD:
        return False
    path = run_dir / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                fcntl.flock(fd, fcntl.LOCK_UN)
                return False
            except BlockingIOError:
                return True
            except OSError:
                pass
        holder = read_holder(run_dir)
        pid = holder.get("pid")
        return (
            isinstance(pid, int)
            and pid != os.getpid()
            and (holder.get("host") != socket.gethostname() or _pid_alive(pid))
        )
    finally:
        os.close(fd)
