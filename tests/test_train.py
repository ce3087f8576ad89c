"""The training loop: run directory contents, exact resume (also after SIGKILL mid-epoch),
precision and data subsets (its losses: test_objectives.py, its schedules:
test_schedules.py)."""

import json
import math
import os
import subprocess
import sys
import textwrap
import time
import types

import pytest
import torch

from capsnet import functional as F
from capsnet.config import RunConfig
from capsnet.models import ModelOutput
from capsnet.train import resume_config, train
from training_helpers import TINY_MODEL, assert_same_weights, make_mnist, tiny_config, weights


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_mnist(tmp_path_factory.mktemp("data"))


def _read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_run_directory_and_metrics(data_root, tmp_path):
    run = tmp_path / "run"
    result = train(tiny_config(data_root, run, plot=True, checkpoint_every=3))
    names = {p.name for p in run.iterdir()}
    expected = {"config.json", "metrics.jsonl", "evaluation.json", "curves.png"}
    expected |= {"last.safetensors", "last.state.safetensors", "last.json"}
    expected |= {"best.safetensors", "best.json"}
    assert expected <= names, names
    assert not [n for n in names if n.endswith(".tmp")]
    saved = json.loads((run / "config.json").read_text())
    assert RunConfig.from_dict(saved) == tiny_config(data_root, run, plot=True, checkpoint_every=3)
    rows = _read_metrics(run)
    kinds = [r["kind"] for r in rows]
    assert kinds[0] == "start" and kinds[-1] == "end" and kinds.count("epoch") == 2
    (threads,) = [r for r in rows if r["kind"] == "threads"]  # the thread policy's decision
    assert (threads["threads"], threads["policy"], threads["step"]) == (1, "fixed", 0)
    steps = [r["step"] for r in rows if r["kind"] == "train"]
    assert steps == [2, 4, 6, 8]  # 64 images / batch 16 = 4 steps per epoch, log every 2
    # Each epoch's train loss/accuracy is the mean of its (equal-sized) logged windows,
    # also after the periodic checkpoints of the epoch before.
    for e in (1, 2):
        windows = [r for r in rows if r["kind"] == "train" and e - 1 < r["epoch"] <= e]
        summary = [r for r in rows if r["kind"] == "epoch" and r["epoch"] == e][0]
        assert summary["train_loss"] == pytest.approx(sum(r["loss"] for r in windows) / 2)
        acc = sum(r["accuracy"] for r in windows) / 2
        assert summary["train_accuracy"] == pytest.approx(acc)
    epoch = [r for r in rows if r["kind"] == "epoch"][-1]
    assert {"train_loss", "train_accuracy", "test_loss", "test_accuracy", "lr"} <= epoch.keys()
    final = json.loads((run / "evaluation.json").read_text())
    assert final["num_examples"] == 40 and len(final["confusion"]) == 10
    assert sum(map(sum, final["confusion"])) == 40
    assert math.isclose(final["accuracy"], epoch["test_accuracy"])
    assert result.final["accuracy"] == final["accuracy"]
    assert len(final["mean_scores"]) == 10  # capsule lengths reported for a capsule model


def test_resume_after_epoch_equals_uninterrupted(data_root, tmp_path):
    full = tmp_path / "full"
    train(tiny_config(data_root, full, epochs=2))
    part = tmp_path / "part"
    train(tiny_config(data_root, part, epochs=1))
    train(resume_config(part, epochs=2), resume=True)
    assert_same_weights(weights(full), weights(part))
    rows = _read_metrics(part)
    assert [r["epoch"] for r in rows if r["kind"] == "epoch"] == [1, 2]


