"""Where dataset files come from: the data root, file specs, verification, atomic downloads.

The data root is resolved as: explicit ``root`` argument (CLI ``--data-root``) >
the ``CAPSNET_DATA`` environment variable > ``~/.cache/capsnet``. Inside the root every
dataset has a standard sub-folder (``mnist``, ``fashion-mnist``, ``smallnorb``, ...); a
root that points straight at the folder holding the files works too.

A file "exists" only once verified: its *uncompressed* content must match the official
MD5 (where one is known), because mirrors gzip the same bytes differently. Downloads go
to a temporary file in the destination folder, are verified, then renamed into place, so
an interrupted or corrupt download never leaves a half-written file under a real name.
Offline, :class:`DatasetNotFoundError` names the files expected, the folders searched,
the checksums and the ``download=True`` / ``--download`` switch.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import os
import shutil
import urllib.error
import urllib.request
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from capsnet.io import atomic_path  # re-exported: downloads and caches write through it

__all__ = [
    "ENV_VAR",
    "DEFAULT_ROOT",
    "DataError",
    "DatasetNotFoundError",
    "CorruptFileError",
    "RemoteFile",
    "resolve_root",
    "find_folder",
    "locate",
    "read_file_bytes",
    "decompress_limit",
    "check_md5",
    "download_file",
    "ensure_files",
    "read_verified",
    "atomic_path",
    "cache_load",
    "cache_save",
    "cache_key",
]

ENV_VAR = "CAPSNET_DATA"
DEFAULT_ROOT = "~/.cache/capsnet"
_CHUNK = 1 << 20
_CACHE_VERSION = 1


class DataError(RuntimeError):
    """Base class of the errors raised for missing or bad dataset files."""


class DatasetNotFoundError(DataError):
    """The dataset's files are not where they were looked for (and no download was asked)."""


class CorruptFileError(DataError):
    """A dataset file is truncated, has the wrong magic number/shape, or a wrong checksum."""


@dataclass(frozen=True)
class RemoteFile:
    """One file of a dataset, as stored locally and as published.

    Attributes:
        name: the standard local file name without a ``.gz`` suffix, e.g.
            ``"train-images-idx3-ubyte"``. Locally both ``name`` and ``name + ".gz"`` are
            accepted.
        urls: mirrors, tried in order; the downloaded file keeps the URL's base name.
        md5: MD5 of the *uncompressed* content, or ``None`` when no official checksum is
            known (then the file is verified by format and shape only).
        size: uncompressed size in bytes, when known (a quick early check).
    """

    name: str
    urls: tuple[str, ...] = ()
    md5: str | None = None
    size: int | None = None

    def candidates(self, folder: Path) -> list[Path]:
        """Local paths this file may have inside ``folder``, in order of preference."""
        return [folder / self.name, folder / (self.name + ".gz")]

    def describe(self) -> str:
        checksum = f"MD5 of uncompressed content {self.md5}" if self.md5 else "no official MD5"
        return f"{self.name}[.gz]  ({checksum})"


def resolve_root(root: str | os.PathLike | None = None) -> Path:
    """The data root: ``root`` if given, else ``$CAPSNET_DATA``, else ``~/.cache/capsnet``."""
    if root is not None:
        if not isinstance(root, (str, os.PathLike)):
            raise TypeError(f"root must be a path (str or PathLike), got {type(root).__name__}")
        return Path(root).expanduser()
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    return Path(DEFAULT_ROOT).expanduser()


def candidate_folders(root: Path, subdirs: Sequence[str]) -> list[Path]:
    """``root/<subdir>`` for each standard sub-folder, then ``root`` itself."""
    return [root / s for s in subdirs] + [root]


def locate(spec: RemoteFile, folder: Path) -> Path | None:
    """The first existing local path of ``spec`` inside ``folder``, or ``None``."""
    for path in spec.candidates(folder):
        if path.is_file():
            return path
    return None


def find_folder(root: Path, subdirs: Sequence[str], files: Sequence[RemoteFile]) -> Path | None:
    """The first candidate folder that holds every file in ``files`` (any accepted name)."""
    for folder in candidate_folders(root, subdirs):
        if all(locate(f, folder) is not None for f in files):
            return folder
    return None


def not_found_message(
    title: str, files: Sequence[RemoteFile], folders: Sequence[Path], download_dir: Path
) -> str:
    lines = [f"{title} not found. Looked for:"]
    lines += [f"  {f.describe()}" for f in files]
    lines.append("in: " + ", ".join(str(p) for p in folders))
    urls = [u for f in files for u in f.urls[:1]]
    if urls:
        lines.append("Standard sources: " + ", ".join(urls))
    lines.append(
        f"Pass download=True (CLI: --download) to fetch them into {download_dir}, or point "
        f"root= (CLI: --data-root) or ${ENV_VAR} at the folder that holds them."
    )
    return "\n".join(lines)


MAX_RATIO = 200
"""The largest expansion accepted from a gzip file whose uncompressed size is not known
in advance (real dataset files expand 2-10x; a gzip bomb of zeros about 1000x)."""
MIN_LIMIT = 64 << 20
"""Without a known size, files up to this size are accepted whatever their ratio."""


