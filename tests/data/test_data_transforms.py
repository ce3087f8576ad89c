"""Batched transforms: bounds (a 2 px shift never moves content further), exact crops,
placements, standardisation, affine warps against plain references, determinism."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from capsnet.data.transforms import (
    CenterCrop,
    Compose,
    Identity,
    PlaceOnCanvas,
    RandomAffine,
    RandomBrightness,
    RandomContrast,
    RandomCrop,
    RandomFlip,
    RandomShift,
    Standardize,
    apply_affine,
    crop_windows,
)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def shift_plain(img, dy, dx):
    """Reference: move content by (dy, dx) with zero fill, one image at a time."""
    out = torch.zeros_like(img)
    H, W = img.shape[-2:]
    out[..., max(dy, 0) : H + min(dy, 0), max(dx, 0) : W + min(dx, 0)] = img[
        ..., max(-dy, 0) : H - max(dy, 0), max(-dx, 0) : W - max(dx, 0)
    ]
    return out


def test_shift_reference():
    img = torch.arange(16.0).view(1, 4, 4)
    assert shift_plain(img, 1, -2)[0, 1].tolist() == [2.0, 3.0, 0.0, 0.0]
    assert shift_plain(img, 1, -2)[0, 0].tolist() == [0.0, 0.0, 0.0, 0.0]


def test_crop_windows_matches_slicing():
    x = torch.rand(5, 2, 9, 11)
    top, left = torch.tensor([0, 1, 2, 3, 4]), torch.tensor([5, 0, 3, 1, 4])
    out = crop_windows(x, top, left, (5, 6))
    for b in range(5):
        torch.testing.assert_close(out[b], x[b, :, top[b] : top[b] + 5, left[b] : left[b] + 6])


def test_random_shift_is_a_zero_filled_shift_of_at_most_max_shift():
    x = torch.rand(64, 1, 12, 12)
    out = RandomShift(2)(x, gen(1))
    seen = set()
    for b in range(64):
        matches = [
            (dy, dx)
            for dy in range(-2, 3)
            for dx in range(-2, 3)
            if torch.equal(out[b], shift_plain(x[b], dy, dx))
        ]
        assert matches, f"image {b} is not a shift of at most 2 px"
        seen.add(matches[0])
    assert len(seen) > 15  # the shifts vary over the 25 possibilities


def test_shift_never_moves_a_pixel_more_than_max_shift():
    x = torch.zeros(400, 1, 28, 28)
    x[:, 0, 13, 7] = 1.0  # one bright pixel
    out = RandomShift(2)(x, gen(2))
    pos = out[:, 0].flatten(1).argmax(1)
    rows, cols = pos // 28, pos % 28
    assert (out.flatten(1).sum(1) == 1).all()  # nothing lost, nothing duplicated
    assert (rows - 13).abs().max() == 2 and (cols - 7).abs().max() == 2
    assert set((rows - 13).tolist()) == {-2, -1, 0, 1, 2}


def test_random_crop_with_padding_windows_and_center_crop():
    x = torch.rand(30, 3, 8, 8)
    out = RandomCrop(8, padding=2)(x, gen(3))
    padded = F.pad(x, (2, 2, 2, 2))
    for b in range(30):
        assert any(
            torch.equal(out[b], padded[b, :, i : i + 8, j : j + 8])
            for i in range(5)
            for j in range(5)
        )
    c = CenterCrop(4)(torch.arange(36.0).view(1, 1, 6, 6))
    assert c[0, 0, 0].tolist() == [7.0, 8.0, 9.0, 10.0]
    assert CenterCrop((3, 5)).output_size((10, 10)) == (3, 5)
    with pytest.raises(ValueError, match="larger than"):
        RandomCrop(10)(x, gen())


def test_place_on_canvas_centred_and_random():
    x = torch.rand(200, 1, 28, 28)
    centred = PlaceOnCanvas(40, random=False)(x)
    torch.testing.assert_close(centred, F.pad(x, (6, 6, 6, 6)))
    out = PlaceOnCanvas(40)(x, gen(4))
    assert out.shape == (200, 1, 40, 40)
    torch.testing.assert_close(out.sum((1, 2, 3)), x.sum((1, 2, 3)))  # nothing clipped
    tops = set()
    for b in range(200):
        nz = out[b, 0].nonzero()
        top, left = int(nz[:, 0].min()), int(nz[:, 1].min())
        tops.add(top)
        torch.testing.assert_close(out[b, 0, top : top + 28, left : left + 28], x[b, 0])
    assert tops == set(range(13))  # every vertical position 0..12 occurs
    limited = PlaceOnCanvas(40, max_shift=1)(x, gen(5))
    assert set((limited[:, 0].sum(2) > 0).float().argmax(1).tolist()) <= {5, 6, 7}


def test_standardize_and_constant_images():
    x = torch.rand(4, 2, 5, 5) * 3 + 1
    y = Standardize()(x)
    torch.testing.assert_close(y.mean((1, 2, 3)), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.std((1, 2, 3), correction=0), torch.ones(4), atol=1e-5, rtol=0)
    const = Standardize()(torch.full((2, 1, 4, 4), 0.7))
    assert torch.isfinite(const).all() and (const == 0).all()


def test_brightness_contrast_flip_ranges():
    x = torch.rand(100, 1, 6, 6)
    b = RandomBrightness(0.1)(x, gen(6)) - x
    delta = b[:, 0, 0, 0]
    assert (b - delta.view(-1, 1, 1, 1)).abs().max() < 1e-6
    assert delta.abs().max() <= 0.1 and delta.std() > 0.02
    c = RandomContrast(0.5, 1.5)(x, gen(7))
    mean = x.mean((2, 3), keepdim=True)
    factor = ((c - mean) / (x - mean))[:, 0, 0, 0]
    assert factor.min() >= 0.5 - 1e-4 and factor.max() <= 1.5 + 1e-4
    f = RandomFlip()(x, gen(8))
    flipped = [torch.equal(f[i], x[i].flip(-1)) for i in range(100)]
    kept = [torch.equal(f[i], x[i]) for i in range(100)]
    assert all(a or k for a, k in zip(flipped, kept, strict=True)) and 25 < sum(flipped) < 75


def test_same_generator_seed_same_augmentation():
    t = Compose([RandomShift(2), RandomBrightness(0.2), RandomFlip()])
    x = torch.rand(16, 1, 10, 10)
    torch.testing.assert_close(t(x, gen(9)), t(x, gen(9)))
    assert not torch.equal(t(x, gen(9)), t(x, gen(10)))
    assert t.randomized and not Compose([Identity(), Standardize()]).randomized


def test_apply_affine_identity_rotation_and_translation():
    x = torch.rand(3, 1, 28, 28)
    eye = torch.eye(2, dtype=torch.float64).expand(3, 2, 2)
    zero = torch.zeros(3, 2, dtype=torch.float64)
    torch.testing.assert_close(apply_affine(x, eye, zero, (40, 40)), F.pad(x, (6, 6, 6, 6)))
    # a whole-pixel translation (tx=+3 right, ty=-2 up)
    t = torch.tensor([[3.0, -2.0]], dtype=torch.float64).expand(3, 2)
    moved = apply_affine(x, eye, t, (40, 40))
    torch.testing.assert_close(moved, shift_plain(F.pad(x, (6, 6, 6, 6)), -2, 3))
    # a 90 degree rotation (x right, y down: (x, y) -> (-y, x)) is rot90 of the image
    rot = torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=torch.float64).expand(3, 2, 2)
    torch.testing.assert_close(
        apply_affine(x, rot, zero, (28, 28)), torch.rot90(x, k=-1, dims=(2, 3)), atol=1e-5, rtol=0
    )


def test_random_affine_fit_keeps_content_inside_and_scales_mass():
    x = torch.zeros(64, 1, 28, 28)
    x[:, :, 4:24, 4:24] = torch.rand(64, 1, 20, 20)
    warp = RandomAffine(out_size=40)
    A, t = warp.sample(x, gen(11))
    out = apply_affine(x, A, t, (40, 40))
    # Content never leaves the canvas: the warped mass is the input mass times det(A).
    ratio = out.sum((1, 2, 3)) / x.sum((1, 2, 3))
    det = torch.linalg.det(A).float()
    torch.testing.assert_close(ratio, det, atol=0.03, rtol=0.03)
    angles = torch.rad2deg(torch.atan2(A[:, 1, 0], A[:, 0, 0]))
    assert angles.abs().max() <= 20.0 + 1e-6
    assert t.abs().max() <= 20 and t.std() > 1.0  # translations spread over the canvas
    torch.testing.assert_close(warp(x, gen(11)), out)


def test_random_affine_parameter_ranges():
    from capsnet.data.transforms import affine_matrices

    A = affine_matrices(
        torch.tensor([30.0]), torch.tensor([0.2]), torch.tensor([1.1]), torch.tensor([0.9])
    )
    c, s = math.cos(math.radians(30)), math.sin(math.radians(30))
    expected = (
        torch.tensor([[c, -s], [s, c]])
        @ torch.tensor([[1, 0.2], [0, 1]])
        @ torch.diag(torch.tensor([1.1, 0.9]))
    )
    torch.testing.assert_close(A[0].float(), expected)
    with pytest.raises(ValueError, match="translate"):
        RandomAffine(translate="wherever")
    with pytest.raises(ValueError, match="scale"):
        RandomAffine(scale=(1.2, 0.8))


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        RandomShift(2)(torch.rand(3, 28, 28), gen())
    with pytest.raises(TypeError, match="float"):
        RandomShift(2)(torch.zeros(1, 1, 4, 4, dtype=torch.uint8), gen())
    with pytest.raises(ValueError, match="max_shift"):
        RandomShift(-1)