def test_resume_refuses_config_changes_and_existing_runs(data_root, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(data_root, run, epochs=1))
    with pytest.raises(ValueError, match="lr cannot change"):
        resume_config(run, lr=1.0)
    with pytest.raises(FileExistsError, match="--resume"):
        train(tiny_config(data_root, run, epochs=1))
    with pytest.raises(FileNotFoundError, match="cannot resume"):
        resume_config(tmp_path)


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import capsnet.train as tr
    from capsnet.cli import main

    kill_after_step = int(sys.argv[1])
    saved = []
    real_save, real_loss = tr.save_checkpoint, tr.compute_loss

    def save(run_dir, tag, *args, **kwargs):
        real_save(run_dir, tag, *args, **kwargs)
        saved.append((tag, kwargs["trainer_state"]["step"]))

    def loss_then_die(kind, output, images, labels, **kwargs):
        # The training step after the checkpoint of step kill_after_step: die in the
        # middle of it (after the forward pass), losing its work.
        training = kwargs.get("reduction", "mean") == "mean"  # evaluation uses "none"
        if training and ("last", kill_after_step) in saved:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_loss(kind, output, images, labels, **kwargs)

    tr.save_checkpoint, tr.compute_loss = save, loss_then_die
    sys.exit(main(sys.argv[2:]))
    """
)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_gives_identical_weights(data_root, tmp_path):
    """Kill a training process with SIGKILL in the middle of epoch 2 (after the periodic
    checkpoint of step 6), resume it, and compare with an uninterrupted run: bit-identical
    weights on CPU (same batches, augmentation, Adam state, LR and RNG)."""
    from training_helpers import tiny_flags

    overrides = dict(checkpoint_every=2, augment=True)
    full = tmp_path / "full"
    train(tiny_config(data_root, full, **overrides))

    run = tmp_path / "killed"
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT)
    flags = tiny_flags(data_root, run) + ["--checkpoint-every", "2", "--augment"]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    proc = subprocess.run(
        [sys.executable, str(script), "6", "train", *flags],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert proc.returncode == -9, proc.stderr[-2000:]
    state = json.loads((run / "last.json").read_text())
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (6, 1, 2)
    logged = [r["step"] for r in _read_metrics(run) if r["kind"] == "train"]
    assert logged == [2, 4, 6]

    train(resume_config(run), resume=True)
    assert_same_weights(weights(full), weights(run))
    assert_same_weights(weights(full, "best"), weights(run, "best"))
    train_rows = [r for r in _read_metrics(run) if r["kind"] == "train"]
    full_rows = [r for r in _read_metrics(full) if r["kind"] == "train"]
    assert [r["step"] for r in train_rows] == [2, 4, 6, 8]
    assert [r["loss"] for r in train_rows] == [r["loss"] for r in full_rows]
    epochs = [r for r in _read_metrics(run) if r["kind"] == "epoch"]
    full_epochs = [r for r in _read_metrics(full) if r["kind"] == "epoch"]
    assert epochs[-1]["train_loss"] == pytest.approx(full_epochs[-1]["train_loss"], rel=1e-12)


def test_subsets_and_validation_split(data_root, tmp_path):
    cfg = tiny_config(data_root, tmp_path / "run", epochs=1, train_samples=32, val_samples=16)
    result = train(cfg)
    rows = _read_metrics(result.run_dir)
    assert rows[0]["train_images"] == 32 and rows[0]["steps_per_epoch"] == 2
    epoch = [r for r in rows if r["kind"] == "epoch"][0]
    assert "val_accuracy" in epoch and result.best["selected_on"] == "val"


def test_bf16_and_limits(data_root, tmp_path):
    cfg = tiny_config(
        data_root, tmp_path / "run", epochs=1, precision="bf16",
        limit_train_batches=2, limit_eval_batches=1,
    )  # fmt: skip
    result = train(cfg)
    assert result.final["num_examples"] == 32  # one evaluation batch
    assert all(torch.isfinite(w).all() for w in weights(result.run_dir).values())


def test_spread_loss_margin_schedule(data_root, tmp_path):
    """Matrix capsules train with the spread loss; the margin grows 0.2, 0.3, ... per epoch."""
    cfg = tiny_config(
        data_root, tmp_path / "run", model="matrix_capsnet", epochs=2, limit_train_batches=1,
        limit_eval_batches=1, log_every=1, model_kwargs={"A": 8, "B": 2, "C": 2, "D": 2},
    )  # fmt: skip
    train(cfg)
    margins = [r["margin"] for r in _read_metrics(tmp_path / "run") if "margin" in r]
    assert margins == pytest.approx([0.2, 0.3])


def test_spread_margin_grows_inside_an_epoch(data_root, tmp_path):
    """margin_updates_per_epoch=2: each half epoch adds margin_per_epoch / 2 (4 steps an
    epoch, so the margin steps after steps 2, 4 and 6)."""
    cfg = tiny_config(
        data_root, tmp_path / "run", model="matrix_capsnet", epochs=2, batch_size=16,
        limit_eval_batches=1, log_every=1, margin_updates_per_epoch=2,
        model_kwargs={"A": 8, "B": 2, "C": 2, "D": 2},
    )  # fmt: skip
    train(cfg)
    rows = _read_metrics(tmp_path / "run")
    assert rows[0]["steps_per_epoch"] == 4
    margins = [r["margin"] for r in rows if "margin" in r]
    assert margins == pytest.approx([0.2, 0.2, 0.25, 0.25, 0.3, 0.3, 0.35, 0.35])


def test_em_diagnostics_and_recorded_variant(data_root, tmp_path):
    """Matrix-capsule runs log "em" records (is EM alive?) after the first step and every
    epoch, and record the resolved EM variant and iterations with their weights."""
    from capsnet.checkpoint import read_metadata
    from capsnet.layers import DEFAULT_EM_VARIANT

    cfg = tiny_config(
        data_root, tmp_path / "run", model="matrix_capsnet", epochs=2, limit_train_batches=2,
        limit_eval_batches=1, model_kwargs={"A": 8, "B": 2, "C": 2, "D": 2},
    )  # fmt: skip
    train(cfg)
    records = [r for r in _read_metrics(tmp_path / "run") if r["kind"] == "em"]
    assert [r["step"] for r in records] == [1, 2, 4]
    for layer in ("conv_caps1", "conv_caps2", "class_caps"):
        for key in ("activation_std", "saturated", "mass", "grad_activation", "grad_pose"):
            assert math.isfinite(records[-1][f"{layer}.{key}"]), (layer, key)
        assert 0.0 <= records[-1][f"{layer}.saturated"] <= 1.0
        assert records[-1][f"{layer}.mass"] > 0
    assert records[0]["primary.grad_pose"] > 0
    kwargs = read_metadata(tmp_path / "run", "last")["model_kwargs"]
    assert kwargs["variant"] == DEFAULT_EM_VARIANT and kwargs["iterations"] == 3
    # capsnet models have no EM layers: no em records
    train(tiny_config(data_root, tmp_path / "caps", epochs=1, limit_train_batches=1))
    assert not [r for r in _read_metrics(tmp_path / "caps") if r["kind"] == "em"]


def test_two_digit_objective_and_accuracy():
    """MultiMNIST ([S17] §6): margin loss with both digits present, each digit reconstructed
    from its own capsule; correct = the two classes are the two top scores."""
    from capsnet.models import create
    from capsnet.train import correct_predictions, two_digit_loss

    torch.manual_seed(0)
    model = create("capsnet", input_size=36, conv_channels=8, primary_types=2)
    images = torch.rand(3, 1, 36, 36)
    parts = torch.rand(3, 2, 1, 36, 36)
    labels, labels2 = torch.tensor([1, 4, 7]), torch.tensor([2, 0, 3])
    out = model(images, labels)
    loss = two_digit_loss(model, out, labels, labels2, parts, reconstruction_weight=0.0005)
    targets = torch.zeros(3, 10)
    targets[torch.arange(3), labels] = 1
    targets[torch.arange(3), labels2] = 1
    second = model.reconstruct(out.poses, labels2)
    recon = ((out.reconstructions - parts[:, 0]) ** 2).sum((1, 2, 3)).mean()
    recon = recon + ((second - parts[:, 1]) ** 2).sum((1, 2, 3)).mean()
    assert torch.allclose(loss, F.margin_loss(out.scores, targets) + 0.0005 * recon)

    scores = torch.tensor([[0.1, 0.9, 0.8, 0.0], [0.9, 0.1, 0.8, 0.7]])
    both = correct_predictions(scores, torch.tensor([2, 0]), torch.tensor([1, 3]))
    assert both.tolist() == [True, False]
    assert correct_predictions(scores, torch.tensor([1, 2])).tolist() == [True, False]


def test_multimnist_run(data_root, tmp_path):
    cfg = tiny_config(
        data_root, tmp_path / "run", dataset="multimnist", epochs=1, limit_train_batches=2,
        model_kwargs={**TINY_MODEL, "reconstruction": True},
    )  # fmt: skip
    result = train(cfg)
    assert result.final["num_examples"] == 40
    # The reported accuracy is the two-digit one, recomputed here from the saved model.
    import capsnet
    from capsnet.train import correct_predictions

    test = capsnet.data.create("multimnist", "test", root=data_root, verify=False)
    model = capsnet.load(result.run_dir, which="last")
    with torch.no_grad():
        scores = model(test.images.float() / 255).scores
    expected = correct_predictions(scores, test.labels, test.labels2).float().mean().item()
    assert result.final["accuracy"] == pytest.approx(expected)


class _FixedScores(torch.nn.Module):
    """A stand-in model whose scores are the input's first row (for evaluate tests)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return ModelOutput(x[:, 0, 0] + self.w, x[:, 0, 0], None)


