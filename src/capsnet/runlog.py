"""The run directory's logs and the console reports of a training run.

* :class:`RunLog`: ``metrics.jsonl`` (one JSON object per line), TensorBoard scalars when
  TensorBoard is installed, and ``curves.png`` (loss and accuracy over epochs).
* :func:`epoch_summary` / :func:`final_report`: the lines ``capsnet train`` prints.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from capsnet.checkpoint import atomic_write

__all__ = ["RunLog", "read_metrics", "epoch_summary", "final_report"]


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file (a run directory or the file)."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line]


class RunLog:
    """metrics.jsonl (+ TensorBoard when installed); a no-op on ranks other than 0."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.writer = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                pass

    def truncate(self, step: int) -> None:
        """Drop records after ``step`` (written by a run killed after its last checkpoint)."""
        if self.enabled and self.path.exists():
            rows = read_metrics(self.path)
            keep = [r for r in rows if r.get("step", 0) <= step and r.get("kind") != "end"]
            atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in keep))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as fh:
            fh.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")
        if self.writer is not None and "step" in record:
            for key, value in record.items():
                if isinstance(value, float | int) and not isinstance(value, bool):
                    self.writer.add_scalar(f"{record['kind']}/{key}", value, record["step"])

    def plot(self, split: str) -> Path | None:
        """``curves.png``: train loss/accuracy per logged step and ``split`` per epoch."""
        try:
            from capsnet.plots import plot_training_curves
        except ImportError:
            return None
        rows = []
        for r in read_metrics(self.path):
            if r.get("kind") == "train":
                rows.append({"epoch": r["epoch"], "train_loss": r["loss"],
                             "train_accuracy": r["accuracy"]})  # fmt: skip
            elif r.get("kind") == "epoch":
                keys = [f"{split}_loss", f"{split}_accuracy", "val_loss", "val_accuracy"]
                rows.append({"epoch": r["epoch"], **{k: r[k] for k in keys if k in r}})
        if not rows:
            return None
        return plot_training_curves(rows, self.path.parent / "curves.png", x_key="epoch")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def epoch_summary(r: dict[str, Any], epochs: int, split: str) -> str:
    """One line per epoch: train loss/accuracy, evaluation error, lr, speed, time."""
    text = (
        f"epoch {r['epoch']}/{epochs}  train loss {r['train_loss']:.4f} "
        f"acc {100 * r['train_accuracy']:.2f}%"
    )
    if "val_accuracy" in r:
        text += f"  val error {100 * r['val_error']:.2f}%"
    if f"{split}_accuracy" in r:
        text += f"  {split} loss {r[f'{split}_loss']:.4f} error {100 * r[f'{split}_error']:.2f}%"
    text += f"  lr {r['lr']:.2e}  {r['images_per_s']:.0f} img/s  {r['time_s']:.0f} s"
    return text + ("  *best*" if r.get("best") else "")


def final_report(
    run_dir: Path,
    final: dict[str, Any],
    best: dict[str, Any] | None,
    split: str,
    plot: Path | None,
) -> str:
    """What the run achieved and where its files are."""
    lines = [
        f"\n{split} error {100 * final['error']:.2f}% ({final['num_examples']} images, final model)"
    ]
    if best is not None:
        lines.append(
            f"best checkpoint: epoch {best['epoch']} ({best['selected_on']} accuracy "
            f"{100 * best['accuracy']:.2f}%)"
        )
    lines.append(f"run saved in {run_dir}/")
    for name in ("best.safetensors", "last.safetensors", "metrics.jsonl", "evaluation.json"):
        if (run_dir / name).exists():
            lines.append(f"  {run_dir / name}")
    if plot is not None:
        lines.append(f"  {plot}   (loss and accuracy curves)")
    lines.append(f"evaluate again: capsnet evaluate {run_dir}")
    lines.append(f"in Python:      model = capsnet.load({str(run_dir)!r})")
    return "\n".join(lines)
