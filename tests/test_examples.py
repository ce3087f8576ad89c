"""The README's Python example (examples/api_tour.py) runs as shipped."""

import runpy
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_api_tour_runs(capsys):
    runpy.run_path(str(EXAMPLES / "api_tour.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "dynamic routing: (8, 10, 16)" in out
    assert "matrix capsnet scores: (16, 10)" in out
