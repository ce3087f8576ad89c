"""The training loop: one :class:`~capsnet.config.RunConfig` in, a run directory out.

>>> from capsnet.config import load_recipe
>>> from capsnet.train import train
>>> result = train(load_recipe("quickstart", data_root="data", download=True))
>>> result.run_dir   # config.json, metrics.jsonl, best/last checkpoints, curves.png

The same code runs single-process and under ``torchrun`` (DistributedDataParallel): each
rank trains on its shard of every global batch, gradients are averaged, metrics are summed
over ranks, and only rank 0 writes logs, progress bars and checkpoints. ``batch_size`` is
the global batch, so a run resumes with any number of ranks.

Exact resume: the last checkpoint (written every ``checkpoint_every`` steps and after each
epoch) holds the optimiser, scheduler and RNG states and the position inside the epoch;
the data loader is re-seeded per epoch, so a resumed single-process run continues with the
very batches and random numbers the uninterrupted run would have used. The previous
``keep_checkpoints - 1`` last checkpoints stay as ``step-N``; a resume verifies each
checkpoint's checksums and falls back to the newest good one, saying what it skipped.

Safety (docs/training.md): the run directory is locked for the whole run (one writer;
:mod:`capsnet.runlock`); a non-finite loss or gradient stops the run with
:class:`NonFiniteError` naming the step (or skips up to ``skip_nonfinite_steps`` such
steps), non-finite input pixels are refused, and a non-finite model is never saved;
SIGTERM and SIGINT save a checkpoint at the next step boundary, print how to resume and
raise :class:`TrainingInterrupted` (exit status 128 + signal number).
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from capsnet import distributed, models, probes
from capsnet.checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    read_metadata,
    save_checkpoint,
    verify_checkpoint,
)
from capsnet.config import RunConfig, config_from_dict
from capsnet.distributed import DistContext
from capsnet.evaluate import EvalResult, evaluate
from capsnet.io import write_json
from capsnet.objectives import compute_loss, resolve_loss, two_digit_loss
from capsnet.predict import preprocessing_metadata
from capsnet.provenance import environment
from capsnet.runlock import RunLock
from capsnet.runlog import RunLog, epoch_summary, final_report, progress_line, show_progress
from capsnet.runtime import ThreadPolicy
from capsnet.schedules import lr_factor, spread_margin
from capsnet.validation import default_val_samples, held_out_instances, split_validation

# compute_loss and two_digit_loss live in capsnet.objectives, the validation splits in
# capsnet.validation; re-exported here (the trainer calls them through this module's names,
# and code written before capsnet.validation imports them from here).
__all__ = [
    "train",
    "resume_config",
    "TrainResult",
    "NonFiniteError",
    "TrainingInterrupted",
    "compute_loss",
    "two_digit_loss",
    "RESUME_OVERRIDES",
    "split_validation",
    "held_out_instances",
    "default_val_samples",
]

RESUME_OVERRIDES = (
    "epochs", "device", "num_threads", "data_root", "download", "progress", "tensorboard",
    "plot", "dist_backend", "dist_timeout", "checkpoint_every", "log_every",
    "limit_eval_batches", "eval_every", "eval_batch_size", "keep_checkpoints",
    "skip_nonfinite_steps", "max_minutes",
)  # fmt: skip
"""Config fields ``--resume`` may change; the others would break the continuation."""


class NonFiniteError(RuntimeError):
    """Training met a non-finite loss, gradient, input pixel or parameter; the message
    names the step (and the batch)."""


class TrainingInterrupted(SystemExit):
    """SIGTERM or SIGINT stopped a run at a step boundary (after saving a checkpoint).

    A :class:`SystemExit` whose ``code`` is the conventional ``128 + signum`` (143 for
    SIGTERM, 130 for SIGINT), so the ``capsnet`` command exits with it; ``checkpoint`` is
    the file saved (None when none could be), ``message`` what was printed.
    """

    def __init__(self, signum: int, run_dir: Path, checkpoint: Path | None, message: str):
        super().__init__(128 + signum)
        self.signum, self.run_dir, self.checkpoint, self.message = (
            signum, run_dir, checkpoint, message,
        )  # fmt: skip


@dataclass
class TrainResult:
    """What :func:`train` returns: the run directory and the final evaluation."""

    run_dir: Path
    final: dict[str, Any]
    best: dict[str, Any] | None


def correct_predictions(scores: Tensor, labels: Tensor, labels2: Tensor | None = None) -> Tensor:
    """Examples whose class is the top score, or (``labels2`` given) whose two classes are
    the two top scores ([S17] §6). Shape: ``(B, K)``, ``(B,)`` -> ``(B,)`` bool."""
    if labels2 is None:
        return scores.argmax(-1) == labels
    top2 = scores.topk(2, dim=-1).indices
    return (top2 == labels[:, None]).any(-1) & (top2 == labels2[:, None]).any(-1)


def resume_config(run_dir: str | Path, **overrides: Any) -> RunConfig:
    """The saved config of ``run_dir`` with ``overrides`` (only :data:`RESUME_OVERRIDES`)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise FileNotFoundError(f"cannot resume: {run_dir / 'config.json'} does not exist")
    if not list_checkpoints(run_dir):
        raise FileNotFoundError(f"cannot resume: {run_dir} holds no last checkpoint")
    saved = json.loads((run_dir / "config.json").read_text())
    bad = sorted(k for k, v in overrides.items() if k not in RESUME_OVERRIDES and saved.get(k) != v)
    if bad:
        raise ValueError(
            f"--resume continues {run_dir} with its saved config; {', '.join(bad)} cannot "
            f"change. Changeable: {', '.join(RESUME_OVERRIDES)}"
        )
    saved.update(overrides, output_dir=str(run_dir))
    # Runs made before val_seed existed drew their validation split with the training seed.
    saved.setdefault("val_seed", None)
    return config_from_dict(saved, source=str(run_dir / "config.json"))


