"""Statistics every reported number stands on: intervals, paired tests, seeded subsets.

* :func:`bootstrap_error` — an error rate with a 95 % percentile-bootstrap interval,
  resampling test images and, when several training seeds were run, seeds too (a two-level
  bootstrap: seeds with replacement, then images with replacement, the same images for
  every seed, since all seeds are evaluated on one test set).
* :func:`paired_comparison` — two models on the same images: the error difference with a
  paired bootstrap interval and an exact McNemar test (two-sided binomial test on the
  images where exactly one model is wrong).
* :func:`seeded_subset` — a seeded random sample of test indices (never "the first N").

Inputs are per-image correctness arrays (``True`` = correct), ``(N,)`` for one seed or
``(S, N)`` for S seeds on the same N images. Plain NumPy; deterministic for a given
``seed``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = [
    "Estimate",
    "Comparison",
    "bootstrap_error",
    "paired_comparison",
    "mcnemar_exact",
    "seeded_subset",
    "relative_reduction",
    "format_interval_table",
]

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Estimate:
    """An error rate (in %) with its bootstrap interval, and what it was computed from."""

    error: float
    low: float
    high: float
    images: int
    seeds: int
    confidence: float = CONFIDENCE

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.error:.2f} % [{self.low:.2f}, {self.high:.2f}]"


@dataclass(frozen=True)
class Comparison:
    """Model A minus model B on the same images: error difference (points) and tests."""

    difference: float
    low: float
    high: float
    only_a_wrong: int
    only_b_wrong: int
    p_value: float
    images: int
    seeds: int
    confidence: float = CONFIDENCE

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        return (
            f"{self.difference:+.2f} points [{self.low:+.2f}, {self.high:+.2f}], "
            f"McNemar p = {self.p_value:.3g}"
        )


def _as_correct(correct: Any, name: str = "correct") -> np.ndarray:
    arr = np.asarray(correct)
    if arr.dtype != bool:
        if not np.isin(arr, (0, 1)).all():
            raise ValueError(f"{name} must hold booleans (or 0/1) per image")
        arr = arr.astype(bool)
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise ValueError(
            f"{name} must have shape (N,) or (seeds, N) with N >= 1, got {tuple(arr.shape)}"
        )
    return arr


def _resample_means(values: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Bootstrap means of ``values (S, N)``: seeds, then images, with replacement."""
    s, n = values.shape
    out = np.empty(resamples)
    for r in range(resamples):
        seeds = rng.integers(0, s, size=s) if s > 1 else np.zeros(1, dtype=int)
        images = rng.integers(0, n, size=n)
        out[r] = values[np.ix_(seeds, images)].mean()
    return out


def _interval(samples: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1.0 - confidence) / 2.0
    return float(np.quantile(samples, tail)), float(np.quantile(samples, 1.0 - tail))


def bootstrap_error(
    correct: Any, *, resamples: int = 2000, seed: int = 0, confidence: float = CONFIDENCE
) -> Estimate:
    """Error rate in % with a percentile-bootstrap interval over images (and seeds).

    Args:
        correct: per-image correctness, ``(N,)`` or ``(S, N)`` for S training seeds
            evaluated on the same N images.
        resamples: bootstrap resamples.
        seed: of the resampling (the result is deterministic).
        confidence: of the interval (0.95).
    """
    arr = _as_correct(correct)
    errors = 100.0 * (~arr).astype(float)
    samples = _resample_means(errors, resamples, np.random.default_rng(seed))
    low, high = _interval(samples, confidence)
    return Estimate(float(errors.mean()), low, high, arr.shape[1], arr.shape[0], confidence)


def mcnemar_exact(only_a_wrong: int, only_b_wrong: int) -> float:
    """Two-sided exact McNemar p-value: a binomial(n, 1/2) test on the discordant images."""
    n = only_a_wrong + only_b_wrong
    if n == 0:
        return 1.0
    k = min(only_a_wrong, only_b_wrong)
    tail = sum(math.comb(n, i) for i in range(k + 1))  # an exact integer
    # P(X <= k) = tail / 2^n, in log space: 2^n overflows a float beyond n = 1023
    return float(min(1.0, 2.0 * math.exp(math.log(tail) - n * math.log(2.0))))


def paired_comparison(
    correct_a: Any,
    correct_b: Any,
    *,
    resamples: int = 2000,
    seed: int = 0,
    confidence: float = CONFIDENCE,
) -> Comparison:
    """Error of A minus error of B, in points, on the same images.

    The interval resamples images (and seeds, pairing seed s of A with seed s of B) with
    the same indices for both models; the McNemar counts pool every seed's images.
    """
    a, b = _as_correct(correct_a, "correct_a"), _as_correct(correct_b, "correct_b")
    if a.shape != b.shape:
        raise ValueError(
            f"correct_a and correct_b must cover the same seeds and images, got "
            f"{tuple(a.shape)} and {tuple(b.shape)}"
        )
    diff = 100.0 * ((~a).astype(float) - (~b).astype(float))
    samples = _resample_means(diff, resamples, np.random.default_rng(seed))
    low, high = _interval(samples, confidence)
    only_a = int((~a & b).sum())
    only_b = int((a & ~b).sum())
    return Comparison(
        float(diff.mean()),
        low,
        high,
        only_a,
        only_b,
        mcnemar_exact(only_a, only_b),
        a.shape[1],
        a.shape[0],
        confidence,
    )


def relative_reduction(
    correct_a: Any,
    correct_b: Any,
    *,
    resamples: int = 2000,
    seed: int = 0,
    confidence: float = CONFIDENCE,
) -> dict[str, float]:
    """``1 - error(A) / error(B)`` (the share of B's errors that A avoids) on the same
    images, with a paired bootstrap interval (images and seeds resampled together).

    [H18] §5.2's "about 30 % fewer novel-view errors" is this number for capsules (A)
    against the CNN (B).
    """
    a, b = _as_correct(correct_a, "correct_a"), _as_correct(correct_b, "correct_b")
    if a.shape != b.shape:
        raise ValueError(f"correct_a and correct_b differ in shape: {a.shape} vs {b.shape}")
    ea, eb = (~a).astype(float), (~b).astype(float)
    rng = np.random.default_rng(seed)
    s, n = a.shape
    samples = np.empty(resamples)
    for r in range(resamples):
        seeds = rng.integers(0, s, size=s) if s > 1 else np.zeros(1, dtype=int)
        images = rng.integers(0, n, size=n)
        num, den = ea[np.ix_(seeds, images)].mean(), eb[np.ix_(seeds, images)].mean()
        samples[r] = 1.0 - num / den if den > 0 else np.nan
    samples = samples[np.isfinite(samples)]
    point = 1.0 - ea.mean() / eb.mean() if eb.mean() > 0 else math.nan
    low, high = _interval(samples, confidence) if len(samples) else (math.nan, math.nan)
    return {"reduction": float(point), "low": low, "high": high, "confidence": confidence}


def seeded_subset(total: int, size: int | None, seed: int = 0) -> np.ndarray:
    """``size`` distinct indices of ``range(total)`` drawn with ``seed``, sorted.

    ``size=None`` or ``size >= total`` gives every index.
    """
    if total < 0:
        raise ValueError(f"total must be >= 0, got {total}")
    if size is None or size >= total:
        return np.arange(total)
    if size < 1:
        raise ValueError(f"size must be >= 1 (or None for all), got {size}")
    return np.sort(np.random.default_rng(seed).choice(total, size=size, replace=False))


def format_interval_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A plain-text table of ``rows`` (values formatted with ``str``) for the console."""
    cells = [[str(c) for c in columns]] + [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
