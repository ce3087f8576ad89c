"""Argument checks shared by capsnet's modules (the one home for them; private to the
package, so other modules import these public names instead of each other's helpers)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["check_choice"]


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices``, else ``ValueError`` listing them.

    >>> check_choice("which", "best", ("best", "last"))
    'best'
    """
    if not isinstance(value, str) or value not in choices:
        valid = ", ".join(map(repr, choices))
        raise ValueError(f"{name} must be one of {valid}, got {value!r}")
    return value
