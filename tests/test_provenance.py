"""capsnet.provenance: what every result records about its code and machine."""

from __future__ import annotations

import subprocess
from pathlib import Path

import torch

from capsnet import provenance
from capsnet.experiments import make_record

ROOT = Path(__file__).resolve().parents[1]


def test_environment_names_code_versions_machine_and_load():
    env = provenance.environment("cpu", seeds=[0, 1], wall_seconds=1.5)
    if (ROOT / ".git").exists():
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        assert env["commit"] == head and isinstance(env["dirty"], bool)
    assert env["torch"] == torch.__version__ and env["device"] == "cpu" and env["gpu"] is None
    assert env["cpu"] and env["cpu"] != "unknown"
    assert env["threads"] == torch.get_num_threads()
    assert len(env["load_average"]) == 3
    assert (env["seeds"], env["wall_seconds"]) == ([0, 1], 1.5)


def test_every_experiment_record_carries_the_environment():
    record = make_record(
        "x", "X", settings={}, models={}, results={}, figures=[], device="cpu", started=0.0
    )
    env = record["environment"]
    assert env["device"] == "cpu" and env["wall_seconds"] > 0 and "commit" in env