def test_evaluate_counts_single_and_two_digit():
    from capsnet.evaluate import evaluate

    scores = torch.tensor([[0.9, 0.8, 0.1], [0.2, 0.1, 0.7], [0.6, 0.1, 0.5], [0.1, 0.8, 0.2]])
    images = scores[:, None, None, :]  # (4, 1, 1, 3)
    labels, labels2 = torch.tensor([0, 2, 2, 1]), torch.tensor([1, 0, 0, 2])
    batches = [
        (images[:3], labels[:3], torch.arange(3)),
        (images[3:], labels[3:], torch.arange(3, 4)),
    ]
    single = evaluate(_FixedScores(), [b[:2] for b in batches], num_classes=3)
    assert single.accuracy == 0.75 and single.per_class_accuracy == [1.0, 1.0, 0.5]
    assert single.confusion == [[1, 0, 0], [0, 1, 0], [1, 0, 1]]
    assert single.mean_scores == pytest.approx(scores.mean(0).tolist())
    two = evaluate(_FixedScores(), batches, num_classes=3, labels2=labels2)
    # top-2 sets: {0,1}, {2,0}, {0,2}, {1,2} vs label sets {0,1}, {2,0}, {2,0}, {1,2}.
    assert two.accuracy == 1.0 and two.per_class_accuracy == [1.0, 1.0, 1.0]
    labels2_wrong = torch.tensor([1, 1, 0, 0])
    two = evaluate(_FixedScores(), batches, num_classes=3, labels2=labels2_wrong)
    assert two.accuracy == 0.5
    # class 1 present in examples 0, 1, 3 and recalled in 0, 3; class 0 in 0, 2, 3 -> 0, 2.
    assert two.per_class_accuracy[:2] == pytest.approx([2 / 3, 2 / 3])


