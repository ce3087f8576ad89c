"""``capsnet data list|download|generate|verify``: dataset files from the command line.

::

    capsnet data list                                   # every dataset, where it comes from
    capsnet data generate toynorb --root /data          # render ToyNORB into /data/toynorb
    capsnet data download smallnorb --root /data        # fetch and verify smallNORB
    capsnet data verify toynorb --root /data            # re-check every file's MD5

:func:`register_cli` adds the ``data`` group to the ``capsnet`` parser; each parser
carries its handler as ``args.handler``.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import time
from typing import Any

__all__ = ["register_cli"]

_USER_ERRORS = (ValueError, TypeError, FileNotFoundError, RuntimeError)


def _source(info: Any) -> str:
    if info.extra.get("generate") is not None:
        return "generated"
    if info.name in ("folder", "npz"):
        return "your files"
    return "download" if info.download else "local files"


def _base_splits(info: Any) -> list[str]:
    """The splits backed by files (the viewpoint splits are subsets of ``test``)."""
    splits = [s for s in ("train", "test") if s in info.splits]
    return splits or list(info.splits[:1])


def _create(name: str, split: str, root: str | None, **kwargs: Any) -> Any:
    """``data.create`` with the keyword arguments this dataset accepts."""
    from capsnet import data

    params = inspect.signature(data.dataset_info(name).factory).parameters
    kwargs = {k: v for k, v in kwargs.items() if k in params}
    return data.create(name, split=split, root=root, **kwargs)


def _fail(message: str) -> int:
    print(f"capsnet data: error: {message}", file=sys.stderr)
    return 1


def _list(_: argparse.Namespace) -> int:
    from capsnet import data

    names = data.list_datasets()
    width = max(len(n) for n in names) + 5
    for name in names:
        info = data.dataset_info(name)
        label = f"{name}:PATH" if name in ("folder", "npz") else name
        print(f"{label.ljust(width)}  {_source(info):11s}  {info.description}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from capsnet import data
    from capsnet.data.sources import resolve_root

    try:
        info = data.dataset_info(args.name)
    except ValueError as err:
        return _fail(str(err))
    generate = info.extra.get("generate")
    if generate is None:
        generated = [n for n in data.list_datasets() if data.dataset_info(n).extra.get("generate")]
        return _fail(
            f"{info.name!r} is not generated to files; datasets that are: {', '.join(generated)}"
        )
    if info.name == "toynorb" and not args.force:
        from capsnet.data.toynorb import toynorb_folder

        folder = toynorb_folder(args.root)
        if folder is not None:
            print(f"{info.name}: files already in {folder} (use --force to render them again)")
            return 0
    start = time.perf_counter()
    try:
        folder = generate(
            resolve_root(args.root),
            workers=args.workers,
            verify=args.verify,
            progress=not args.no_progress,
        )
    except _USER_ERRORS as err:
        return _fail(str(err))
    print(f"{info.name}: generated in {folder} in {time.perf_counter() - start:.1f} s")
    return 0


def _load_all(args: argparse.Namespace, *, download: bool) -> int:
    from capsnet import data

    try:
        info = data.dataset_info(args.name)
        for split in _base_splits(info):
            ds = _create(
                info.name, split, args.root, download=download, verify=True, cache=False,
                progress=not args.no_progress,
            )  # fmt: skip
            files = ds.meta.get("files") or ds.meta.get("path") or ""
            print(f"{info.name} {split}: {len(ds):,} examples verified  {files}")
    except _USER_ERRORS as err:
        return _fail(str(err))
    return 0


def _download(args: argparse.Namespace) -> int:
    return _load_all(args, download=True)


def _verify(args: argparse.Namespace) -> int:
    return _load_all(args, download=False)


def register_cli(subparsers: Any) -> None:
    """Add the ``data`` command group to a ``capsnet`` subparsers object."""
    group = subparsers.add_parser(
        "data",
        help="list, download, generate or verify dataset files",
        description="Dataset files: where each dataset comes from, fetching or rendering "
        "them into a data root, and checking them against their MD5s.",
    )
    sub = group.add_subparsers(dest="data_command", metavar="ACTION")
    sub.required = True

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("name", help="dataset name (see `capsnet data list`)")
        p.add_argument(
            "--root",
            default=os.environ.get("CAPSNET_DATA"),
            help="data root (default: $CAPSNET_DATA, else ~/.cache/capsnet)",
        )
        p.add_argument("--no-progress", action="store_true", help="no progress bars")

    p = sub.add_parser("list", help="every dataset and where its files come from")
    p.set_defaults(handler=_list)
    p = sub.add_parser("generate", help="render a generated dataset's files (e.g. toynorb)")
    common(p)
    p.add_argument("--workers", type=int, help="rendering processes (default: the available CPUs)")
    p.add_argument("--force", action="store_true", help="render again even if the files exist")
    p.add_argument(
        "--verify",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="refuse files whose MD5s differ from the recorded ones (default: on)",
    )
    p.set_defaults(handler=_generate)
    p = sub.add_parser(
        "download", help="fetch (or, for generated datasets, render) missing files, verified"
    )
    common(p)
    p.set_defaults(handler=_download)
    p = sub.add_parser("verify", help="check a dataset's files (MD5s and formats), no cache")
    common(p)
    p.set_defaults(handler=_verify)
