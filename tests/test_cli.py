"""The `capsnet` command: train -> evaluate -> resume end to end on tiny MNIST files, and
clear errors for bad configuration."""

import json
import subprocess
import sys

import pytest

from capsnet.cli import main
from training_helpers import make_mnist, tiny_flags


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_mnist(tmp_path_factory.mktemp("data"))


def test_train_evaluate_resume_end_to_end(data_root, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *tiny_flags(data_root, run)]) == 0
    out = capsys.readouterr().out
    assert "epoch 2/2" in out and f"run saved in {run}" in out
    assert "capsnet evaluate" in out

    assert main(["evaluate", str(run), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "confusion" in out and "error" in out
    record = json.loads((run / "evaluation_best_test.json").read_text())
    assert record["num_examples"] == 40 and record["model"] == "capsnet"
    assert len(record["per_class_accuracy"]) == 10 and len(record["mean_scores"]) == 10
    assert record["split"] == "test"

    # Another dataset (the run's data options do not carry over): 12 images as .npz.
    import numpy as np

    from training_helpers import synthetic_digits

    x, y = synthetic_digits(12, seed=5)
    np.savez(tmp_path / "other.npz", x_test=x, y_test=y)
    argv = ["evaluate", str(run), "--dataset", f"npz:{tmp_path / 'other.npz'}", "--no-progress"]
    assert main([*argv, "--output", str(tmp_path / "other.json")]) == 0
    other = json.loads((tmp_path / "other.json").read_text())
    assert other["num_examples"] == 12 and other["dataset"].startswith("npz:")

    out_file = tmp_path / "train_eval.json"
    argv = ["evaluate", str(run / "last.safetensors"), "--split", "train", "--no-progress"]
    assert main([*argv, "--output", str(out_file)]) == 0
    assert json.loads(out_file.read_text())["num_examples"] == 64
    capsys.readouterr()

    # Continue the finished run for one more epoch.
    assert main(["train", "--resume", str(run), "--epochs", "3", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "resuming" in out and "epoch 3/3" in out
    assert json.loads((run / "last.json").read_text())["epoch"] == 3
    assert json.loads((run / "config.json").read_text())["epochs"] == 2  # the original config


def test_resume_rejects_changes(data_root, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *tiny_flags(data_root, run), "--epochs", "1"]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--lr", "0.1"]) == 2
    err = capsys.readouterr().err
    assert "lr cannot change" in err and "epochs" in err


def test_resume_a_recipe_run_with_more_epochs(data_root, tmp_path, capsys):
    """A run made with --recipe resumes with only --resume (and changeable flags): the
    recipe name in its config.json is not compared with the absent --recipe."""
    run = tmp_path / "run"
    assert main(["train", *tiny_flags(data_root, run), "--epochs", "1"]) == 0
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "recipe": "quickstart"}))
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 0
    assert "epoch 2/2" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "capsnt"], "Did you mean 'capsnet'"),
        (["--dataset", "mnsit"], "Available"),
        (["--model-kwarg", "routings=3"], "Valid arguments: iterations"),
        (["--model", "sabour_cnn", "--iterations", "2"], "not a capsule model"),
        (["--recipe", "nope"], "Available recipes: "),
        (["--epochs", "0"], "epochs must be >= 1"),
        (["--model-kwarg", "num_classes=3"], "set from the dataset"),
    ],
)
def test_config_errors_list_valid_choices(argv, message, capsys):
    assert main(["train", "--dry-run", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("capsnet: error: ") and message in err


def test_unknown_flag_and_bad_choice(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--epoch", "3"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit):
        main(["train", "--optimizer", "lamb"])
    err = capsys.readouterr().err
    assert "invalid choice: 'lamb'" in err and "adam" in err


def test_dry_run_merges_recipe_and_flags(capsys):
    argv = ["train", "--recipe", "quickstart", "--epochs", "1", "--model-kwarg", "primary_types=4"]
    assert main([*argv, "--dry-run"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["epochs"] == 1 and cfg["recipe"] == "quickstart"
    assert cfg["model_kwargs"] == {"conv_channels": 64, "primary_types": 4, "reconstruction": True}


def test_recipes_models_datasets_lists(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert "quickstart" in out and "capsnet_mnist" in out
    assert main(["recipes", "quickstart"]) == 0
    assert 'model = "capsnet"' in capsys.readouterr().out
    assert main(["models"]) == 0
    assert "matrix_capsnet" in capsys.readouterr().out
    assert main(["datasets"]) == 0
    assert "smallnorb" in capsys.readouterr().out


def test_python_dash_m_entry_point():
    proc = subprocess.run(
        [sys.executable, "-m", "capsnet", "recipes"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "quickstart" in proc.stdout


def test_experiment_attack_and_the_former_attack_command(data_root, tmp_path, capsys):
    """`capsnet experiment attack` writes RUN/experiments/attack/; the former `capsnet
    attack` runs the same code after a one-line note, and so does the former --out."""
    run = tmp_path / "run"
    assert main(["train", *tiny_flags(data_root, run), "--epochs", "1"]) == 0
    capsys.readouterr()
    flags = ["--epsilons", "0,0.1", "--methods", "fgsm", "--targeted", "no"]
    flags += ["--max-examples", "8", "--batch-size", "8", "--device", "cpu", "--no-progress"]
    assert main(["experiment", "attack", str(run), *flags]) == 0
    out, err = capsys.readouterr()
    record = json.loads((run / "experiments" / "attack" / "attack.json").read_text())
    assert record["experiment"] == "attack" and str(run / "experiments" / "attack") in out
    assert "note" not in err

    assert main(["attack", str(run), *flags, "--out", str(tmp_path / "old")]) == 0
    out, err = capsys.readouterr()
    old = json.loads((tmp_path / "old" / "attack.json").read_text())
    assert old["summary"] == record["summary"]
    assert err.splitlines() == [
        "capsnet: note: --out is now --output-dir",
        "capsnet: note: `capsnet attack` is now `capsnet experiment attack`",
    ]
    new = tmp_path / "new"
    assert main(["experiment", "attack", str(run), *flags, "--output-dir", str(new)]) == 0
    assert json.loads((new / "attack.json").read_text())["summary"] == record["summary"]
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    "argv",
    [
        ["experiment", "routing", "RUN"],
        ["experiment", "attack", "RUN"],
        ["attack", "RUN"],
        ["experiment", "viewpoint"],
        ["experiment", "affnist-protocol"],
    ],
)
def test_one_output_folder_flag(argv, capsys):
    from capsnet.cli import build_parser

    parser = build_parser()
    assert parser.parse_args([*argv, "--output-dir", "D"]).output_dir == "D"
    assert capsys.readouterr().err == ""
    assert parser.parse_args([*argv, "--out", "E"]).output_dir == "E"  # the former name
    assert capsys.readouterr().err == "capsnet: note: --out is now --output-dir\n"
    assert parser.parse_args(argv).output_dir is None
    with pytest.raises(SystemExit):
        parser.parse_args([*argv, "--help"])
    help_text = capsys.readouterr().out
    assert "--output-dir DIR" in help_text and "--out " not in help_text


def test_single_file_commands_take_output(capsys):
    from capsnet.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["evaluate", "RUN", "--output", "r.json"]).output == "r.json"
    assert parser.parse_args(["report", "RUN", "--output", "r.html"]).output == "r.html"
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    assert "--output-dir DIR" in capsys.readouterr().out


def test_experiment_attack_pools_seeds(data_root, tmp_path, capsys):
    """Several runs per model: one attack per seed (seed-S/), then a pooled record whose
    rates are the means over seeds of the per-seed rates, with a paired comparison row."""
    runs = []
    for seed in (0, 1):
        run = tmp_path / f"caps-{seed}"
        flags = [*tiny_flags(data_root, run), "--epochs", "1", "--seed", str(seed)]
        assert main(["train", *flags]) == 0
        runs.append(str(run))
    capsys.readouterr()
    flags = ["--epsilons", "0,0.1", "--methods", "fgsm", "--targeted", "no"]
    flags += ["--max-examples", "8", "--batch-size", "8", "--device", "cpu", "--no-progress"]
    out_dir = tmp_path / "pooled"
    argv = ["experiment", "attack", runs[0], runs[1], "--baseline", runs[1], runs[0]]
    assert main([*argv, *flags, "--output-dir", str(out_dir)]) == 0
    out = capsys.readouterr().out
    pooled = json.loads((out_dir / "attack_seeds.json").read_text())
    per_seed = [json.loads((out_dir / f"seed-{s}" / "attack.json").read_text()) for s in (0, 1)]
    labels = [k for k in pooled["results"] if k not in ("comparisons", "per_seed")]
    assert len(labels) == 2 and pooled["settings"]["seeds"] == 2
    first = pooled["results"][labels[0]][0]
    means = [
        (per_seed[0]["results"][labels[0]][0]["accuracy"][k]
         + per_seed[1]["results"][labels[0]][0]["accuracy"][k]) / 2
        for k in range(2)
    ]  # fmt: skip
    assert first["accuracy"] == pytest.approx(means)
    # the baseline is the same two models in the other order: pooled, no difference
    (row,) = pooled["results"]["comparisons"]
    assert row["eps=0"].startswith("+0.0 [") and "p=1" in row["eps=0"]
    assert "attack_seeds.json" in out and "accuracy %" in out
    assert main(["experiment", "attack", runs[0], runs[1], "--baseline", runs[0], *flags]) != 0
    assert "one run per seed" in capsys.readouterr().err


def test_experiment_attack_matched_reads_the_snapshots_of_a_protocol_record(
    data_root, tmp_path, capsys
):
    """--matched RECORD attacks the snapshots a viewpoint / affNIST record names, per model
    and seed, under RECORD's folder runs/LABEL/seed-S/."""
    root = tmp_path / "vp"
    per_seed: dict[str, list[dict]] = {"capsules": [], "cnn": []}
    for label in per_seed:
        for seed in (0, 1):
            run = root / "runs" / label / f"seed-{seed}"
            flags = [*tiny_flags(data_root, run), "--epochs", "1", "--seed", str(seed)]
            assert main(["train", *flags]) == 0
            per_seed[label].append({"seed": seed, "snapshot": "last.safetensors"})
    record = {"results": {"models": {k: {"per_seed": v} for k, v in per_seed.items()}}}
    (root / "viewpoint_azimuth.json").write_text(json.dumps(record))
    capsys.readouterr()
    flags = ["--epsilons", "0,0.1", "--methods", "fgsm", "--targeted", "no"]
    flags += ["--max-examples", "8", "--batch-size", "8", "--device", "cpu", "--no-progress"]
    out_dir = tmp_path / "atk"
    argv = ["experiment", "attack", "--matched", str(root / "viewpoint_azimuth.json"), *flags]
    assert main([*argv, "--output-dir", str(out_dir)]) == 0
    pooled = json.loads((out_dir / "attack_seeds.json").read_text())
    assert pooled["settings"]["seeds"] == 2
    assert [r["comparison"] for r in pooled["results"]["comparisons"]] == ["capsules - cnn"]
    assert pooled["summary"][0]["model"] == "capsules"
    capsys.readouterr()
    assert main([*argv, str(root / "runs" / "cnn" / "seed-0")]) != 0
    assert "not both" in capsys.readouterr().err
    (root / "bad.json").write_text("{}")
    assert main(["experiment", "attack", "--matched", str(root / "bad.json"), *flags]) != 0
    assert "not a matched-protocol record" in capsys.readouterr().err
