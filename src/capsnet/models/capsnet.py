"""Sabour, Frosst & Hinton 2017: CapsNet with dynamic routing and a reconstruction decoder.

Architecture (docs/spec.md §1), for a ``C x H x W`` input::

    Conv1        256 ch, 9x9, stride 1, ReLU         (B, 256, H-8, W-8)
    PrimaryCaps  32 types x 8D, 9x9, stride 2        (B, I, 8),  I = H'*W'*32 (1152 at 28x28)
    DigitCaps    num_classes x 16D, dynamic routing  (B, num_classes, 16)
    Decoder      FC 512 -> FC 1024 -> FC C*H*W       (B, C, H, W)   (reconstruction=True)

Parameters at 28x28, 10 classes: 20,992 + 5,308,672 + 1,474,560 = 6,804,224 without the
decoder, + 1,411,344 = 8,215,568 with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from capsnet.layers import (
    CapsuleDecoder,
    DenseCapsules,
    PrimaryCapsules,
    capsule_lengths,
    conv_output_size,
)
from capsnet.models._common import as_size, check_images, check_targets, positive_int
from capsnet.models.registry import ModelOutput, register_model

__all__ = ["CapsNet"]


class CapsNet(nn.Module):
    """Sabour et al. 2017 CapsNet (docs/spec.md §1).

    Args:
        num_classes: class capsules (10).
        in_channels: image channels (1 for MNIST, 3 for CIFAR-10).
        input_size: ``H`` or ``(H, W)``: 28 (MNIST), 36 (MultiMNIST), 40 (affNIST), 32
            (CIFAR-10); at least 17 so the two 9x9 convolutions fit.
        iterations: routing iterations (3).
        reconstruction: attach the reconstruction decoder (adds 1.4M parameters at 28x28).
        conv_channels: channels of Conv1 (256).
        primary_types: primary capsule types per position (32; e.g. 8 for a quick variant).
        primary_dim: primary capsule size (8).
        class_dim: class capsule size (16).
        detach_inner: see :func:`capsnet.functional.dynamic_routing`.
        checkpoint: recompute the class capsules' predictions and routing in the backward
            pass instead of keeping them (memory-saving option, see
            :class:`~capsnet.layers.DenseCapsules`).

    Shape:
        - images: ``(B, in_channels, H, W)`` float; targets: ``(B,)`` int64 or None.
        - output: :class:`~capsnet.models.ModelOutput` with scores ``(B, num_classes)``
          (class capsule lengths), poses ``(B, num_classes, class_dim)`` and
          reconstructions ``(B, in_channels, H, W)`` or None.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        input_size: int | Sequence[int] = 28,
        iterations: int = 3,
        *,
        reconstruction: bool = True,
        conv_channels: int = 256,
        primary_types: int = 32,
        primary_dim: int = 8,
        class_dim: int = 16,
        detach_inner: bool = False,
        checkpoint: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.num_classes = positive_int("num_classes", num_classes)
        self.in_channels = positive_int("in_channels", in_channels)
        self.input_size = as_size(input_size)
        positive_int("conv_channels", conv_channels)
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        grid = tuple(conv_output_size(s, 9) for s in self.input_size)
        grid = tuple(conv_output_size(s, 9, 2) for s in grid)
        if min(grid) < 1:
            raise ValueError(
                "input_size must be at least 17x17 for the 9x9 and 9x9/2 convolutions, "
                f"got {self.input_size}"
            )
        self.conv1 = nn.Conv2d(in_channels, conv_channels, 9, **kw)
        self.primary = PrimaryCapsules(
            conv_channels, out_types=primary_types, pose_dim=primary_dim, kernel_size=9,
            stride=2, **kw,
        )  # fmt: skip
        in_caps = grid[0] * grid[1] * primary_types
        self.digits = DenseCapsules(
            in_caps, in_dim=primary_dim, out_caps=num_classes, out_dim=class_dim,
            iterations=iterations, detach_inner=detach_inner, checkpoint=checkpoint, **kw,
        )  # fmt: skip
        self.decoder = (
            CapsuleDecoder(
                num_classes, pose_dim=class_dim, output_shape=(in_channels, *self.input_size), **kw
            )
            if reconstruction
            else None
        )

    def forward(self, images: Tensor, targets: Tensor | None = None) -> ModelOutput:
        check_images(images, self.in_channels, self.input_size)
        check_targets(targets, images.shape[0], self.num_classes)
        u = self.primary(torch.relu(self.conv1(images)))  # (B, I, 8)
        v = self.digits(u)  # (B, num_classes, 16)
        recon = self.decoder(v, targets) if self.decoder is not None else None
        return ModelOutput(capsule_lengths(v), v, recon)

    def reconstruct(self, poses: Tensor, classes: Tensor | None = None) -> Tensor:
        """Decode class capsule poses (e.g. perturbed ones) masked by ``classes``.

        Shape: poses ``(B, num_classes, class_dim)``, classes ``(B,)`` or None (longest)
        -> ``(B, in_channels, H, W)``.
        """
        if self.decoder is None:
            raise RuntimeError("this CapsNet was built with reconstruction=False")
        return self.decoder(poses, classes)


@register_model(
    paper="Sabour, Frosst, Hinton. Dynamic Routing Between Capsules. NeurIPS 2017",
    loss="margin",
    input_size=(28, 28),
    in_channels=1,
    num_classes=10,
    expected_params=8_215_568,
    recipe="capsnet_mnist",
    description="Sabour et al. 2017 CapsNet, dynamic routing + reconstruction decoder",
    extra={"expected_params_without_decoder": 6_804_224},
)
def capsnet(**kwargs) -> CapsNet:
    return CapsNet(**kwargs)
