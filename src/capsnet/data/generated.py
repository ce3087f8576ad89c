"""Datasets generated from MNIST-family splits, deterministically from a seed.

``affnist_generated``: affNIST-*style* images made here, not the official affNIST. Each
digit is warped by a random affine map with affNIST's ranges (docs/spec.md §3: rotation up to 20
degrees, shear up to 0.2, scale 0.8 to 1.2 per axis, translation anywhere the digit stays
inside the 40x40 canvas) using ``affine_grid``/``grid_sample`` (bilinear). Use it where the
official affNIST cannot be downloaded; results on it are not comparable digit-for-digit
with the published affNIST numbers. The applied maps are kept (``affine``,
``translation``), as affNIST keeps its transforms.

``multimnist``: Sabour et al. 2017's MultiMNIST construction, following the official
generator: both digits are zero-padded to 36x36 and shifted by up to 4 pixels along each
axis; the second digit is drawn uniformly from the images of the same split with a
*different* label; the merged image is ``min(a + b, 255)``. Each source digit is the base
of ``pairs_per_digit`` examples (the paper: 1,000, i.e. 60M training images; the default
here is 1 so a split fits in memory; memory is about 1.3 KB per example). The base digit
keeps one shift for all its pairs, as in the official code; partners are drawn with
replacement (the official code draws without replacement among 2 x pairs candidates).
"""

from __future__ import annotations

import math
from typing import cast

import torch
from torch import Tensor
from tqdm.auto import tqdm

from capsnet.data.dataset import ImageDataset, to_float
from capsnet.data.loader import derive_seed
from capsnet.data.mnist import MNIST_FAMILY, load_idx_family
from capsnet.data.registry import register_dataset
from capsnet.data.transforms import RandomAffine, apply_affine, crop_windows

__all__ = ["MultiMNISTDataset", "generate_affine", "generate_multimnist"]

_CHUNK = 4096


def _generator(*parts) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(derive_seed(*parts))
    return g


