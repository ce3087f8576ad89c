"""Vector capsule layers of [S17]: primary capsules, dense capsules with dynamic routing,
and the masked reconstruction decoder.

Letters: ``B`` batch, ``C`` channels, ``H x W`` a grid, ``T`` capsule types per position,
``I`` input capsules, ``O`` output capsules, ``D`` pose (vector) size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from capsnet import functional as CF
from capsnet.layers._compat import deprecated_arguments
from capsnet.layers.hooks import RoutingLayer
from capsnet.layers.layouts import (
    capsule_lengths,
    capsules_from_feature_map,
    check_class_targets,
    check_tensor,
    conv_output_size,
    flatten_capsules,
    maybe_checkpoint,
    positive_int,
)

__all__ = ["PrimaryCapsules", "DenseCapsules", "CapsuleDecoder"]


class PrimaryCapsules(nn.Module):
    """Primary vector capsules, [S17] §4: a convolution whose channels form capsules, squashed.

    The convolution outputs ``out_types * pose_dim`` channels; the ``pose_dim`` channels
    ``t*D .. t*D + D-1`` at one position form the capsule of type ``t`` there
    (:func:`capsules_from_feature_map`). Sabour's MNIST layer is
    ``PrimaryCapsules(256, out_types=32, pose_dim=8, kernel_size=9, stride=2)``:
    ``(B, 256, 20, 20)`` -> ``(B, 1152, 8)``.

    Args:
        in_channels: channels of the input feature map.
        out_types: T, capsule types per position (32 in the paper).
        pose_dim: D, values per capsule (8 in the paper).
        kernel_size, stride, padding: of the convolution (9, 2, 0 in the paper).

    Shape:
        - input: ``(B, C, H, W)``.
        - output: ``(B, H_out * W_out * T, D)`` squashed, enumerated ``(h, w, t)``.
    """

    @deprecated_arguments(positional=("out_types", "pose_dim", "kernel_size", "stride", "padding"))
    def __init__(
        self,
        in_channels: int,
        *,
        out_types: int = 32,
        pose_dim: int = 8,
        kernel_size: int = 9,
        stride: int = 2,
        padding: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_channels = positive_int("in_channels", in_channels)
        self.out_types = positive_int("out_types", out_types)
        self.pose_dim = positive_int("pose_dim", pose_dim)
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.conv = nn.Conv2d(
            in_channels,
            out_types * pose_dim,
            kernel_size,
            stride=stride,
            padding=padding,
            device=device,
            dtype=dtype,
        )

    def output_size(self, input_size: tuple[int, int]) -> tuple[int, int]:
        """``(H_out, W_out)`` of the capsule grid for an ``(H, W)`` input map."""
        (h, w), k, s, p = input_size, self.kernel_size, self.stride, self.padding
        return conv_output_size(h, k, s, p), conv_output_size(w, k, s, p)

    def num_capsules(self, input_size: tuple[int, int]) -> int:
        """``H_out * W_out * T``, the number of capsules for an ``(H, W)`` input map."""
        h, w = self.output_size(input_size)
        return h * w * self.out_types

    def forward(self, x: Tensor) -> Tensor:
        check_tensor("x", x, 4, f"(B, {self.in_channels}, H, W)")
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"x must have shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        grid = capsules_from_feature_map(self.conv(x), self.pose_dim)  # (B, H, W, T, D)
        return CF.squash(flatten_capsules(grid))

    def extra_repr(self) -> str:
        return f"out_types={self.out_types}, pose_dim={self.pose_dim}"


class DenseCapsules(RoutingLayer):
    """Fully connected capsule layer with dynamic routing, [S17] eq. (2) and Procedure 1.

    One transformation matrix ``W_ij`` (``out_dim x in_dim``) per (input, output) capsule
    pair gives predictions ``u_hat_j|i = W_ij u_i``, which
    :func:`capsnet.functional.dynamic_routing` combines. The routing logits ``b_ij`` are
    per example and start at zero on every call (they are not parameters). No bias, as in
    the paper's parameter count (docs/spec.md §1: 1152 * 10 * 8 * 16 = 1,474,560).

    Args:
        in_caps: I, number of input capsules (1152 for MNIST).
        in_dim: input capsule size (8).
        out_caps: O, number of output capsules (10 classes).
        out_dim: output capsule size (16).
        iterations: routing iterations (3 in the paper).
        detach_inner: passed to :func:`capsnet.functional.dynamic_routing`.
        routing: the routing algorithm by registered name
            (:func:`capsnet.functional.list_routings`; ``"dynamic"``, the paper's); any
            algorithm that needs no options beyond ``iterations`` works here.
        init_std: standard deviation of the normal initialisation of ``W`` (0.01, as in
            the official code).
        checkpoint: keep only the input for the backward pass and recompute the
            predictions and the routing there (saves the ``(B, I, O, out_dim)`` predictions
            of every call for one more forward pass; for very large layers).

    Shape:
        - input: ``(B, I, in_dim)``.
        - output: ``(B, O, out_dim)``; with ``return_couplings=True`` also the coupling
          coefficients ``(B, I, O)``.
    """

    @deprecated_arguments(positional=("in_dim", "out_caps", "out_dim", "iterations"))
    def __init__(
        self,
        in_caps: int,
        *,
        in_dim: int,
        out_caps: int,
        out_dim: int,
        iterations: int = 3,
        detach_inner: bool = False,
        routing: str = "dynamic",
        init_std: float = 0.01,
        checkpoint: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.checkpoint = bool(checkpoint)
        self.in_caps = positive_int("in_caps", in_caps)
        self.in_dim = positive_int("in_dim", in_dim)
        self.out_caps = positive_int("out_caps", out_caps)
        self.out_dim = positive_int("out_dim", out_dim)
        self.iterations = positive_int("iterations", iterations)
        self.detach_inner = bool(detach_inner)
        self.routing = CF.get_routing(routing).name
        self.init_std = float(init_std)
        self.weight = nn.Parameter(
            torch.empty(in_caps, out_caps, out_dim, in_dim, device=device, dtype=dtype)
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.init_std)

    def predictions(self, u: Tensor) -> Tensor:
        """``u_hat_j|i = W_ij u_i``: ``(B, I, in_dim)`` -> ``(B, I, O, out_dim)``."""
        expected = f"(B, {self.in_caps}, {self.in_dim})"
        check_tensor("u", u, 3, expected)
        if u.shape[1:] != (self.in_caps, self.in_dim):
            raise ValueError(f"u must have shape {expected}, got {tuple(u.shape)}")
        return torch.einsum("iodk,bik->biod", self.weight, u)

    def forward(self, u: Tensor, return_couplings: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        v, c = maybe_checkpoint(self.checkpoint and not self.has_routing_hooks, self._route, u)
        return (v, c) if return_couplings else v

    def _route(self, u: Tensor) -> tuple[Tensor, Tensor]:
        u_hat = self.predictions(u)
        if self.routing == "dynamic":  # the paper's: called directly (hooks see its arguments)
            route = self._routed if self.has_routing_hooks else _call
            return route(
                "dynamic", CF.dynamic_routing, u_hat, self.iterations,
                detach_inner=self.detach_inner,
            )  # fmt: skip
        algorithm = CF.get_routing(self.routing).function
        route = self._routed if self.has_routing_hooks else _call
        poses, _, assignments = route(
            self.routing, algorithm, u_hat, None, iterations=self.iterations
        )
        return poses, assignments

    def extra_repr(self) -> str:
        return (
            f"in_caps={self.in_caps}, in_dim={self.in_dim}, out_caps={self.out_caps}, "
            f"out_dim={self.out_dim}, iterations={self.iterations}, "
            f"detach_inner={self.detach_inner}, routing={self.routing!r}, "
            f"checkpoint={self.checkpoint}"
        )


class CapsuleDecoder(nn.Module):
    """Masked reconstruction decoder, [S17] §4.1 (docs/spec.md §1).

    All class capsules but one are zeroed: the one named by ``targets`` (the true class
    during training) or, without targets, the longest. The masked ``O * D`` vector goes
    through FC 512 ReLU -> FC 1024 ReLU -> FC ``C*H*W`` sigmoid.

    Note: when ``targets`` are given they are used in every mode (train or eval); this lets
    callers reconstruct any chosen class (e.g. each digit of a MultiMNIST image). For the
    paper's test-time behaviour, call without targets.

    Args:
        num_classes: O, class capsules (10). (Formerly ``num_caps``, deprecated.)
        pose_dim: D, class capsule size (16). (Formerly ``caps_dim``, deprecated.)
        output_shape: ``(C, H, W)`` of the reconstructed image.
        hidden: sizes of the hidden layers (``(512, 1024)`` in the paper).

    Shape:
        - poses: ``(B, O, D)``; targets: ``(B,)`` int64 or None.
        - output: ``(B, C, H, W)`` in [0, 1].
    """

    @deprecated_arguments(
        positional=("pose_dim", "output_shape", "hidden"),
        renamed={"num_caps": "num_classes", "caps_dim": "pose_dim"},
    )
    def __init__(
        self,
        num_classes: int,
        *,
        pose_dim: int,
        output_shape: Sequence[int],
        hidden: Sequence[int] = (512, 1024),
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.num_classes = positive_int("num_classes", num_classes)
        self.pose_dim = positive_int("pose_dim", pose_dim)
        if len(output_shape) != 3:
            raise ValueError(f"output_shape must be (C, H, W), got {tuple(output_shape)}")
        self.output_shape = tuple(positive_int("output_shape", int(s)) for s in output_shape)
        sizes = [num_classes * pose_dim, *hidden, math.prod(self.output_shape)]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            layers.append(nn.Linear(a, b, device=device, dtype=dtype))
            layers.append(nn.ReLU(inplace=True) if i < len(sizes) - 2 else nn.Sigmoid())
        self.net = nn.Sequential(*layers)

    def mask(self, poses: Tensor, targets: Tensor | None = None) -> Tensor:
        """Zero every capsule but the target (or the longest): ``(B, O, D)`` -> ``(B, O*D)``."""
        expected = f"(B, {self.num_classes}, {self.pose_dim})"
        check_tensor("poses", poses, 3, expected)
        if poses.shape[1:] != (self.num_classes, self.pose_dim):
            raise ValueError(f"poses must have shape {expected}, got {tuple(poses.shape)}")
        if targets is None:
            targets = capsule_lengths(poses.detach()).argmax(-1)
        else:
            check_class_targets(targets, poses.shape[0], self.num_classes)
        one_hot = F.one_hot(targets.long(), self.num_classes).to(poses.dtype)  # (B, O)
        return (poses * one_hot.unsqueeze(-1)).flatten(1)

    def forward(self, poses: Tensor, targets: Tensor | None = None) -> Tensor:
        out = self.net(self.mask(poses, targets))
        return out.reshape(out.shape[0], *self.output_shape)

    @property
    def num_caps(self) -> int:
        """Deprecated name of :attr:`num_classes`."""
        return self.num_classes

    @property
    def caps_dim(self) -> int:
        """Deprecated name of :attr:`pose_dim`."""
        return self.pose_dim

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, pose_dim={self.pose_dim}"


def _call(_: str, function: Any, *args: Any, **kwargs: Any) -> Any:
    """``function(*args, **kwargs)``: :meth:`RoutingLayer._routed` without hooks."""
    return function(*args, **kwargs)
