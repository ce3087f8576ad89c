"""capsnet.report: one self-contained HTML page from a run directory and its experiments."""

from __future__ import annotations

import argparse
import base64
import json
import re

import pytest

from capsnet import experiment_cli, experiments, report
from experiment_helpers import FakeDataset, TinyCNN


def fake_run(tmp_path):
    run = tmp_path / "run-a"
    run.mkdir()
    (run / "config.json").write_text(
        json.dumps({"model": "capsnet", "dataset": "mnist", "lr": 1e-3})
    )
    rows = [
        {
            "kind": "start",
            "step": 0,
            "model": "capsnet",
            "parameters": 1234,
            "steps_per_epoch": 10,
            "world_size": 2,
            "command": "capsnet train --recipe quickstart --epochs 3",
        }
    ]
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
            {
                "split": "test",
                "accuracy": 0.93,
                "error": 0.07,
                "confusion": [[1, 0], [0, 1]],
                "per_class_accuracy": [0.875, 0.985],
                "classes": ["zero", "one"],
            }
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
    assert "<table" in page and "report_training_curves.png" not in page.split("<body>")[0]
    # every figure is numbered and says what it shows and which command made it
    captions = re.findall(r"<figcaption>(.*?)</figcaption>", page, re.S)
    assert len(captions) == 2
    assert (
        "Figure 1." in captions[0] and "capsnet train --recipe quickstart --epochs 3" in captions[0]
    )
    assert "Figure 2." in captions[1] and "rotation applied to the test images" in captions[1]
    assert "Made by <code>" in captions[1]
    # tables scroll sideways in a narrow window instead of widening the page
    assert page.count("<table") == page.count('<div class="scroll"><table') + page.count(
        "<td><table"
    )
    assert "2 ranks" in page and "per epoch (global batch)" in page
    assert "0.8750" in page and "zero" in page  # per-class accuracy


def test_report_without_experiments_says_how_to_run_them(tmp_path):
    run = fake_run(tmp_path)
    out = report.build_report(run, output=tmp_path / "elsewhere" / "r.html")
    page = out.read_text()
    assert "capsnet experiment attack" in page
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


def _png(path, width=40, height=30):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(width / 10, height / 10), dpi=10)
    fig.savefig(path)
    plt.close(fig)
    return path.name


def test_figure_series_share_one_captioned_gallery_and_sections_follow_the_docs(tmp_path):
    run = fake_run(tmp_path)
    routing = run / "experiments" / "routing"
    routing.mkdir(parents=True)
    names = [
        _png(routing / name)
        for name in ("couplings_0.png", "vote_distances_0.png", "couplings_1.png")
    ]
    record = experiments.make_record(
        "routing", "Routing diagnostics", settings={"nested": {"a": 1, "b": [1, 2]}},
        models={"capsnet": {"class": "CapsNet", "parameters": 10}}, results={},
        figures=[*names, "gone_0.png"], summary=[{"iteration": 1, "true_assignment": 0.5}],
    )  # fmt: skip
    record["created"] = "2001-01-01T00:00:00+00:00"  # older than the attack record below
    experiments.write_json(routing / "routing.json", record)
    attack = experiments.make_record(
        "attack", "Adversarial robustness", settings={}, models={}, results={}, figures=[]
    )
    attack["created"] = "2002-01-01T00:00:00+00:00"
    experiments.write_json(run / "experiments" / "attack_model_loss" / "attack.json", attack)
    page = report.build_report(run).read_text()
    # docs order (attack first), whatever the creation times; nav names the folders
    assert page.index("Adversarial robustness") < page.index("Routing diagnostics")
    assert ">attack_model_loss</a>" in page
    figures = re.findall(r"<figure>(.*?)</figure>", page, re.S)
    assert len(figures) == 3  # curves, couplings_0 + couplings_1, vote_distances_0
    couplings = next(f for f in figures if "couplings_0.png, couplings_1.png" in f)
    assert couplings.count("<img") == 2 and 'class="gallery"' in couplings
    assert "flex-basis" in couplings and "max-width: 40px" in couplings  # never upscaled
    assert "Coupling coefficients" in couplings
    assert "missing" in page and "gone_0.png" in page  # a lost file is named, not hidden
    assert '<table class="kv"><tbody><tr><td>a</td>' in page  # nested settings as a table


def test_report_of_an_old_run_without_a_recorded_command(tmp_path):
    run = fake_run(tmp_path)
    rows = [r for r in report.read_metrics(run / "metrics.jsonl") if r["kind"] != "start"]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "config.json").write_text(json.dumps({"model": "capsnet", "recipe": "quickstart"}))
    page = report.build_report(run).read_text()
    assert "capsnet train --recipe quickstart ..." in page


def test_capsnet_command_has_the_experiment_subcommands(tmp_path, capsys):
    """`capsnet attack|experiment|report` are reachable from the installed `capsnet` entry
    point (capsnet.cli.main), not only from capsnet.experiment_cli."""
    from capsnet import cli

    run = fake_run(tmp_path)
    assert cli.main(["report", str(run)]) == 0
    assert "report written to" in capsys.readouterr().out
    for argv in (["attack", "--help"], ["experiment", "routing", "--help"]):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        assert exit_info.value.code == 0
        assert "--num-threads" in capsys.readouterr().out


def test_hostile_record_fields_are_escaped(tmp_path):
    """Every record field inserted into the page is HTML-escaped: no script runs, no
    attribute is broken out of, and figure names cannot reach outside the record folder."""
    run = fake_run(tmp_path)
    folder = run / "experiments" / "attack"
    folder.mkdir(parents=True)
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"\x89PNG\r\n\x1a\nSECRET-BYTES")
    record = experiments.make_record(
        "attack", 'Robust "quoted" <b>title</b>', settings={"<script>k": "<script>v"},
        models={"<script>m": {"class": "<script>c", "run_dir": "<script>r"}},
        results={}, figures=["x<script>.png", "../../../secret.png"],
        summary=[{"<script>col": "<script>alert(2)</script>", "n": 1}],
        notes=["<script>alert(3)</script>"],
    )  # fmt: skip
    record["created"] = "<script>alert(1)</script>"
    record["command"] = "capsnet <script>"
    record["figures"] = ["x<script>.png", "../../../secret.png"]
    experiments.write_json(folder / "a<b.json", record)
    page = report.build_report(run).read_text()
    assert "<script" not in page.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "Robust &quot;quoted&quot; &lt;b&gt;title&lt;/b&gt;" in page
    assert "a&lt;b.json" in page
    assert base64.b64encode(secret.read_bytes()).decode() not in page
    assert "../../../secret.png skipped" in page
