"""Distributed data-parallel helpers; the same code path runs single-process.

``torchrun --nproc-per-node N -m capsnet train ...`` sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`setup` reads them and joins the
process group (``nccl`` on CUDA, ``gloo`` on CPU unless told otherwise). Without them it
returns a single-process :class:`DistContext` and every helper here is a no-op, so the
trainer never branches on "distributed or not" except through ``ctx.is_main``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from capsnet.devices import resolve_device  # re-exported (the one device rule)

__all__ = [
    "DistContext",
    "setup",
    "cleanup",
    "resolve_device",
    "all_reduce_sum",
    "broadcast_object",
    "barrier",
]


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job.

    Attributes:
        rank: global rank (0 writes logs, progress bars and checkpoints).
        world_size: number of processes.
        local_rank: rank on this machine (selects the CUDA device).
        device: the device this rank computes on.
        backend: the process-group backend, or None single-process.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.backend is not None


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def setup(backend: str = "auto", device: str = "auto", timeout: float = 300.0) -> DistContext:
    """Join the process group described by torchrun's environment variables, if any.

    Args:
        backend: ``"auto"`` (nccl for CUDA devices, gloo otherwise), ``"gloo"`` or ``"nccl"``.
        device: the run config's device (see :func:`capsnet.devices.resolve_device`).
        timeout: seconds to wait for every rank to join (and for later collectives).

    Raises:
        RuntimeError: a rank could not join within ``timeout``; the message names the
            rendezvous address.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    dev = resolve_device(device, local_rank)
    if world_size <= 1:
        return DistContext(device=dev)
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK must be in [0, WORLD_SIZE={world_size}), got {rank}")
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"dist_backend must be one of ('auto', 'gloo', 'nccl'), got {backend!r}")
    if backend == "nccl" and dev.type != "cuda":
        raise ValueError(f"dist_backend 'nccl' needs CUDA devices, not {dev}; use gloo (or auto)")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    address = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    try:
        dist.init_process_group(
            backend,
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout),
            device_id=dev if dev.type == "cuda" else None,
        )
        # Joining is only complete once every rank has arrived.
        barrier()
    except Exception as err:  # noqa: BLE001 - re-raised with the rendezvous address
        if dist.is_initialized():
            dist.destroy_process_group()
        raise RuntimeError(
            f"rank {rank} of {world_size} could not join the process group at {address} "
            f"(backend {backend}, timeout {timeout:g} s): {str(err).rstrip('. ')}. Check that all "
            f"{world_size} processes were started and can reach MASTER_ADDR:MASTER_PORT, "
            f"or raise --dist-timeout."
        ) from err
    return DistContext(rank, world_size, local_rank, dev, backend)


def cleanup(ctx: DistContext) -> None:
    """Leave the process group (no-op single-process)."""
    if ctx.is_distributed and dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place and return it (unchanged single-process)."""
    if _active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank (``obj`` itself single-process)."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    """Wait for every rank (no-op single-process)."""
    if _active():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()
