"""The benchmark suite still runs: ``python benchmarks/run.py --smoke`` (tiny sizes, no timing).

Speed is never asserted here; this only proves that every kind of benchmark case builds,
that capsnet and the straightforward reference implementation agree, and that the report
is written.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_benchmark_smoke_mode(tmp_path):
    out = tmp_path / "RESULTS.md"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--smoke", "--output", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = out.read_text()
    for section in ("Routing alone", "Training step", "Inference"):
        assert section in text
    assert "smoke_matrix" in text and "smoke_capsnet" in text and "smoke_conv_em" in text


def test_models_throughput_measures_a_model():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import models_throughput
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    train, infer, params = models_throughput.measure("hinton_cnn", {}, batch=4, steps=1)
    assert train > 0 and infer > 0
    assert params == 3_274_634
    assert {name for name, _, _ in models_throughput.CASES} == {
        "capsnet", "matrix_capsnet", "sabour_cnn", "hinton_cnn"
    }  # fmt: skip
