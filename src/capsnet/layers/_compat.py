"""Deprecated spellings of constructor arguments, accepted for one release with a warning."""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

__all__ = ["deprecated_arguments"]

F = TypeVar("F", bound=Callable[..., Any])


def deprecated_arguments(
    positional: Sequence[str] = (), renamed: Mapping[str, str] | None = None
) -> Callable[[F], F]:
    """Decorate an ``__init__`` whose arguments became keyword-only or were renamed.

    Args:
        positional: the keyword-only parameters, in their old positional order, that callers
            may still pass by position (with a ``DeprecationWarning``).
        renamed: old keyword -> new keyword (the old one warns and is mapped onto the new).
    """
    renamed = dict(renamed or {})

    def decorate(init: F) -> F:
        params = list(inspect.signature(init).parameters.values())[1:]  # without self
        positional_names = [
            p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        n_positional = len(positional_names)

        @functools.wraps(init)
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> None:
            owner = type(self).__name__
            if len(args) > n_positional:
                extra = args[n_positional:]
                if len(extra) > len(positional):
                    raise TypeError(
                        f"{owner}() takes {n_positional + len(positional)} positional "
                        f"arguments at most, got {len(args)}"
                    )
                names = list(positional[: len(extra)])
                warnings.warn(
                    f"{owner}: passing {', '.join(names)} by position is deprecated; "
                    f"pass {'them' if len(names) > 1 else 'it'} by keyword",
                    DeprecationWarning,
                    stacklevel=2,
                )
                for name, value in zip(names, extra, strict=True):
                    if name in kwargs:
                        raise TypeError(f"{owner}() got multiple values for argument {name!r}")
                    kwargs[name] = value
                args = args[:n_positional]
            for old, new in renamed.items():
                if old in kwargs:
                    if new in kwargs or new in positional_names[: len(args)]:
                        raise TypeError(
                            f"{owner}() got both {old!r} (deprecated) and {new!r}; pass {new!r}"
                        )
                    warnings.warn(
                        f"{owner}: argument {old!r} is deprecated; use {new!r}",
                        DeprecationWarning,
                        stacklevel=2,
                    )
                    kwargs[new] = kwargs.pop(old)
            init(self, *args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate
