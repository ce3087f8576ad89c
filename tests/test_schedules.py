"""capsnet.schedules: the spread-loss margin and learning-rate schedules."""

import math

import pytest

from capsnet import schedules


def test_spread_margin_schedule():
    assert schedules.spread_margin(0) == pytest.approx(0.2)
    assert schedules.spread_margin(3) == pytest.approx(0.5)
    assert schedules.spread_margin(2.5) == pytest.approx(0.45)
    assert schedules.spread_margin(50) == pytest.approx(0.9)
    assert schedules.spread_margin(1, start=0.5, stop=0.6, step_per_epoch=0.2) == 0.6
    with pytest.raises(ValueError, match="epoch"):
        schedules.spread_margin(-1)


def test_learning_rate_schedules():
    f = schedules.lr_factor("exponential", 10_000, decay_rate=0.96, decay_steps=2000)  # Sabour
    assert f(0) == 1.0 and math.isclose(f(2000), 0.96) and math.isclose(f(1000), 0.96**0.5)
    f = schedules.lr_factor("exponential", 10**6, decay_steps=20_000, staircase=True)
    assert f(19_999) == 1.0 and math.isclose(f(20_000), 0.96) and math.isclose(f(45_000), 0.96**2)
    f = schedules.lr_factor("cosine", 100)
    assert f(0) == 1.0 and math.isclose(f(50), 0.5) and abs(f(100)) < 1e-12 and abs(f(200)) < 1e-12
    assert schedules.lr_factor("constant", 10)(7) == 1.0
    with pytest.raises(ValueError, match="'constant', 'exponential', 'cosine'"):
        schedules.lr_factor("linear", 10)


def test_schedules_import_nothing_from_capsnet():
    """capsnet.functional re-exports spread_margin from here, so no cycle is possible."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(schedules))
    imported = [
        n.module if isinstance(n, ast.ImportFrom) else a.name
        for n in ast.walk(tree)
        if isinstance(n, ast.Import | ast.ImportFrom)
        for a in n.names
    ]
    assert not [m for m in imported if m and m.startswith("capsnet")]
