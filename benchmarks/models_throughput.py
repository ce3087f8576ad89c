"""Training and inference images/s of every registered model, as ``capsnet train`` runs them.

Run: ``python benchmarks/models_throughput.py [--threads N] [--steps 5] [--device cuda]``.

Each model is built for MNIST (``capsnet.models.create(name, num_classes=10,
in_channels=1, input_size=28)``, otherwise defaults; the matrix capsnet in both presets),
trained for a few steps with Adam on random 28x28 images
(forward, the model's loss, backward, optimiser step) and run in ``inference_mode`` at
batch 256. Medians after one warm-up step. Unlike ``run.py`` there is no reference
implementation: these are the absolute numbers for the baselines next to the capsule
models. Prints a Markdown table. ``--device cuda``: models and inputs on the GPU, each timed
step ends with ``torch.cuda.synchronize`` (the table names the GPU).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from capsnet import models
from capsnet.objectives import compute_loss

CASES = [
    ("capsnet", {}, 128),
    ("matrix_capsnet", {"preset": "small"}, 32),
    ("matrix_capsnet", {"preset": "paper"}, 32),
    ("sabour_cnn", {}, 32),
    ("hinton_cnn", {}, 128),
]


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn, steps: int, device: torch.device | None = None) -> float:
    fn()  # warm-up
    _sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(
    name: str, kwargs: dict, batch: int, steps: int, device: str = "cpu"
) -> tuple[float, float, int]:
    dev = torch.device(device)
    torch.manual_seed(0)
    model = models.create(name, num_classes=10, in_channels=1, input_size=28, **kwargs).to(dev)
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    x = torch.rand(batch, model.in_channels, *model.input_size, device=dev)
    y = torch.randint(0, model.num_classes, (batch,), device=dev)

    def train_step():
        model.train()
        out = model(x, y)
        loss = compute_loss(models.model_info(name).loss, out, x, y, margin=0.2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    xi = torch.rand(256, model.in_channels, *model.input_size, device=dev)

    def infer_step():
        model.eval()
        with torch.inference_mode():
            model(xi)

    train = batch / _median_seconds(train_step, steps, dev)
    infer = 256 / _median_seconds(infer_step, max(2, steps // 2), dev)
    return train, infer, params


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    p.add_argument("--steps", type=int, default=5, help="timed training steps per model")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    print(
        f"torch {torch.__version__}, {where} (device {dev}), {torch.get_num_threads()} threads, "
        f"load average {', '.join(f'{x:.1f}' for x in os.getloadavg())}"
    )
    print()
    print("| model | parameters | train batch | train img/s | inference img/s (batch 256) |")
    print("|---|---|---|---|---|")
    for name, kwargs, batch in CASES:
        train, infer, params = measure(name, kwargs, batch, args.steps, args.device)
        label = name + "".join(f" {k}={v}" for k, v in kwargs.items())
        print(f"| {label} | {params:,} | {batch} | {train:.1f} | {infer:.1f} |", flush=True)


if __name__ == "__main__":
    main()
