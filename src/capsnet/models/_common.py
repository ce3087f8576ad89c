"""Argument and input checks shared by the models."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from capsnet.layers.layouts import check_class_targets, positive_int

__all__ = ["as_size", "positive_int", "check_images", "check_targets"]


def as_size(input_size: int | Sequence[int]) -> tuple[int, int]:
    """``28`` or ``(28, 28)`` (or a JSON list ``[28, 28]``) -> ``(H, W)``."""
    if isinstance(input_size, int) and not isinstance(input_size, bool):
        size: tuple[int, ...] = (input_size, input_size)
    elif isinstance(input_size, Sequence) and not isinstance(input_size, str):
        size = tuple(input_size)
    else:
        raise TypeError(f"input_size must be an int or (H, W), got {input_size!r}")
    if len(size) != 2 or not all(
        isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size
    ):
        raise ValueError(f"input_size must be a positive int or (H, W), got {input_size!r}")
    return size[0], size[1]


def check_images(images: Tensor, in_channels: int, input_size: tuple[int, int]) -> None:
    """``images`` must be a float tensor of shape ``(B, in_channels, H, W)``."""
    expected = f"(B, {in_channels}, {input_size[0]}, {input_size[1]})"
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a torch.Tensor {expected}, got {type(images).__name__}")
    if not images.is_floating_point():
        raise TypeError(
            f"images must be a floating-point tensor (e.g. float32 in [0, 1]), "
            f"got dtype {images.dtype}"
        )
    if images.ndim != 4 or tuple(images.shape[1:]) != (in_channels, *input_size):
        raise ValueError(f"images must have shape {expected}, got {tuple(images.shape)}")


def check_targets(targets: Tensor | None, batch: int, num_classes: int) -> None:
    """``targets`` must be None or int64 ``(B,)`` in ``[0, num_classes)``."""
    if targets is not None:
        check_class_targets(targets, batch, num_classes)
