"""capsnet.report: one self-contained HTML page from a run directory and its experiments."""

from __future__ import annotations

import argparse
import json
import re

import pytest

from capsnet import experiment_cli, experiments, report
from test_experiments import FakeDataset, TinyCNN


def fake_run(tmp_path):
    run = tmp_path / "run-a"
    run.mkdir()
    (run / "config.json").write_text(
        json.dumps({"model": "capsnet", "dataset": "mnist", "lr": 1e-3})
    )
    rows = [{"kind": "start", "step": 0, "model": "capsnet"}]
    for epoch in (1, 2, 3):
        rows.append(
            {
                "kind": "train",
                "step": 10 * epoch,
                "epoch": epoch - 0.5,
                "loss": 0.5 / epoch,
                "accuracy": 0.8 + 0.05 * epoch,
            }
        )
        rows.append(
            {
                "kind": "epoch",
                "epoch": epoch,
                "step": 10 * epoch,
                "train_loss": 0.4 / epoch,
                "train_accuracy": 0.8,
                "test_loss": 0.3 / epoch,
                "test_accuracy": 0.9 + 0.01 * epoch,
                "test_error": 0.1 - 0.01 * epoch,
            }
        )
    with open(run / "metrics.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        f.write("{not json\n")  # a torn last line must not break the report
    (run / "evaluation.json").write_text(
        json.dumps(
            {"split": "test", "accuracy": 0.93, "error": 0.07, "confusion": [[1, 0], [0, 1]]}
        )
    )
    return run


def test_report_is_self_contained(tmp_path):
    run = fake_run(tmp_path)
    experiments.transform_sweep(
        {"cnn": TinyCNN()},
        FakeDataset(6),
        run / "experiments" / "rotation_sweep",
        kind="rotation",
        values=[-10, 0, 10],
    )
    path = report.build_report(run)
    assert path == run / "report.html"
    page = path.read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert "Rotation sweep" in page and "Training" in page and "Final evaluation" in page
    images = re.findall(r'<img[^>]*src="([^"]+)"', page)
    assert len(images) == 2  # training curves + the sweep
    assert all(src.startswith("data:image/png;base64,") for src in images)
    assert not re.search(r'(src|href)="(https?:|file:|/)', page)  # nothing external
    assert "0.9300" in page  # the final accuracy
    assert "<table>" in page and "report_training_curves.png" not in page.split("<body>")[0]


def test_report_without_experiments_says_how_to_run_them(tmp_path):
    run = fake_run(tmp_path)
    out = report.build_report(run, output=tmp_path / "elsewhere" / "r.html")
    page = out.read_text()
    assert "capsnet attack" in page
    assert not (run / "report.html").exists()


def test_collect_records_skips_foreign_json(tmp_path):
    run = fake_run(tmp_path)
    (run / "experiments" / "x").mkdir(parents=True)
    (run / "experiments" / "x" / "other.json").write_text('{"a": 1}')
    (run / "experiments" / "x" / "broken.json").write_text("{")
    experiments.write_json(
        run / "experiments" / "x" / "ok.json",
        experiments.make_record("demo", "Demo", settings={}, models={}, results={}, figures=[]),
    )
    found = report.collect_records(run)
    assert [r["experiment"] for _, r in found] == ["demo"]
    page = report.build_report(run).read_text()
    assert "Demo" in page


def test_report_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        report.build_report(tmp_path / "missing")


def test_cli_report_subcommand(tmp_path, capsys):
    run = fake_run(tmp_path)
    parser = argparse.ArgumentParser(prog="capsnet")
    sub = parser.add_subparsers(dest="command")
    handlers = experiment_cli.register_cli(sub)
    assert set(handlers) == {"attack", "experiment", "report"}
    args = parser.parse_args(["report", str(run)])
    assert args.handler(args) == 0
    assert "report written to" in capsys.readouterr().out
    assert (run / "report.html").is_file()
    args = parser.parse_args(["report", str(tmp_path / "nope")])
    assert handlers["report"](args) == 1
    assert "does not exist" in capsys.readouterr().err
    args = parser.parse_args(["experiment", "rotation", str(run), "--values", "-10", "0,10"])
    assert args.values == [-10.0, 0.0, 10.0] and args.kind == "rotation"
    with pytest.raises(SystemExit):
        parser.parse_args(["attack", str(run), "--epsilons", "a,b"])


def test_report_of_an_experiment_folder(tmp_path):
    """A protocol's output folder (records at its top, no training logs) is reportable too."""
    folder = tmp_path / "viewpoint_azimuth"
    experiments.write_json(
        folder / "viewpoint_azimuth.json",
        experiments.make_record(
            "viewpoint_azimuth", "Novel viewpoints (azimuth)", settings={}, models={},
            results={}, figures=[], summary=[{"model": "capsules", "novel error": 0.13}],
        ),
    )  # fmt: skip
    page = report.build_report(folder).read_text()
    assert "Novel viewpoints (azimuth)" in page and "0.1300" in page
    assert 'id="training"' not in page  # no training section for a folder without a run
