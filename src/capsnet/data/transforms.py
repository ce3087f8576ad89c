"""Batched image transforms: augmentation and preprocessing on whole batches at once.

Every transform takes a float tensor ``x`` of shape ``(B, C, H, W)`` (pixels in [0, 1]
when it comes from a dataset) on any device, and a CPU ``torch.Generator``. Random
parameters (a few numbers per image) are drawn on the CPU from that generator and then
moved to ``x.device``, so a batch's augmentation depends only on the generator's seed,
never on the device or on other batches. The pixel work itself (padding, gathers,
``grid_sample``) runs on ``x.device``, vectorised over the batch.

Letters: B batch, C channels, H x W spatial size. Example: a Sabour MNIST training batch
is ``(128, 1, 28, 28)`` and :class:`RandomShift` ``(max_shift=2)`` keeps that shape.

Transforms know the output size for a given input size (:meth:`Transform.output_size`),
which is how a dataset reports the ``input_size`` the model sees.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "Transform",
    "transform_spec",
    "transform_from_spec",
    "Compose",
    "Identity",
    "RandomShift",
    "RandomCrop",
    "CenterCrop",
    "PlaceOnCanvas",
    "RandomFlip",
    "Standardize",
    "RandomBrightness",
    "RandomContrast",
    "RandomAffine",
    "crop_windows",
    "affine_matrices",
    "random_affine_params",
    "apply_affine",
]

Size = tuple[int, int]


def _pair(value: int | Sequence[int], name: str) -> Size:
    if isinstance(value, int) and not isinstance(value, bool):
        pair = (value, value)
    elif isinstance(value, Sequence) and len(value) == 2:
        pair = (int(value[0]), int(value[1]))
    else:
        raise TypeError(f"{name} must be an int or a pair (H, W), got {value!r}")
    if pair[0] <= 0 or pair[1] <= 0:
        raise ValueError(f"{name} must be positive, got {pair}")
    return pair


def _check_batch(x: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"expected a tensor (B, C, H, W), got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"expected a batch (B, C, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"expected a float tensor, got {x.dtype} (divide uint8 images by 255)")


def _uniform(n: int, low: float, high: float, generator: torch.Generator | None) -> Tensor:
    return torch.rand(n, generator=generator, dtype=torch.float64) * (high - low) + low


def _randint(n: int, low: int, high: int, generator: torch.Generator | None) -> Tensor:
    """``n`` integers uniform in ``[low, high]`` (inclusive), on the CPU."""
    return torch.randint(low, high + 1, (n,), generator=generator)


class Transform:
    """Base class: a batched transform ``(B, C, H, W) -> (B, C, H', W')``."""

    #: whether the transform draws random numbers (augmentation) or is deterministic.
    randomized: bool = False

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        raise NotImplementedError

    def output_size(self, size: Size) -> Size:
        """Spatial size of the output for an input of spatial size ``size``."""
        return size

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


class Identity(Transform):
    """Returns the batch unchanged."""

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        _check_batch(x)
        return x


class Compose(Transform):
    """Applies transforms in order, passing the same generator to each.

    Args:
        transforms: the transforms; ``None`` entries are skipped.
    """

    def __init__(self, transforms: Sequence[Transform | None]):
        self.transforms = [t for t in transforms if t is not None]
        for t in self.transforms:
            if not isinstance(t, Transform):
                raise TypeError(f"Compose takes Transform objects, got {type(t).__name__}")
        self.randomized = any(t.randomized for t in self.transforms)

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        _check_batch(x)
        for t in self.transforms:
            x = t(x, generator)
        return x

    def output_size(self, size: Size) -> Size:
        for t in self.transforms:
            size = t.output_size(size)
        return size

    def __repr__(self) -> str:
        return "Compose([" + ", ".join(map(repr, self.transforms)) + "])"


def crop_windows(x: Tensor, top: Tensor, left: Tensor, size: Size) -> Tensor:
    """Crop a differently placed window from every image of a batch.

    Args:
        x: ``(B, C, H, W)``.
        top, left: ``(B,)`` int64 window corners; every window must lie inside the image.
        size: ``(h, w)`` window size.

    Returns:
        ``(B, C, h, w)`` with ``out[b] = x[b, :, top[b]:top[b]+h, left[b]:left[b]+w]``.
    """
    B, C, H, W = x.shape
    h, w = size
    top = top.to(device=x.device, dtype=torch.long)
    left = left.to(device=x.device, dtype=torch.long)
    rows = top.view(B, 1, 1, 1) + torch.arange(h, device=x.device).view(1, 1, h, 1)
    x = x.gather(2, rows.expand(B, C, h, W))
    cols = left.view(B, 1, 1, 1) + torch.arange(w, device=x.device).view(1, 1, 1, w)
    return x.gather(3, cols.expand(B, C, h, w))


class RandomShift(Transform):
    """Shift each image by a random whole number of pixels, filling with zeros.

    Sabour et al. 2017 train on MNIST "randomly shifted by up to 2 pixels in each
    direction with zero padding" (docs/spec.md §1): each of the vertical and horizontal shifts is
    uniform in ``{-max_shift, ..., max_shift}``. Content never moves further than
    ``max_shift`` pixels along either axis.

    Args:
        max_shift: largest shift in pixels (0 disables the transform).
    """

    randomized = True

    def __init__(self, max_shift: int = 2):
        if not isinstance(max_shift, int) or max_shift < 0:
            raise ValueError(f"max_shift must be a non-negative int, got {max_shift!r}")
        self.max_shift = max_shift
        self.randomized = max_shift > 0

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        _check_batch(x)
        s = self.max_shift
        if s == 0 or x.shape[0] == 0:
            return x
        B, _, H, W = x.shape
        padded = F.pad(x, (s, s, s, s))
        top = _randint(B, 0, 2 * s, generator)
        left = _randint(B, 0, 2 * s, generator)
        return crop_windows(padded, top, left, (H, W))


class RandomCrop(Transform):
    """Random ``size`` crop of each image, after optional zero padding on every side.

    Args:
        size: ``(h, w)`` or an int.
        padding: pixels of zeros added on each side first (4 for the usual CIFAR recipe).
    """

    randomized = True

    def __init__(self, size: int | Sequence[int], padding: int = 0):
        self.size = _pair(size, "size")
        if not isinstance(padding, int) or padding < 0:
            raise ValueError(f"padding must be a non-negative int, got {padding!r}")
        self.padding = padding

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        _check_batch(x)
        p = self.padding
        if p:
            x = F.pad(x, (p, p, p, p))
        B, _, H, W = x.shape
        h, w = self.size
        if h > H or w > W:
            raise ValueError(f"crop size {self.size} larger than the (padded) image {(H, W)}")
        top = _randint(B, 0, H - h, generator)
        left = _randint(B, 0, W - w, generator)
        return crop_windows(x, top, left, self.size)

    def output_size(self, size: Size) -> Size:
        return self.size


class CenterCrop(Transform):
    """Central ``size`` crop (for odd margins the extra pixel goes to the bottom/right).

    Args:
        size: ``(h, w)`` or an int.
    """

    def __init__(self, size: int | Sequence[int]):
        self.size = _pair(size, "size")

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        _check_batch(x)
        H, W = x.shape[-2:]
        h, w = self.size
        if h > H or w > W:
            raise ValueError(f"crop size {self.size} larger than the image {(H, W)}")
        top, left = (H - h) // 2, (W - w) // 2
        return x[..., top : top + h, left : left + w]

    def output_size(self, size: Size) -> Size:
        return self.size


class PlaceOnCanvas(Transform):
    """Put each image on a larger black canvas, centred or at a random position.

    For Sabour's affNIST experiment the 28x28 MNIST digits are placed "randomly on a
    black background of 40x40 pixels" (the official code pads by 6 and shifts by up to
    6 pixels, i.e. every placement that keeps the digit inside).

    Args:
        canvas: ``(H, W)`` or an int: the output size.
        random: random placement (training); ``False`` centres the image (evaluation).
        max_shift: largest offset from the centred position in pixels (default: as far
            as the canvas allows).
    """

    def __init__(self, canvas: int | Sequence[int], *, random: bool = True, max_shift=None):
        self.canvas = _pair(canvas, "canvas")
        self.random = bool(random)
        if max_shift is not None and (not isinstance(max_shift, int) or max_shift < 0):
            raise ValueError(f"max_shift must be a non-negative int or None, got {max_shift!r}")
        self.max_shift = max_shift
        self.randomized = self.random

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        _check_batch(x)
        B, _, H, W = x.shape
        CH, CW = self.canvas
        if H > CH or W > CW:
            raise ValueError(f"image {(H, W)} larger than the canvas {self.canvas}")
        my, mx = CH - H, CW - W  # free pixels along each axis
        # Pad so that a canvas-sized window at offset (my, mx) holds the image at (0, 0)
        # and a window at offset 0 holds it at (my, mx).
        padded = F.pad(x, (mx, mx, my, my))
        cy, cx = my // 2, mx // 2
        if not self.random:
            return padded[..., my - cy : my - cy + CH, mx - cx : mx - cx + CW]
        if self.max_shift is None:
            lo_y, hi_y, lo_x, hi_x = 0, my, 0, mx
        else:
            s = self.max_shift
            lo_y, hi_y = max(0, cy - s), min(my, cy + s)
            lo_x, hi_x = max(0, cx - s), min(mx, cx + s)
        pos_y = _randint(B, lo_y, hi_y, generator)  # image's top row on the canvas
        pos_x = _randint(B, lo_x, hi_x, generator)
        return crop_windows(padded, my - pos_y, mx - pos_x, self.canvas)

    def output_size(self, size: Size) -> Size:
        return self.canvas


class RandomFlip(Transform):
    """Flip each image left-right with probability ``p``."""

    randomized = True

    def __init__(self, p: float = 0.5):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        self.p = float(p)

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        _check_batch(x)
        flip = (torch.rand(x.shape[0], generator=generator) < self.p).to(x.device)
        return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


class Standardize(Transform):
    """Per-image standardisation to zero mean and unit variance over (C, H, W).

    ``(x - mean) / max(std, eps)`` with the population std, so a constant image maps to
    zeros instead of NaN. (``tf.image.per_image_standardization`` floors the std at
    ``1 / sqrt(C*H*W)`` instead, a floor meant for 0..255 pixel values that would bind
    on low-contrast images scaled to [0, 1].)

    Args:
        eps: floor of the standard deviation.
    """

    def __init__(self, eps: float = 1e-5):
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.eps = float(eps)

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        _check_batch(x)
        # The mean in float64 is exact for constant images, so they map to exact zeros
        # (MPS has no float64; there the mean stays in x's dtype).
        wide = torch.float32 if x.device.type == "mps" else torch.float64
        mean = x.flatten(1).mean(dim=1, dtype=wide).to(x.dtype)
        centred = x - mean.view(-1, 1, 1, 1)
        std = centred.flatten(1).square().mean(dim=1).sqrt().clamp_min(self.eps)
        return centred / std.view(-1, 1, 1, 1)


class RandomBrightness(Transform):
    """Add a random ``delta ~ U(-max_delta, max_delta)`` to every pixel of each image."""

    randomized = True

    def __init__(self, max_delta: float):
        if max_delta < 0:
            raise ValueError(f"max_delta must be >= 0, got {max_delta}")
        self.max_delta = float(max_delta)

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        _check_batch(x)
        delta = _uniform(x.shape[0], -self.max_delta, self.max_delta, generator)
        return x + delta.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)


class RandomContrast(Transform):
    """Scale each image's deviation from its per-channel mean by ``f ~ U(lower, upper)``.

    As ``tf.image.random_contrast``: ``(x - mean_c) * f + mean_c``.
    """

    randomized = True

    def __init__(self, lower: float, upper: float):
        if not 0 <= lower <= upper:
            raise ValueError(f"need 0 <= lower <= upper, got lower={lower}, upper={upper}")
        self.lower, self.upper = float(lower), float(upper)

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        _check_batch(x)
        factor = _uniform(x.shape[0], self.lower, self.upper, generator)
        factor = factor.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)
        mean = x.mean(dim=(2, 3), keepdim=True)
        return (x - mean) * factor + mean


def affine_matrices(rotation: Tensor, shear: Tensor, scale_x: Tensor, scale_y: Tensor) -> Tensor:
    """Forward 2x2 maps ``A = R(rotation) @ Shear(shear) @ diag(scale_x, scale_y)``.

    Acting on ``(x, y)`` pixel offsets from the image centre (x right, y down).

    Args:
        rotation: ``(B,)`` angles in degrees.
        shear: ``(B,)`` horizontal shear factors (x += shear * y).
        scale_x, scale_y: ``(B,)`` scale factors.

    Returns:
        ``(B, 2, 2)`` float64.
    """
    theta = torch.deg2rad(rotation.double())
    cos, sin = torch.cos(theta), torch.sin(theta)
    zeros, ones = torch.zeros_like(cos), torch.ones_like(cos)
    rot = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    shr = torch.stack([torch.stack([ones, shear.double()], -1), torch.stack([zeros, ones], -1)], -2)
    scl = torch.diag_embed(torch.stack([scale_x.double(), scale_y.double()], -1))
    return rot @ shr @ scl


def _content_boxes(x: Tensor, threshold: float) -> Tensor:
    """Per-image bounding boxes ``(B, 4)`` = (x0, x1, y0, y1) of pixels above threshold,
    as pixel-edge offsets from the image centre; empty images get a zero box."""
    B, _, H, W = x.shape
    mask = x.detach().amax(dim=1) > threshold  # (B, H, W)
    rows, cols = mask.any(dim=2), mask.any(dim=1)
    ar_h = torch.arange(H, device=x.device)
    ar_w = torch.arange(W, device=x.device)
    big = max(H, W) + 1
    y0 = torch.where(rows, ar_h, big).amin(1)
    y1 = torch.where(rows, ar_h, -1).amax(1) + 1
    x0 = torch.where(cols, ar_w, big).amin(1)
    x1 = torch.where(cols, ar_w, -1).amax(1) + 1
    box = torch.stack([x0 - W / 2, x1 - W / 2, y0 - H / 2, y1 - H / 2], 1).double()
    empty = ~rows.any(dim=1)
    return torch.where(empty.view(B, 1), torch.zeros_like(box), box).cpu()


def random_affine_params(
    n: int,
    generator: torch.Generator | None,
    *,
    rotation: float,
    shear: float,
    scale: tuple[float, float],
) -> Tensor:
    """``(n, 2, 2)`` random forward maps with the given ranges (rotation in degrees)."""
    rot = _uniform(n, -rotation, rotation, generator)
    shr = _uniform(n, -shear, shear, generator)
    sx = _uniform(n, scale[0], scale[1], generator)
    sy = _uniform(n, scale[0], scale[1], generator)
    return affine_matrices(rot, shr, sx, sy)


def apply_affine(x: Tensor, matrices: Tensor, translation: Tensor, out_size: Size) -> Tensor:
    """Warp each image by ``p_out = A p_in + t`` (centre-relative pixel coordinates).

    The input is implicitly centred on the output canvas; pixels mapped from outside the
    input are zero. Bilinear interpolation (``grid_sample``, ``align_corners=False``).

    Args:
        x: ``(B, C, H, W)``.
        matrices: ``(B, 2, 2)`` forward maps ``A``.
        translation: ``(B, 2)`` offsets ``t = (tx, ty)`` in output pixels.
        out_size: ``(H', W')``.

    Returns:
        ``(B, C, H', W')``.
    """
    B, C, H, W = x.shape
    Ho, Wo = out_size
    inv = torch.linalg.inv(matrices.double())
    d_in = torch.tensor([[2.0 / W, 0.0], [0.0, 2.0 / H]], dtype=torch.float64)
    d_out = torch.tensor([[Wo / 2.0, 0.0], [0.0, Ho / 2.0]], dtype=torch.float64)
    # normalised input = D_in^-1 A^-1 (D_out normalised output - t)
    lin = d_in @ inv @ d_out
    shift = -(d_in @ inv @ translation.double().unsqueeze(-1))
    theta = torch.cat([lin, shift], dim=-1).to(device=x.device, dtype=x.dtype)
    grid = F.affine_grid(theta, [B, C, Ho, Wo], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class RandomAffine(Transform):
    """Random affine warp per image with affNIST-style ranges (docs/spec.md §3).

    Each image gets ``A = R(theta) Shear(s) diag(sx, sy)`` with ``theta ~ U(-rotation,
    rotation)`` degrees, ``s ~ U(-shear, shear)``, ``sx, sy ~ U(*scale)`` independently,
    then a translation. With ``translate="fit"`` (affNIST's rule) the translation is
    uniform over all offsets that keep the transformed content's bounding box inside the
    output canvas; a number ``t`` instead draws each offset uniformly in ``[-t, t]`` pixels.

    Args:
        rotation: largest rotation in degrees (affNIST: 20).
        shear: largest shear factor (affNIST: 0.2).
        scale: ``(low, high)`` scale range per axis (affNIST: 0.8 to 1.2).
        translate: ``"fit"`` or a maximum offset in pixels.
        out_size: output canvas (affNIST: 40); ``None`` keeps the input size.
        threshold: pixel value above which a pixel counts as content for ``"fit"``.
    """

    randomized = True

    def __init__(
        self,
        rotation: float = 20.0,
        shear: float = 0.2,
        scale: tuple[float, float] = (0.8, 1.2),
        translate: str | float = "fit",
        out_size: int | Sequence[int] | None = 40,
        threshold: float = 0.0,
    ):
        if rotation < 0 or shear < 0:
            raise ValueError(f"rotation and shear must be >= 0, got {rotation}, {shear}")
        if len(scale) != 2 or not 0 < scale[0] <= scale[1]:
            raise ValueError(f"scale must be (low, high) with 0 < low <= high, got {scale}")
        if not (translate == "fit" or (isinstance(translate, (int, float)) and translate >= 0)):
            raise ValueError(f"translate must be 'fit' or a number >= 0, got {translate!r}")
        self.rotation, self.shear = float(rotation), float(shear)
        self.scale = (float(scale[0]), float(scale[1]))
        self.translate = translate
        self.out_size = None if out_size is None else _pair(out_size, "out_size")
        self.threshold = float(threshold)

    def output_size(self, size: Size) -> Size:
        return self.out_size or size

    def sample(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Draw the warp of every image of ``x`` without applying it.

        Returns:
            ``(A, t)``: forward maps ``(B, 2, 2)`` and translations ``(B, 2)`` (float64,
            CPU) for :func:`apply_affine`.
        """
        _check_batch(x)
        B = x.shape[0]
        out = self.output_size((x.shape[-2], x.shape[-1]))
        A = random_affine_params(
            B, generator, rotation=self.rotation, shear=self.shear, scale=self.scale
        )
        u = torch.rand(B, 2, generator=generator, dtype=torch.float64)
        if self.translate == "fit":
            box = _content_boxes(x, self.threshold)  # (B, 4): x0, x1, y0, y1
            corners = torch.stack([box[:, [0, 0, 1, 1]], box[:, [2, 3, 2, 3]]], dim=1)
            moved = A @ corners  # (B, 2, 4) corners of the transformed content box
            half = torch.tensor([out[1], out[0]], dtype=torch.float64) / 2
            lo = -half - moved.amin(-1)
            hi = half - moved.amax(-1)
            # Content larger than the canvas cannot fit: centre it instead.
            mid = (lo + hi) / 2
            lo, hi = torch.where(lo <= hi, lo, mid), torch.where(lo <= hi, hi, mid)
            t = lo + u * (hi - lo)
        else:
            t = (2 * u - 1) * float(self.translate)
        return A, t

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        A, t = self.sample(x, generator)
        return apply_affine(x, A, t, self.output_size((x.shape[-2], x.shape[-1])))


# ---------------------------------------------------------------------------------------
# Deterministic preprocessing as plain data (stored with a run, rebuilt for prediction).

_SPEC_CLASSES: dict[str, type[Transform]] = {
    "Identity": Identity,
    "Compose": Compose,
    "CenterCrop": CenterCrop,
    "PlaceOnCanvas": PlaceOnCanvas,
    "Standardize": Standardize,
}


def transform_spec(transform: Transform) -> dict[str, Any] | None:
    """A JSON-ready description of a deterministic (evaluation) transform, rebuilt by
    :func:`transform_from_spec`; ``None`` when it holds a transform that cannot be
    described (a random or custom one).

    >>> transform_spec(CenterCrop(32))
    {'name': 'CenterCrop', 'size': [32, 32]}
    """
    name = type(transform).__name__
    if _SPEC_CLASSES.get(name) is not type(transform) or transform.randomized:
        return None
    if isinstance(transform, Compose):
        inner = [transform_spec(t) for t in transform.transforms]
        if any(t is None for t in inner):
            return None
        return {"name": name, "transforms": inner}
    spec: dict[str, Any] = {"name": name}
    for key, value in vars(transform).items():
        if key.startswith("_") or key == "randomized":
            continue
        spec[key] = list(value) if isinstance(value, tuple) else value
    return spec


def transform_from_spec(spec: Any) -> Transform:
    """The transform a :func:`transform_spec` dict describes.

    Raises:
        ValueError: not a spec of a known deterministic transform.
    """
    if not isinstance(spec, dict) or spec.get("name") not in _SPEC_CLASSES:
        raise ValueError(
            f"not a preprocessing spec (a dict naming one of {sorted(_SPEC_CLASSES)}): {spec!r}"
        )
    kwargs = {k: v for k, v in spec.items() if k != "name"}
    if spec["name"] == "Compose":
        return Compose([transform_from_spec(t) for t in kwargs.get("transforms", [])])
    try:
        return _SPEC_CLASSES[spec["name"]](**kwargs)
    except TypeError as err:
        raise ValueError(f"bad preprocessing spec {spec!r}: {err}") from err
