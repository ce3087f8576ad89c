"""``BatchLoader``: shuffled, seeded, resumable batches from an in-memory dataset.

No worker processes: a batch is an index into the split's uint8 tensor, moved to the
model's device, converted to float in [0, 1] and transformed there as one batch. On a
2-core CPU this is far faster than per-sample ``DataLoader`` pipelines.

Reproducibility: the epoch permutation is a pure function of ``(seed, epoch)`` and each
batch's augmentation a pure function of ``(seed, epoch, rank, batch index)``, so a run
resumed at any batch (``set_epoch(epoch, start_batch=k)`` or :meth:`load_state_dict`)
sees exactly the batches the uninterrupted run would have seen, on any device.

Distributed: with ``world_size > 1`` rank ``r`` takes every ``world_size``-th position of
the epoch permutation starting at ``r`` (as ``DistributedSampler``): shards are disjoint
and every rank gets the same number of batches. Without ``drop_last`` the permutation is
first padded by wrapping around (repeating at most ``world_size - 1`` examples) so all
ranks are equal; with ``drop_last`` the tail that does not fill a batch on every rank is
dropped instead.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from capsnet.data.dataset import ImageDataset
from capsnet.devices import resolve_device  # re-exported (the one device rule)

__all__ = ["BatchLoader", "resolve_device", "derive_seed"]


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from ``parts`` (stable across runs, platforms and Python versions)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _cpu_generator(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


class BatchLoader:
    """Iterate over ``(images, labels)`` batches of an :class:`ImageDataset`.

    Args:
        dataset: the split (its uint8 ``images`` and ``labels``).
        batch_size: examples per batch (per rank).
        shuffle: new random order every epoch (a function of ``seed`` and the epoch).
        seed: base seed of shuffling and augmentation.
        drop_last: drop the last incomplete batch.
        augment: use ``dataset.train_transform`` (random augmentation + preprocessing);
            ``False`` uses ``dataset.eval_transform`` (preprocessing only).
        device: where batches are produced (``"cpu"``, ``"cuda"``, ``"auto"``, ...; see
            :func:`capsnet.devices.resolve_device`).
        rank, world_size: this process's shard for distributed training.
        start_batch: first batch of the first iteration (resume mid-epoch).
        with_indices: also yield the ``(B,)`` dataset indices of each batch (to fetch
            extras such as MultiMNIST's ``labels2``).
        keep_on_device: copy the whole uint8 split to ``device`` once, so batches are
            gathered there (default: when ``device`` is not the CPU and the split is
            under 2 GiB).

    Iteration yields ``(images, labels)`` or ``(images, labels, indices)``.

    Epochs: each full pass advances ``epoch`` by one, so consecutive ``for`` loops see
    new orders; calling :meth:`set_epoch` before each pass (as with
    ``DistributedSampler``) gives the same result and is the resumable way.

    Shape:
        - images: ``(B, C, *dataset.input_size)`` float32 on ``device``.
        - labels: ``(B,)`` int64 on ``device``; indices: ``(B,)`` int64 on the CPU.
    """

    def __init__(
        self,
        dataset: ImageDataset,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        augment: bool = True,
        device: str | torch.device = "cpu",
        rank: int = 0,
        world_size: int = 1,
        start_batch: int = 0,
        with_indices: bool = False,
        keep_on_device: bool | None = None,
    ):
        if not isinstance(dataset, ImageDataset):
            raise TypeError(f"dataset must be an ImageDataset, got {type(dataset).__name__}")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be a positive int, got {world_size!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank!r}")
        if not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = bool(shuffle)
        self.seed = seed
        self.drop_last = bool(drop_last)
        self.augment = bool(augment)
        self.device = resolve_device(device)
        self.rank = rank
        self.world_size = world_size
        self.with_indices = bool(with_indices)
        self.keep_on_device = keep_on_device
        self.epoch = 0
        self._start_batch = 0
        self._next_batch = 0
        self._stored: tuple[Tensor, Tensor] | None = None
        self._stored_source: Tensor | None = None
        self.set_epoch(0, start_batch=start_batch)

    # -- sizes --------------------------------------------------------------------------

    def _shard_length(self) -> int:
        n, ws, bs = len(self.dataset), self.world_size, self.batch_size
        if self.drop_last:
            return (n // ws) // bs * bs
        return -(-n // ws)  # ceil

    def __len__(self) -> int:
        """Number of batches per epoch for this rank."""
        length = self._shard_length()
        if self.drop_last:
            return length // self.batch_size
        return -(-length // self.batch_size)

    @property
    def num_samples(self) -> int:
        """Examples this rank sees per epoch (including wrap-around padding)."""
        return self._shard_length()

    # -- epochs and resuming --------------------------------------------------------------

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch (order and augmentation) and the batch the next pass starts at."""
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
        if not isinstance(start_batch, int) or not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch must be in [0, {len(self)}], got {start_batch!r}")
        self.epoch = epoch
        self._start_batch = start_batch
        self._next_batch = start_batch

    def state_dict(self) -> dict[str, int]:
        """Position to resume from: ``{"seed", "epoch", "batch"}`` (next batch to yield)."""
        return {"seed": self.seed, "epoch": self.epoch, "batch": self._next_batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at ``state`` from :meth:`state_dict` (the seed must match)."""
        if int(state.get("seed", self.seed)) != self.seed:
            raise ValueError(f"state was saved with seed {state['seed']}, loader has {self.seed}")
        epoch, batch = int(state["epoch"]), int(state["batch"])
        if batch >= len(self):  # the saved epoch was complete
            epoch, batch = epoch + 1, 0
        self.set_epoch(epoch, start_batch=batch)

    def epoch_indices(self, epoch: int | None = None) -> Tensor:
        """This rank's dataset indices for ``epoch`` (default: the current one), in order.

        Shape: ``(num_samples,)`` int64.
        """
        epoch = self.epoch if epoch is None else epoch
        n = len(self.dataset)
        if self.shuffle:
            g = _cpu_generator(derive_seed("perm", self.seed, epoch))
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        ws = self.world_size
        total = self._shard_length() * ws
        if total > n:  # wrap around so every rank gets the same number of examples
            reps = -(-total // max(n, 1))
            order = order.repeat(reps)
        order = order[:total]
        return order[self.rank :: ws]

    # -- iteration ------------------------------------------------------------------------

    def _storage(self) -> tuple[Tensor, Tensor]:
        images, labels = self.dataset.images, self.dataset.labels
        keep = self.keep_on_device
        if keep is None:
            keep = self.device.type != "cpu" and images.numel() < (2 << 30)
        if not keep or self.device.type == "cpu":
            return images, labels
        if self._stored is None or self._stored_source is not images:
            self._stored = (images.to(self.device), labels.to(self.device))
            self._stored_source = images
        return self._stored

    def batch_generator(self, epoch: int, batch: int) -> torch.Generator:
        """The CPU generator driving the augmentation of ``batch`` in ``epoch``."""
        return _cpu_generator(derive_seed("augment", self.seed, epoch, self.rank, batch))

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        epoch, start = self.epoch, self._start_batch
        indices = self.epoch_indices(epoch)
        images, labels = self._storage()
        transform = self.dataset.train_transform if self.augment else self.dataset.eval_transform
        nb = len(self)
        self._next_batch = start
        for b in range(start, nb):
            idx = indices[b * self.batch_size : (b + 1) * self.batch_size]
            dev_idx = idx.to(images.device, non_blocking=True)
            x = images.index_select(0, dev_idx).to(self.device, non_blocking=True)
            y = labels.index_select(0, dev_idx).to(self.device, non_blocking=True)
            x = x.to(torch.float32).div_(255.0)
            if transform.randomized:
                x = transform(x, self.batch_generator(epoch, b))
            else:
                x = transform(x)
            self._next_batch = b + 1
            yield (x, y, idx) if self.with_indices else (x, y)
        # A finished pass moves on to the next epoch, from its first batch.
        if self.epoch == epoch and self._start_batch == start:
            self.set_epoch(epoch + 1)

    def __repr__(self) -> str:
        return (
            f"BatchLoader({self.dataset.name}/{self.dataset.split}, batch_size="
            f"{self.batch_size}, shuffle={self.shuffle}, augment={self.augment}, "
            f"seed={self.seed}, epoch={self.epoch}, rank={self.rank}/{self.world_size}, "
            f"batches={len(self)}, device={self.device})"
        )