def decompress_limit(compressed: int, expected: int | None = None) -> int:
    """The most bytes a gzip file of ``compressed`` bytes may expand to: its ``expected``
    uncompressed size when the file spec gives one, else ``MAX_RATIO`` times its size
    (at least ``MIN_LIMIT``)."""
    if expected is not None:
        return int(expected)
    return max(MIN_LIMIT, MAX_RATIO * int(compressed))


def _decompress(path: Path, limit: int) -> bytes:
    """Stream-decompress the gzip file ``path``, refusing it once it passes ``limit``
    bytes (before the rest is inflated, so a gzip bomb never fills the memory)."""
    try:
        with gzip.open(path, "rb") as fh:
            content = fh.read(limit + 1)
    except (EOFError, OSError, zlib.error) as exc:
        raise CorruptFileError(
            f"{path}: not a valid gzip stream ({exc}); the file is truncated or corrupt. "
            "Delete it (or pass download=True to fetch it again)."
        ) from exc
    if len(content) > limit:
        raise CorruptFileError(
            f"{path}: decompresses to more than {limit:,} bytes (the most this file may "
            f"hold), refused before reading the rest; it is not the expected file (or a "
            f"decompression bomb). Delete it (or pass download=True to fetch it again)."
        )
    return content


def read_file_bytes(path: Path, *, expected_size: int | None = None) -> bytes:
    """The content of ``path``, gunzipped when it is a gzip file (detected by its magic).

    Args:
        path: the file.
        expected_size: its uncompressed size when known (a file spec's ``size``): a gzip
            file that expands past it is refused while decompressing. Without it the
            expansion is limited by ratio (:func:`decompress_limit`).

    Raises:
        CorruptFileError: an invalid gzip stream, or one that expands past the limit.
    """
    try:
        with open(path, "rb") as fh:
            magic = fh.read(2)
        compressed = path.stat().st_size
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    if magic == b"\x1f\x8b":
        return _decompress(path, decompress_limit(compressed, expected_size))
    if path.suffix == ".gz":
        raise CorruptFileError(f"{path}: named .gz but does not start with the gzip magic 1f8b")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc


def check_md5(
    content: bytes, expected: str | None, path: Path, *, what: str = "uncompressed content"
) -> None:
    """Raise :class:`CorruptFileError` unless ``md5(content) == expected`` (``None`` skips)."""
    if expected is None:
        return
    got = hashlib.md5(content).hexdigest()
    if got != expected:
        raise CorruptFileError(
            f"{path}: MD5 of the {what} is {got}, expected {expected} "
            f"({len(content):,} bytes). The file is corrupt, truncated or not the official "
            "release; delete it (or pass download=True to replace it), or pass verify=False "
            "for your own files in this format."
        )


def _fetch(url: str, dest: Path, *, progress: bool = True, timeout: float = 60.0) -> None:
    """Stream ``url`` into ``dest`` (overwriting it), with a tqdm bar when long."""
    from tqdm.auto import tqdm

    request = urllib.request.Request(url, headers={"User-Agent": "capsnet-data"})
    with urllib.request.urlopen(request, timeout=timeout) as response, open(dest, "wb") as out:
        total = response.headers.get("Content-Length")
        total = int(total) if total and total.isdigit() else None
        with tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=url.rsplit("/", 1)[-1],
            disable=None if progress else True,
            leave=False,
        ) as bar:
            while True:
                chunk = response.read(_CHUNK)
                if not chunk:
                    break
                out.write(chunk)
                bar.update(len(chunk))


def download_file(
    urls: Sequence[str],
    dest: Path,
    *,
    md5: str | None = None,
    md5_of: str = "content",
    progress: bool = True,
    expected_size: int | None = None,
) -> Path:
    """Download the first working mirror of ``urls`` to ``dest``, verified, atomically.

    Args:
        urls: mirrors tried in order.
        dest: final path; written only after verification succeeded.
        md5: expected MD5 (``None``: no check).
        md5_of: ``"content"`` checks the gunzipped content (IDX / smallNORB files, whose
            ``.gz`` bytes differ between mirrors); ``"file"`` checks the bytes as
            downloaded (archives such as the CIFAR-10 tarball).
        progress: show a tqdm progress bar (auto-disabled when not on a terminal).
        expected_size: the uncompressed size, when known (limits the decompression).

    Returns:
        ``dest``.

    Raises:
        DataError: every mirror failed; the message lists each URL and why.
    """
    if md5_of not in ("content", "file"):
        raise ValueError(f"md5_of must be 'content' or 'file', got {md5_of!r}")
    errors = []
    for url in urls:
        try:
            with atomic_path(dest) as tmp:
                _fetch(url, tmp, progress=progress)
                if md5 is not None:
                    if md5_of == "content":
                        content = read_file_bytes(tmp, expected_size=expected_size)
                        check_md5(content, md5, Path(url))
                    else:
                        check_md5(tmp.read_bytes(), md5, Path(url), what="downloaded file")
            return dest
        except (urllib.error.URLError, OSError, DataError, ValueError) as exc:
            errors.append(f"  {url}: {exc}")
    raise DataError(f"could not download {dest.name}:\n" + "\n".join(errors))


