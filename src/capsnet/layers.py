"""Capsule layers as ``nn.Module`` s; the math lives in :mod:`capsnet.functional`.

Vector capsules ([S17], dynamic routing): :class:`PrimaryCapsules`, :class:`DenseCapsules`,
:class:`CapsuleDecoder`. Matrix capsules ([H18], EM routing): :class:`PrimaryMatrixCapsules`,
:class:`ConvMatrixCapsules`, :class:`ClassMatrixCapsules`.

Letters used in shapes: ``B`` batch, ``C`` image/feature channels, ``H x W`` a spatial grid,
``T`` capsule types per position, ``I`` input capsules, ``O`` output capsules, ``D`` pose
size (8 or 16 for vectors, 16 for flattened 4x4 matrices), ``K`` kernel size, ``P`` parent
positions of a convolutional capsule layer. Example: Sabour's PrimaryCapsules turn a
``(128, 256, 20, 20)`` feature map into ``(128, 1152, 8)`` capsules (``6*6*32 = 1152``).

Capsule layouts (the only places that reorder dimensions are the helpers below):

* A **capsule grid** is ``poses (B, H, W, T, D)`` with ``activations (B, H, W, T)``; matrix
  capsule layers take and return grids.
* A **feature map** ``(B, T*D, H, W)`` holds a grid as NCHW channels: channel
  ``t * D + d`` at position ``(h, w)`` is component ``d`` of the capsule of type ``t`` at
  ``(h, w)`` (:func:`capsules_from_feature_map`). A capsule is built from the channels of one
  position, never from neighbouring pixels of one channel.
* A **flat** capsule list ``(B, I, D)`` enumerates the grid row-major over ``(h, w, t)``
  (:func:`flatten_capsules`), the order :func:`capsnet.functional.coordinate_addition`
  expects.
* A **receptive-field** layout ``(B, P, K*K*T, D)`` lists, for each parent position (row-major
  over the output grid), its ``K*K*T`` children ordered ``(kh, kw, t)``
  (:func:`unfold_capsules`), the order :func:`capsnet.functional.conv_em_routing` expects.

References:
    [S17] Sabour, Frosst, Hinton. Dynamic Routing Between Capsules. NeurIPS 2017.
    [H18] Hinton, Sabour, Frosst. Matrix Capsules with EM Routing. ICLR 2018.
    [G19] Gritzman. Avoiding Implementation Pitfalls of "Matrix Capsules with EM Routing".
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from capsnet import functional as CF

__all__ = [
    "capsules_from_feature_map",
    "flatten_capsules",
    "unfold_capsules",
    "conv_output_size",
    "capsule_lengths",
    "authors_inverse_temperatures",
    "PrimaryCapsules",
    "DenseCapsules",
    "CapsuleDecoder",
    "PrimaryMatrixCapsules",
    "ConvMatrixCapsules",
    "ClassMatrixCapsules",
    "ROUTING_MODES",
]

ROUTING_MODES = CF.ROUTING_MODES


# --------------------------------------------------------------------------- checks


def _check_tensor(name: str, x: Tensor, ndim: int, expected: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must have shape {expected}, got {tuple(x.shape)}")


def _positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def conv_output_size(size: int, kernel_size: int, stride: int = 1, padding: int = 0) -> int:
    """Output length of a convolution along one axis: ``(size + 2p - K) // stride + 1``."""
    return (size + 2 * padding - kernel_size) // stride + 1


# --------------------------------------------------------------------------- layouts


