"""Shared helpers of the training tests: tiny MNIST-format files and a tiny run config.

The files are real IDX files (gzipped, big-endian headers, docs/spec.md §3) with learnable
synthetic digits: class k lights up a bar at a class-specific place. The dataset is read
through the real ``capsnet.data`` MNIST loader with ``verify=false`` (the official MD5s
would reject our tiny files).
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
from safetensors.torch import load_file

TINY_MODEL = {
    "conv_channels": 8,
    "primary_types": 2,
    "primary_dim": 4,
    "class_dim": 4,
    "reconstruction": False,
}


def _write_idx(path: Path, array: np.ndarray) -> None:
    magic = 0x00000803 if array.ndim == 3 else 0x00000801
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def synthetic_digits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` 28x28 uint8 images whose class (0..9) is a bar position, plus noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    images = rng.integers(0, 60, size=(n, 28, 28)).astype(np.uint8)
    for i, k in enumerate(labels):
        row = 4 + 2 * int(k)
        images[i, row : row + 2, 6:22] = 255
    return images, labels.astype(np.uint8)


def make_mnist(root: Path, n_train: int = 64, n_test: int = 40) -> Path:
    """Tiny MNIST-format files in ``root/mnist``; returns ``root``."""
    folder = Path(root) / "mnist"
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        images, labels = synthetic_digits(n, seed)
        _write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return Path(root)


def tiny_config(data_root: Path, run_dir: Path, **overrides):
    """A RunConfig for a run of a few seconds on the tiny MNIST files."""
    from capsnet.config import RunConfig

    values = dict(
        model="capsnet",
        model_kwargs=dict(TINY_MODEL),
        dataset="mnist",
        data_kwargs={"verify": False},
        data_root=str(data_root),
        epochs=2,
        val_samples=0,  # all 64 images train: the tests count steps (the default holds 6 out)
        batch_size=16,
        eval_batch_size=32,
        lr=3e-3,
        seed=0,
        device="cpu",
        num_threads=1,
        output_dir=str(run_dir),
        checkpoint_every=0,
        log_every=2,
        progress=False,
        plot=False,
    )
    values.update(overrides)
    return RunConfig(**values)


def tiny_flags(data_root: Path, run_dir: Path) -> list[str]:
    """The command-line flags equivalent to :func:`tiny_config`."""
    flags = ["--model", "capsnet", "--dataset", "mnist", "--data-root", str(data_root)]
    flags += ["--data-kwarg", "verify=false", "--epochs", "2", "--batch-size", "16"]
    flags += ["--val-samples", "0"]
    flags += ["--eval-batch-size", "32", "--lr", "0.003", "--seed", "0", "--device", "cpu"]
    flags += ["--num-threads", "1", "--output-dir", str(run_dir), "--checkpoint-every", "0"]
    flags += ["--log-every", "2", "--no-progress", "--no-plot"]
    for key, value in TINY_MODEL.items():
        flags += ["--model-kwarg", f"{key}={str(value).lower()}"]
    return flags


def weights(path: Path, tag: str = "last") -> dict:
    return load_file(str(Path(path) / f"{tag}.safetensors"))


def assert_same_weights(a: dict, b: dict, atol: float = 0.0) -> None:
    import torch

    assert a.keys() == b.keys()
    for key in a:
        if atol == 0.0:
            assert torch.equal(a[key], b[key]), f"{key} differs"
        else:
            diff = (a[key] - b[key]).abs().max().item()
            assert diff <= atol, f"{key} differs by {diff}"
