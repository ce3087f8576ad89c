"""The papers' baseline CNNs: Sabour et al. 2017 (MNIST) and Hinton et al. 2018 (smallNORB).

Both return logits as ``scores`` and their penultimate features as ``poses``; they are
trained with cross-entropy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from capsnet.models._common import as_size, check_images, check_targets, positive_int
from capsnet.models.registry import ModelOutput, register_model

__all__ = ["SabourCNN", "HintonCNN"]


class SabourCNN(nn.Module):
    """Sabour et al. 2017 baseline CNN (docs/spec.md §1).

    Three 5x5 convolutions of 256, 256, 128 channels (stride 1, "same" padding, ReLU, no
    pooling), FC 328 ReLU, FC 192 ReLU, dropout, FC ``num_classes``. 35,445,522 parameters
    at 28x28 with 10 classes (the 128*28*28 -> 328 layer holds 32.9M of them).

    Args:
        num_classes, in_channels, input_size: as in every capsnet model.
        dropout: drop probability before the last layer.

    Shape:
        - images: ``(B, in_channels, H, W)``; targets ignored (checked if given).
        - output: scores (logits) ``(B, num_classes)``, poses (features) ``(B, 192)``.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        input_size: int | Sequence[int] = 28,
        *,
        dropout: float = 0.5,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.num_classes = positive_int("num_classes", num_classes)
        self.in_channels = positive_int("in_channels", in_channels)
        self.input_size = as_size(input_size)
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        h, w = self.input_size
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 256, 5, padding=2, **kw),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, 5, padding=2, **kw),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 128, 5, padding=2, **kw),
            nn.ReLU(inplace=True),
            nn.Flatten(),
            nn.Linear(128 * h * w, 328, **kw),
            nn.ReLU(inplace=True),
            nn.Linear(328, 192, **kw),
            nn.ReLU(inplace=True),
        )
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(192, num_classes, **kw)

    def forward(self, images: Tensor, targets: Tensor | None = None) -> ModelOutput:
        check_images(images, self.in_channels, self.input_size)
        check_targets(targets, images.shape[0], self.num_classes)
        features = self.features(images)
        return ModelOutput(self.classifier(self.dropout(features)), features, None)


class HintonCNN(nn.Module):
    """Hinton et al. 2018 smallNORB baseline CNN (docs/spec.md §2).

    Conv 32 5x5 ReLU + 2x2 max-pool, conv 64 5x5 ReLU + 2x2 max-pool ("same" padding, so
    32x32 -> 8x8x64), FC 1024 ReLU with dropout, FC ``num_classes``. 4,252,549 parameters
    at 32x32 with 5 classes.

    Args:
        num_classes, in_channels, input_size: as in every capsnet model; ``input_size``
            at least 4x4.
        dropout: drop probability after the FC 1024 layer.

    Shape:
        - images: ``(B, in_channels, H, W)``; targets ignored (checked if given).
        - output: scores (logits) ``(B, num_classes)``, poses (features) ``(B, 1024)``.
    """

    def __init__(
        self,
        num_classes: int = 5,
        in_channels: int = 1,
        input_size: int | Sequence[int] = 32,
        *,
        dropout: float = 0.5,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.num_classes = positive_int("num_classes", num_classes)
        self.in_channels = positive_int("in_channels", in_channels)
        self.input_size = as_size(input_size)
        h, w = (s // 4 for s in self.input_size)
        if min(h, w) < 1:
            raise ValueError(f"input_size must be at least 4x4, got {self.input_size}")
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 5, padding=2, **kw),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, padding=2, **kw),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * h * w, 1024, **kw),
            nn.ReLU(inplace=True),
        )
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(1024, num_classes, **kw)

    def forward(self, images: Tensor, targets: Tensor | None = None) -> ModelOutput:
        check_images(images, self.in_channels, self.input_size)
        check_targets(targets, images.shape[0], self.num_classes)
        features = self.features(images)
        return ModelOutput(self.classifier(self.dropout(features)), features, None)


@register_model(
    paper="Sabour, Frosst, Hinton. Dynamic Routing Between Capsules. NeurIPS 2017 (baseline)",
    loss="cross_entropy",
    input_size=(28, 28),
    in_channels=1,
    num_classes=10,
    expected_params=35_445_522,
    recipe="sabour_cnn_mnist",
    description="Sabour et al. 2017 baseline CNN: 3 conv 256/256/128, FC 328, FC 192",
)
def sabour_cnn(**kwargs) -> SabourCNN:
    return SabourCNN(**kwargs)


@register_model(
    paper="Hinton, Sabour, Frosst. Matrix Capsules with EM Routing. ICLR 2018 (baseline)",
    loss="cross_entropy",
    input_size=(32, 32),
    in_channels=1,
    num_classes=5,
    expected_params=4_252_549,
    recipe="hinton_cnn_smallnorb",
    description="Hinton et al. 2018 smallNORB baseline CNN: conv 32, conv 64, FC 1024",
)
def hinton_cnn(**kwargs) -> HintonCNN:
    return HintonCNN(**kwargs)