def test_run_that_died_before_its_first_checkpoint_starts_over(data_root, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    (run / "metrics.jsonl").write_text('{"kind": "train", "step": 99}\n')
    train(tiny_config(data_root, run, epochs=1))
    assert [r["kind"] for r in _read_metrics(run)][0] == "start"
    assert json.loads((run / "config.json").read_text())["epochs"] == 1


def test_runlog_tensorboard_and_truncate(tmp_path, monkeypatch):
    """Scalars also go to TensorBoard when it is importable; truncate drops later steps."""
    import types

    from capsnet.runlog import RunLog, read_metrics

    scalars = []

    class Writer:
        def __init__(self, log_dir):
            self.log_dir = log_dir

        def add_scalar(self, tag, value, step):
            scalars.append((tag, value, step))

        def close(self):
            scalars.append("closed")

    monkeypatch.setitem(
        sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer)
    )
    log = RunLog(tmp_path, enabled=True, tensorboard=True)
    for step in (1, 2, 3):
        log.write({"kind": "train", "step": step, "loss": 1.0 / step, "best": True})
    log.close()
    assert ("train/loss", 0.5, 2) in scalars and scalars[-1] == "closed"
    assert not [s for s in scalars if s != "closed" and s[0] == "train/best"]
    log.truncate(2)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    RunLog(tmp_path, enabled=False, tensorboard=True).write({"kind": "x", "step": 9})
    assert len(read_metrics(tmp_path)) == 2


def test_validation_split_by_default_fixed_across_seeds_and_used_for_best(tmp_path):
    from capsnet import distributed
    from capsnet.train import Trainer, train
    from capsnet.validation import default_val_samples
    from training_helpers import make_mnist, tiny_config

    root = make_mnist(tmp_path / "data", n_train=64, n_test=40)
    assert default_val_samples(64) == 6 and default_val_samples(60_000) == 5000
    ctx = distributed.setup("auto", "cpu", 60.0)

    def val_images(cfg):
        trainer = Trainer(cfg, ctx)
        try:
            assert len(trainer.val_ds) + len(trainer.train_ds) == 64
            return len(trainer.val_ds), trainer.val_ds.images.clone()
        finally:
            trainer.close()

    n0, seed0 = val_images(tiny_config(root, tmp_path / "r0", val_samples=None, seed=0))
    n1, seed1 = val_images(tiny_config(root, tmp_path / "r1", val_samples=None, seed=1))
    assert n0 == n1 == 6 and torch.equal(seed0, seed1)  # the same images for every seed
    _, legacy = val_images(tiny_config(root, tmp_path / "r2", val_samples=6, val_seed=None, seed=1))
    assert not torch.equal(legacy, seed0)  # runs before val_seed: drawn with the train seed
    result = train(tiny_config(root, tmp_path / "sel", val_samples=None, epochs=1))
    assert result.best["selected_on"] == "val" and "test_accuracy" in result.best


