"""Render ToyNORB to files in smallNORB's binary matrix format (SPEC §3), atomically.

Per split (``train``: instances 4, 6, 7, 8, 9; ``test``: 0, 1, 2, 3, 5), three files in
``<root>/toynorb``::

    toynorb-5x46789x9x18x6x2x96x96-training-{dat,cat,info}.mat
    toynorb-5x01235x9x18x6x2x96x96-testing-{dat,cat,info}.mat

``dat`` is ``(N, 2, 96, 96)`` uint8 stereo pairs, ``cat`` ``(N,)`` int32 category, ``info``
``(N, 4)`` int32 instance, elevation code (0..8), azimuth code (0, 2, ..., 34), lighting
(0..5), exactly as smallNORB. The rows are in a fixed pseudo-random order (seeded by the
generator version and split) so that ``limit=N`` keeps a mix of everything.

Work is split by object (category, instance): every object is rendered at all its views
by one worker process and its rows are written into a memory map of the temporary file
at fixed positions, so the bytes do not depend on the number of workers or the order in
which they finish. Files are written under temporary names and renamed into place only
when complete; with the standard settings their MD5s are checked against
:data:`TOYNORB_MD5` before the rename.
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from capsnet.data.formats import smallnorb_header
from capsnet.data.sources import CorruptFileError, RemoteFile, atomic_path
from capsnet.data.toynorb.objects import (
    GENERATOR_VERSION,
    TEST_INSTANCES,
    TRAIN_INSTANCES,
    build_object,
)
from capsnet.data.toynorb.render import render_views

__all__ = [
    "TOYNORB_FILES",
    "TOYNORB_MD5",
    "SPLIT_INSTANCES",
    "generate_toynorb",
    "file_specs",
]

SPLIT_INSTANCES = {"train": TRAIN_INSTANCES, "test": TEST_INSTANCES}
_STEMS = {
    "train": "toynorb-5x46789x9x18x6x2x96x96-training",
    "test": "toynorb-5x01235x9x18x6x2x96x96-testing",
}
_KINDS = ("dat", "cat", "info")
#: MD5s of the standard files of generator version :data:`GENERATOR_VERSION`.
TOYNORB_MD5 = {
    "train": {
        "dat": "61e5aad3b772fec265ff3c0be4822ee6",
        "cat": "206ade5eba198a3f1a010eacc1c1a3a5",
        "info": "ff93c57bc8fb63c5fcfc33372180a399",
    },
    "test": {
        "dat": "3d84156ca8cc1864af22a8153380cbd3",
        "cat": "63abe3b72bd12205bad85754b9cb1d9e",
        "info": "2a08a403fdc944b7ee5f42fd43864355",
    },
}
_N = 5 * 5 * 9 * 18 * 6  # 24,300 stereo pairs per split
_SIZES = {"dat": 24 + _N * 2 * 96 * 96, "cat": 20 + _N * 4, "info": 20 + _N * 16}


def file_specs(split: str, md5: dict[str, str | None] | None = None) -> dict[str, RemoteFile]:
    """``{"dat", "cat", "info"} -> RemoteFile`` of a split (no URLs: they are generated)."""
    standard = md5 is None
    sums: dict[str, str | None] = dict(TOYNORB_MD5[split]) if md5 is None else md5
    return {
        kind: RemoteFile(
            f"{_STEMS[split]}-{kind}.mat", (), sums[kind], _SIZES[kind] if standard else None
        )
        for kind in _KINDS
    }


#: The standard files: ``TOYNORB_FILES[split][kind]``.
TOYNORB_FILES = {split: file_specs(split) for split in _STEMS}


def _render_object(job: tuple) -> tuple[int, int, np.ndarray]:
    """Worker: all views of one object, ``(E, A, L, 2, S, S)`` uint8."""
    category, instance, elevations, azimuths, lightings, size, supersample = job
    from capsnet.data.toynorb.render import AZIMUTHS, ELEVATIONS, LIGHTINGS

    mesh = build_object(category, instance)
    views = [(ELEVATIONS[e], AZIMUTHS[a // 2]) for e in elevations for a in azimuths]
    lights = [LIGHTINGS[k] for k in lightings]
    images = render_views(mesh, views, lights=lights, size=size, supersample=supersample)
    shape = (len(elevations), len(azimuths), len(lightings), 2, size, size)
    return category, instance, images.reshape(shape)


def _permutation(split: str, n: int) -> np.ndarray:
    """Row position of each canonical (category, instance, elevation, azimuth, lighting)."""
    seed = 7919 * GENERATOR_VERSION + (0 if split == "train" else 1)
    return np.random.default_rng(seed).permutation(n)


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _estimate_seconds(views: int, size: int, supersample: int, workers: int) -> tuple[float, float]:
    """(estimated total seconds, measured seconds per stereo view with all lightings)."""
    mesh = build_object(2, 4)
    start = time.perf_counter()
    render_views(mesh, [(40, 40), (60, 200)], size=size, supersample=supersample)
    per_view = (time.perf_counter() - start) / 2
    return per_view * views / max(1, workers) * 1.1, per_view


def generate_toynorb(
    folder: str | os.PathLike,
    *,
    splits: Sequence[str] = ("train", "test"),
    categories: Sequence[int] = range(5),
    instances: dict[str, Sequence[int]] | None = None,
    elevations: Sequence[int] = range(9),
    azimuths: Sequence[int] = range(0, 36, 2),
    lightings: Sequence[int] = range(6),
    size: int = 96,
    supersample: int = 3,
    workers: int | None = None,
    verify: bool = True,
    progress: bool = True,
) -> dict[str, dict[str, str]]:
    """Render ToyNORB into ``folder`` (see the module docstring).

    The defaults give the standard dataset (24,300 stereo pairs per split). Smaller
    selections (fewer views, smaller images) are for tests and previews; their files have
    the standard names but not the standard MD5s.

    Args:
        folder: destination folder (created).
        splits: ``"train"`` and/or ``"test"``.
        categories: category codes 0..4.
        instances: per split, the instances (default smallNORB's split).
        elevations: elevation codes 0..8 (30 + 5 e degrees).
        azimuths: azimuth codes 0, 2, ..., 34 (10 a degrees).
        lightings: lighting codes 0..5.
        size: image size (96).
        supersample: antialiasing samples per pixel along each axis (3).
        workers: processes (default: the CPUs available, at most 8; 1 renders in this
            process).
        verify: with the standard settings, refuse (and do not install) files whose MD5
            differs from :data:`TOYNORB_MD5`.
        progress: tqdm bar and a one-line message on stderr.

    Returns:
        ``{split: {kind: md5}}`` of the files written.

    Raises:
        ValueError: bad selections.
        CorruptFileError: the standard files came out with other MD5s than recorded.
    """
    from tqdm.auto import tqdm

    folder = Path(folder).expanduser()
    instances = dict(SPLIT_INSTANCES if instances is None else instances)
    for split in splits:
        if split not in _STEMS:
            raise ValueError(f"splits must be 'train' and/or 'test', got {split!r}")
        if not set(instances.get(split, ())) <= set(range(10)):
            raise ValueError(f"instances[{split!r}] must be in 0..9, got {instances.get(split)}")
    checks = (
        (categories, range(5), "categories"),
        (elevations, range(9), "elevations"),
        (azimuths, range(0, 36, 2), "azimuths"),
        (lightings, range(6), "lightings"),
    )
    for values, valid, name in checks:
        if not values or not set(values) <= set(valid) or len(set(values)) != len(values):
            raise ValueError(
                f"{name} must be distinct codes from {list(valid)}, got {list(values)}"
            )
    if not isinstance(size, int) or size < 1 or not isinstance(supersample, int) or supersample < 1:
        raise ValueError(
            f"size and supersample must be positive ints, got {size!r}, {supersample!r}"
        )
    standard = (
        list(categories) == list(range(5))
        and all(list(instances[s]) == list(SPLIT_INSTANCES[s]) for s in splits)
        and list(elevations) == list(range(9))
        and list(azimuths) == list(range(0, 36, 2))
        and list(lightings) == list(range(6))
        and (size, supersample) == (96, 3)
    )
    if workers is None:
        workers = min(
            8,
            len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else os.cpu_count() or 1,
        )
    E, A, L = len(elevations), len(azimuths), len(lightings)
    per_object = E * A * L
    jobs = [
        (c, i, tuple(elevations), tuple(azimuths), tuple(lightings), size, supersample, split)
        for split in splits
        for c in categories
        for i in instances[split]
    ]
    total_pairs = len(jobs) * per_object
    if progress:
        estimate, per_view = _estimate_seconds(len(jobs) * E * A, size, supersample, workers)
        print(
            f"ToyNORB v{GENERATOR_VERSION}: rendering {total_pairs:,} stereo pairs "
            f"({', '.join(splits)}; {size}x{size}) into {folder} with {workers} process(es); "
            f"estimated {estimate / 60:.1f} min ({per_view * 1000:.0f} ms per stereo view with "
            "all lightings, measured now). Runs once; later loads read the files.",
            file=sys.stderr,
            flush=True,
        )
    folder.mkdir(parents=True, exist_ok=True)
    digests: dict[str, dict[str, str]] = {}
    with contextlib.ExitStack() as stack:
        temps, maps, cats, infos, orders = {}, {}, {}, {}, {}
        for split in splits:
            n = len(categories) * len(instances[split]) * per_object
            names = file_specs(split, {k: None for k in _KINDS})
            temps[split] = {
                k: stack.enter_context(atomic_path(folder / names[k].name)) for k in _KINDS
            }
            header = smallnorb_header((n, 2, size, size), "<u1")
            with open(temps[split]["dat"], "wb") as f:
                f.write(header)
                f.truncate(len(header) + n * 2 * size * size)
            maps[split] = np.memmap(
                temps[split]["dat"], dtype=np.uint8, mode="r+", offset=len(header),
                shape=(n, 2, size, size),
            )  # fmt: skip
            cats[split] = np.zeros(n, dtype="<i4")
            infos[split] = np.zeros((n, 4), dtype="<i4")
            orders[split] = _permutation(split, n)
        rank: dict[str, dict[Any, int]] = {split: {} for split in splits}
        for split in splits:
            for c in categories:
                for i in instances[split]:
                    rank[split][(c, i)] = len(rank[split])
        grid = np.stack(
            np.meshgrid(
                np.asarray(elevations), np.asarray(azimuths), np.asarray(lightings), indexing="ij"
            ),
            -1,
        ).reshape(-1, 3)

        def place(split: str, category: int, instance: int, images: np.ndarray) -> None:
            start = rank[split][(category, instance)] * per_object
            rows = orders[split][start : start + per_object]
            maps[split][rows] = images.reshape(per_object, 2, size, size)
            cats[split][rows] = category
            infos[split][rows, 0] = instance
            infos[split][rows, 1:] = grid

        bar = tqdm(
            total=total_pairs, unit="pair", desc="toynorb", disable=None if progress else True
        )
        job_args = [j[:-1] for j in jobs]
        results: Iterator[tuple[int, int, np.ndarray]]
        if workers <= 1:
            results = map(_render_object, job_args)
        else:
            # fork where available: no re-import of __main__, workers only run NumPy.
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method))
            stack.callback(pool.shutdown, cancel_futures=True)
            results = pool.map(_render_object, job_args)
        for job, (category, instance, images) in zip(jobs, results, strict=True):
            place(job[-1], category, instance, images)
            bar.update(per_object)
        bar.close()
        for split in splits:
            maps[split].flush()
            del maps[split]
            n = cats[split].shape[0]
            with open(temps[split]["cat"], "wb") as f:
                f.write(smallnorb_header((n,), "<i4") + cats[split].tobytes())
            with open(temps[split]["info"], "wb") as f:
                f.write(smallnorb_header((n, 4), "<i4") + infos[split].tobytes())
            digests[split] = {k: _md5(temps[split][k]) for k in _KINDS}
            if standard and verify:
                for kind in _KINDS:
                    want = TOYNORB_MD5[split][kind]
                    if want is not None and digests[split][kind] != want:
                        name = file_specs(split)[kind].name
                        raise CorruptFileError(
                            f"ToyNORB v{GENERATOR_VERSION}: generated {name} has MD5 "
                            f"{digests[split][kind]}, expected {want}. This machine's "
                            "floating point gives other bytes than the recorded ones; nothing "
                            "was installed. Pass verify=False (CLI: --no-verify) to keep them."
                        )
    return digests
