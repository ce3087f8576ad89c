"""A run directory that nothing can spoil: torn logs, two writers, signals, NaN steps,
damaged checkpoints, read-only and full disks (docs/training.md, "Faults")."""

import errno
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import capsnet
from capsnet import checkpoint as ck
from capsnet import io as cio
from capsnet.cli import main
from capsnet.runlock import RunLock, RunLockedError
from capsnet.train import NonFiniteError, resume_config, train
from training_helpers import make_mnist, tiny_config, weights


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_mnist(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def finished(data_root, tmp_path_factory):
    """A finished 2-epoch run with a checkpoint every 2 steps (8 steps)."""
    run = tmp_path_factory.mktemp("runs") / "run"
    train(tiny_config(data_root, run, checkpoint_every=2))
    return run


def _copy(run, tmp_path):
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(run, dst)
    return dst


# ------------------------------------------------------------------ logs


def test_torn_metrics_line_is_dropped_and_resume_repairs_it(finished, data_root, tmp_path):
    run = _copy(finished, tmp_path)
    text = (run / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text(text + '{"kind": "train", "step": 9, "lo')
    with pytest.warns(RuntimeWarning, match=r"metrics.jsonl: line \d+ is not a complete"):
        rows = capsnet.runlog.read_metrics(run)
    assert rows[-1]["kind"] == "end"
    train(resume_config(run, epochs=3), resume=True)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["kind"] == "end" and max(r["step"] for r in rows) == 12


# ------------------------------------------------------------------ two writers


def test_second_writer_and_resume_of_a_running_run_are_refused(finished, data_root, tmp_path):
    run = _copy(finished, tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            sys.path.insert(0, {str(capsnet.__path__[0] + '/..')!r})
            from capsnet.runlock import RunLock
            with RunLock({str(run)!r}):
                print("locked", flush=True)
                time.sleep(60)
        """)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RuntimeError, match=f"in use .*PID {holder.pid} on "):
            train(resume_config(run, epochs=3), resume=True)
        with pytest.raises(RuntimeError, match=f"PID {holder.pid}"):
            train(tiny_config(data_root, run))
    finally:
        holder.kill()
        holder.wait()
    # The OS released the dead holder's lock; its lock file does not stand in the way.
    train(resume_config(run, epochs=3), resume=True)
    assert not (run / ".lock").exists()


def test_lock_in_process_and_stale_lock_file(tmp_path):
    run = tmp_path / "run"
    with RunLock(run):
        with pytest.raises(RunLockedError, match=f"PID {os.getpid()}"):
            RunLock(run).acquire()
    (run / ".lock").write_text(json.dumps({"pid": 999999, "host": "elsewhere"}))
    with RunLock(run) as lock:  # flock is free: the file's holder is dead
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()


# ------------------------------------------------------------------ non-finite values


def test_infinite_lr_stops_at_the_step_and_saves_no_broken_model(data_root, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(ValueError, match="lr must be a finite number"):  # refused up front
        tiny_config(data_root, run, lr=float("inf"))
    # A finite lr so large that the first update overflows the weights: step 2 is non-finite.
    with pytest.raises(NonFiniteError, match=r"non-finite (loss|gradient) at step 2 "):
        train(tiny_config(data_root, run, lr=1e30))
    assert not (run / "best.safetensors").exists()
    assert not (run / ".lock").exists()


def test_skipping_bad_steps_and_nan_pixels(data_root, tmp_path, monkeypatch):
    import capsnet.train as tr

    real = tr.compute_loss
    calls = []

    def nan_once(kind, output, images, labels, **kwargs):
        loss = real(kind, output, images, labels, **kwargs)
        if kwargs.get("reduction", "mean") == "mean":
            calls.append(1)
            if len(calls) == 3:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(tr, "compute_loss", nan_once)
    cfg = tiny_config(data_root, tmp_path / "skip")
    with pytest.raises(NonFiniteError, match="non-finite loss at step 3"):
        train(cfg)
    calls.clear()
    object.__setattr__(cfg, "skip_nonfinite_steps", 1)  # the field part B adds
    object.__setattr__(cfg, "output_dir", str(tmp_path / "skip2"))
    result = train(cfg)
    assert all(torch.isfinite(v).all() for v in weights(result.run_dir, "best").values())
    monkeypatch.undo()

    from capsnet.data import BatchLoader

    real_iter = BatchLoader.__iter__

    def poisoned(self):
        for j, batch in enumerate(real_iter(self)):
            if self.shuffle and j == 1:
                batch[0][0, 0, 0, 0] = float("nan")
            yield batch

    monkeypatch.setattr(BatchLoader, "__iter__", poisoned)
    with pytest.raises(NonFiniteError, match=r"batch 2 of epoch 1 \(step 2\) has non-finite input"):
        train(tiny_config(data_root, tmp_path / "nanpixel"))


# ------------------------------------------------------------------ damaged checkpoints


def _flip_last_byte(path):
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x10
    path.write_bytes(bytes(raw))


def test_truncated_and_bit_flipped_checkpoints_are_named(finished, tmp_path, capsys):
    run = _copy(finished, tmp_path)
    best = run / "best.safetensors"
    _flip_last_byte(best)
    with pytest.raises(ck.CheckpointError, match=r"best.safetensors is corrupt \(checksum"):
        capsnet.load(run)
    lone = tmp_path / "lone.safetensors"
    lone.write_bytes((run / "last.safetensors").read_bytes()[:-100])
    with pytest.raises(ck.CheckpointError, match=r"lone.safetensors is truncated \("):
        capsnet.load(lone)
    (run / "last.safetensors").write_bytes((run / "last.safetensors").read_bytes()[:-100])
    with pytest.raises(ck.CheckpointError, match="last.safetensors is truncated"):
        capsnet.load(run, which="last")  # not "files from different saves"
    assert main(["evaluate", str(run), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("capsnet: error: checkpoint ") and "Traceback" not in err


def test_resume_falls_back_to_an_older_good_checkpoint(finished, data_root, tmp_path, capsys):
    run = _copy(finished, tmp_path)
    assert ck.list_checkpoints(run) == ["last", "step-6"]  # keep 2: last (8) and step 6
    _flip_last_byte(run / "last.state.safetensors")
    train(resume_config(run, epochs=3), resume=True)
    out = capsys.readouterr()
    assert "skipped checkpoint 'last'" in out.err and "checksum mismatch" in out.err
    assert "resuming" in out.out and "step 6" in out.out
    assert (run / "last.state.safetensors.corrupt").exists()
    assert json.loads((run / "last.json").read_text())["step"] == 12


# ------------------------------------------------------------------ OS errors


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_disk_full_and_read_only_are_one_line_errors(data_root, tmp_path, monkeypatch, code):
    # We run as root, where chmod does not stop writes: the file system refuses instead.
    run = tmp_path / "run"
    real_open = open

    def refusing_open(file, mode="r", *args, **kwargs):
        if "w" in mode and ".safetensors." in str(file):
            raise OSError(code, os.strerror(code), str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", refusing_open)
    with pytest.raises(
        cio.RunDirError, match=r"cannot write \S*run/(best|last)\.safetensors: "
    ) as info:
        train(tiny_config(data_root, run, epochs=1))
    assert info.value.errno == code and isinstance(info.value, RuntimeError)
    assert "\n" not in str(info.value)
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]


def test_evaluate_refuses_a_read_only_output_before_evaluating(
    finished, tmp_path, monkeypatch, capsys
):
    import capsnet.evaluate as ev

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(cio.tempfile, "mkstemp", read_only)
    monkeypatch.setattr(ev, "evaluate", lambda *a, **k: pytest.fail("evaluated first"))
    assert main(["evaluate", str(finished), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "capsnet: error: cannot write to" in err and "read-only (EROFS)" in err


# ------------------------------------------------------------------ signals

SIGNAL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import capsnet.train as tr
    from capsnet.cli import main

    real = tr.compute_loss
    count = []

    def loss(kind, output, images, labels, **kwargs):
        if kwargs.get("reduction", "mean") == "mean":
            count.append(1)
            if len(count) == int(sys.argv[1]):
                os.kill(os.getpid(), signal.SIGTERM)  # mid-step, as a scheduler would
        return real(kind, output, images, labels, **kwargs)

    tr.compute_loss = loss
    sys.exit(main(sys.argv[2:]))
    """
)


@pytest.mark.slow
def test_sigterm_mid_epoch_saves_and_resumes_to_the_end(data_root, tmp_path):
    from training_helpers import tiny_flags

    run = tmp_path / "run"
    script = tmp_path / "term.py"
    script.write_text(SIGNAL_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), "3", "train", *tiny_flags(data_root, run)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 143, proc.stderr[-2000:]
    assert f"continue with: capsnet train --resume {run}" in proc.stderr
    state = json.loads((run / "last.json").read_text())
    assert (state["step"], state["batch_in_epoch"]) == (3, 3)
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp") or p.name == ".lock"]
    train(resume_config(run), resume=True)
    assert (run / "evaluation.json").exists()
    assert json.loads((run / "last.json").read_text())["epoch"] == 2


def test_progress_bars_only_on_a_terminal(finished, data_root, tmp_path, capsys):
    from training_helpers import tiny_flags

    flags = [f for f in tiny_flags(data_root, tmp_path / "run") if f != "--no-progress"]
    assert main(["train", *flags]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and len(err) < 2000


def test_matrix_curves_compare_like_with_like(tmp_path):
    from capsnet.runlog import RunLog

    log = RunLog(tmp_path, enabled=True, tensorboard=False)
    log.write({"kind": "train", "step": 1, "epoch": 0.5, "loss": 0.1, "accuracy": 0.5,
               "margin": 0.2, "loss_at_final_margin": 0.8})  # fmt: skip
    log.write({"kind": "epoch", "step": 2, "epoch": 1, "test_loss": 0.7, "test_accuracy": 0.6})
    assert log.plot("test") == tmp_path / "curves.png"


def test_cli_reports_a_nan_stop_in_one_line_and_checkpoints_carry_class_names(
    data_root, tmp_path, capsys
):
    import json

    from safetensors import safe_open

    from capsnet.cli import main
    from training_helpers import tiny_flags

    run = tmp_path / "nan"
    assert main(["train", *tiny_flags(data_root, run), "--lr", "1e30"]) == 1
    err = capsys.readouterr().err
    assert "capsnet: error: " in err and "non-finite" in err and "Traceback" not in err
    ok = tmp_path / "ok"
    assert main(["train", *tiny_flags(data_root, ok), "--epochs", "1"]) == 0
    with safe_open(str(ok / "best.safetensors"), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["class_names"]) == [str(k) for k in range(10)]
    assert json.loads(meta["preprocessing"])["dataset"] == "mnist"