def _norb_like(instances_per_class=3, views=4, classes=2):
    """An ImageDataset with smallNORB's ``info`` extra: instance, elevation, azimuth, lighting."""
    from capsnet.data.dataset import ImageDataset

    rows = [
        (c, inst, v)
        for c in range(classes)
        for inst in range(instances_per_class)
        for v in range(views)
    ]
    labels = torch.tensor([r[0] for r in rows])
    # instance ids as smallNORB's: reused across classes (class 0 and 1 both have instance 0)
    info = torch.tensor([[r[1], 0, 2 * r[2], 0] for r in rows])
    images = torch.arange(len(rows), dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, 2, 2)
    names = [str(c) for c in range(classes)]
    return ImageDataset(images.contiguous(), labels, classes=names, extras={"info": info})


def test_validation_holds_out_whole_instances():
    from capsnet.validation import split_validation

    ds = _norb_like()
    cfg = RunConfig(val_split="instances", val_samples=None, val_seed=3)
    train_ds, val_ds = split_validation(ds, cfg)
    assert len(train_ds) + len(val_ds) == len(ds) == 24

    def pairs(d):  # (class, instance) of every image
        return {(int(y), int(i[0])) for y, i in zip(d.labels, d.info, strict=True)}

    held = pairs(val_ds)
    assert sorted(c for c, _ in held) == [0, 1]  # one instance of every class, all its views
    assert len(val_ds) == 2 * 4 and not held & pairs(train_ds)  # no object on both sides
    again = split_validation(ds, RunConfig(val_split="instances", val_seed=3, seed=7))[1]
    assert torch.equal(again.images, val_ds.images)  # val_seed, not the training seed
    others = {frozenset(pairs(split_validation(ds, RunConfig(val_split="instances",
              val_seed=s))[1])) for s in range(12)}  # fmt: skip
    assert len(others) > 1  # the held-out instances follow val_seed
    capped = split_validation(ds, RunConfig(val_split="instances", val_samples=3, val_seed=3))
    assert len(capped[1]) == 3 and pairs(capped[1]) <= held
    assert len(capped[0]) == 16  # the rest of the held-out objects is not trained on either
    # the old random-image split is unchanged
    plain = split_validation(ds, RunConfig(val_samples=5, val_seed=0))
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(0))
    assert torch.equal(plain[1].images, ds.images[perm[:5].sort().values])


def test_instance_validation_refuses_data_it_cannot_split():
    from capsnet.data.dataset import ImageDataset
    from capsnet.validation import split_validation

    images, labels = torch.zeros(4, 1, 2, 2, dtype=torch.uint8), torch.tensor([0, 1, 0, 1])
    flat = ImageDataset(images, labels, classes=["a", "b"])
    with pytest.raises(ValueError, match="instance id per image"):
        split_validation(flat, RunConfig(val_split="instances"))
    with pytest.raises(
        ValueError, match="needs at least 2 instances of every class; class 0 \\(0\\) has 1"
    ):
        split_validation(_norb_like(instances_per_class=1), RunConfig(val_split="instances"))
    with pytest.raises(ValueError, match="val_split must be one of"):
        RunConfig(val_split="views")
    with pytest.raises(ValueError, match="cannot go with val_samples 0"):
        RunConfig(val_split="instances", val_samples=0)


def test_validation_can_hold_out_several_instances_per_class():
    from capsnet.validation import split_validation

    ds = _norb_like(instances_per_class=4)

    def pairs(d):  # (class, instance) of every image
        return {(int(y), int(i[0])) for y, i in zip(d.labels, d.info, strict=True)}

    one = split_validation(ds, RunConfig(val_split="instances", val_seed=5))[1]
    same = split_validation(ds, RunConfig(val_split="instances", val_seed=5, val_instances=1))[1]
    assert torch.equal(one.images, same.images)  # 1 is the default and draws as before
    gen = torch.Generator().manual_seed(5)  # the pre-val_instances draw, written out
    before = set()
    for c in range(2):
        ids = torch.arange(4)  # instances 0..3 of every class, sorted as unique() gives them
        before.add((c, int(ids[torch.randint(4, (1,), generator=gen)])))
    assert pairs(one) == before
    train_ds, val_ds = split_validation(
        ds, RunConfig(val_split="instances", val_seed=5, val_instances=3)
    )
    held = pairs(val_ds)
    for c in range(2):  # 3 whole objects of every class held out, 1 left to train on
        assert len({i for k, i in held if k == c}) == 3
        assert len({i for k, i in pairs(train_ds) if k == c}) == 1
    assert len(val_ds) == 2 * 3 * 4 and not held & pairs(train_ds)
    with pytest.raises(ValueError, match="val_instances 4 needs at least 5 instances"):
        split_validation(ds, RunConfig(val_split="instances", val_instances=4))
    with pytest.raises(ValueError, match="val_instances must be >= 1"):
        RunConfig(val_split="instances", val_instances=0)
    with pytest.raises(ValueError, match="counts the objects held out by val_split 'instances'"):
        RunConfig(val_instances=2)