def generate_affine(
    images: Tensor,
    *,
    seed: int,
    copies: int = 1,
    rotation: float = 20.0,
    shear: float = 0.2,
    scale: tuple[float, float] = (0.8, 1.2),
    canvas: int = 40,
    progress: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Warp every image ``copies`` times with random affNIST-style affine maps.

    Deterministic: the result depends only on ``images`` and the arguments (chunks are
    seeded by their position, not by the order of work).

    Args:
        images: uint8 ``(N, C, H, W)``.
        seed: generator seed.
        copies: warped versions per image (affNIST made 32).
        rotation, shear, scale: ranges as in :class:`~capsnet.data.transforms.RandomAffine`.
        canvas: output size.
        progress: tqdm bar.

    Returns:
        ``(warped uint8 (N*copies, C, canvas, canvas), source index (N*copies,),
        A float32 (N*copies, 2, 2), t float32 (N*copies, 2))``, copy-major order
        (all images' first copy, then their second, ...).
    """
    n = images.shape[0]
    warp = RandomAffine(rotation, shear, scale, translate="fit", out_size=canvas)
    outs, mats, shifts, sources = [], [], [], []
    chunks = [(c, s) for c in range(copies) for s in range(0, n, _CHUNK)]
    for copy_index, start in tqdm(
        chunks, desc="affnist_generated", disable=None if progress else True, leave=False
    ):
        x = to_float(images[start : start + _CHUNK])
        A, t = warp.sample(x, _generator("affnist_generated", seed, copy_index, start))
        y = apply_affine(x, A, t, (canvas, canvas))
        outs.append(y.mul_(255).round_().clamp_(0, 255).to(torch.uint8))
        mats.append(A.float())
        shifts.append(t.float())
        sources.append(torch.arange(start, start + x.shape[0]))
    if not outs:
        c = images.shape[1]
        return (
            torch.zeros(0, c, canvas, canvas, dtype=torch.uint8),
            torch.zeros(0, dtype=torch.long),
            torch.zeros(0, 2, 2),
            torch.zeros(0, 2),
        )
    return torch.cat(outs), torch.cat(sources), torch.cat(mats), torch.cat(shifts)


@register_dataset(
    input_size=(40, 40),
    in_channels=1,
    num_classes=10,
    paper="Sabour et al. 2017, affNIST experiment (self-generated stand-in test set)",
    description="affNIST-style random affine warps of MNIST on 40x40 (self-generated)",
    download=True,
)
def affnist_generated(
    split: str = "test",
    root=None,
    download: bool = False,
    *,
    source: str = "mnist",
    seed: int = 0,
    copies: int = 1,
    rotation: float = 20.0,
    shear: float = 0.2,
    scale: tuple[float, float] = (0.8, 1.2),
    canvas: int = 40,
    verify: bool = True,
    progress: bool = True,
) -> ImageDataset:
    """Self-generated affNIST-style split of ``source`` (``"mnist"``/``"fashion_mnist"``).

    Extras: ``source_index`` (the digit's index in the source split), ``affine`` ``(N, 2, 2)``
    and ``translation`` ``(N, 2)`` (pixels, ``p_out = A p_in + t`` about the centres).
    """
    if source not in MNIST_FAMILY:
        raise ValueError(f"source must be one of {sorted(MNIST_FAMILY)}, got {source!r}")
    if not isinstance(copies, int) or copies < 1:
        raise ValueError(f"copies must be a positive int, got {copies!r}")
    src, labels, classes, meta = load_idx_family(
        source, split, root, download, verify=verify, progress=progress
    )
    images, index, A, t = generate_affine(
        src,
        seed=seed,
        copies=copies,
        rotation=rotation,
        shear=shear,
        scale=cast("tuple[float, float]", tuple(scale)),  # (low, high): checked by RandomAffine
        canvas=canvas,
        progress=progress,
    )
    return ImageDataset(
        images,
        labels[index],
        classes=classes,
        name="affnist_generated",
        split=split,
        extras={"source_index": index, "affine": A, "translation": t},
        meta={
            **meta,
            "source": source,
            "seed": seed,
            "copies": copies,
            "ranges": {"rotation": rotation, "shear": shear, "scale": tuple(scale)},
            "note": "self-generated affNIST-style data, not the official affNIST",
        },
    )


def _place(images: Tensor, pos: Tensor, canvas: int) -> Tensor:
    """Put uint8 images ``(M, C, h, w)`` on a black canvas with their top-left corner at
    ``pos`` ``(M, 2)`` = (row, col); every placement must fit."""
    M, _, h, w = images.shape
    my, mx = canvas - h, canvas - w
    padded = torch.nn.functional.pad(images, (mx, mx, my, my))
    return crop_windows(padded, my - pos[:, 0], mx - pos[:, 1], (canvas, canvas))


def generate_multimnist(
    images: Tensor,
    labels: Tensor,
    *,
    seed: int,
    pairs_per_digit: int = 1,
    max_shift: int = 4,
    canvas: int = 36,
    progress: bool = True,
) -> dict[str, Tensor]:
    """Sabour's MultiMNIST pairs from one split (see the module docstring).

    Args:
        images: uint8 ``(N, 1, 28, 28)``.
        labels: int64 ``(N,)``; at least two classes must be present.
        seed: generator seed (same seed, same data).
        pairs_per_digit: examples per base digit.
        max_shift: largest shift of each digit from the centre, per axis.
        canvas: output size (28 + 2 * 4 = 36).

    Returns:
        dict with ``images`` uint8 ``(M, 1, canvas, canvas)``, ``labels`` and ``labels2``
        int64 ``(M,)``, ``pairs`` int64 ``(M, 2)`` (source indices of the two digits) and
        ``positions`` int64 ``(M, 2, 2)`` (top-left (row, col) of each digit on the
        canvas), with ``M = N * pairs_per_digit`` in base-major order.
    """
    n, _, h, w = images.shape
    if canvas - h < 2 * max_shift or canvas - w < 2 * max_shift:
        raise ValueError(f"canvas {canvas} too small for {h}x{w} digits shifted by {max_shift}")
    counts = torch.bincount(labels, minlength=int(labels.max()) + 1 if n else 1)
    if n and int((counts > 0).sum()) < 2:
        raise ValueError("MultiMNIST needs digits of at least two different classes")
    order = torch.argsort(labels, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    centre = torch.tensor([(canvas - h) // 2, (canvas - w) // 2])
    P = pairs_per_digit
    keys = ("images", "labels", "labels2", "pairs", "positions")
    out: dict[str, list[Tensor]] = {k: [] for k in keys}
    for start in tqdm(
        range(0, n, _CHUNK), desc="multimnist", disable=None if progress else True, leave=False
    ):
        g = _generator("multimnist", seed, start)
        base = torch.arange(start, min(start + _CHUNK, n))
        b = base.shape[0]
        base_shift = torch.randint(-max_shift, max_shift + 1, (b, 2), generator=g)
        top_shift = torch.randint(-max_shift, max_shift + 1, (b, P, 2), generator=g)
        # Partner: uniform over the indices whose label differs from the base's.
        y = labels[base]
        others = n - counts[y]  # (b,)
        r = (torch.rand(b, P, generator=g, dtype=torch.float64) * others.view(-1, 1)).long()
        r = torch.minimum(r, (others - 1).view(-1, 1))
        r = torch.where(r >= starts[y].view(-1, 1), r + counts[y].view(-1, 1), r)
        partner = order[r]  # (b, P)
        base_rep = base.repeat_interleave(P)
        pos1 = (centre + base_shift).repeat_interleave(P, dim=0)
        pos2 = centre + top_shift.reshape(-1, 2)
        img1 = _place(images[base_rep], pos1, canvas)
        img2 = _place(images[partner.reshape(-1)], pos2, canvas)
        merged = (img1.to(torch.int16) + img2.to(torch.int16)).clamp_(max=255).to(torch.uint8)
        out["images"].append(merged)
        out["labels"].append(labels[base_rep])
        out["labels2"].append(labels[partner.reshape(-1)])
        out["pairs"].append(torch.stack([base_rep, partner.reshape(-1)], 1))
        out["positions"].append(torch.stack([pos1, pos2], 1))
    if not out["images"]:
        return {
            "images": torch.zeros(0, 1, canvas, canvas, dtype=torch.uint8),
            "labels": torch.zeros(0, dtype=torch.long),
            "labels2": torch.zeros(0, dtype=torch.long),
            "pairs": torch.zeros(0, 2, dtype=torch.long),
            "positions": torch.zeros(0, 2, 2, dtype=torch.long),
        }
    return {k: torch.cat(v) for k, v in out.items()}


class MultiMNISTDataset(ImageDataset):
    """MultiMNIST split: ``labels`` (first digit), ``labels2`` (second digit), ``pairs``,
    ``positions``, plus :meth:`components` for the two separate digits (reconstruction
    targets), rebuilt on demand from the source digits to save memory.
    """

    source_images: Tensor
    canvas: int
    labels2: Tensor  # extras (set by ImageDataset from ``extras``)
    pairs: Tensor
    positions: Tensor

    def components(self, indices: Tensor | None = None) -> Tensor:
        """The two shifted single digits of examples ``indices`` (default: all).

        Shape: ``(B, 2, 1, canvas, canvas)`` uint8; ``[:, 0]`` has label ``labels``,
        ``[:, 1]`` has label ``labels2``; ``images = min(sum, 255)``.
        """
        idx = torch.arange(len(self)) if indices is None else torch.as_tensor(indices).long()
        pairs, pos = self.pairs[idx], self.positions[idx]
        first = _place(self.source_images[pairs[:, 0]], pos[:, 0], self.canvas)
        second = _place(self.source_images[pairs[:, 1]], pos[:, 1], self.canvas)
        return torch.stack([first, second], dim=1)

    def multi_hot(self, indices: Tensor | None = None) -> Tensor:
        """``(B, num_classes)`` float targets with ones at both digits' classes."""
        idx = torch.arange(len(self)) if indices is None else torch.as_tensor(indices).long()
        target = torch.zeros(idx.shape[0], self.num_classes)
        target[torch.arange(idx.shape[0]), self.labels[idx]] = 1.0
        target[torch.arange(idx.shape[0]), self.labels2[idx]] = 1.0
        return target


@register_dataset(
    input_size=(36, 36),
    in_channels=1,
    num_classes=10,
    paper="Sabour et al. 2017, MultiMNIST (5.2 % error)",
    description="two overlapping MNIST digits of different classes, 36x36 (generated)",
    download=True,
)
def multimnist(
    split: str = "train",
    root=None,
    download: bool = False,
    *,
    seed: int = 0,
    pairs_per_digit: int = 1,
    max_shift: int = 4,
    source: str = "mnist",
    verify: bool = True,
    progress: bool = True,
) -> MultiMNISTDataset:
    """MultiMNIST generated from ``source`` (see :func:`generate_multimnist`).

    Training and test splits use different seeds derived from ``seed`` and the split.
    No further augmentation: the shifts are part of the generated data.
    """
    if source not in MNIST_FAMILY:
        raise ValueError(f"source must be one of {sorted(MNIST_FAMILY)}, got {source!r}")
    if not isinstance(pairs_per_digit, int) or pairs_per_digit < 1:
        raise ValueError(f"pairs_per_digit must be a positive int, got {pairs_per_digit!r}")
    if not isinstance(max_shift, int) or max_shift < 0:
        raise ValueError(f"max_shift must be a non-negative int, got {max_shift!r}")
    src, labels, classes, meta = load_idx_family(
        source, split, root, download, verify=verify, progress=progress
    )
    canvas = src.shape[-1] + 2 * max_shift
    data = generate_multimnist(
        src,
        labels,
        seed=derive_seed(seed, split),
        pairs_per_digit=pairs_per_digit,
        max_shift=max_shift,
        canvas=canvas,
        progress=progress,
    )
    ds = MultiMNISTDataset(
        data["images"],
        data["labels"],
        classes=classes,
        name="multimnist",
        split=split,
        extras={k: data[k] for k in ("labels2", "pairs", "positions")},
        meta={
            **meta,
            "source": source,
            "seed": seed,
            "pairs_per_digit": pairs_per_digit,
            "max_shift": max_shift,
            "approx_bytes_per_example": math.prod(data["images"].shape[1:]),
        },
    )
    ds.source_images = src
    ds.canvas = canvas
    return ds
