"""Model registry: the front door for building models by name.

Every model file ends with small factories decorated with :func:`register_model`, which
records metadata (paper, default input size, classes, expected parameter count, loss,
recipe). :func:`create` builds a model by name; unknown names list close matches.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn

__all__ = [
    "ModelOutput",
    "ModelInfo",
    "register_model",
    "create",
    "list_models",
    "model_info",
    "legacy_kwargs",
    "restore_kwargs",
    "record_kwargs",
]


class ModelOutput(NamedTuple):
    """What every capsnet model returns from ``model(images, targets=None)``.

    Attributes:
        scores: ``(B, num_classes)``: class capsule lengths (dynamic routing), class capsule
            activations (EM routing) or logits (baseline CNNs). ``argmax`` is the prediction.
        poses: ``(B, num_classes, pose_dim)`` class capsule poses (16D vectors or flattened
            4x4 matrices); for CNN baselines the penultimate features ``(B, F)``.
        reconstructions: ``(B, C, H, W)`` decoder output in [0, 1], or ``None`` for models
            without a decoder.
    """

    scores: torch.Tensor
    poses: torch.Tensor
    reconstructions: torch.Tensor | None = None


@dataclass(frozen=True)
class ModelInfo:
    """Metadata recorded for a registered model.

    Attributes:
        name: registry name.
        factory: callable building the model from keyword arguments.
        paper: citation of the paper the architecture comes from.
        loss: the paper's loss for this model: ``"margin"``, ``"spread"`` or
            ``"cross_entropy"``; the trainer uses it unless told otherwise.
        input_size: default ``(H, W)``.
        in_channels: default number of image channels.
        num_classes: default number of classes.
        expected_params: parameter count with default arguments (checked by tests).
        recipe: name of the recipe reproducing the paper's result.
        description: one line for ``capsnet models``.
    """

    name: str
    factory: Callable[..., nn.Module]
    paper: str = ""
    loss: str = "cross_entropy"
    input_size: tuple[int, int] = (28, 28)
    in_channels: int = 1
    num_classes: int = 10
    expected_params: int | None = None
    recipe: str | None = None
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


_REGISTRY: dict[str, ModelInfo] = {}


def register_model(name: str | None = None, **metadata: Any) -> Callable:
    """Decorator registering a model factory under ``name`` (default: the function name).

    Example::

        @register_model(loss="margin", paper="Sabour et al. 2017", expected_params=8_215_568)
        def capsnet(**kwargs):
            return CapsNet(**kwargs)
    """

    def decorator(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or factory.__name__
        if key in _REGISTRY:
            raise ValueError(f"model {key!r} is already registered")
        _REGISTRY[key] = ModelInfo(name=key, factory=factory, **metadata)
        return factory

    return decorator


def _lookup(name: str) -> ModelInfo:
    if not isinstance(name, str):
        raise TypeError(f"model name must be a str, got {type(name).__name__}")
    key = name.strip().lower().replace("-", "_")
    if key not in _REGISTRY:
        close = difflib.get_close_matches(key, _REGISTRY, n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(
            f"unknown model {name!r}.{hint} Available models: {', '.join(list_models())}"
        )
    return _REGISTRY[key]


def create(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model by name.

    Keyword arguments whose value is ``None`` are dropped, so callers (the CLI, configs)
    can pass every option and let the model keep its defaults.

    Args:
        name: a name from :func:`list_models` (case-insensitive, ``-`` equals ``_``).
        **kwargs: constructor arguments, e.g. ``num_classes``, ``in_channels``,
            ``input_size``, ``iterations``.

    Raises:
        ValueError: unknown model name (the message lists close matches and all names).
        TypeError: an argument the model does not accept.
    """
    info = _lookup(name)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return info.factory(**kwargs)


def list_models() -> list[str]:
    """Sorted names of all registered models."""
    return sorted(_REGISTRY)


def model_info(name: str) -> ModelInfo:
    """Metadata of a registered model (see :class:`ModelInfo`)."""
    return _lookup(name)


def legacy_kwargs(name: str) -> dict[str, Any]:
    """Constructor arguments whose default changed, with the value a model saved without
    them was built with (metadata ``extra["legacy_kwargs"]``; ``{}`` for most models)."""
    return dict(_lookup(name).extra.get("legacy_kwargs", {}))


def restore_kwargs(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The kwargs that rebuild a saved model: ``kwargs`` with :func:`legacy_kwargs` filled
    in where they are missing (a checkpoint from before a default changed)."""
    return {**legacy_kwargs(name), **kwargs}


def record_kwargs(name: str, kwargs: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """``kwargs`` plus the values ``model`` resolved for every :func:`legacy_kwargs` key
    (its attribute of that name), so that a checkpoint records them and later default
    changes do not change what it rebuilds."""
    out = dict(kwargs)
    for key in legacy_kwargs(name):
        if key not in out and hasattr(model, key):
            out[key] = getattr(model, key)
    return out
