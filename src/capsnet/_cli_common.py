"""Pieces shared by the ``capsnet`` command's modules (:mod:`capsnet.cli`,
:mod:`capsnet.experiment_cli`): the one home of the user-error list, the error line, the
``KEY=VALUE`` argument type and the output flags.

Output flags, the same in every command: a command that writes **a folder** takes
``--output-dir DIR`` (``capsnet train``, ``capsnet experiment ...``); a command that writes
**one file** takes ``--output FILE`` (``capsnet evaluate``, ``capsnet report``). The former
``--out`` of the experiment commands still works, with a note on stderr.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["USER_ERRORS", "fail", "key_value", "add_output_dir"]

USER_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError, RuntimeError)
"""Exceptions a command reports as one ``capsnet: error: ...`` line (the others are bugs
and keep their traceback)."""


def fail(message: str, code: int = 1) -> int:
    """Print ``capsnet: error: MESSAGE`` on stderr; returns the exit status ``code``."""
    print(f"capsnet: error: {message}", file=sys.stderr)
    return code


def key_value(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` -> ``(KEY, VALUE)`` with VALUE parsed as TOML (an argparse type)."""
    from capsnet.config import parse_value

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), parse_value(value.strip())


class _DeprecatedAlias(argparse.Action):
    """Stores like the flag it stands for, after a one-line note on stderr."""

    def __init__(self, option_strings: Sequence[str], dest: str, *, new: str, **kwargs: Any):
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: Any = None):
        print(f"capsnet: note: {option_string} is now {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_output_dir(parser: argparse.ArgumentParser, help: str) -> None:
    """Add ``--output-dir DIR`` (``args.output_dir``) and the hidden former ``--out``."""
    parser.add_argument("--output-dir", metavar="DIR", help=help)
    parser.add_argument(
        "--out", dest="output_dir", action=_DeprecatedAlias, new="--output-dir",
        metavar="DIR", help=argparse.SUPPRESS,
    )  # fmt: skip
