"""Pieces shared by the ``capsnet`` command's modules (:mod:`capsnet.cli`,
:mod:`capsnet.experiment_cli`): the one home of the user-error list, the error line, the
``KEY=VALUE`` argument type and the output flags.

Output flags, the same in every command: a command that writes **a folder** takes
``--output-dir DIR`` (``capsnet train``, ``capsnet experiment ...``); a command that writes
**one file** takes ``--output FILE`` (``capsnet evaluate``, ``capsnet report``). The former
``--out`` of the experiment commands still works, with a note on stderr.

:class:`CapsnetParser` is the parser class of every ``capsnet`` (sub)command: help shows
each option's default, a misspelt option gets a suggestion and a wrong choice a one-line
error (no usage dump).
"""

from __future__ import annotations

import argparse
import difflib
import math
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

__all__ = [
    "USER_ERRORS",
    "fail",
    "key_value",
    "add_output_dir",
    "CapsnetParser",
    "HelpFormatter",
    "VersionAction",
    "version_text",
    "format_table",
    "thread_count",
]

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


# --------------------------------------------------------------------------- parsers


class HelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to an option's help unless the help already says it, the
    default is None/suppressed, or the option is a plain on/off switch."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            "%(default)" in text
            or "default" in text.lower()
            or default is None
            or default is argparse.SUPPRESS
            or default is False
            or default == []
            or not action.option_strings
            or action.nargs == 0
        ):
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


_CHOICE = re.compile(r"invalid choice: '?([^'(]*?)'? \(choose from (.*)\)")


class CapsnetParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with short errors.

    * An unknown ``--flag`` names the closest valid one: ``unknown option --epcohs; did
      you mean --epochs?`` (suggestions come from the (sub)command that was parsed).
    * A wrong choice is one line naming the valid choices (and the closest one).
    * No usage dump: the error line and a pointer to ``--help``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        ns, extras = super().parse_known_args(args, namespace)
        # The innermost (sub)command parsed sets it first; its values are copied upwards.
        if not hasattr(ns, "_capsnet_parser"):
            ns._capsnet_parser = self
        return ns, extras

    def parse_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> argparse.Namespace:
        ns, extras = self.parse_known_args(args, namespace)
        leaf = vars(ns).pop("_capsnet_parser", self)
        if extras:
            leaf.error(leaf.unknown_message(extras))
        return ns

    def option_names(self) -> list[str]:
        """The ``--flags`` this parser accepts (hidden ones excluded)."""
        return [
            s
            for a in self._actions
            if a.help is not argparse.SUPPRESS
            for s in a.option_strings
            if s.startswith("--")
        ]

    def unknown_message(self, extras: Sequence[str]) -> str:
        """``unknown option --x; did you mean --y?`` for each unknown flag in ``extras``."""
        parts = []
        others = []
        for token in extras:
            if token.startswith("-") and len(token) > 1 and not _is_number(token):
                flag = token.split("=", 1)[0]
                close = difflib.get_close_matches(flag, self.option_names(), n=1, cutoff=0.6)
                hint = f"; did you mean {close[0]}?" if close else ""
                parts.append(f"unknown option {flag}{hint}")
            else:
                others.append(token)
        if others and not parts:  # after an unknown flag, the rest is likely its value
            parts.append("unexpected argument(s): " + " ".join(others))
        return "; ".join(parts)

    def error(self, message: str) -> NoReturn:
        m = _CHOICE.search(message)
        if m:
            valid = re.findall(r"'([^']*)'", m.group(2)) or [
                v.strip() for v in m.group(2).split(",")
            ]
            close = difflib.get_close_matches(m.group(1), valid, n=1)
            if close:
                message += f"; did you mean {close[0]!r}?"
        self.exit(2, f"{self.prog}: error: {message}\n(see `{self.prog} --help`)\n")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def version_text() -> str:
    """``capsnet X.Y.Z (torch A.B.C, Python D.E.F)``."""
    import platform

    import torch

    from capsnet import __version__

    return f"capsnet {__version__} (torch {torch.__version__}, Python {platform.python_version()})"


class VersionAction(argparse.Action):
    """``--version``: print :func:`version_text` and exit (torch is imported only then)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        kwargs.setdefault("help", "print the capsnet and torch versions and exit")
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: Any = None):
        print(version_text())
        parser.exit()


def thread_count(text: str) -> int:
    """An argparse type: a thread count in ``1..MAX_THREADS``."""
    from capsnet.config import MAX_THREADS

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 1 <= value <= MAX_THREADS:
        raise argparse.ArgumentTypeError(f"must be in 1..{MAX_THREADS}, got {value}")
    return value


# --------------------------------------------------------------------------- output


def _cell(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return "-" if v is None else str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if v == 0:
            return "0"
        return f"{v:.4f}" if 1e-3 <= abs(v) < 10 else f"{v:.4g}"
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_cell(x) for x in v[:6]) + (", ..." if len(v) > 6 else "") + "]"
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{k}: {_cell(x)}" for k, x in list(v.items())[:6]) + "}"
    return str(v)


def format_table(rows: Sequence[Mapping[str, Any]], *, max_rows: int = 40) -> str:
    """Rows of dicts as an aligned text table (one table per run of rows with the same
    keys; at most ``max_rows`` rows, then a count of the rest)."""
    rows = [r for r in rows if isinstance(r, Mapping)]
    shown, rest = rows[:max_rows], len(rows) - max_rows
    groups: list[list[Mapping[str, Any]]] = []
    for r in shown:
        if groups and list(groups[-1][0]) == list(r):
            groups[-1].append(r)
        else:
            groups.append([r])
    blocks = []
    for group in groups:
        columns = list(group[0])
        cells = [[_cell(r.get(c)) for c in columns] for r in group]
        widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
        lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
        blocks.append("\n".join(line.rstrip() for line in lines))
    if rest > 0:
        blocks.append(f"... {rest} more rows")
    return "\n\n".join(blocks)
