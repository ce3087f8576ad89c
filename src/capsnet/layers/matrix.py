"""Matrix capsule layers of [H18]: primary matrix capsules, convolutional capsules and
class capsules, both with EM routing.

Letters: ``B`` batch, ``H x W`` a capsule grid, ``T`` capsule types per position, ``K``
kernel size, ``P`` parent positions, ``E`` classes; poses are flattened 4x4 matrices
(16 values). The paper's layer sizes are A (ReLU conv channels), B (primary capsule types),
C and D (the two convolutional capsule layers' types), E (classes).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple, cast

import torch
from torch import Tensor, nn

from capsnet import functional as CF
from capsnet.layers._compat import deprecated_arguments
from capsnet.layers.hooks import RoutingLayer
from capsnet.layers.layouts import (
    capsules_from_feature_map,
    check_tensor,
    conv_output_size,
    flatten_capsules,
    maybe_checkpoint,
    positive_int,
)

__all__ = [
    "ROUTING_MODES",
    "DEFAULT_EM_VARIANT",
    "EM_LAYER_VARIANTS",
    "EMLayerVariant",
    "authors_inverse_temperatures",
    "PrimaryMatrixCapsules",
    "ConvMatrixCapsules",
    "ClassMatrixCapsules",
]

ROUTING_MODES = CF.ROUTING_MODES


def _check_grid(
    name: str, poses: Tensor, activations: Tensor, types: int, pose_dim: int = 16
) -> None:
    expected = f"(B, H, W, {types}, {pose_dim})"
    check_tensor(f"{name} poses", poses, 5, expected)
    if poses.shape[3:] != (types, pose_dim):
        raise ValueError(f"{name} poses must have shape {expected}, got {tuple(poses.shape)}")
    check_tensor(f"{name} activations", activations, 4, f"(B, H, W, {types})")
    if activations.shape != poses.shape[:4]:
        raise ValueError(
            f"{name} activations must have shape {tuple(poses.shape[:4])} (poses.shape[:4]), "
            f"got {tuple(activations.shape)}"
        )


def authors_inverse_temperatures(iterations: int, final_lambda: float = 0.01) -> list[float]:
    """``lambda_t = final_lambda * (1 - 0.95 ** t)`` for t = 1..r: the matrix layers' default
    (:func:`capsnet.functional.authors_inverse_temperatures`, checked here as a layer
    argument).

    Note:
        Not :func:`capsnet.functional.default_inverse_temperatures` (lambda 1 -> 3): with
        the paper's cost, lambda of order 1 saturates the logistic of a freshly initialised
        layer (``lambda * cost`` is in the tens to hundreds), every activation is exactly
        1.0 in float32 and no gradient reaches the layers below. Small lambdas keep the
        logistic in its linear range, so the network trains (see
        :class:`capsnet.models.MatrixCapsNet`).
    """
    positive_int("iterations", iterations)
    return CF.authors_inverse_temperatures(iterations, final_lambda)


#: An initialisation: ("zeros",), ("constant", value), ("identity_normal", std) (the 4x4
#: identity plus N(0, std^2) noise), ("trunc_normal", mean, std) (N(mean, std^2) cut at
#: 2 std, as TensorFlow's truncated_normal_initializer) or ("xavier_uniform",)
#: (TensorFlow's Xavier for a bias shaped (..., O, 1): U(+-sqrt(6 / (O + 1)))).
InitSpec = tuple


class EMLayerVariant(NamedTuple):
    """The layer-level choices of an EM variant (the routing maths is in
    :data:`capsnet.functional.em_variants.EM_VARIANTS` under the same name).

    Attributes:
        final_lambda: the convolutional capsule layers' schedule
            ``final_lambda * (1 - 0.95 ** t)`` (:func:`authors_inverse_temperatures`).
        class_lambda_factor: the class capsule layer uses ``final_lambda * factor``.
        conv_weight, class_weight: initialisation of ``W`` (the std is replaced by a
            layer's ``init_std`` when one is given).
        conv_beta_u, conv_beta_a, class_beta_u, class_beta_a: initialisation of the betas.
        class_eps: ``eps`` of the class layer's routing (None: the variant's).
        primary: None (PyTorch's default initialisation) or ``(conv1 std, conv1 bias, pose
            std, activation std, activation bias)`` for ReLU Conv1 and PrimaryCaps.
        source: where the choices come from (docs/em_variants.md).
    """

    final_lambda: float = 0.01
    class_lambda_factor: float = 1.0
    conv_weight: InitSpec = ("identity_normal", 0.5)
    class_weight: InitSpec = ("identity_normal", 0.5)
    conv_beta_u: InitSpec = ("zeros",)
    conv_beta_a: InitSpec = ("zeros",)
    class_beta_u: InitSpec = ("zeros",)
    class_beta_a: InitSpec = ("zeros",)
    class_eps: float | None = None
    primary: tuple[float, float, float, float, float] | None = None
    source: str = ""


EM_LAYER_VARIANTS: dict[str, EMLayerVariant] = {
    # capsnet's choices before the variants existed: lambda 0.01 (1 - 0.95^t) in every
    # layer, W = identity + N(0, 0.5^2), betas 0 (the paper gives none of these).
    "paper": EMLayerVariant(source="capsnet's earlier defaults; [H18] gives no numbers"),
    # google-research capsule_em: experiment.py flag final_beta = 0.01; em_layers.py
    # connector_capsule_mat routes with final_beta / 4, W stddev 0.01, activation_biases
    # 1.0, sigma_biases 2.0, masses + 0.00001; conv_capsule_mat: kernel stddev 0.3,
    # activation_biases 0.5, sigma_biases 0.5; primary_caps: pose kernel stddev 0.5,
    # activation kernel stddev 3.0, sigmoid(logit - 1.0); simple_model.add_convs: conv1
    # stddev 5e-2, bias 0.1; utils.weight_variable: truncated normal.
    "official": EMLayerVariant(
        final_lambda=0.01,
        class_lambda_factor=0.25,
        conv_weight=("trunc_normal", 0.0, 0.3),
        class_weight=("trunc_normal", 0.0, 0.01),
        conv_beta_u=("constant", 0.5),
        conv_beta_a=("constant", 0.5),
        class_beta_u=("constant", 2.0),
        class_beta_a=("constant", 1.0),
        class_eps=1e-5,
        primary=(0.05, 0.1, 0.5, 3.0, -1.0),
        source="google-research capsule_em em_layers.py, simple_model.py, experiment.py",
    ),
    # The official code's schedule (class layer final_beta / 4, class eps 1e-5) with
    # capsnet's initialisation ("paper": W = identity + N(0, 0.5^2), betas 0, PyTorch's
    # default for Conv1 and PrimaryCaps) instead of the official W stds 0.3 / 0.01 and
    # biases 0.5-2.0, which leave the class votes ~1e-5 and the pose path without gradient
    # in capsnet's model (docs/em_variants.md).
    "capsnet": EMLayerVariant(
        final_lambda=0.01,
        class_lambda_factor=0.25,
        class_eps=1e-5,
        source="google-research capsule_em schedules; capsnet's initialisation",
    ),
    # IBM matrix-capsules-with-em-routing: config.py final_lambda = 0.01 in every layer;
    # em_routing.py em_routing: beta_a ~ truncated N(-1000, 500^2), beta_v Xavier;
    # utils.compute_votes: w ~ truncated N(0, 1).
    "gritzman": EMLayerVariant(
        final_lambda=0.01,
        conv_weight=("trunc_normal", 0.0, 1.0),
        class_weight=("trunc_normal", 0.0, 1.0),
        conv_beta_u=("xavier_uniform",),
        conv_beta_a=("trunc_normal", -1000.0, 500.0),
        class_beta_u=("xavier_uniform",),
        class_beta_a=("trunc_normal", -1000.0, 500.0),
        source="IBM matrix-capsules-with-em-routing em_routing.py, utils.py, config.py",
    ),
}

#: The EM variant of the layers and of ``matrix_capsnet`` when none is given: chosen by
#: the learning curves of docs/results.md ("EM routing variants"). Checkpoints saved
#: without a ``variant`` were built with ``"paper"`` and load as such.
DEFAULT_EM_VARIANT = "capsnet"


def _layer_variant(variant: str) -> EMLayerVariant:
    CF.resolve_em_variant(variant)  # a clear error for unknown names
    if variant not in EM_LAYER_VARIANTS:
        raise ValueError(f"variant must be one of {tuple(EM_LAYER_VARIANTS)}, got {variant!r}")
    return EM_LAYER_VARIANTS[variant]


def _check_routing_options(
    iterations: int,
    inverse_temperatures: Sequence[float] | None,
    final_lambda: float | None,
    variant_lambda: float,
    factor: float = 1.0,
) -> tuple[float, ...]:
    """The layers' schedule: the given one, else :func:`authors_inverse_temperatures` with
    ``final_lambda`` (None: ``variant_lambda``) times ``factor`` (the class layer's)."""
    positive_int("iterations", iterations)
    if final_lambda is not None:
        if inverse_temperatures is not None:
            raise ValueError("give inverse_temperatures or final_lambda, not both")
        if not (isinstance(final_lambda, (int, float)) and math.isfinite(final_lambda)
                and final_lambda > 0):  # fmt: skip
            raise ValueError(f"final_lambda must be a finite number > 0, got {final_lambda!r}")
    if inverse_temperatures is None:
        lam = variant_lambda if final_lambda is None else float(final_lambda)
        inverse_temperatures = authors_inverse_temperatures(iterations, lam * factor)
    return tuple(CF.resolve_inverse_temperatures(iterations, inverse_temperatures))


def init_parameter(param: Tensor, spec: InitSpec, std: float | None = None) -> None:
    """Initialise ``param`` in place by ``spec`` (see :data:`InitSpec`); ``std`` replaces
    the spec's standard deviation when given."""
    kind = spec[0]
    with torch.no_grad():
        if kind == "zeros":
            param.zero_()
        elif kind == "constant":
            param.fill_(spec[1])
        elif kind == "identity_normal":
            param.normal_(0.0, spec[1] if std is None else std)
            param.add_(torch.eye(4, device=param.device, dtype=param.dtype))
        elif kind == "trunc_normal":
            mean, sd = spec[1], spec[2] if std is None else std
            nn.init.trunc_normal_(param, mean, sd, mean - 2 * sd, mean + 2 * sd)
        elif kind == "xavier_uniform":
            bound = math.sqrt(6.0 / (param.shape[-1] + 1))
            param.uniform_(-bound, bound)
        else:
            raise ValueError(f"unknown initialisation {spec!r}")


class PrimaryMatrixCapsules(nn.Module):
    """Primary matrix capsules, [H18] §4: a pose convolution and a sigmoid activation conv.

    A ``kernel_size`` (1 in the paper) convolution gives ``T * 16`` pose channels (channels
    ``t*16 .. t*16 + 15`` at one position are the 4x4 pose of type ``t``, row-major) and a
    second one gives ``T`` activation logits, squashed by a sigmoid.

    Args:
        in_channels: A, channels of the input feature map.
        out_types: T (the paper's B), capsule types per position.
        kernel_size: of both convolutions (1 in the paper).
        variant: an EM variant name; ``"official"`` initialises the convolutions as the
            official code does (:data:`EM_LAYER_VARIANTS`), the others keep PyTorch's
            default initialisation.

    Shape:
        - input: ``(B, C, H, W)``.
        - output: ``(poses (B, H, W, T, 16), activations (B, H, W, T))``.
    """

    @deprecated_arguments(positional=("out_types", "kernel_size"))
    def __init__(
        self,
        in_channels: int,
        *,
        out_types: int,
        kernel_size: int = 1,
        variant: str = DEFAULT_EM_VARIANT,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_channels = positive_int("in_channels", in_channels)
        self.out_types = positive_int("out_types", out_types)
        self.kernel_size = positive_int("kernel_size", kernel_size)
        self.variant = variant
        self._layer_variant = _layer_variant(variant)
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        self.pose = nn.Conv2d(in_channels, out_types * 16, kernel_size, **kw)
        self.activation = nn.Conv2d(in_channels, out_types, kernel_size, **kw)
        self._init_variant()  # the convolutions' own init has run; no second default draw

    def reset_parameters(self) -> None:
        self.pose.reset_parameters()
        self.activation.reset_parameters()
        self._init_variant()

    def _init_variant(self) -> None:
        """The variant's initialisation of the two convolutions, if it has one."""
        if self._layer_variant.primary is not None:
            # Note: the official primary_caps has no biases and computes
            # sigmoid(logit - 1.0); a bias starting at -1 is the same function at init.
            _, _, pose_std, act_std, act_bias = self._layer_variant.primary
            init_parameter(self.pose.weight, ("trunc_normal", 0.0, pose_std))
            assert self.pose.bias is not None and self.activation.bias is not None
            init_parameter(self.pose.bias, ("zeros",))
            init_parameter(self.activation.weight, ("trunc_normal", 0.0, act_std))
            init_parameter(self.activation.bias, ("constant", act_bias))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        check_tensor("x", x, 4, f"(B, {self.in_channels}, H, W)")
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"x must have shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        poses = capsules_from_feature_map(self.pose(x), 16)  # (B, H, W, T, 16)
        logits = capsules_from_feature_map(self.activation(x), 1).squeeze(-1)  # (B, H, W, T)
        return poses, torch.sigmoid(logits)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, out_types={self.out_types}"


class ConvMatrixCapsules(RoutingLayer):
    """Convolutional matrix capsule layer with EM routing, [H18] §3-4.

    Every parent position routes the ``K*K*in_types`` children of its receptive field (a valid,
    unpadded convolution with ``stride``). Votes ``V = M W`` use one 4x4 ``W`` per (kernel
    offset, input type, output type), shared across positions; ``beta_u`` and ``beta_a``
    are learned per output type (initialised as the variant says).

    ``routing`` selects how a child's assignments are normalised:

    * ``"faithful"`` (default): over the parents at several output positions whose
      receptive field contains the child (:func:`capsnet.functional.conv_em_routing`):
      over all of them, of every type, for ``"paper"`` and ``"gritzman"`` ([G19], pitfall
      1, and IBM's ``softmax_across_parents``), or over the positions of each parent type
      for ``"official"`` and ``"capsnet"`` (the official ``update_conv_routing``). This is
      what a child feeding several overlapping parents means in [H18], so it is the
      default.
    * ``"per_position"``: each receptive field routed on its own, over the ``C`` parents of
      that position (:func:`capsnet.functional.em_routing` on the same tensors): the common
      simplification of public implementations, a little cheaper.

    Args:
        in_types: input capsule types per position (the paper's B for ConvCaps1).
        out_types: output capsule types per position (the paper's C for ConvCaps1).
        kernel_size: K (3 in the paper).
        stride: 2 for ConvCaps1, 1 for ConvCaps2 in the paper.
        iterations: EM iterations (default 3, as in the paper).
        inverse_temperatures: lambda per iteration (None: the variant's,
            :func:`authors_inverse_temperatures` with its ``final_lambda``, 0.01:
            ``0.01 * (1 - 0.95 ** t)``).
        final_lambda: the schedule ``final_lambda * (1 - 0.95 ** t)`` with this value in
            place of the variant's (the official code's ``final_beta`` flag); None: the
            variant's. Not together with ``inverse_temperatures``.
        routing: ``"faithful"`` or ``"per_position"``.
        variant: the EM variant (:mod:`capsnet.functional.em_variants` for the routing
            maths, :data:`EM_LAYER_VARIANTS` for the layer's schedule and
            initialisation; docs/em_variants.md). Default :data:`DEFAULT_EM_VARIANT`.
        normalize_cost: standardise the EM cost over parents before the logistic (opt-in,
            not in the paper; see :func:`capsnet.functional.em_routing`).
        init_std: the std of ``W``'s initialisation (None: the variant's; ``"paper"``:
            the identity plus N(0, 0.5^2) noise).
        checkpoint: keep only the layer's input for the backward pass and rerun its
            forward there. The votes are never stored anyway
            (:func:`capsnet.functional.conv_matrix_capsules`); this also drops the
            per-iteration assignments (``iterations * K*K*in_types*out_types`` numbers per
            parent position) for one more forward pass.

    Shape:
        - input: ``poses (B, H, W, in_types, 16)``, ``activations (B, H, W, in_types)``.
        - output: ``poses (B, H_out, W_out, out_types, 16)``,
          ``activations (B, H_out, W_out, out_types)``, ``H_out = (H - K) // stride + 1``.
    """

    @deprecated_arguments(
        positional=("out_types", "kernel_size", "stride", "iterations", "inverse_temperatures")
    )
    def __init__(
        self,
        in_types: int,
        *,
        out_types: int,
        kernel_size: int = 3,
        stride: int = 1,
        iterations: int = 3,
        inverse_temperatures: Sequence[float] | None = None,
        final_lambda: float | None = None,
        routing: str = "faithful",
        variant: str = DEFAULT_EM_VARIANT,
        normalize_cost: bool = False,
        init_std: float | None = None,
        checkpoint: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.checkpoint = bool(checkpoint)
        self.in_types = positive_int("in_types", in_types)
        self.out_types = positive_int("out_types", out_types)
        self.kernel_size = positive_int("kernel_size", kernel_size)
        self.stride = positive_int("stride", stride)
        self.iterations = iterations
        self.variant = variant
        self._layer_variant = _layer_variant(variant)
        self.inverse_temperatures = _check_routing_options(
            iterations, inverse_temperatures, final_lambda, self._layer_variant.final_lambda
        )
        if routing not in ROUTING_MODES:
            raise ValueError(f"routing must be one of {ROUTING_MODES}, got {routing!r}")
        self.routing = routing
        self.normalize_cost = bool(normalize_cost)
        self.init_std = None if init_std is None else float(init_std)
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        kk = kernel_size * kernel_size
        self.weight = nn.Parameter(torch.empty(kk, in_types, out_types, 4, 4, **kw))
        self.beta_u = nn.Parameter(torch.zeros(out_types, **kw))
        self.beta_a = nn.Parameter(torch.zeros(out_types, **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        lv = self._layer_variant
        init_parameter(self.weight, lv.conv_weight, self.init_std)
        init_parameter(self.beta_u, lv.conv_beta_u)
        init_parameter(self.beta_a, lv.conv_beta_a)

    def output_size(self, input_size: tuple[int, int]) -> tuple[int, int]:
        """``(H_out, W_out)`` for an ``(H, W)`` input grid."""
        (h, w), k, s = input_size, self.kernel_size, self.stride
        return conv_output_size(h, k, s), conv_output_size(w, k, s)

    def votes(self, poses: Tensor, activations: Tensor) -> tuple[Tensor, Tensor, tuple[int, int]]:
        """Gather receptive fields and compute ``V = M W`` for every (child, parent).

        For looking at the votes; :meth:`forward` never stores them
        (:func:`capsnet.functional.conv_matrix_capsules`).

        Shape: grid ``(B, H, W, in_types, 16)`` -> votes ``(B, P, K*K*in_types, out_types,
        16)``, child activations ``(B, P, K*K*in_types)``, and ``(H_out, W_out)``.
        """
        self._check_input(poses, activations)
        votes, child_act = CF.conv_capsule_votes(
            poses, activations, self.weight, self.kernel_size, self.stride
        )
        return votes, child_act, self.output_size((poses.shape[1], poses.shape[2]))

    def _check_input(self, poses: Tensor, activations: Tensor) -> None:
        _check_grid("input", poses, activations, self.in_types)
        h, w = poses.shape[1:3]
        if h < self.kernel_size or w < self.kernel_size:
            raise ValueError(f"input grid {h}x{w} is smaller than kernel_size={self.kernel_size}")

    def forward(self, poses: Tensor, activations: Tensor) -> tuple[Tensor, Tensor]:
        self._check_input(poses, activations)
        if self.has_routing_hooks:
            return self._forward_hooked(poses, activations)
        return maybe_checkpoint(
            self.checkpoint,
            CF.conv_matrix_capsules,
            poses,
            activations,
            self.weight,
            self.beta_u,
            self.beta_a,
            kernel_size=self.kernel_size,
            stride=self.stride,
            iterations=self.iterations,
            inverse_temperatures=self.inverse_temperatures,
            routing=self.routing,
            variant=self.variant,
            normalize_cost=self.normalize_cost,
        )

    def _forward_hooked(self, poses: Tensor, activations: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`forward` as votes + a routing call that the routing hooks see."""
        votes, child_act, (h_out, w_out) = self.votes(poses, activations)
        options = {
            "iterations": self.iterations,
            "inverse_temperatures": self.inverse_temperatures,
            "variant": self.variant,
            "normalize_cost": self.normalize_cost,
        }
        if self.routing == "faithful":
            mu, act, _ = self._routed(
                "conv_em", CF.conv_em_routing, votes, child_act, self.beta_u, self.beta_a,
                in_size=tuple(poses.shape[1:3]), kernel_size=self.kernel_size,
                stride=self.stride, **options,
            )  # fmt: skip
        else:
            mu, act, _ = self._routed(
                "em", CF.em_routing, votes, child_act, self.beta_u, self.beta_a, **options
            )
        n = poses.shape[0]
        return (
            mu.reshape(n, h_out, w_out, self.out_types, 16),
            act.reshape(n, h_out, w_out, self.out_types),
        )

    def extra_repr(self) -> str:
        return (
            f"in_types={self.in_types}, out_types={self.out_types}, "
            f"kernel_size={self.kernel_size}, stride={self.stride}, "
            f"iterations={self.iterations}, routing={self.routing!r}, "
            f"variant={self.variant!r}, normalize_cost={self.normalize_cost}, "
            f"checkpoint={self.checkpoint}"
        )


class ClassMatrixCapsules(RoutingLayer):
    """Class capsules, [H18] §3-4: one ``W`` per (input type, class) shared over positions.

    Every child capsule of the grid votes for every class; EM routing runs over all
    ``H*W*in_types`` children at once. With ``coordinate_addition`` the scaled
    ``(row, col)`` of each child's position is added to the first two vote entries
    (:func:`capsnet.functional.coordinate_addition`), for any, also rectangular, grid.

    Args:
        in_types: input capsule types per position (the paper's D).
        num_classes: E, class capsules.
        iterations, variant, normalize_cost, init_std, checkpoint: as in
            :class:`ConvMatrixCapsules` (``checkpoint`` recomputes the votes too).
        inverse_temperatures: lambda per iteration (None: the variant's,
            :func:`authors_inverse_temperatures` with ``final_lambda *
            class_lambda_factor``: 0.01 for ``"paper"`` and ``"gritzman"``, 0.0025 for
            ``"official"``).
        final_lambda: as in :class:`ConvMatrixCapsules`; the class layer multiplies it by
            its variant's ``class_lambda_factor`` (1/4 for ``"official"`` and ``"capsnet"``).
        coordinate_addition: add scaled coordinates to the votes (paper: yes).
        coordinate_elements: the two vote entries that get the row and the column:
            ``(0, 1)`` (docs/spec.md §2), or ``(3, 7)`` for the paper's "right-hand column" reading
            (see :func:`capsnet.functional.coordinate_addition`).

    Shape:
        - input: ``poses (B, H, W, in_types, 16)``, ``activations (B, H, W, in_types)``.
        - output: ``poses (B, num_classes, 16)``, ``activations (B, num_classes)``.
    """

    @deprecated_arguments(positional=("num_classes", "iterations", "inverse_temperatures"))
    def __init__(
        self,
        in_types: int,
        *,
        num_classes: int,
        iterations: int = 3,
        inverse_temperatures: Sequence[float] | None = None,
        final_lambda: float | None = None,
        coordinate_addition: bool = True,
        coordinate_elements: Sequence[int] = (0, 1),
        variant: str = DEFAULT_EM_VARIANT,
        normalize_cost: bool = False,
        init_std: float | None = None,
        checkpoint: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.checkpoint = bool(checkpoint)
        self.in_types = positive_int("in_types", in_types)
        self.num_classes = positive_int("num_classes", num_classes)
        self.iterations = iterations
        self.variant = variant
        self._layer_variant = lv = _layer_variant(variant)
        self.inverse_temperatures = _check_routing_options(
            iterations, inverse_temperatures, final_lambda, lv.final_lambda, lv.class_lambda_factor
        )
        self.coordinate_addition = bool(coordinate_addition)
        # (row, col) entries; the length is checked just below
        self.coordinate_elements = cast(
            "tuple[int, int]", tuple(int(x) for x in coordinate_elements)
        )
        if len(self.coordinate_elements) != 2 or not all(
            0 <= x < 16 for x in self.coordinate_elements
        ):
            raise ValueError(
                f"coordinate_elements must be two indices in 0..15, got {coordinate_elements!r}"
            )
        self.normalize_cost = bool(normalize_cost)
        self.init_std = None if init_std is None else float(init_std)
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(in_types, num_classes, 4, 4, **kw))
        self.beta_u = nn.Parameter(torch.zeros(num_classes, **kw))
        self.beta_a = nn.Parameter(torch.zeros(num_classes, **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        lv = self._layer_variant
        init_parameter(self.weight, lv.class_weight, self.init_std)
        init_parameter(self.beta_u, lv.class_beta_u)
        init_parameter(self.beta_a, lv.class_beta_a)

    def votes(self, poses: Tensor) -> Tensor:
        """``V = M W`` (+ coordinates): ``(B, H, W, in_types, 16)`` -> ``(B, I, E, 16)``."""
        b, h, w = poses.shape[:3]
        m = poses.reshape(b, h, w, self.in_types, 4, 4)
        # Parent-major (B, E, H*W*in_types, 16) as a transposed view, as in ConvMatrixCapsules.
        votes = torch.einsum("bhwixy,ieyz->behwixz", m, self.weight)
        votes = votes.reshape(b, self.num_classes, h * w * self.in_types, 16).transpose(1, 2)
        if self.coordinate_addition:
            votes = CF.coordinate_addition(votes, h, w, self.coordinate_elements)
        return votes

    def forward(self, poses: Tensor, activations: Tensor) -> tuple[Tensor, Tensor]:
        _check_grid("input", poses, activations, self.in_types)
        checkpoint = self.checkpoint and not self.has_routing_hooks
        return maybe_checkpoint(checkpoint, self._route, poses, activations)

    def _route(self, poses: Tensor, activations: Tensor) -> tuple[Tensor, Tensor]:
        route = CF.em_routing
        if self.has_routing_hooks:
            route = functools.partial(self._routed, "em", CF.em_routing)
        mu, act, _ = route(
            self.votes(poses),
            flatten_capsules(activations),
            self.beta_u,
            self.beta_a,
            self.iterations,
            self.inverse_temperatures,
            variant=self.variant,
            normalize_cost=self.normalize_cost,
            eps=self._layer_variant.class_eps,
        )
        return mu, act

    def extra_repr(self) -> str:
        return (
            f"in_types={self.in_types}, num_classes={self.num_classes}, "
            f"iterations={self.iterations}, coordinate_addition={self.coordinate_addition}, "
            f"variant={self.variant!r}, normalize_cost={self.normalize_cost}, "
            f"checkpoint={self.checkpoint}"
        )