def train(config: RunConfig, *, resume: bool = False) -> TrainResult:
    """Train (or, with ``resume=True``, continue) the run described by ``config``.

    With ``resume`` the run directory ``config.output_dir`` must hold a last checkpoint
    (see :func:`resume_config`).
    """
    ctx = distributed.setup(config.dist_backend, config.device, config.dist_timeout)
    try:
        return Trainer(config, ctx, resume=resume).fit()
    finally:
        distributed.cleanup(ctx)


class _Meter:
    """Sums of loss, correct predictions, examples and the loss under the final spread
    margin, kept on the device (no syncs)."""

    def __init__(self, device: torch.device, sums: list[float] | None = None) -> None:
        sums = list(sums or [])
        sums += [0.0] * (4 - len(sums))  # checkpoints before the final-margin loss: 3
        self.sums = torch.tensor(sums, dtype=torch.float64, device=device)

    def add(self, loss: Tensor, correct: Tensor, final_loss: Tensor | None = None) -> None:
        n = correct.shape[0]
        correct = correct.sum()
        final = (loss if final_loss is None else final_loss).detach().double()
        self.sums += torch.stack(
            [loss.detach().double() * n, correct.double(), loss.new_tensor(n).double(), final * n]
        )

    def reduced(self) -> tuple[float, float, int, float]:
        """(mean loss, accuracy, examples, mean loss under the final margin) over every rank."""
        loss, correct, n, final = distributed.all_reduce_sum(self.sums.clone()).tolist()
        return loss / max(n, 1), correct / max(n, 1), int(n), final / max(n, 1)


def _command_line() -> str:
    """The command that is running, as typed (``capsnet ...``; under torchrun the ranks
    run ``python -m capsnet``, recorded as ``capsnet ...`` next to ``world_size``)."""
    argv = list(sys.argv)
    if argv and Path(argv[0]).name in ("capsnet", "__main__.py", "cli.py"):
        argv[0] = "capsnet"
    return " ".join(argv)