def capsules_from_feature_map(x: Tensor, pose_dim: int) -> Tensor:
    """NCHW feature map -> capsule grid: channels ``t*D .. t*D + D-1`` of one position.

    Args:
        x: a feature map whose channels hold ``T`` capsule types of ``pose_dim`` values.
        pose_dim: D, the values per capsule (1 for activation maps).

    Shape:
        - x: ``(B, T*D, H, W)``.
        - output: ``(B, H, W, T, D)`` (a view when possible).
    """
    b, c, h, w = x.shape
    if c % pose_dim:
        raise ValueError(f"channels ({c}) must be a multiple of pose_dim ({pose_dim})")
    # (B, T, D, H, W) -> (B, H, W, T, D): move the grid axes in front of (type, component).
    return x.reshape(b, c // pose_dim, pose_dim, h, w).permute(0, 3, 4, 1, 2)


def flatten_capsules(grid: Tensor) -> Tensor:
    """Capsule grid -> flat list enumerated row-major over ``(h, w, t)``.

    Shape:
        - grid: ``(B, H, W, T, D)`` (or activations ``(B, H, W, T)``).
        - output: ``(B, H*W*T, D)`` (or ``(B, H*W*T)``).
    """
    children = math.prod(grid.shape[1:4])  # explicit: also for an empty batch
    if grid.ndim == 5:
        return grid.reshape(grid.shape[0], children, grid.shape[-1])
    return grid.reshape(grid.shape[0], children)


def unfold_capsules(
    poses: Tensor, activations: Tensor, kernel_size: int, stride: int
) -> tuple[Tensor, Tensor, tuple[int, int]]:
    """Gather each parent position's ``K*K*T`` children of a valid capsule convolution.

    Children are ordered ``(kh, kw, t)`` and parent positions row-major over the output grid,
    as :func:`capsnet.functional.conv_em_routing` and
    :func:`capsnet.functional.conv_children_index` define them.

    Returns:
        ``(poses, activations, (H_out, W_out))`` in the receptive-field layout.

    Shape:
        - poses: ``(B, H, W, T, D)``; activations: ``(B, H, W, T)``.
        - output poses: ``(B, P, K*K*T, D)``; output activations: ``(B, P, K*K*T)``,
          ``P = H_out * W_out``, ``H_out = (H - K) // stride + 1``.
    """
    h, w = poses.shape[1:3]
    index = CF.conv_children_index((h, w), kernel_size, stride, device=poses.device)  # (P, KK)
    out_poses, out_act = CF._gather_children(poses, activations, index)
    out_size = (conv_output_size(h, kernel_size, stride), conv_output_size(w, kernel_size, stride))
    return out_poses, out_act, out_size


def capsule_lengths(poses: Tensor, eps: float = 1e-9) -> Tensor:
    """Euclidean length of capsule vectors, computed in at least float32.

    ``eps`` under the square root keeps the gradient finite at the zero vector.

    Shape:
        - poses: ``(..., D)``; output: ``(...)``.
    """
    p = poses.float() if poses.dtype in (torch.float16, torch.bfloat16) else poses
    return p.pow(2).sum(-1).add(eps).sqrt()


# --------------------------------------------------------------------------- vector capsules


class PrimaryCapsules(nn.Module):
    """Primary vector capsules, [S17] §4: a convolution whose channels form capsules, squashed.

    The convolution outputs ``out_types * pose_dim`` channels; the ``pose_dim`` channels
    ``t*D .. t*D + D-1`` at one position form the capsule of type ``t`` there
    (:func:`capsules_from_feature_map`). Sabour's MNIST layer is
    ``PrimaryCapsules(256, 32, 8, kernel_size=9, stride=2)``: ``(B, 256, 20, 20)`` ->
    ``(B, 1152, 8)``.

    Args:
        in_channels: channels of the input feature map.
        out_types: T, capsule types per position (32 in the paper).
        pose_dim: D, values per capsule (8 in the paper).
        kernel_size, stride, padding: of the convolution (9, 2, 0 in the paper).

    Shape:
        - input: ``(B, C, H, W)``.
        - output: ``(B, H_out * W_out * T, D)`` squashed, enumerated ``(h, w, t)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_types: int = 32,
        pose_dim: int = 8,
        kernel_size: int = 9,
        stride: int = 2,
        padding: int = 0,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_channels = _positive_int("in_channels", in_channels)
        self.out_types = _positive_int("out_types", out_types)
        self.pose_dim = _positive_int("pose_dim", pose_dim)
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
        return tuple(
            conv_output_size(s, self.kernel_size, self.stride, self.padding) for s in input_size
        )

    def num_capsules(self, input_size: tuple[int, int]) -> int:
        """``H_out * W_out * T``, the number of capsules for an ``(H, W)`` input map."""
        h, w = self.output_size(input_size)
        return h * w * self.out_types

    def forward(self, x: Tensor) -> Tensor:
        _check_tensor("x", x, 4, f"(B, {self.in_channels}, H, W)")
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"x must have shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        grid = capsules_from_feature_map(self.conv(x), self.pose_dim)  # (B, H, W, T, D)
        return CF.squash(flatten_capsules(grid))

    def extra_repr(self) -> str:
        return f"out_types={self.out_types}, pose_dim={self.pose_dim}"


class DenseCapsules(nn.Module):
    """Fully connected capsule layer with dynamic routing, [S17] eq. (2) and Procedure 1.

    One transformation matrix ``W_ij`` (``out_dim x in_dim``) per (input, output) capsule
    pair gives predictions ``u_hat_j|i = W_ij u_i``, which
    :func:`capsnet.functional.dynamic_routing` combines. The routing logits ``b_ij`` are
    per example and start at zero on every call (they are not parameters). No bias, as in
    the paper's parameter count (SPEC §1: 1152 * 10 * 8 * 16 = 1,474,560).

    Args:
        in_caps: I, number of input capsules (1152 for MNIST).
        in_dim: input capsule size (8).
        out_caps: O, number of output capsules (10 classes).
        out_dim: output capsule size (16).
        iterations: routing iterations (3 in the paper).
        detach_inner: passed to :func:`capsnet.functional.dynamic_routing`.
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

    def __init__(
        self,
        in_caps: int,
        in_dim: int,
        out_caps: int,
        out_dim: int,
        iterations: int = 3,
        *,
        detach_inner: bool = False,
        init_std: float = 0.01,
        checkpoint: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.checkpoint = bool(checkpoint)
        self.in_caps = _positive_int("in_caps", in_caps)
        self.in_dim = _positive_int("in_dim", in_dim)
        self.out_caps = _positive_int("out_caps", out_caps)
        self.out_dim = _positive_int("out_dim", out_dim)
        self.iterations = _positive_int("iterations", iterations)
        self.detach_inner = bool(detach_inner)
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
        _check_tensor("u", u, 3, expected)
        if u.shape[1:] != (self.in_caps, self.in_dim):
            raise ValueError(f"u must have shape {expected}, got {tuple(u.shape)}")
        return torch.einsum("iodk,bik->biod", self.weight, u)

    def forward(self, u: Tensor, return_couplings: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        v, c = _maybe_checkpoint(self.checkpoint, self._route, u)
        return (v, c) if return_couplings else v

    def _route(self, u: Tensor) -> tuple[Tensor, Tensor]:
        return CF.dynamic_routing(
            self.predictions(u), self.iterations, detach_inner=self.detach_inner
        )

    def extra_repr(self) -> str:
        return (
            f"in_caps={self.in_caps}, in_dim={self.in_dim}, out_caps={self.out_caps}, "
            f"out_dim={self.out_dim}, iterations={self.iterations}, "
            f"detach_inner={self.detach_inner}, checkpoint={self.checkpoint}"
        )


class CapsuleDecoder(nn.Module):
    """Masked reconstruction decoder, [S17] §4.1 (SPEC §1).

    All class capsules but one are zeroed: the one named by ``targets`` (the true class
    during training) or, without targets, the longest. The masked ``O * D`` vector goes
    through FC 512 ReLU -> FC 1024 ReLU -> FC ``C*H*W`` sigmoid.

    Note: when ``targets`` are given they are used in every mode (train or eval); this lets
    callers reconstruct any chosen class (e.g. each digit of a MultiMNIST image). For the
    paper's test-time behaviour, call without targets.

    Args:
        num_caps: O, class capsules (10).
        caps_dim: D, class capsule size (16).
        output_shape: ``(C, H, W)`` of the reconstructed image.
        hidden: sizes of the hidden layers (``(512, 1024)`` in the paper).

    Shape:
        - poses: ``(B, O, D)``; targets: ``(B,)`` int64 or None.
        - output: ``(B, C, H, W)`` in [0, 1].
    """

    def __init__(
        self,
        num_caps: int,
        caps_dim: int,
        output_shape: Sequence[int],
        hidden: Sequence[int] = (512, 1024),
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.num_caps = _positive_int("num_caps", num_caps)
        self.caps_dim = _positive_int("caps_dim", caps_dim)
        if len(output_shape) != 3:
            raise ValueError(f"output_shape must be (C, H, W), got {tuple(output_shape)}")
        self.output_shape = tuple(_positive_int("output_shape", int(s)) for s in output_shape)
        sizes = [num_caps * caps_dim, *hidden, math.prod(self.output_shape)]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            layers.append(nn.Linear(a, b, device=device, dtype=dtype))
            layers.append(nn.ReLU(inplace=True) if i < len(sizes) - 2 else nn.Sigmoid())
        self.net = nn.Sequential(*layers)

    def mask(self, poses: Tensor, targets: Tensor | None = None) -> Tensor:
        """Zero every capsule but the target (or the longest): ``(B, O, D)`` -> ``(B, O*D)``."""
        expected = f"(B, {self.num_caps}, {self.caps_dim})"
        _check_tensor("poses", poses, 3, expected)
        if poses.shape[1:] != (self.num_caps, self.caps_dim):
            raise ValueError(f"poses must have shape {expected}, got {tuple(poses.shape)}")
        if targets is None:
            targets = capsule_lengths(poses.detach()).argmax(-1)
        else:
            _check_targets(targets, poses.shape[0], self.num_caps)
        one_hot = F.one_hot(targets.long(), self.num_caps).to(poses.dtype)  # (B, O)
        return (poses * one_hot.unsqueeze(-1)).flatten(1)

    def forward(self, poses: Tensor, targets: Tensor | None = None) -> Tensor:
        out = self.net(self.mask(poses, targets))
        return out.reshape(out.shape[0], *self.output_shape)


def _check_targets(targets: Tensor, batch: int, num_classes: int) -> None:
    """Integer class targets ``(B,)`` with values in ``[0, num_classes)``."""
    if not isinstance(targets, Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise TypeError(f"targets must be an integer tensor (int64), got dtype {targets.dtype}")
    if targets.shape != (batch,):
        raise ValueError(f"targets must have shape (B,) = ({batch},), got {tuple(targets.shape)}")
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= num_classes):
        raise ValueError(
            f"targets must lie in [0, {num_classes}), got min {int(targets.min())}, "
            f"max {int(targets.max())}"
        )


# --------------------------------------------------------------------------- matrix capsules


def _check_grid(
    name: str, poses: Tensor, activations: Tensor, types: int, pose_dim: int = 16
) -> None:
    expected = f"(B, H, W, {types}, {pose_dim})"
    _check_tensor(f"{name} poses", poses, 5, expected)
    if poses.shape[3:] != (types, pose_dim):
        raise ValueError(f"{name} poses must have shape {expected}, got {tuple(poses.shape)}")
    _check_tensor(f"{name} activations", activations, 4, f"(B, H, W, {types})")
    if activations.shape != poses.shape[:4]:
        raise ValueError(
            f"{name} activations must have shape {tuple(poses.shape[:4])} (poses.shape[:4]), "
            f"got {tuple(activations.shape)}"
        )


def authors_inverse_temperatures(iterations: int, final_lambda: float = 0.01) -> list[float]:
    """``lambda_t = final_lambda * (1 - 0.95 ** t)`` for t = 1..r: the matrix layers' default.

    The schedule the authors quoted on OpenReview (SPEC §2), used by the official code:
    ``[0.0005, 0.000975, 0.00142625]`` for r = 3.

    Note:
        Not :func:`capsnet.functional.default_inverse_temperatures` (lambda 1 -> 3): with
        the paper's cost, lambda of order 1 saturates the logistic of a freshly initialised
        layer (``lambda * cost`` is in the tens to hundreds), every activation is exactly
        1.0 in float32 and no gradient reaches the layers below. Small lambdas keep the
        logistic in its linear range, so the network trains (see
        :class:`capsnet.models.MatrixCapsNet`).
    """
    _positive_int("iterations", iterations)
    return [final_lambda * (1.0 - 0.95**t) for t in range(1, iterations + 1)]


def _check_routing_options(
    iterations: int, inverse_temperatures: Sequence[float] | None
) -> tuple[float, ...]:
    _positive_int("iterations", iterations)
    if inverse_temperatures is None:
        return tuple(authors_inverse_temperatures(iterations))
    lambdas = tuple(float(x) for x in inverse_temperatures)
    if len(lambdas) != iterations:
        raise ValueError(
            f"inverse_temperatures must hold one lambda per iteration ({iterations}), "
            f"got {len(lambdas)}"
        )
    return lambdas


def _maybe_checkpoint(enabled: bool, fn, *args: Tensor, **kwargs):
    """``fn(*args, **kwargs)``, recomputed in the backward pass when ``enabled`` (and grad).

    The memory-saving option of the capsule layers: nothing of the layer's votes or
    routing is kept for the backward pass but its inputs; the forward pass runs twice.
    """
    if enabled and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, **kwargs)
    return fn(*args, **kwargs)


def _init_transform(weight: Tensor, init_std: float) -> None:
    """Transformation matrices: identity plus N(0, init_std^2) noise (see MatrixCapsNet)."""
    with torch.no_grad():
        weight.normal_(0.0, init_std)
        weight.add_(torch.eye(4, device=weight.device, dtype=weight.dtype))


class PrimaryMatrixCapsules(nn.Module):
    """Primary matrix capsules, [H18] §4: a pose convolution and a sigmoid activation conv.

    A ``kernel_size`` (1 in the paper) convolution gives ``T * 16`` pose channels (channels
    ``t*16 .. t*16 + 15`` at one position are the 4x4 pose of type ``t``, row-major) and a
    second one gives ``T`` activation logits, squashed by a sigmoid.

    Args:
        in_channels: A, channels of the input feature map.
        out_types: B, capsule types per position.
        kernel_size: of both convolutions (1 in the paper).

    Shape:
        - input: ``(B, C, H, W)``.
        - output: ``(poses (B, H, W, T, 16), activations (B, H, W, T))``.
    """

    def __init__(
        self,
        in_channels: int,
        out_types: int,
        kernel_size: int = 1,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_channels = _positive_int("in_channels", in_channels)
        self.out_types = _positive_int("out_types", out_types)
        self.kernel_size = _positive_int("kernel_size", kernel_size)
        kw = {"device": device, "dtype": dtype}
        self.pose = nn.Conv2d(in_channels, out_types * 16, kernel_size, **kw)
        self.activation = nn.Conv2d(in_channels, out_types, kernel_size, **kw)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        _check_tensor("x", x, 4, f"(B, {self.in_channels}, H, W)")
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"x must have shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        poses = capsules_from_feature_map(self.pose(x), 16)  # (B, H, W, T, 16)
        logits = capsules_from_feature_map(self.activation(x), 1).squeeze(-1)  # (B, H, W, T)
        return poses, torch.sigmoid(logits)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, out_types={self.out_types}"


class ConvMatrixCapsules(nn.Module):
    """Convolutional matrix capsule layer with EM routing, [H18] §3-4.

    Every parent position routes the ``K*K*B`` children of its receptive field (a valid,
    unpadded convolution with ``stride``). Votes ``V = M W`` use one 4x4 ``W`` per (kernel
    offset, input type, output type), shared across positions; ``beta_u`` and ``beta_a``
    are learned per output type (zeros at init).

    ``routing`` selects how a child's assignments are normalised:

    * ``"faithful"`` (default): over every parent, at every output position and of every
      type, whose receptive field contains the child
      (:func:`capsnet.functional.conv_em_routing`). This is what a child feeding several
      overlapping parents means in [H18]; the official code and the best reproduction
      ([G19], pitfall 1) do it, so it is the default.
    * ``"per_position"``: each receptive field routed on its own, over the ``C`` parents of
      that position (:func:`capsnet.functional.em_routing` on the same tensors): the common
      simplification of public implementations, a little cheaper.

    Args:
        in_types: B, input capsule types per position.
        out_types: C, output capsule types per position.
        kernel_size: K (3 in the paper).
        stride: 2 for ConvCaps1, 1 for ConvCaps2 in the paper.
        iterations: EM iterations (default 2, see :class:`capsnet.models.MatrixCapsNet`;
            the paper used 3).
        inverse_temperatures: lambda per iteration (None: :func:`authors_inverse_temperatures`,
            ``0.01 * (1 - 0.95 ** t)``).
        routing: ``"faithful"`` or ``"per_position"``.
        normalize_cost: standardise the EM cost over parents before the logistic (opt-in,
            not in the paper; see :func:`capsnet.functional.em_routing`).
        init_std: ``W`` starts as the identity plus N(0, init_std^2) noise.
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

    def __init__(
        self,
        in_types: int,
        out_types: int,
        kernel_size: int = 3,
        stride: int = 1,
        iterations: int = 2,
        inverse_temperatures: Sequence[float] | None = None,
        *,
        routing: str = "faithful",
        normalize_cost: bool = False,
        init_std: float = 0.5,
        checkpoint: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.checkpoint = bool(checkpoint)
        self.in_types = _positive_int("in_types", in_types)
        self.out_types = _positive_int("out_types", out_types)
        self.kernel_size = _positive_int("kernel_size", kernel_size)
        self.stride = _positive_int("stride", stride)
        self.iterations = iterations
        self.inverse_temperatures = _check_routing_options(iterations, inverse_temperatures)
        if routing not in ROUTING_MODES:
            raise ValueError(f"routing must be one of {ROUTING_MODES}, got {routing!r}")
        self.routing = routing
        self.normalize_cost = bool(normalize_cost)
        self.init_std = float(init_std)
        kw = {"device": device, "dtype": dtype}
        kk = kernel_size * kernel_size
        self.weight = nn.Parameter(torch.empty(kk, in_types, out_types, 4, 4, **kw))
        self.beta_u = nn.Parameter(torch.zeros(out_types, **kw))
        self.beta_a = nn.Parameter(torch.zeros(out_types, **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _init_transform(self.weight, self.init_std)
        nn.init.zeros_(self.beta_u)
        nn.init.zeros_(self.beta_a)

    def output_size(self, input_size: tuple[int, int]) -> tuple[int, int]:
        """``(H_out, W_out)`` for an ``(H, W)`` input grid."""
        return tuple(conv_output_size(s, self.kernel_size, self.stride) for s in input_size)

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
        return votes, child_act, self.output_size(tuple(poses.shape[1:3]))

    def _check_input(self, poses: Tensor, activations: Tensor) -> None:
        _check_grid("input", poses, activations, self.in_types)
        h, w = poses.shape[1:3]
        if h < self.kernel_size or w < self.kernel_size:
            raise ValueError(f"input grid {h}x{w} is smaller than kernel_size={self.kernel_size}")

    def forward(self, poses: Tensor, activations: Tensor) -> tuple[Tensor, Tensor]:
        self._check_input(poses, activations)
        return _maybe_checkpoint(
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
            normalize_cost=self.normalize_cost,
        )

    def extra_repr(self) -> str:
        return (
            f"in_types={self.in_types}, out_types={self.out_types}, "
            f"kernel_size={self.kernel_size}, stride={self.stride}, "
            f"iterations={self.iterations}, routing={self.routing!r}, "
            f"normalize_cost={self.normalize_cost}, checkpoint={self.checkpoint}"
        )


class ClassMatrixCapsules(nn.Module):
    """Class capsules, [H18] §3-4: one ``W`` per (input type, class) shared over positions.

    Every child capsule of the grid votes for every class; EM routing runs over all
    ``H*W*in_types`` children at once. With ``coordinate_addition`` the scaled
    ``(row, col)`` of each child's position is added to the first two vote entries
    (:func:`capsnet.functional.coordinate_addition`), for any, also rectangular, grid.

    Args:
        in_types: D (paper letter), input capsule types per position.
        num_classes: E, class capsules.
        iterations, inverse_temperatures, normalize_cost, init_std, checkpoint: as in
            :class:`ConvMatrixCapsules` (``checkpoint`` recomputes the votes too).
        coordinate_addition: add scaled coordinates to the votes (paper: yes).
        coordinate_elements: the two vote entries that get the row and the column:
            ``(0, 1)`` (SPEC), or ``(3, 7)`` for the paper's "right-hand column" reading
            (see :func:`capsnet.functional.coordinate_addition`).

    Shape:
        - input: ``poses (B, H, W, in_types, 16)``, ``activations (B, H, W, in_types)``.
        - output: ``poses (B, num_classes, 16)``, ``activations (B, num_classes)``.
    """

    def __init__(
        self,
        in_types: int,
        num_classes: int,
        iterations: int = 2,
        inverse_temperatures: Sequence[float] | None = None,
        *,
        coordinate_addition: bool = True,
        coordinate_elements: tuple[int, int] = (0, 1),
        normalize_cost: bool = False,
        init_std: float = 0.5,
        checkpoint: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.checkpoint = bool(checkpoint)
        self.in_types = _positive_int("in_types", in_types)
        self.num_classes = _positive_int("num_classes", num_classes)
        self.iterations = iterations
        self.inverse_temperatures = _check_routing_options(iterations, inverse_temperatures)
        self.coordinate_addition = bool(coordinate_addition)
        self.coordinate_elements = tuple(int(x) for x in coordinate_elements)
        if len(self.coordinate_elements) != 2 or not all(
            0 <= x < 16 for x in self.coordinate_elements
        ):
            raise ValueError(
                f"coordinate_elements must be two indices in 0..15, got {coordinate_elements!r}"
            )
        self.normalize_cost = bool(normalize_cost)
        self.init_std = float(init_std)
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(in_types, num_classes, 4, 4, **kw))
        self.beta_u = nn.Parameter(torch.zeros(num_classes, **kw))
        self.beta_a = nn.Parameter(torch.zeros(num_classes, **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _init_transform(self.weight, self.init_std)
        nn.init.zeros_(self.beta_u)
        nn.init.zeros_(self.beta_a)

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
        return _maybe_checkpoint(self.checkpoint, self._route, poses, activations)

    def _route(self, poses: Tensor, activations: Tensor) -> tuple[Tensor, Tensor]:
        mu, act, _ = CF.em_routing(
            self.votes(poses),
            flatten_capsules(activations),
            self.beta_u,
            self.beta_a,
            self.iterations,
            self.inverse_temperatures,
            normalize_cost=self.normalize_cost,
        )
        return mu, act

    def extra_repr(self) -> str:
        return (
            f"in_types={self.in_types}, num_classes={self.num_classes}, "
            f"iterations={self.iterations}, coordinate_addition={self.coordinate_addition}, "
            f"normalize_cost={self.normalize_cost}, checkpoint={self.checkpoint}"
        )
