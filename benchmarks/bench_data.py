"""Speed of capsnet.data on this machine: decoding, one augmented epoch, generators.

Run: ``python benchmarks/bench_data.py [--root /work/shared/data] [--threads 1 2]``.

Measures, on the public API (``capsnet.data.create`` / ``BatchLoader``):

* decoding + verifying the MNIST training split (IDX .gz -> uint8 tensor, MD5 check);
* one full MNIST training epoch (60,000 images, batch 128) through ``BatchLoader``:
  gather, uint8 -> float, and the default augmentation (random shift up to 2 px), plus
  the same without augmentation and for ``mnist_shifted40`` (random 40x40 placement);
* one epoch of smallNORB-sized data (24,300 48x48 images -> standardise, random 32x32
  crop, brightness, contrast; synthetic pixels, the real files are not available here);
* generating ``affnist_generated`` (10,000 test digits) and ``multimnist`` (60,000 pairs).

Times are the best of ``--repeats`` runs (``torch.utils.benchmark.Timer``); the CPU may be
shared, so the load average is printed with the results.
Without the real MNIST files, random digits of the same shape stand in.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch
from torch.utils import benchmark

import capsnet.data as data
from capsnet.data.generated import generate_affine, generate_multimnist


def _epoch(loader: data.BatchLoader) -> int:
    n = 0
    for x, _ in loader:
        n += x.shape[0]
    return n


def _time(fn, repeats: int) -> float:
    """Best wall time of ``repeats`` single runs of ``fn``, in seconds."""
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn})
    return min(timer.timeit(1).mean for _ in range(max(1, repeats)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=None, help="data root holding mnist/ (default: auto)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, torch.get_num_threads()])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()

    root = args.root
    if root is None:
        here = os.path.dirname(os.path.abspath(__file__))
        shared = os.path.join(here, "..", "..", "shared", "data")
        root = shared if os.path.isdir(os.path.join(shared, "mnist")) else None

    print(f"capsnet.data benchmark: {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} logical CPUs, torch {torch.__version__}, "
          f"load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    t0 = time.perf_counter()
    try:
        mnist = data.create("mnist", "train", root=root)
        source = "real MNIST"
    except data.DataError:
        g = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (60000, 1, 28, 28), generator=g, dtype=torch.uint8)
        mnist = data.from_arrays(images, torch.arange(60000) % 10, name="mnist")
        source = "random stand-in (no MNIST files found)"
    decode = time.perf_counter() - t0
    print(f"MNIST train decode + MD5 verify ({source}): {decode:.2f} s")
    shifted40 = data.ImageDataset(
        mnist.images,
        mnist.labels,
        classes=mnist.classes,
        name="mnist_shifted40",
        train_transform=data.transforms.PlaceOnCanvas(40),
        eval_transform=data.transforms.PlaceOnCanvas(40, random=False),
    )
    g = torch.Generator().manual_seed(1)
    norb_images = torch.randint(0, 256, (24300, 1, 48, 48), generator=g, dtype=torch.uint8)
    norb = data.ImageDataset(
        norb_images,
        torch.arange(24300) % 5,
        classes=list("abcde"),
        name="smallnorb-shaped",
        train_transform=data.transforms.Compose(
            [
                data.transforms.Standardize(),
                data.transforms.RandomCrop(32),
                data.transforms.RandomBrightness(32 / 255),
                data.transforms.RandomContrast(0.5, 1.5),
            ]
        ),
        eval_transform=data.transforms.Compose(
            [data.transforms.Standardize(), data.transforms.CenterCrop(32)]
        ),
    )
    cases = [
        ("MNIST epoch, shift <= 2 px", mnist, True, args.batch_size),
        ("MNIST epoch, no augmentation", mnist, False, args.batch_size),
        ("mnist_shifted40 epoch, random 40x40", shifted40, True, args.batch_size),
        ("smallNORB-sized epoch, paper preprocessing", norb, True, 64),
    ]
    default_threads = torch.get_num_threads()
    for threads in args.threads:
        torch.set_num_threads(threads)
        print(f"\n-- torch.set_num_threads({threads}) --")
        for name, ds, augment, bs in cases:
            loader = data.BatchLoader(ds, bs, seed=0, augment=augment)
            seconds = _time(lambda loader=loader: _epoch(loader), args.repeats)
            print(f"{name:45s} {seconds:6.2f} s  ({len(ds) / seconds:,.0f} images/s)")
        test = mnist.images[:10000]
        seconds = _time(
            lambda test=test: generate_affine(test, seed=0, progress=False), args.repeats
        )
        print(f"{'affnist_generated, 10,000 digits':45s} {seconds:6.2f} s")
        seconds = _time(
            lambda: generate_multimnist(mnist.images, mnist.labels, seed=0, progress=False),
            args.repeats,
        )
        print(f"{'multimnist, 60,000 pairs':45s} {seconds:6.2f} s")
    torch.set_num_threads(default_threads)


if __name__ == "__main__":
    main()