class Trainer:
    """Builds data, model, optimiser and schedule from a config and runs the epochs."""

    def __init__(self, cfg: RunConfig, ctx: DistContext, *, resume: bool = False) -> None:
        self.cfg, self.ctx, self.device = cfg, ctx, ctx.device
        if cfg.batch_size % ctx.world_size:
            raise ValueError(
                f"batch_size {cfg.batch_size} (global) must be divisible by the "
                f"{ctx.world_size} ranks"
            )
        # CPU threads: num_threads fixed, or chosen from the load and re-checked
        # (capsnet.runtime; decisions go to metrics.jsonl as kind "threads").
        self.threads = ThreadPolicy(
            cfg.num_threads, device=self.device, distributed=ctx.is_distributed
        )
        self.threads_start = self.threads.start()
        self.lock = RunLock(Path("."))  # replaced by the run directory's (rank 0)
        self.run_dir = self._run_dir(resume)
        try:
            self._build(resume)
        except BaseException:
            self.close()
            raise

    def _build(self, resume: bool) -> None:
        from capsnet import data

        cfg, ctx = self.cfg, self.ctx
        # Data: rank 0 first, so a download happens once.
        kw = {"root": cfg.data_root, "download": cfg.download, **cfg.data_kwargs}
        for turn in (0, 1):
            if (turn == 0) == ctx.is_main:
                train_ds = data.create(cfg.dataset, split="train", **kw)
                self.eval_ds = data.create(cfg.dataset, split=cfg.eval_split, **kw)
            distributed.barrier()
        self.train_ds, self.val_ds = self._split(train_ds)
        self.classes = list(self.eval_ds.classes)
        # class names and evaluation preprocessing, for `capsnet predict` (checkpoint metadata)
        self.checkpoint_metadata = preprocessing_metadata(self.eval_ds)
        # MultiMNIST: two digits per image (labels2) and their separate images.
        self.two_digits = "labels2" in getattr(train_ds, "extras", ())
        self.loader = data.BatchLoader(
            self.train_ds, cfg.batch_size // ctx.world_size, shuffle=True, seed=cfg.seed,
            drop_last=True, augment=cfg.augment, device=self.device, rank=ctx.rank,
            world_size=ctx.world_size, with_indices=self.two_digits,
        )  # fmt: skip
        # Evaluation: rank r takes examples r, r + world_size, ... (no padding, so the
        # counts summed over ranks are exact).
        self.eval_loaders = {
            name: data.BatchLoader(
                ds.subset(torch.arange(ctx.rank, len(ds), ctx.world_size)),
                cfg.eval_batch_size,
                shuffle=False,
                augment=False,
                device=self.device,
                with_indices=self.two_digits,
            )
            for name, ds in (("val", self.val_ds), (cfg.eval_split, self.eval_ds))
            if ds is not None
        }
        if len(self.loader) == 0:
            raise ValueError(
                f"{len(self.train_ds)} training images give no full batch of {cfg.batch_size}"
            )
        self.steps_per_epoch = min(len(self.loader), cfg.limit_train_batches or len(self.loader))
        # batches (1-based, within an epoch) after which a weight snapshot is kept
        k = min(cfg.snapshots_per_epoch, self.steps_per_epoch)
        self.snapshot_batches = {round(self.steps_per_epoch * f / k) for f in range(1, k + 1)}
        # Model, loss, optimiser, schedule.
        self.model_kwargs = {
            "num_classes": train_ds.num_classes,
            "in_channels": train_ds.in_channels,
            "input_size": list(train_ds.input_size),
            **cfg.model_arguments(),
        }
        if resume:  # kwargs whose default changed: as the checkpoint was built
            saved = models.restore_kwargs(
                cfg.model, read_metadata(self.run_dir, "last")["model_kwargs"]
            )
            for key in models.legacy_kwargs(cfg.model):
                self.model_kwargs.setdefault(key, saved[key])
        torch.manual_seed(cfg.seed)
        self.model = models.create(cfg.model, **self.model_kwargs).to(self.device)
        # Record the resolved values of such kwargs, so later default changes keep this run.
        self.model_kwargs = models.record_kwargs(cfg.model, self.model_kwargs, self.model)
        torch.manual_seed(cfg.seed + 1 + ctx.rank)  # dropout etc. differ between ranks
        info = models.model_info(cfg.model)
        self.loss_kind = resolve_loss(cfg.loss, cfg.model)
        self.em_layers = bool(probes.em_routing_layers(self.model))
        self.capsule_scores = info.loss != "cross_entropy"
        if self.two_digits and self.loss_kind != "margin":
            raise ValueError(
                f"{cfg.dataset!r} has two digits per image; train it with the margin loss "
                f"(a capsule model), not {self.loss_kind!r}"
            )
        if self.two_digits and ctx.is_distributed and hasattr(self.model, "reconstruct"):
            # The second digit's reconstruction runs the decoder outside DDP's forward.
            raise ValueError("two-digit (MultiMNIST) training with a decoder is single-process")
        self.ddp = (
            nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
            if ctx.is_distributed
            else self.model
        )
        opt = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
        extra = {"momentum": cfg.momentum} if cfg.optimizer == "sgd" else {}
        self.optimizer = opt[cfg.optimizer](
            self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, **extra
        )
        total = cfg.epochs * self.steps_per_epoch
        factor = lr_factor(
            cfg.lr_schedule, total, decay_rate=cfg.lr_decay_rate,
            decay_steps=cfg.lr_decay_steps, staircase=cfg.lr_staircase,
        )  # fmt: skip
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)
        self.state: dict[str, Any] = {
            "epoch": 0, "batch_in_epoch": 0, "step": 0, "best": None, "skipped_steps": 0,
            "train_seconds": 0.0,  # time in training steps (not evaluation), for max_minutes
        }  # fmt: skip
        self.time_up = False
        self.epoch_sums: list[float] | None = None
        self.window_sums: list[float] | None = None
        self.stop_signal: int | None = None
        self.skip_limit = int(cfg.skip_nonfinite_steps)
        self.keep = max(1, int(cfg.keep_checkpoints))
        self.log = RunLog(self.run_dir, ctx.is_main, cfg.tensorboard)
        if resume:
            self._resume()
        elif ctx.is_main:
            write_json(self.run_dir / "config.json", cfg.to_dict())

    # ------------------------------------------------------------------ setup helpers

    def _run_dir(self, resume: bool) -> Path:
        cfg = self.cfg
        name = cfg.output_dir
        if name is None:
            stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
            name = str(Path("runs") / f"{cfg.recipe or cfg.model}-{cfg.dataset}-{stamp}")
        run_dir = Path(distributed.broadcast_object(name))
        error: BaseException | None = None
        if self.ctx.is_main:  # one writer per run directory, for the whole run
            try:
                self.lock = RunLock(run_dir).acquire()
            except RuntimeError as err:  # RunLockedError, RunDirError
                error = err
        message = distributed.broadcast_object(None if error is None else str(error))
        if error is not None:
            raise error
        if message is not None:
            raise RuntimeError(message)
        try:
            if resume:
                if not list_checkpoints(run_dir):
                    raise FileNotFoundError(f"cannot resume: {run_dir} holds no last checkpoint")
            elif list_checkpoints(run_dir):
                raise FileExistsError(
                    f"{run_dir} already holds a run; continue it with --resume {run_dir} or "
                    f"choose another --output-dir"
                )
            if self.ctx.is_main and not resume:
                # a run that died before its first checkpoint starts over
                (run_dir / "metrics.jsonl").unlink(missing_ok=True)
        except BaseException:
            self.lock.release()
            raise
        distributed.barrier()
        return run_dir

    def close(self) -> None:
        """Release the run directory's lock and close the logs (also after a failure)."""
        self.lock.release()
        self.threads.restore()
        log = getattr(self, "log", None)
        if log is not None:
            log.close()

    def _split(self, ds: Any) -> tuple[Any, Any]:
        return split_validation(ds, self.cfg)

    def _resume(self) -> None:
        """Load the newest good checkpoint (``last``, else ``step-N``), saying what was
        skipped and why; a damaged ``last`` is renamed ``*.corrupt`` (kept, not reused)."""
        skipped: list[tuple[str, str]] = []
        record, used = None, "last"
        for used in list_checkpoints(self.run_dir):
            try:
                verify_checkpoint(self.run_dir, used)
                record = load_checkpoint(
                    self.run_dir, used, self.model, self.optimizer, self.scheduler
                )
                break
            except (CheckpointError, RuntimeError) as err:  # damaged / inconsistent
                skipped.append((used, str(err)))
        if record is None:
            raise CheckpointError(
                f"cannot resume {self.run_dir}: no usable checkpoint ("
                + "; ".join(f"{tag}: {why}" for tag, why in skipped)
                + ")"
            )
        distributed.barrier()
        for tag, why in skipped:
            self._warn(f"skipped checkpoint {tag!r}: {why}")
            if tag == "last" and self.ctx.is_main:
                for path in self.run_dir.glob("last.*"):
                    if not path.name.endswith(".corrupt"):
                        path.replace(path.with_name(path.name + ".corrupt"))
        for key in self.state:
            self.state[key] = record.get(key, self.state[key])
        self.epoch_sums = record.get("epoch_sums")
        self.window_sums = record.get("window_sums")
        if self.ctx.rank > 0:  # rank 0's generator was restored; keep the others distinct
            torch.manual_seed(self.cfg.seed + 1 + self.ctx.rank + 7919 * self.state["step"])
        for note in self.log.truncate(self.state["step"]):
            self._warn(note + " (the file is repaired)")
        self._print(
            f"resuming {self.run_dir} at epoch {self.state['epoch'] + 1}, "
            f"batch {self.state['batch_in_epoch']}, step {self.state['step']}"
            + (f" (from checkpoint {used!r})" if skipped else "")
        )

    # ------------------------------------------------------------------ the loop

    def fit(self) -> TrainResult:
        """Run the remaining epochs; the lock is released and the logs closed at the end,
        however it ends."""
        handlers = self._catch_signals()
        try:
            return self._fit()
        finally:
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
            self.close()

    def _fit(self) -> TrainResult:
        cfg, st = self.cfg, self.state
        t0 = time.perf_counter()
        params = sum(p.numel() for p in self.model.parameters())
        self._print(
            f"{cfg.model} ({params:,} parameters) on {cfg.dataset}: {len(self.train_ds)} train / "
            + (
                f"{len(self.val_ds)} validation"
                + (" (held-out instances)" if cfg.val_split == "instances" else "")
                + " / "
                if self.val_ds is not None
                else ""
            )
            + f"{len(self.eval_ds)} {cfg.eval_split} images, {self.steps_per_epoch} steps of "
            f"{cfg.batch_size} per epoch, {self.loss_kind} loss, device {self.device}"
            + (f", {self.ctx.world_size} ranks" if self.ctx.is_distributed else "")
        )
        self.log.write({
            "kind": "start", "step": st["step"], "model": cfg.model, "dataset": cfg.dataset,
            "parameters": params, "world_size": self.ctx.world_size, "device": str(self.device),
            "train_images": len(self.train_ds), "steps_per_epoch": self.steps_per_epoch,
            "val_images": len(self.val_ds) if self.val_ds is not None else 0,
            "command": _command_line(), "environment": environment(self.device, seed=cfg.seed),
        })  # fmt: skip
        self.log.write({**self.threads_start.record(), "step": st["step"]})
        if self.threads_start.after != self.threads_start.before:
            self._print(f"{self.threads_start.after} CPU threads ({self.threads_start.reason})")
        final = None
        for epoch in range(st["epoch"], cfg.epochs):
            if self._out_of_time():  # resumed with no time left
                break
            start = st["batch_in_epoch"]
            train_loss, train_acc, seconds = self._train_epoch(epoch)
            done = st["batch_in_epoch"]
            if self.time_up and done < self.steps_per_epoch:
                # A time limit ends the run inside the epoch: the record's epoch is
                # fractional and the checkpoint continues this epoch on --resume.
                epoch_value: float = round(epoch + done / self.steps_per_epoch, 4)
            else:
                st.update(epoch=epoch + 1, batch_in_epoch=0)
                epoch_value = epoch + 1
            record = {
                "kind": "epoch", "epoch": epoch_value, "step": st["step"],
                "train_loss": train_loss, "train_accuracy": train_acc,
                "lr": self.scheduler.get_last_lr()[0], "time_s": round(seconds, 2),
                "images_per_s": round((done - start) * cfg.batch_size / max(seconds, 1e-9), 1),
            }  # fmt: skip
            if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs or self.time_up:
                final = self._evaluate_all(record)
            self.log.write(record)
            self._print(epoch_summary(record, cfg.epochs, cfg.eval_split))
            self._save("last", record)
            if self.time_up:
                self._print(
                    f"time limit reached: {st['train_seconds'] / 60:.1f} of "
                    f"{cfg.max_minutes:g} minutes of training, {st['step']} steps "
                    f"(epoch {epoch_value} of {cfg.epochs})"
                )
                self.log.write({
                    "kind": "time_limit", "step": st["step"], "epoch": epoch_value,
                    "train_seconds": round(st["train_seconds"], 2),
                    "max_minutes": cfg.max_minutes,
                })  # fmt: skip
                break
            if self._stop_requested() and epoch + 1 < cfg.epochs:
                raise self._interrupted(saved=True)
        if final is None:  # resumed after the last epoch had finished
            final = self._evaluate_all({})
        if self.ctx.is_main:
            write_json(
                self.run_dir / "evaluation.json",
                {
                    **final,
                    "best": st["best"],
                    "environment": environment(
                        self.device, seed=cfg.seed, wall_seconds=round(time.perf_counter() - t0, 2)
                    ),
                },
            )
            self.log.write({"kind": "end", "step": st["step"], "best": st["best"]})
            plot = self.log.plot(cfg.eval_split) if cfg.plot else None
            self._print(final_report(self.run_dir, final, st["best"], cfg.eval_split, plot))
        distributed.barrier()
        return TrainResult(self.run_dir, final, st["best"])

    def _train_epoch(self, epoch: int) -> tuple[float, float, float]:
        cfg, st = self.cfg, self.state
        self.ddp.train()
        start = st["batch_in_epoch"]
        # A mid-epoch resume continues the epoch's sums from the checkpoint.
        meter = _Meter(self.device, self.epoch_sums if start else None)
        # The rolling window of the train log continues too (a resumed run logs the same).
        window = _Meter(self.device, self.window_sums if start else None)
        self.epoch_sums = self.window_sums = None
        # Spread-loss margin, 0.2 -> 0.9 ([H18] §3.1): +margin_per_epoch per epoch, in
        # margin_updates_per_epoch equal steps (a short run still sees it grow).
        updates = cfg.margin_updates_per_epoch

        def margin_at(i: int) -> float:
            part = (i * updates // self.steps_per_epoch) / updates
            return spread_margin(
                epoch + part, cfg.margin_start, cfg.margin_stop, cfg.margin_per_epoch
            )

        bars = show_progress(cfg.progress and self.ctx.is_main)
        bar = tqdm(
            total=self.steps_per_epoch, initial=start, desc=f"epoch {epoch + 1}/{cfg.epochs}",
            disable=not bars, unit="batch", dynamic_ncols=True,
        )  # fmt: skip
        tic = window_tic = line_tic = step_tic = self._step_tic = time.perf_counter()
        for i, batch in self._batches(epoch, start):
            margin = margin_at(i)
            loss, correct, final_loss = self._forward_loss(batch, margin)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            finite = self._check_step(batch[0], loss, epoch, i)
            if finite:
                self.optimizer.step()
            self.scheduler.step()
            st["step"] += 1
            st["batch_in_epoch"] = i + 1
            if finite:
                meter.add(loss, correct, final_loss)
                window.add(loss, correct, final_loss)
            bar.update()
            now = time.perf_counter()
            threads = self.threads.after_step(now - step_tic)
            st["train_seconds"] += now - step_tic
            step_tic = self._step_tic = now
            if threads is not None:
                self.log.write({**threads.record(), "step": st["step"]})
            if self.em_layers and (st["step"] == 1 or i + 1 == self.steps_per_epoch):
                self._log_em(batch[0], round(epoch + (i + 1) / self.steps_per_epoch, 4))
            if st["step"] % cfg.log_every == 0 or i + 1 == self.steps_per_epoch:
                w_loss, w_acc, w_n, w_final = window.reduced()
                speed = w_n / (time.perf_counter() - window_tic)
                bar.set_postfix(
                    loss=f"{w_loss:.4f}", acc=f"{100 * w_acc:.1f}%", img_s=f"{speed:.0f}"
                )
                self.log.write({
                    "kind": "train", "step": st["step"],
                    "epoch": round(epoch + (i + 1) / self.steps_per_epoch, 4),
                    "loss": w_loss, "accuracy": w_acc, "lr": self.scheduler.get_last_lr()[0],
                    "images_per_s": round(speed, 1),
                    **({"margin": margin, "loss_at_final_margin": w_final}
                       if self.loss_kind == "spread" else {}),
                })  # fmt: skip
                if cfg.progress and not bars and time.perf_counter() - line_tic >= 10:
                    line_tic = time.perf_counter()  # a redirected log: a line, not a bar
                    steps = self.steps_per_epoch
                    line = progress_line(epoch + 1, cfg.epochs, i + 1, steps, w_loss, w_acc, speed)
                    self._print(line)
                window, window_tic = _Meter(self.device), time.perf_counter()
            if (i + 1) in self.snapshot_batches:
                self._save(f"snapshot-{st['step']}", None)  # weights only, kept
            if self.time_up:  # every rank agreed in _check_step; _fit saves and ends
                break
            stop = self._stop_requested()
            if stop or (cfg.checkpoint_every and st["step"] % cfg.checkpoint_every == 0):
                if i + 1 < self.steps_per_epoch:  # the epoch end saves anyway
                    self.epoch_sums = meter.sums.tolist()
                    self.window_sums = window.sums.tolist()
                    self._save("last", None)
                    if stop:
                        bar.close()
                        raise self._interrupted(saved=True)
        bar.close()
        if self.time_up and st["batch_in_epoch"] < self.steps_per_epoch:
            # A time limit ended the epoch early: _fit saves, --resume continues the sums.
            self.epoch_sums, self.window_sums = meter.sums.tolist(), window.sums.tolist()
        else:
            self.epoch_sums = None  # the epoch is complete; nothing to continue
        epoch_loss, acc, _, _ = meter.reduced()
        return epoch_loss, acc, time.perf_counter() - tic

    # ------------------------------------------------------------------ faults

    def _check_step(self, images: Tensor, loss: Tensor, epoch: int, i: int) -> bool:
        """After ``backward``: True to take the step, False to skip it (a non-finite loss
        or gradient within ``skip_nonfinite_steps``); raises :class:`NonFiniteError`
        otherwise and for non-finite input pixels. One host sync per step; under DDP the
        ranks decide together (and agree on a pending signal)."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.cfg.grad_clip is not None:
            norm = nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        else:
            norm = nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        dev = norm.device
        flags = torch.stack([
            ~torch.isfinite(images).all(), ~torch.isfinite(loss.detach()).all(),
            ~torch.isfinite(norm), torch.tensor(self.stop_signal is not None, device=dev),
            torch.tensor(self._out_of_time(time.perf_counter() - self._step_tic), device=dev),
        ]).double()  # fmt: skip
        if self.ctx.is_distributed:
            flags = distributed.all_reduce_sum(flags)
        bad_input, bad_loss, bad_grad, stop, time_up = (v > 0 for v in flags.tolist())
        if stop and self.stop_signal is None:
            self.stop_signal = signal.SIGTERM  # another rank was signalled
        self.time_up = self.time_up or time_up  # this step is the last one
        step = self.state["step"] + 1
        where = f"step {step} (epoch {epoch + 1}, batch {i + 1})"
        if bad_input:
            raise NonFiniteError(
                f"batch {i + 1} of epoch {epoch + 1} (step {step}) has non-finite input "
                f"pixels (NaN or inf); check the dataset {self.cfg.dataset!r} and its "
                f"transforms. Nothing of this step was applied."
            )
        if not (bad_loss or bad_grad):
            return True
        what = "loss" if bad_loss else "gradient"
        skipped = self.state.get("skipped_steps", 0)
        if skipped < self.skip_limit:
            self.state["skipped_steps"] = skipped + 1
            self._warn(
                f"non-finite {what} at {where}: step skipped "
                f"({skipped + 1} of at most {self.skip_limit})"
            )
            self.optimizer.zero_grad(set_to_none=True)
            return False
        resume = self._latest_checkpoint()
        raise NonFiniteError(
            f"non-finite {what} at {where}; training stopped before applying it"
            + (f" ({self.skip_limit} bad steps skipped already)" if self.skip_limit else "")
            + ". Lower --lr, set --grad-clip, or allow skipping (skip_nonfinite_steps)"
            + (f"; the last good checkpoint is {resume}" if resume else "")
        )

    def _out_of_time(self, running: float = 0.0) -> bool:
        """True once ``max_minutes`` of training steps (``running`` seconds of the current
        step included) have been spent; evaluation time does not count."""
        limit = self.cfg.max_minutes
        return limit is not None and self.state["train_seconds"] + running >= 60 * limit

    def _model_is_finite(self) -> bool:
        return bool(torch.stack([p.detach().isfinite().all() for p in self.model.parameters()])
                    .all().item())  # fmt: skip

    def _latest_checkpoint(self) -> Path | None:
        tags = list_checkpoints(self.run_dir)
        return self.run_dir / f"{tags[0]}.safetensors" if tags else None

    def _catch_signals(self) -> dict[int, Any]:
        """SIGTERM / SIGINT set :attr:`stop_signal`; the loop saves at the next step
        boundary. A second Ctrl-C stops at once, without saving."""
        if threading.current_thread() is not threading.main_thread():
            return {}

        def on_signal(signum: int, frame: Any) -> None:
            if self.stop_signal is not None and signum == signal.SIGINT:
                raise self._interrupted(saved=False, signum=signum)
            self.stop_signal = signum
            if self.ctx.is_main:
                print(
                    f"\ncapsnet: {signal.Signals(signum).name} received: saving a checkpoint "
                    f"after this step (Ctrl-C again to stop without saving)",
                    file=sys.stderr, flush=True,
                )  # fmt: skip

        return {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}

    def _stop_requested(self) -> bool:
        return self.stop_signal is not None

    def _interrupted(self, *, saved: bool, signum: int | None = None) -> TrainingInterrupted:
        """The exception that ends an interrupted run, after printing where it stands."""
        signum = signum or self.stop_signal or signal.SIGINT
        name, st = signal.Signals(signum).name, self.state
        checkpoint = self._latest_checkpoint()
        where = f"step {st['step']} (epoch {st['epoch'] + 1}, batch {st['batch_in_epoch']})"
        if saved:
            text = f"stopped by {name} at {where}; checkpoint saved: {checkpoint}"
        elif checkpoint is not None:
            text = f"stopped by {name} without saving; the newest checkpoint is {checkpoint}"
        else:
            text = f"stopped by {name} before the first checkpoint: nothing can be resumed"
        if checkpoint is not None:
            text += f"\ncontinue with: capsnet train --resume {self.run_dir}"
        else:
            text += "; run the same command again to start over"
        if self.ctx.is_main:
            print(f"capsnet: {text}", file=sys.stderr, flush=True)
        return TrainingInterrupted(signum, self.run_dir, checkpoint, text)

    def _log_em(self, images: Tensor, epoch: float) -> None:
        """An ``"em"`` record: is EM alive? Per EM layer the spread and saturation of the
        activations and the data mass per parent on 32 of these training images
        (:func:`capsnet.probes.em_layer_statistics`), and the gradient norms of the
        activation and pose paths of the step just taken
        (:func:`capsnet.probes.em_gradient_norms`)."""
        if not self.ctx.is_main:
            return
        record: dict[str, Any] = {"kind": "em", "step": self.state["step"], "epoch": epoch}
        for source in (
            probes.em_layer_statistics(self.model, images[:32]),
            probes.em_gradient_norms(self.model),
        ):
            for layer, values in source.items():
                for key, value in values.items():
                    record[f"{layer}.{key}"] = value
        self.log.write(record)

    def _forward_loss(
        self, batch: tuple[Tensor, ...], margin: float
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Loss, per-example correctness and (a ramping spread margin) the loss under the
        final margin, which evaluation uses, of one batch."""
        cfg = self.cfg
        images, labels = batch[0], batch[1]
        with torch.autocast(self.device.type, torch.bfloat16, enabled=cfg.precision == "bf16"):
            out = self.ddp(images, labels)
            if not self.two_digits:
                loss = compute_loss(
                    self.loss_kind, out, images, labels, margin=margin,
                    reconstruction_weight=cfg.reconstruction_weight,
                )  # fmt: skip
                final = None
                if self.loss_kind == "spread" and margin != cfg.margin_stop:
                    with torch.no_grad():
                        final = compute_loss(
                            self.loss_kind, out, images, labels, margin=cfg.margin_stop,
                            reconstruction_weight=cfg.reconstruction_weight,
                        )  # fmt: skip
                return loss, correct_predictions(out.scores, labels), final
            idx = batch[2]
            labels2 = self.train_ds.labels2[idx].to(self.device)
            parts = self.train_ds.components(idx).to(self.device, torch.float32) / 255
            loss = two_digit_loss(
                self.model, out, labels, labels2, parts,
                reconstruction_weight=cfg.reconstruction_weight,
            )  # fmt: skip
        return loss, correct_predictions(out.scores, labels, labels2), None

    def _batches(self, epoch: int, start: int):
        """``(index, batch)`` of ``epoch`` from batch ``start`` (mid-epoch resume).

        The loader's order and augmentation are functions of (seed, epoch, batch), so
        starting at ``start`` yields exactly what an uninterrupted pass yields there.
        """
        self.loader.set_epoch(epoch, start_batch=start)
        for i, batch in enumerate(self.loader, start):
            if i >= self.steps_per_epoch:
                break
            yield i, batch

    # ------------------------------------------------------------------ evaluation, saving

    def _evaluate_all(self, record: dict[str, Any]) -> dict[str, Any]:
        """Evaluate on val (if any) and the eval split; update best; fill ``record``."""
        cfg = self.cfg

        def loss_fn(out, images, targets):
            # The training objective, with the decoder masked by the prediction as at test
            # time ([S17] §4.1); two-digit data: the margin part only.
            if self.two_digits:
                out = out._replace(reconstructions=None)
            return compute_loss(
                self.loss_kind, out, images, targets, margin=cfg.margin_stop,
                reconstruction_weight=cfg.reconstruction_weight, reduction="none",
            )  # fmt: skip

        results: dict[str, EvalResult] = {}
        for name, loader in self.eval_loaders.items():
            results[name] = evaluate(
                self.model, loader, num_classes=len(self.classes), classes=self.classes,
                capsule_scores=self.capsule_scores, loss_fn=loss_fn, precision=cfg.precision,
                limit_batches=cfg.limit_eval_batches,
                progress=show_progress(cfg.progress and self.ctx.is_main),
                # labels2: an extra of two-digit data, set with setattr (no static attribute)
                labels2=getattr(loader.dataset, "labels2") if self.two_digits else None,  # noqa: B009
            )  # fmt: skip
            record[f"{name}_loss"] = results[name].loss
            record[f"{name}_accuracy"] = results[name].accuracy
            record[f"{name}_error"] = results[name].error
        select = "val" if "val" in results else cfg.eval_split
        best = self.state["best"]
        if record and (best is None or results[select].accuracy > best["accuracy"]):
            self.state["best"] = {
                "epoch": record["epoch"], "step": self.state["step"], "selected_on": select,
                "accuracy": results[select].accuracy,
                f"{cfg.eval_split}_accuracy": results[cfg.eval_split].accuracy,
            }  # fmt: skip
            record["best"] = True
            self._save("best", record)
        return {"split": cfg.eval_split, **results[cfg.eval_split].to_dict()}

    def _save(self, tag: str, record: dict[str, Any] | None) -> None:
        if not self.ctx.is_main:
            return
        if not self._model_is_finite():  # never save (or select as best) a broken model
            raise NonFiniteError(
                f"the model's parameters are non-finite after step {self.state['step']} "
                f"(epoch {self.state['epoch'] + 1}); not saving checkpoint {tag!r}. Lower "
                f"--lr or set --grad-clip"
            )
        state = {**self.state, "world_size": self.ctx.world_size, "metrics": record}
        if tag == "last":
            state["epoch_sums"] = self.epoch_sums
            state["window_sums"] = self.window_sums
        save_checkpoint(
            self.run_dir, tag, self.model, model_name=self.cfg.model,
            model_kwargs=self.model_kwargs, config=self.cfg.to_dict(), trainer_state=state,
            optimizer=self.optimizer if tag == "last" else None,
            scheduler=self.scheduler if tag == "last" else None, keep=self.keep,
            extra_metadata=self.checkpoint_metadata,
        )  # fmt: skip

    def _print(self, text: str) -> None:
        if self.ctx.is_main:
            tqdm.write(text, file=sys.stdout)
            sys.stdout.flush()

    def _warn(self, text: str) -> None:
        if self.ctx.is_main:
            tqdm.write(f"capsnet: warning: {text}", file=sys.stderr)
            sys.stderr.flush()
