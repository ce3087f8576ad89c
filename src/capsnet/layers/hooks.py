"""Routing hooks: an explicit way to look inside a capsule layer's routing.

Every routing layer (:class:`~capsnet.layers.DenseCapsules`,
:class:`~capsnet.layers.ConvMatrixCapsules`, :class:`~capsnet.layers.ClassMatrixCapsules`)
is a :class:`RoutingLayer`: ``layer.register_routing_hook(hook)`` makes each forward pass
call ``hook(layer, call)`` with a :class:`RoutingCall` holding the routing call's
arguments (votes included) and outputs, detached. It returns a handle whose ``remove()``
unregisters the hook, as PyTorch's module hooks do. Results are unchanged; a layer with
hooks computes its votes explicitly (the fused convolutional path never stores them), so
it is slower while hooked. :func:`capsnet.probes.capture_routing` hooks a whole model.
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = ["RoutingCall", "RoutingHook", "RoutingLayer"]


@dataclass
class RoutingCall:
    """One recorded routing call.

    Attributes:
        kind: ``"dynamic"`` (:func:`capsnet.functional.dynamic_routing`), ``"em"``
            (:func:`~capsnet.functional.em_routing`) or ``"conv_em"``
            (:func:`~capsnet.functional.conv_em_routing`).
        arguments: every argument of that function by name, defaults filled in; tensors
            detached (``u_hat`` or ``votes``, ``activations``, ``beta_u``, ...), so that
            ``function(**arguments)`` repeats the call.
        outputs: the call's return value, detached: ``(v, c)`` for dynamic routing,
            ``(poses, activations, assignments)`` for EM routing.
    """

    kind: str
    arguments: dict[str, Any]
    outputs: tuple[Tensor, ...]

    @property
    def iterations(self) -> int:
        return int(self.arguments["iterations"])


RoutingHook = Callable[[nn.Module, RoutingCall], None]


def _detach(x: Any) -> Any:
    if isinstance(x, Tensor):
        return x.detach()
    if isinstance(x, tuple):
        return tuple(_detach(v) for v in x)
    return x


class RoutingLayer(nn.Module):
    """Base of the capsule layers that route: holds and calls their routing hooks."""

    def __init__(self) -> None:
        super().__init__()
        self._routing_hooks: OrderedDict[int, RoutingHook] = OrderedDict()

    def register_routing_hook(self, hook: RoutingHook) -> RemovableHandle:
        """Call ``hook(self, call: RoutingCall)`` after every routing call of this layer.

        Returns:
            A handle; ``handle.remove()`` unregisters the hook.
        """
        if not callable(hook):
            raise TypeError(f"hook must be callable, got {type(hook).__name__}")
        handle = RemovableHandle(self._routing_hooks)
        self._routing_hooks[handle.id] = hook
        return handle

    @property
    def has_routing_hooks(self) -> bool:
        return bool(self.__dict__.get("_routing_hooks"))

    def _routed(self, kind: str, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``function(*args, **kwargs)``, reported to the hooks as a :class:`RoutingCall`."""
        out = function(*args, **kwargs)
        bound = inspect.signature(function).bind(*args, **kwargs)
        bound.apply_defaults()
        call = RoutingCall(kind, {k: _detach(v) for k, v in bound.arguments.items()}, _detach(out))
        for hook in list(self._routing_hooks.values()):
            hook(self, call)
        return out
