"""The run directory's logs and the console reports of a training run.

* :class:`RunLog`: ``metrics.jsonl`` (one JSON object per line), TensorBoard scalars when
  TensorBoard is installed, and ``curves.png`` (loss and accuracy over epochs).
* :func:`epoch_summary` / :func:`final_report`: the lines ``capsnet train`` prints.
* :func:`show_progress` / :func:`progress_line`: progress bars on a terminal only; a plain
  line every few steps when the output is redirected to a file.

A log can never block a run: a line that cannot be parsed (a write torn by a full disk or
a kill) is dropped with a warning naming the file and line, and a resumed run rewrites the
file without it.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from capsnet.io import atomic_write, os_error

__all__ = [
    "RunLog",
    "read_metrics",
    "epoch_summary",
    "final_report",
    "show_progress",
    "progress_line",
]


def read_metrics(path: str | Path, *, dropped: list[str] | None = None) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file (a run directory or the file).

    Lines that are not a JSON object (torn by a full disk or a kill) are skipped: each is
    described in ``dropped`` when a list is given, else in a :class:`RuntimeWarning`
    naming the file and line.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    rows = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
        except ValueError as err:
            note = f"{path}: line {number} is not a complete record and was dropped ({err})"
            if dropped is None:
                warnings.warn(note, RuntimeWarning, stacklevel=2)
            else:
                dropped.append(note)
            continue
        rows.append(row)
    return rows


def show_progress(enabled: bool) -> bool:
    """Whether to draw progress bars: asked for and stderr is a terminal (a redirected log
    gets :func:`progress_line` lines instead of bar redraws)."""
    return enabled and sys.stderr.isatty()


def progress_line(
    epoch: int, epochs: int, batch: int, batches: int, loss: float, acc: float, speed: float
) -> str:
    """The line a redirected log gets instead of a bar, e.g.
    ``epoch 2/10  batch 300/468  loss 0.0412  acc 98.7%  1210 img/s``."""
    return (
        f"epoch {epoch}/{epochs}  batch {batch}/{batches}  loss {loss:.4f}  "
        f"acc {100 * acc:.1f}%  {speed:.0f} img/s"
    )


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

    def truncate(self, step: int) -> list[str]:
        """Drop records after ``step`` (written by a run killed after its last checkpoint)
        and unreadable lines; returns the notes on the lines dropped as unreadable."""
        dropped: list[str] = []
        if self.enabled and self.path.exists():
            rows = read_metrics(self.path, dropped=dropped)
            keep = [r for r in rows if r.get("step", 0) <= step and r.get("kind") != "end"]
            atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in keep))
        return dropped

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (a line ending in a newline, so a torn line stays alone)."""
        if not self.enabled:
            return
        line = json.dumps({"time": round(time.time(), 3), **record}) + "\n"
        try:
            with self.path.open("ab+") as fh:
                if fh.seek(0, 2) and (fh.seek(-1, 2), fh.read(1))[1] != b"\n":
                    line = "\n" + line  # after a torn write: start a new line
                fh.write(line.encode())
        except OSError as err:
            raise os_error(err, self.path) from err
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
        # The spread loss's margin ramps up ([H18] §3.1) while evaluation uses the final
        # one: label each loss with its margin, show the training loss under the final
        # margin too (like with like) and the schedule itself.
        ramp = any(r.get("kind") == "train" and "loss_at_final_margin" in r for r in
                   read_metrics(self.path, dropped=[]))  # fmt: skip
        cur, fin = (" (current margin)", " (final margin)") if ramp else ("", "")
        for r in read_metrics(self.path, dropped=[]):
            if r.get("kind") == "train":
                row = {"epoch": r["epoch"], f"train_loss{cur}": r["loss"],
                       "train_accuracy": r["accuracy"]}  # fmt: skip
                if ramp:
                    row[f"train_loss{fin}"] = r.get("loss_at_final_margin", r["loss"])
                    row["margin"] = r.get("margin")
                rows.append(row)
            elif r.get("kind") == "epoch":
                keys = [f"{split}_loss", f"{split}_accuracy", "val_loss", "val_accuracy"]
                rows.append({"epoch": r["epoch"], **{k + (fin if k.endswith("_loss") else ""): r[k]
                                                     for k in keys if k in r}})  # fmt: skip
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
