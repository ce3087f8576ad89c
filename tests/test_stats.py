"""capsnet.stats: bootstrap intervals, paired comparisons, seeded subsets."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from capsnet import stats


def test_bootstrap_error_point_interval_and_determinism():
    correct = np.ones(1000, dtype=bool)
    correct[:50] = False  # 5 % error
    est = stats.bootstrap_error(correct, resamples=500, seed=1)
    assert est.error == pytest.approx(5.0)
    assert est.low < 5.0 < est.high
    # binomial standard error sqrt(p(1-p)/n) = 0.69 points: the 95 % interval is ~ +-1.35
    assert 0.9 < (est.high - est.low) / 2 < 1.8
    assert stats.bootstrap_error(correct, resamples=500, seed=1) == est
    assert (est.images, est.seeds) == (1000, 1)
    assert "5.00 %" in str(est)


def test_more_images_narrow_the_interval_and_disagreeing_seeds_widen_it():
    rng = np.random.default_rng(0)
    small = rng.random(200) > 0.1
    large = rng.random(5000) > 0.1
    w_small = (
        stats.bootstrap_error(small, resamples=400).high
        - stats.bootstrap_error(small, resamples=400).low
    )
    w_large = (
        stats.bootstrap_error(large, resamples=400).high
        - stats.bootstrap_error(large, resamples=400).low
    )
    assert w_large < w_small / 2
    same = np.stack([large, large, large])
    spread = np.stack([rng.random(5000) > p for p in (0.05, 0.1, 0.2)])
    w_same = stats.bootstrap_error(same, resamples=400)
    w_spread = stats.bootstrap_error(spread, resamples=400)
    assert (w_spread.high - w_spread.low) > 3 * (w_same.high - w_same.low)
    assert w_spread.seeds == 3


def test_mcnemar_matches_the_binomial_test():
    for a, b in [(3, 12), (10, 10), (0, 7), (25, 40)]:
        expected = sps.binomtest(min(a, b), a + b, 0.5).pvalue
        assert stats.mcnemar_exact(a, b) == pytest.approx(expected)
    assert stats.mcnemar_exact(0, 0) == 1.0
    # thousands of discordant images (2^n overflows a float): still exact, no error
    assert stats.mcnemar_exact(900, 1100) == pytest.approx(sps.binomtest(900, 2000).pvalue)
    assert stats.mcnemar_exact(3000, 3000) == pytest.approx(1.0)


def test_paired_comparison():
    rng = np.random.default_rng(3)
    b = rng.random(2000) > 0.2  # 20 % error
    a = b.copy()
    fixed = np.flatnonzero(~b)[:200]
    a[fixed] = True  # A gets 200 of B's errors right: 10 points better
    cmp = stats.paired_comparison(a, b, resamples=500)
    assert cmp.difference == pytest.approx(-10.0)
    assert cmp.high < 0 and cmp.only_a_wrong == 0 and cmp.only_b_wrong == 200
    assert cmp.p_value < 1e-10
    same = stats.paired_comparison(b, b, resamples=100)
    assert same.difference == 0 and same.p_value == 1.0
    with pytest.raises(ValueError, match="same seeds and images"):
        stats.paired_comparison(a[:10], b)


def test_seeded_subset():
    s = stats.seeded_subset(10_000, 500, seed=4)
    assert len(s) == 500 and len(set(s.tolist())) == 500 and (np.diff(s) > 0).all()
    assert (s == stats.seeded_subset(10_000, 500, seed=4)).all()
    assert not (s == stats.seeded_subset(10_000, 500, seed=5)).all()
    assert s.max() > 5000  # not "the first N"
    assert (stats.seeded_subset(7, None) == np.arange(7)).all()
    assert (stats.seeded_subset(7, 100) == np.arange(7)).all()
    with pytest.raises(ValueError, match="size must be >= 1"):
        stats.seeded_subset(7, 0)


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="booleans"):
        stats.bootstrap_error([0.5, 1.0])
    with pytest.raises(ValueError, match="shape"):
        stats.bootstrap_error(np.ones((2, 2, 2), dtype=bool))


def test_format_interval_table():
    text = stats.format_interval_table([{"model": "a", "error": 1.5}], ["model", "error"])
    assert text.splitlines()[0].split() == ["model", "error"]
    assert text.splitlines()[2].split() == ["a", "1.5"]


def test_relative_reduction():
    rng = np.random.default_rng(5)
    b = rng.random(4000) > 0.2
    a = b.copy()
    a[np.flatnonzero(~b)[: int((~b).sum() * 0.3)]] = True  # A avoids 30 % of B's errors
    out = stats.relative_reduction(a, b, resamples=300)
    assert out["reduction"] == pytest.approx(0.3, abs=0.005)
    assert out["low"] < 0.3 < out["high"] and out["high"] - out["low"] < 0.1
