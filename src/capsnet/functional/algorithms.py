"""Routing algorithms by name: the registry that the capsule layers choose from.

Every routing algorithm has one signature::

    fn(votes, activations, *, iterations, **options) -> RoutingResult

with ``votes (..., I, O, D)`` (one vote per child and parent), ``activations (..., I)`` of
the children or ``None`` (vector capsules carry none), and
``RoutingResult(poses (..., O, D), activations (..., O), assignments (..., I, O))``.

To add an algorithm, write one function with that signature and register it::

    @register_routing("mean", summary="every child split evenly over the parents")
    def mean_routing(votes, activations=None, *, iterations=1):
        ...

``DenseCapsules(..., routing="mean")`` then routes with it (:mod:`capsnet.layers`), and
``capsnet.functional.list_routings()`` lists it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from torch import Tensor

from capsnet.functional.routing import dynamic_routing, em_routing

__all__ = [
    "RoutingResult",
    "RoutingAlgorithm",
    "register_routing",
    "get_routing",
    "list_routings",
]


class RoutingResult(NamedTuple):
    """What every routing algorithm returns.

    Shape: poses ``(..., O, D)``, activations ``(..., O)``, assignments ``(..., I, O)``.
    """

    poses: Tensor
    activations: Tensor
    assignments: Tensor


@dataclass(frozen=True)
class RoutingAlgorithm:
    """A registered routing algorithm: its name, function and one-line summary."""

    name: str
    function: Callable[..., RoutingResult]
    summary: str


_REGISTRY: dict[str, RoutingAlgorithm] = {}


def register_routing(
    name: str, *, summary: str
) -> Callable[[Callable[..., RoutingResult]], Callable[..., RoutingResult]]:
    """Register ``fn(votes, activations, *, iterations, **options)`` as routing ``name``."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"a routing name must be an identifier, got {name!r}")

    def decorate(fn: Callable[..., RoutingResult]) -> Callable[..., RoutingResult]:
        if name in _REGISTRY and _REGISTRY[name].function is not fn:
            raise ValueError(f"routing {name!r} is already registered")
        _REGISTRY[name] = RoutingAlgorithm(name, fn, summary)
        return fn

    return decorate


def get_routing(name: str) -> RoutingAlgorithm:
    """The registered routing algorithm ``name`` (the error lists the registered ones)."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"routing must be one of {', '.join(map(repr, sorted(_REGISTRY)))}, got {name!r}"
        ) from None


def list_routings() -> list[str]:
    """Names of the registered routing algorithms, sorted."""
    return sorted(_REGISTRY)


@register_routing("dynamic", summary="routing-by-agreement of vector capsules, [S17] Procedure 1")
def dynamic(
    votes: Tensor,
    activations: Tensor | None = None,
    *,
    iterations: int = 3,
    detach_inner: bool = False,
) -> RoutingResult:
    """:func:`capsnet.functional.dynamic_routing`; child activations are not used (vector
    capsules encode presence in their length), the parents' activations are ``|v_j|``."""
    v, c = dynamic_routing(votes, iterations, detach_inner=detach_inner)
    lengths = v.float().pow(2).sum(-1).add(1e-9).sqrt().to(v.dtype)
    return RoutingResult(v, lengths, c)


@register_routing("em", summary="EM routing of matrix capsules, [H18] Procedure 1")
def em(
    votes: Tensor,
    activations: Tensor | None,
    *,
    iterations: int = 3,
    beta_u: Tensor | float = 0.0,
    beta_a: Tensor | float = 0.0,
    **options: Any,
) -> RoutingResult:
    """:func:`capsnet.functional.em_routing` (``options``: ``inverse_temperatures``,
    ``normalize_cost``, ...); children without activations count as fully active."""
    if activations is None:
        activations = votes.new_ones(votes.shape[:-2])
    return RoutingResult(
        *em_routing(votes, activations, beta_u, beta_a, iterations=iterations, **options)
    )