def copy_atomic(src: Path, dest: Path) -> None:
    """Copy ``src`` to ``dest`` through a temporary file and a rename."""
    with atomic_path(dest) as tmp:
        shutil.copyfile(src, tmp)


def url_basename(url: str) -> str:
    """The file name at the end of ``url``."""
    return url.rstrip("/").rsplit("/", 1)[-1]


def ensure_files(
    title: str,
    root: Path,
    subdirs: Sequence[str],
    files: Sequence[RemoteFile],
    *,
    download: bool,
    progress: bool = True,
) -> Path:
    """The folder holding every file of ``files``, downloading the missing ones if asked.

    Args:
        title: dataset name for messages.
        root: the resolved data root.
        subdirs: standard sub-folders of ``root``; downloads go to ``root / subdirs[0]``.
        files: the files needed.
        download: fetch missing files from their public sources.
        progress: progress bars for downloads.

    Raises:
        DatasetNotFoundError: files missing and ``download`` is false (or no source known).
        DataError: a download failed.
    """
    folder = find_folder(root, subdirs, files)
    if folder is not None:
        return folder
    dest_dir = root / subdirs[0] if subdirs else root
    if not download:
        raise DatasetNotFoundError(
            not_found_message(title, files, candidate_folders(root, subdirs), dest_dir)
        )
    for spec in files:
        if locate(spec, dest_dir) is not None:
            continue
        if not spec.urls:
            raise DatasetNotFoundError(
                f"{title}: {spec.name} has no public download source; place it in {dest_dir}"
            )
        download_file(
            spec.urls, dest_dir / url_basename(spec.urls[0]), md5=spec.md5, progress=progress,
            expected_size=spec.size,
        )  # fmt: skip
    return dest_dir


def read_verified(
    spec: RemoteFile, folder: Path, *, verify: bool, download: bool, progress: bool = True
) -> tuple[bytes, Path]:
    """The uncompressed content of ``spec`` in ``folder``, checked against its MD5.

    With ``download=True`` a file that fails the check is fetched again (verified) and the
    bad copy removed; otherwise :class:`CorruptFileError` names the file and the checksums.

    Returns:
        ``(content, path)``.
    """
    path = locate(spec, folder)
    if path is None:
        raise DatasetNotFoundError(f"{spec.name}[.gz] not found in {folder}")
    # Unverified files may be the user's own data in this format, of any size.
    size = spec.size if verify else None
    try:
        content = read_file_bytes(path, expected_size=size)
        if verify:
            check_md5(content, spec.md5, path)
        return content, path
    except CorruptFileError:
        if not (download and spec.urls):
            raise
    fresh = folder / url_basename(spec.urls[0])
    download_file(spec.urls, fresh, md5=spec.md5, progress=progress, expected_size=spec.size)
    if fresh != path:
        with contextlib.suppress(OSError):
            path.unlink()
    content = read_file_bytes(fresh, expected_size=spec.size)
    return content, fresh


# ---------------------------------------------------------------------------------------
# Cache of decoded uint8 tensors (used where decoding is slow: smallNORB, image folders).


def cache_key(*parts: Any, files: Sequence[Path] = ()) -> str:
    """A short hex key from ``parts`` and the name, size and mtime of ``files``."""
    h = hashlib.blake2b(digest_size=10)
    h.update(repr((_CACHE_VERSION, parts)).encode())
    for path in files:
        st = path.stat()
        h.update(f"|{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _cache_dirs(root: Path) -> list[Path]:
    dirs = [root / "processed"]
    default = Path(DEFAULT_ROOT).expanduser() / "processed"
    if default not in dirs:
        dirs.append(default)
    return dirs


def cache_load(root: Path, stem: str, key: str) -> dict[str, torch.Tensor] | None:
    """Tensors cached by :func:`cache_save` under ``stem-key``, or ``None`` when absent."""
    for folder in _cache_dirs(root):
        path = folder / f"{stem}-{key}.pt"
        if path.is_file():
            try:
                data = torch.load(path, map_location="cpu", weights_only=True)
            except Exception:  # an unreadable cache is ignored and rebuilt
                continue
            if isinstance(data, dict) and all(isinstance(v, torch.Tensor) for v in data.values()):
                return data
    return None


def cache_save(root: Path, stem: str, key: str, tensors: dict[str, torch.Tensor]) -> Path | None:
    """Save ``tensors`` atomically to the first writable cache folder; ``None`` if none is."""
    for folder in _cache_dirs(root):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            dest = folder / f"{stem}-{key}.pt"
            with atomic_path(dest) as tmp:
                buffer = io.BytesIO()
                torch.save({k: v.contiguous() for k, v in tensors.items()}, buffer)
                tmp.write_bytes(buffer.getvalue())
            return dest
        except OSError:
            continue
    return None
