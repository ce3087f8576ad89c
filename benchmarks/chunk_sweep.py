"""Which EM chunk size is fastest on this machine: ``python benchmarks/chunk_sweep.py``.

EM routing works on chunks of examples of about ``chunk_bytes(device)`` bytes of votes
(:mod:`capsnet.functional._kernels.chunking`: on a CPU an eighth of the last-level cache,
clamped to 1-16 MiB). This times the training step of the matrix capsnet (3 iterations,
Adam) at several chunk sizes, the sizes interleaved step by step in one process so that
machine noise hits all alike, and prints the median and quartiles of each, the device's
rule and the fastest size. To use another size: ``CAPSNET_EM_CHUNK_BYTES=<bytes>``.

    python benchmarks/chunk_sweep.py --preset small --reps 20
    python benchmarks/chunk_sweep.py --preset paper --reps 5 --sizes-mib 2,4,8,16
    python benchmarks/chunk_sweep.py --device cuda --batch 64

Check the load average first (printed): on 2 cores one busy process distorts every timing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import capsnet.functional as CF
from capsnet.devices import resolve_device
from capsnet.functional._kernels import chunking
from capsnet.functional._kernels import em as EM_KERNEL
from capsnet.models import create


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=("small", "paper"), default="small")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--sizes-mib", default="0.5,1,2,4,8,16", help="comma-separated MiB")
    p.add_argument("--no-chunks", action="store_true", help="also time one chunk per batch")
    p.add_argument("--reps", type=int, default=10, help="timed steps per size")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)

    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [int(float(x) * (1 << 20)) for x in args.sizes_mib.split(",") if x.strip()]
    if args.no_chunks:
        sizes.append(chunking.ONE_CHUNK)
    size, classes = (28, 10) if args.preset == "small" else (32, 5)
    torch.manual_seed(0)
    model = create(
        "matrix_capsnet", preset=args.preset, iterations=args.iterations,
        num_classes=classes, input_size=size,
    ).to(device)  # fmt: skip
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    x = torch.rand(args.batch, 1, size, size, device=device)
    y = torch.randint(0, classes, (args.batch,), device=device)

    def step() -> None:
        loss = CF.spread_loss(model(x).scores, y, 0.5)
        opt.zero_grad()
        loss.backward()
        opt.step()

    load = os.getloadavg()
    print(
        f"matrix capsnet {args.preset}, batch {args.batch}, {args.iterations} iterations, "
        f"{device}, {torch.get_num_threads()} threads; load average before "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    saved = EM_KERNEL.EM_CHUNK_BYTES
    times: dict[int, list[float]] = {s: [] for s in sizes}
    try:
        for s in sizes:  # warm-up: each size once (allocator, BLAS plans)
            EM_KERNEL.EM_CHUNK_BYTES = s
            step()
        for _ in range(args.reps):
            for s in sizes:
                EM_KERNEL.EM_CHUNK_BYTES = s
                _sync(device)
                start = time.perf_counter()
                step()
                _sync(device)
                times[s].append(time.perf_counter() - start)
    finally:
        EM_KERNEL.EM_CHUNK_BYTES = saved
    rule = chunking.chunk_bytes(device)
    print(f"{'chunk':>10}  {'median ms':>10}  {'quartiles ms':>17}")
    for s in sizes:
        q = statistics.quantiles(times[s], n=4) if len(times[s]) > 1 else [times[s][0]] * 3
        name = "one chunk" if s == chunking.ONE_CHUNK else f"{s / (1 << 20):g} MiB"
        mark = "  <- this device's rule" if s == rule else ""
        print(f"{name:>10}  {1000 * q[1]:10.1f}  {1000 * q[0]:8.1f}-{1000 * q[2]:<8.1f}{mark}")
    best = min(sizes, key=lambda s: statistics.median(times[s]))
    print(
        f"fastest: {'one chunk' if best == chunking.ONE_CHUNK else f'{best / (1 << 20):g} MiB'}; "
        f"the rule gives {rule / (1 << 20):g} MiB (override: {chunking.CHUNK_ENV}={best}); "
        f"load average after {os.getloadavg()[0]:.2f}"
    )


if __name__ == "__main__":
    main()
