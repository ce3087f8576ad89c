"""Checkpoints: atomic writes, exact optimiser/scheduler/RNG round trips, roll-forward of an
interrupted save, and capsnet.load."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import capsnet
from capsnet import checkpoint as ck
from capsnet.models import create

TINY = dict(conv_channels=8, primary_types=2, primary_dim=4, class_dim=4)


def _save(run_dir, model, opt=None, sched=None, step=0, tag="last", kwargs=None, name="capsnet"):
    ck.save_checkpoint(
        run_dir, tag, model, model_name=name, model_kwargs=kwargs or {},
        config={"seed": 0}, trainer_state={"epoch": 0, "step": step},
        optimizer=opt, scheduler=sched,
    )  # fmt: skip


def _steps(model, opt, sched, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.rand(4, 1, 28, 28, generator=g)
        # torch.rand without a generator: the global RNG, which the checkpoint must restore.
        loss = model(x).scores.sum() + 1e-3 * torch.rand(()) * model(x).scores.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def _make(seed=0):
    torch.manual_seed(seed)
    model = create("capsnet", reconstruction=False, **TINY)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** (s / 3))
    return model, opt, sched


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    path = tmp_path / "a.json"
    ck.atomic_write(path, "one")
    ck.atomic_write(path, b"two")
    assert path.read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_round_trip_continues_exactly(tmp_path):
    """Saving after 3 steps, loading into fresh objects and taking 3 more steps gives
    bit-identical weights to 6 uninterrupted steps (Adam moments, LR schedule, RNG)."""
    model, opt, sched = _make()
    _steps(model, opt, sched, 3)
    _save(tmp_path, model, opt, sched, step=3, kwargs=TINY)
    _steps(model, opt, sched, 3, seed=2)

    model2, opt2, sched2 = _make(seed=123)  # different init, overwritten by the load
    torch.manual_seed(999)  # different RNG state, restored by the load
    record = ck.load_checkpoint(tmp_path, "last", model2, opt2, sched2)
    assert record["step"] == 3
    assert sched2.last_epoch == 3
    _steps(model2, opt2, sched2, 3, seed=2)
    for (name, a), b in zip(model.state_dict().items(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_files_and_metadata(tmp_path):
    model, opt, sched = _make()
    _save(tmp_path, model, opt, sched, step=7, kwargs=TINY)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["last.json", "last.safetensors", "last.state.safetensors"]
    meta = ck.read_metadata(tmp_path, "last")
    assert meta["model"] == "capsnet" and meta["model_kwargs"] == TINY and meta["step"] == 7
    record = json.loads((tmp_path / "last.json").read_text())
    assert record["step"] == 7 and "optimizer" in record and "rng" in record


def test_interrupted_save_rolls_forward(tmp_path, monkeypatch):
    """A crash between the renames of one save (weights renamed, the rest not) is completed
    on the next load; a crash while writing the temporary files keeps the old checkpoint."""
    model, opt, sched = _make()
    _save(tmp_path, model, opt, sched, step=1)
    _steps(model, opt, sched, 1)
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    real_replace = os.replace
    calls = []

    def crash_after_first(src, dst):
        calls.append(dst)
        if len(calls) > 1:
            raise KeyboardInterrupt("killed")
        real_replace(src, dst)

    monkeypatch.setattr(ck.os, "replace", crash_after_first)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, model, opt, sched, step=2)
    monkeypatch.setattr(ck.os, "replace", real_replace)

    fresh, opt2, sched2 = _make(seed=5)
    record = ck.load_checkpoint(tmp_path, "last", fresh, opt2, sched2)
    assert record["step"] == 2
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, expected[k]), k
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    # A torn temporary file (crash while writing) does not affect the complete checkpoint.
    (tmp_path / ".last.safetensors.tmp").write_bytes(b"\x00garbage")
    assert ck.load_checkpoint(tmp_path, "last", fresh)["step"] == 2


def test_inconsistent_checkpoint_is_an_error(tmp_path):
    model, opt, sched = _make()
    _save(tmp_path, model, opt, sched, step=1)
    other = tmp_path / "other"
    other.mkdir()
    _save(other, model, opt, sched, step=2)
    os.replace(other / "last.safetensors", tmp_path / "last.safetensors")
    with pytest.raises(RuntimeError, match="inconsistent"):
        ck.load_checkpoint(tmp_path, "last", model)


def test_load_rebuilds_model_for_inference(tmp_path):
    torch.manual_seed(0)
    kwargs = {"num_classes": 4, "in_channels": 1, "input_size": [28, 28], **TINY}
    model = create("capsnet", **kwargs)
    _save(tmp_path, model, tag="best", kwargs=kwargs)
    _save(tmp_path, create("capsnet", **kwargs), tag="last", kwargs=kwargs)
    x = torch.rand(3, 1, 28, 28)
    expected = model.eval()(x).scores
    for path in (tmp_path, tmp_path / "best.safetensors"):
        loaded = capsnet.load(path)
        assert not loaded.training
        assert torch.allclose(loaded(x).scores, expected)
    last = capsnet.load(tmp_path, which="last")
    assert not torch.allclose(last(x).scores, expected)


def test_matrix_capsnet_saved_without_variant_loads_as_before(tmp_path):
    """A run from before the EM variants (no ``variant`` or ``iterations`` in its
    model_kwargs) rebuilds with the defaults of then: ``"paper"`` maths, 2 iterations."""
    torch.manual_seed(0)
    kwargs = {"num_classes": 4, "in_channels": 1, "input_size": [28, 28], "A": 8, "B": 2}
    old = create("matrix_capsnet", variant="paper", iterations=2, **kwargs)
    _save(tmp_path, old, tag="best", kwargs=kwargs, name="matrix_capsnet")
    loaded = capsnet.load(tmp_path)
    assert loaded.variant == "paper" and loaded.iterations == 2
    x = torch.rand(3, 1, 28, 28)
    torch.testing.assert_close(loaded(x).scores, old.eval()(x).scores)
    fresh = create("matrix_capsnet", **kwargs)
    assert fresh.variant != "paper" or fresh.iterations != 2  # the defaults did change
    # a checkpoint that records its variant keeps it
    new_dir = tmp_path / "new"
    new_dir.mkdir()
    recorded = {**kwargs, "variant": "gritzman", "iterations": 3}
    model = create("matrix_capsnet", **recorded)
    _save(new_dir, model, tag="best", kwargs=recorded, name="matrix_capsnet")
    again = capsnet.load(new_dir)
    assert again.variant == "gritzman" and again.iterations == 3


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        capsnet.load(tmp_path)
    with pytest.raises(FileNotFoundError):
        capsnet.load(tmp_path / "missing.safetensors")
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(ValueError, match="not a capsnet checkpoint"):
        capsnet.load(plain)
    with pytest.raises(ValueError, match="which"):
        capsnet.load(tmp_path, which="first")


def test_rng_state_restored(tmp_path):
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(3)
    ck.save_checkpoint(
        tmp_path, "last", model, model_name="x", model_kwargs={}, config={},
        trainer_state={"step": 0}, optimizer=opt,
    )  # fmt: skip
    expected = torch.rand(5)
    torch.manual_seed(4)
    ck.load_checkpoint(tmp_path, "last", model, opt)
    assert torch.equal(torch.rand(5), expected)