def test_snapshots_per_epoch_are_kept_and_load(tmp_path):
    import capsnet
    from capsnet.checkpoint import list_checkpoints
    from capsnet.train import train
    from training_helpers import make_mnist, tiny_config

    root = make_mnist(tmp_path / "data", n_train=64, n_test=40)
    run = train(tiny_config(root, tmp_path / "run", snapshots_per_epoch=2)).run_dir
    snaps = sorted(p.stem for p in run.glob("snapshot-*.safetensors"))
    assert snaps == ["snapshot-2", "snapshot-4", "snapshot-6", "snapshot-8"]  # 4 steps/epoch
    assert all(not t.startswith("snapshot") for t in list_checkpoints(run))  # not resumable
    last = capsnet.load(run, which="last")
    final = capsnet.load(run / "snapshot-8.safetensors")
    for a, b in zip(last.state_dict().values(), final.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_training_records_name_code_machine_and_load(tmp_path):
    import json

    from capsnet.runlog import read_metrics
    from capsnet.train import train
    from training_helpers import make_mnist, tiny_config

    root = make_mnist(tmp_path / "data", n_train=64, n_test=40)
    run = train(tiny_config(root, tmp_path / "run", epochs=1)).run_dir
    start = next(r for r in read_metrics(run) if r["kind"] == "start")
    ev = json.loads((run / "evaluation.json").read_text())
    for env in (start["environment"], ev["environment"]):
        assert {"commit", "capsnet", "torch", "cpu", "threads", "load_average"} <= set(env)
        assert env["device"] == "cpu" and env["seed"] == 0
    assert ev["environment"]["wall_seconds"] > 0 and ev["best"]["selected_on"] == "test"


def test_max_minutes_ends_inside_an_epoch_and_resume_continues(data_root, tmp_path, monkeypatch):
    full = tmp_path / "full"
    train(tiny_config(data_root, full, epochs=2))
    short = tmp_path / "short"
    # 6 ms of training: the first step is the last one. The trainer's clock gains 10 ms a
    # reading, so that holds on any machine (a fast CPU did the real first step in < 6 ms).
    import capsnet.train as train_module

    readings = iter(range(10**9))
    clock = types.SimpleNamespace(perf_counter=lambda: time.perf_counter() + 0.01 * next(readings))
    monkeypatch.setattr(train_module, "time", clock)
    train(tiny_config(data_root, short, epochs=2, max_minutes=1e-4))
    monkeypatch.undo()
    rows = _read_metrics(short)
    (limit,) = [r for r in rows if r["kind"] == "time_limit"]
    assert limit["step"] == 1 and limit["max_minutes"] == 1e-4
    assert limit["train_seconds"] >= 6e-3
    (epoch,) = [r for r in rows if r["kind"] == "epoch"]
    assert epoch["epoch"] == 0.25 and epoch["step"] == 1  # 4 steps per epoch
    assert "test_error" in epoch
    final = json.loads((short / "evaluation.json").read_text())
    assert final["num_examples"] == 40 and final["best"]["epoch"] == 0.25
    # --resume without the limit continues inside the epoch, to the uninterrupted weights
    train(resume_config(short, max_minutes=None), resume=True)
    assert_same_weights(weights(full), weights(short))
    epochs = [r["epoch"] for r in _read_metrics(short) if r["kind"] == "epoch"]
    assert epochs == [0.25, 1, 2]


def test_max_minutes_is_checked():
    with pytest.raises(ValueError, match="max_minutes must be a finite number > 0"):
        RunConfig(model="capsnet", dataset="mnist", max_minutes=0)
    with pytest.raises(ValueError, match="max_minutes"):
        RunConfig(model="capsnet", dataset="mnist", max_minutes=float("inf"))
