"""BatchLoader: coverage, shapes, seeded epochs, exact mid-epoch resume, rank shards."""

from __future__ import annotations

import pytest
import torch

from capsnet.data import BatchLoader, ImageDataset, from_arrays
from capsnet.data.transforms import RandomShift


def make_dataset(n=50, size=6, max_shift=1):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 1, size, size), generator=g, dtype=torch.uint8)
    labels = torch.arange(n) % 5
    return ImageDataset(
        images,
        labels,
        classes=list("abcde"),
        name="toy",
        train_transform=RandomShift(max_shift),
    )


def collect(loader):
    return [tuple(t.clone() for t in batch) for batch in loader]


def test_every_example_once_per_epoch_and_shapes():
    ds = make_dataset(50)
    loader = BatchLoader(ds, 8, seed=1, with_indices=True)
    assert len(loader) == 7
    batches = collect(loader)
    assert [b[0].shape[0] for b in batches] == [8] * 6 + [2]
    idx = torch.cat([b[2] for b in batches])
    assert sorted(idx.tolist()) == list(range(50))
    for x, y, i in batches:
        assert x.dtype == torch.float32 and x.shape[1:] == (1, 6, 6)
        assert y.dtype == torch.int64 and torch.equal(y, ds.labels[i])
        assert 0.0 <= x.min() and x.max() <= 1.0
    dropped = BatchLoader(ds, 8, drop_last=True)
    assert len(dropped) == 6 and all(b[0].shape[0] == 8 for b in collect(dropped))


def test_eval_loader_is_ordered_and_unaugmented():
    ds = make_dataset(20)
    loader = BatchLoader(ds, 6, shuffle=False, augment=False)
    x = torch.cat([b[0] for b in loader])
    torch.testing.assert_close(x, ds.images.float() / 255)


def test_epochs_are_a_function_of_seed_and_epoch():
    ds = make_dataset(40)
    a = BatchLoader(ds, 8, seed=3)
    b = BatchLoader(ds, 8, seed=3)
    a.set_epoch(2)
    b.set_epoch(2)
    for (xa, ya), (xb, yb) in zip(collect(a), collect(b), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(a.epoch_indices(0), a.epoch_indices(1))
    assert not torch.equal(a.epoch_indices(0), BatchLoader(ds, 8, seed=4).epoch_indices(0))


def test_consecutive_passes_advance_the_epoch():
    ds = make_dataset(30)
    loader = BatchLoader(ds, 10, seed=0, with_indices=True)
    first = torch.cat([b[2] for b in loader])
    assert loader.epoch == 1
    second = torch.cat([b[2] for b in loader])
    assert not torch.equal(first, second)
    loader.set_epoch(0)
    assert torch.equal(torch.cat([b[2] for b in loader]), first)


def test_resume_mid_epoch_gives_identical_batches():
    ds = make_dataset(50)
    full = BatchLoader(ds, 8, seed=5)
    full.set_epoch(3)
    reference = collect(full)
    resumed = BatchLoader(ds, 8, seed=5)
    resumed.set_epoch(3, start_batch=4)
    rest = collect(resumed)
    assert len(rest) == len(reference) - 4
    for (xa, ya), (xb, yb) in zip(reference[4:], rest, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # the pass after a resumed one starts the next epoch from its first batch
    assert resumed.epoch == 4 and len(collect(resumed)) == len(reference)


def test_state_dict_round_trip_mid_epoch():
    ds = make_dataset(50)
    loader = BatchLoader(ds, 8, seed=7)
    loader.set_epoch(1)
    it = iter(loader)
    for _ in range(3):
        next(it)
    state = loader.state_dict()
    assert state == {"seed": 7, "epoch": 1, "batch": 3}
    expected = [tuple(t.clone() for t in b) for b in it]
    other = BatchLoader(ds, 8, seed=7)
    other.load_state_dict(state)
    for (xa, ya), (xb, yb) in zip(expected, collect(other), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    done = BatchLoader(ds, 8, seed=7)
    done.load_state_dict({"seed": 7, "epoch": 1, "batch": len(done)})
    assert done.state_dict() == {"seed": 7, "epoch": 2, "batch": 0}
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict({"seed": 8, "epoch": 0, "batch": 0})


@pytest.mark.parametrize("n, world, drop_last", [(50, 2, False), (50, 3, False), (50, 3, True)])
def test_rank_shards_are_disjoint_and_equal(n, world, drop_last):
    ds = make_dataset(n)
    loaders = [
        BatchLoader(ds, 4, seed=2, rank=r, world_size=world, drop_last=drop_last)
        for r in range(world)
    ]
    lengths = {len(loader) for loader in loaders}
    assert len(lengths) == 1
    shards = [loader.epoch_indices(0) for loader in loaders]
    positions = torch.stack(shards)  # (world, per rank): position p of rank r = r + world * p
    perm = loaders[0].epoch_indices(0)
    assert perm.numel() == shards[0].numel()
    flat = positions.t().reshape(-1)
    if drop_last:
        assert flat.numel() <= n and len(set(flat.tolist())) == flat.numel()
    else:
        assert set(flat.tolist()) == set(range(n))
        assert flat.numel() - n < world  # padding repeats fewer than world_size examples
        assert len(set(flat[:n].tolist())) == n  # the first n positions: a permutation


def test_augmentation_differs_per_batch_and_rank_but_not_per_device_call():
    ds = make_dataset(16, max_shift=2)
    r0 = BatchLoader(ds, 16, shuffle=False, seed=0)
    r0b = BatchLoader(ds, 16, shuffle=False, seed=0)
    x0 = next(iter(r0))[0]
    assert torch.equal(x0, next(iter(r0b))[0])
    r1 = BatchLoader(ds, 8, shuffle=False, seed=0, rank=1, world_size=2)
    assert not torch.equal(next(iter(r1))[0], x0[1::2][:8])


def test_from_arrays_and_bad_arguments():
    images = torch.rand(10, 8, 8, 3)  # channels-last floats
    ds = from_arrays(images, torch.arange(10) % 2, augment="crop_flip", padding=1)
    assert ds.images.shape == (10, 3, 8, 8) and ds.num_classes == 2 and ds.in_channels == 3
    with pytest.raises(ValueError, match="batch_size"):
        BatchLoader(ds, 0)
    with pytest.raises(ValueError, match="rank"):
        BatchLoader(ds, 2, rank=2, world_size=2)
    with pytest.raises(TypeError, match="ImageDataset"):
        BatchLoader(list(range(3)), 2)
    with pytest.raises(ValueError, match="start_batch"):
        BatchLoader(ds, 2).set_epoch(0, start_batch=99)
