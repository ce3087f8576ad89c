"""Hinton, Sabour & Frosst 2018: matrix capsules with EM routing.

Architecture (docs/spec.md §2), valid convolutions, for a ``C x H x W`` input::

    Conv1        A ch, 5x5, stride 2, ReLU             (B, A, H1, W1)     H1 = (H-5)//2+1
    PrimaryCaps  B types, 1x1 pose + activation conv   grid (H1, W1, B)
    ConvCaps1    C types, K=3, stride 2, EM routing    grid (H2, W2, C)   H2 = (H1-3)//2+1
    ConvCaps2    D types, K=3, stride 1, EM routing    grid (H3, W3, D)   H3 = H2-2
    ClassCaps    E = num_classes, W shared over positions, coordinate addition

32x32 (smallNORB crops): 14x14 -> 6x6 -> 4x4; 28x28 (MNIST): 12x12 -> 5x5 -> 3x3. Inputs
of at least 17x17 fit. Presets: ``"small"`` A=64, B=8, C=D=16 (68,444 parameters with 10
classes) and ``"paper"`` A=B=C=D=32 (316,394 with 5 classes, 318,964 with 10).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from capsnet.layers import (
    DEFAULT_EM_VARIANT,
    EM_LAYER_VARIANTS,
    ROUTING_MODES,
    ClassMatrixCapsules,
    ConvMatrixCapsules,
    PrimaryMatrixCapsules,
    authors_inverse_temperatures,
    conv_output_size,
)
from capsnet.layers.matrix import init_parameter
from capsnet.models._common import as_size, check_images, check_targets, positive_int
from capsnet.models.registry import ModelOutput, register_model

__all__ = ["MatrixCapsNet", "PRESETS", "authors_inverse_temperatures"]

#: (A, B, C, D) of the presets.
PRESETS: dict[str, tuple[int, int, int, int]] = {
    "small": (64, 8, 16, 16),
    "paper": (32, 32, 32, 32),
}


class MatrixCapsNet(nn.Module):
    """Matrix capsule network with EM routing, [H18] §4 (docs/spec.md §2).

    Args:
        num_classes: E, class capsules (5 for smallNORB, 10 for MNIST).
        in_channels: image channels.
        input_size: ``H`` or ``(H, W)``, at least 17 (any, also rectangular, size).
        iterations: EM iterations in every routing layer (default 3, the paper's).
        preset: ``"small"`` (A=64, B=8, C=D=16) or ``"paper"`` (A=B=C=D=32); ``A``-``D``
            given explicitly override it.
        A, B, C, D: Conv1 channels and capsule types of PrimaryCaps, ConvCaps1, ConvCaps2.
        variant: the EM variant of every layer: ``"paper"``, ``"official"`` or
            ``"gritzman"`` (the routing maths in :mod:`capsnet.functional.em_variants`,
            the schedules and initialisations in
            :data:`capsnet.layers.matrix.EM_LAYER_VARIANTS`; docs/em_variants.md).
            Default :data:`~capsnet.layers.matrix.DEFAULT_EM_VARIANT`, chosen by the
            learning curves in docs/results.md. A checkpoint saved without ``variant``
            (before the variants existed) is rebuilt with ``"paper"`` and
            ``iterations=2``, its defaults then (registry metadata ``legacy_kwargs``).
        inverse_temperatures: lambda per EM iteration, used by every routing layer (None:
            each layer's variant schedule, see
            :class:`~capsnet.layers.ConvMatrixCapsules` and
            :class:`~capsnet.layers.ClassMatrixCapsules`).
        final_lambda: every routing layer's schedule ``final_lambda * (1 - 0.95 ** t)`` with
            this value in place of its variant's (the class layer keeps its factor, 1/4 for
            ``"capsnet"`` and ``"official"``); None: the variant's (0.01).
        routing: ``"faithful"`` (default) or ``"per_position"`` for the convolutional
            capsule layers (see :class:`~capsnet.layers.ConvMatrixCapsules`).
        normalize_cost: standardise the EM cost before the logistic (not in the paper).
        coordinate_addition: in the class capsule layer (paper: True).
        coordinate_elements: the vote entries that get (row, col): ``(0, 1)`` (docs/spec.md) or
            ``(3, 7)`` (the paper's "right-hand column"; see
            :func:`capsnet.functional.coordinate_addition`).
        init_std: std of the transformation matrices' initialisation (None: the
            variant's; ``"paper"``: identity + N(0, 0.5^2)).
        checkpoint: recompute each capsule layer's routing in the backward pass instead of
            keeping its assignments (memory-saving option, see
            :class:`~capsnet.layers.ConvMatrixCapsules`).

    Note:
        With ``variant="paper"`` (the earlier defaults: lambda 0.01 (1 - 0.95^t) in every
        layer, W = identity + N(0, 0.5^2), betas 0) the activation mechanism hardly
        trains: ``beta_a`` moves a logit by lambda ~ 1e-3 per unit, and 3 iterations
        learned far more slowly than 2. The measured learning curves of the three variants
        at 2 and 3 iterations, and why the default is what it is, are in docs/results.md
        ("EM routing variants"); the diagnostics that show whether EM is alive (spread
        and saturation of the activations, data mass per parent, gradient of the
        activation path vs the pose path) are :func:`capsnet.probes.em_layer_statistics`
        and the trainer's ``em`` records in metrics.jsonl.

    Shape:
        - images: ``(B, in_channels, H, W)`` float; targets: ignored (no decoder) but
          checked, ``(B,)`` int64 or None.
        - output: :class:`~capsnet.models.ModelOutput` with scores ``(B, num_classes)``
          (class activations in [0, 1]), poses ``(B, num_classes, 16)`` (flattened 4x4)
          and reconstructions None.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        input_size: int | Sequence[int] = 28,
        iterations: int = 3,
        *,
        preset: str = "small",
        A: int | None = None,
        B: int | None = None,
        C: int | None = None,
        D: int | None = None,
        variant: str = DEFAULT_EM_VARIANT,
        inverse_temperatures: Sequence[float] | None = None,
        final_lambda: float | None = None,
        routing: str = "faithful",
        normalize_cost: bool = False,
        coordinate_addition: bool = True,
        coordinate_elements: Sequence[int] = (0, 1),
        init_std: float | None = None,
        checkpoint: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {preset!r}")
        if routing not in ROUTING_MODES:
            raise ValueError(f"routing must be one of {ROUTING_MODES}, got {routing!r}")
        if variant not in EM_LAYER_VARIANTS:
            raise ValueError(f"variant must be one of {tuple(EM_LAYER_VARIANTS)}, got {variant!r}")
        given = (A, B, C, D)
        a, b, c, d = (
            g if g is not None else p for g, p in zip(given, PRESETS[preset], strict=True)
        )
        for name, value in zip("ABCD", (a, b, c, d), strict=True):
            positive_int(name, value)
        self.num_classes = positive_int("num_classes", num_classes)
        self.in_channels = positive_int("in_channels", in_channels)
        self.input_size = as_size(input_size)
        self.variant = variant
        self.iterations = positive_int("iterations", iterations)
        grids = [self.input_size]
        for k, s in ((5, 2), (3, 2), (3, 1)):
            h, w = grids[-1]
            grids.append((conv_output_size(h, k, s), conv_output_size(w, k, s)))
        if min(grids[-1]) < 1:
            raise ValueError(
                f"input_size must be at least 17x17 for the 5x5/2, 3x3/2, 3x3/1 kernels, "
                f"got {self.input_size}"
            )
        self.grid_sizes = grids[1:]
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        routing_kw = {
            "iterations": iterations,
            "inverse_temperatures": inverse_temperatures,
            "final_lambda": final_lambda,
            "variant": variant,
            "normalize_cost": normalize_cost,
            "init_std": init_std,
            "checkpoint": checkpoint,
            **kw,
        }
        self.conv1 = nn.Conv2d(in_channels, a, 5, stride=2, **kw)
        self.primary = PrimaryMatrixCapsules(a, out_types=b, variant=variant, **kw)
        conv = {"kernel_size": 3, "routing": routing, **routing_kw}
        self.conv_caps1 = ConvMatrixCapsules(b, out_types=c, stride=2, **conv)
        self.conv_caps2 = ConvMatrixCapsules(c, out_types=d, stride=1, **conv)
        self.class_caps = ClassMatrixCapsules(
            d,
            num_classes=num_classes,
            coordinate_addition=coordinate_addition,
            coordinate_elements=tuple(coordinate_elements),
            **routing_kw,
        )
        primary = EM_LAYER_VARIANTS[variant].primary
        if primary is not None:  # the official code's ReLU Conv1 (simple_model.add_convs)
            assert self.conv1.bias is not None
            init_parameter(self.conv1.weight, ("trunc_normal", 0.0, primary[0]))
            init_parameter(self.conv1.bias, ("constant", primary[1]))

    def forward(self, images: Tensor, targets: Tensor | None = None) -> ModelOutput:
        check_images(images, self.in_channels, self.input_size)
        check_targets(targets, images.shape[0], self.num_classes)
        poses, act = self.primary(torch.relu(self.conv1(images)))
        poses, act = self.conv_caps1(poses, act)
        poses, act = self.conv_caps2(poses, act)
        poses, act = self.class_caps(poses, act)  # (B, E, 16), (B, E)
        return ModelOutput(act, poses, None)


@register_model(
    paper="Hinton, Sabour, Frosst. Matrix Capsules with EM Routing. ICLR 2018",
    loss="spread",
    input_size=(28, 28),
    in_channels=1,
    num_classes=10,
    expected_params=68_444,
    recipe="matrix_capsnet_smallnorb",
    description="Hinton et al. 2018 matrix capsules with EM routing (preset small|paper)",
    extra={
        "presets": dict(PRESETS),
        "expected_params_paper_smallnorb": 316_394,  # preset="paper", num_classes=5
        # Checkpoints saved without these kwargs were built with these values (the
        # defaults before the EM variants); capsnet.load rebuilds them so.
        "legacy_kwargs": {"variant": "paper", "iterations": 2},
    },
)
def matrix_capsnet(**kwargs) -> MatrixCapsNet:
    return MatrixCapsNet(**kwargs)
