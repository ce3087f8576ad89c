"""The experiment commands on two tiny trained runs, then the report page."""

from __future__ import annotations

import pytest

from experiment_helpers import load_json as load


def cli(argv):
    import argparse

    from capsnet import experiment_cli

    parser = argparse.ArgumentParser(prog="capsnet")
    experiment_cli.register_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.handler(args)


@pytest.mark.slow
def test_cli_end_to_end(tiny_runs, capsys):
    _, caps, cnn = tiny_runs
    common = ["--device", "cpu", "--no-progress", "--batch-size", "12"]
    assert (
        cli(
            [
                "attack",
                str(caps),
                "--baseline",
                str(cnn),
                "--epsilons",
                "0",
                "0.1",
                "--methods",
                "fgsm",
                "--targeted",
                "no",
                "--max-examples",
                "12",
                *common,
            ]
        )
        == 0
    )
    rec = load(caps / "experiments" / "attack" / "attack.json")
    assert set(rec["results"]) == {"capsnet", "hinton_cnn", "comparisons"}
    assert [r["comparison"] for r in rec["results"]["comparisons"]] == ["capsnet - hinton_cnn"]
    assert (
        cli(
            [
                "experiment",
                "rotation",
                str(caps),
                "--baseline",
                str(cnn),
                "--values",
                "-20",
                "0",
                "20",
                "--max-examples",
                "12",
                *common,
            ]
        )
        == 0
    )
    assert (
        cli(
            [
                "experiment",
                "reconstruction",
                str(caps),
                "--num-examples",
                "4",
                "--num-perturbed",
                "1",
                *common,
            ]
        )
        == 0
    )
    rec = load(caps / "experiments" / "reconstruction" / "reconstruction.json")
    assert len(rec["results"]["perturbed"][0]["dimension_sensitivity"]) == 4  # class_dim
    assert (
        cli(
            [
                "experiment",
                "routing",
                str(caps),
                "--num-examples",
                "1",
                "--max-examples",
                "12",
                *common,
            ]
        )
        == 0
    )
    assert (
        cli(
            [
                "experiment",
                "equivariance",
                str(caps),
                "--baseline",
                str(cnn),
                "--translations",
                "2",
                "--rotations",
                "10",
                "--max-examples",
                "24",
                *common,
            ]
        )
        == 0
    )
    assert cli(["report", str(caps)]) == 0
    page = (caps / "report.html").read_text()
    for title in (
        "Adversarial robustness",
        "Rotation sweep",
        "Reconstructions",
        "Routing diagnostics",
        "Equivariance probe",
        "Training",
    ):
        assert title in page
    # user errors are one line on stderr, exit status 1
    assert cli(["experiment", "routing", str(cnn), *common]) == 1
    assert "routing" in capsys.readouterr().err
    assert cli(["attack", str(caps / "missing"), *common]) == 1
