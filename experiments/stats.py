"""Statistics of the report: mean, spread and 95% intervals over seeds, and tests against the best method.

Over seeds: Student-t intervals and Welch's t-test (scipy). With a single seed on either side, runs are compared by
a paired bootstrap over the evaluation items both rows' runs of the same seed answered, or the held-out items both
scored (their prediction files).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

ALPHA = 0.05
BOOTSTRAP_SAMPLES = 10_000  # Monte Carlo error of a p-value near 0.05: +-0.002


@dataclass(frozen=True)
class Estimate:
    """A metric over seeds: mean, sample std (0 for one seed), 95% CI half-width (None for one seed), count."""

    mean: float
    std: float
    ci: float | None
    n: int


def estimate(values: list[float]) -> Estimate | None:
    """Mean, std and the Student-t 95% CI half-width of ``values`` (None if there are none)."""
    values = [float(v) for v in values if v is not None]
    if not values:
        return None
    n = len(values)
    if n == 1:
        return Estimate(values[0], 0.0, None, 1)
    from scipy import stats

    std = float(np.std(values, ddof=1))
    return Estimate(float(np.mean(values)), std, float(stats.t.ppf(1 - ALPHA / 2, n - 1)) * std / math.sqrt(n), n)


def welch_p(a: list[float], b: list[float]) -> float:
    """Two-sided p-value of Welch's t-test (unequal variances); 1.0 when both samples are constant and equal."""
    from scipy import stats

    if np.std(a) == 0 and np.std(b) == 0:
        return 1.0 if np.mean(a) == np.mean(b) else 0.0
    return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def paired_bootstrap_p(a: list[float], b: list[float], seed: int = 0, weights: list[float] | None = None) -> float:
    """Two-sided p-value that two runs' scores on the same items differ (paired bootstrap).

    The statistic is ``sum(a - b) / sum(weights)`` over the items: the accuracy difference for correct/incorrect
    items (unit weights), or the per-token loss difference for summed item losses weighted by their token counts.
    Resamples items with replacement and counts how often the resampled statistic, re-centred on zero (the null), is
    at least as extreme as the observed one.
    """
    if len(a) != len(b) or not a or (weights is not None and len(weights) != len(a)):
        raise ValueError(f"paired bootstrap needs two equally long non-empty item lists, got {len(a)} and {len(b)}")
    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    w = np.ones_like(diff) if weights is None else np.asarray(weights, dtype=float)
    observed = diff.sum() / w.sum()
    rng = np.random.default_rng(seed)
    chunks = []
    for _ in range(BOOTSTRAP_SAMPLES // 1000):  # 1000 resamples at a time: one index matrix of all can be large
        index = rng.integers(0, len(diff), size=(1000, len(diff)))
        chunks.append(diff[index].sum(axis=1) / w[index].sum(axis=1))
    samples = np.concatenate(chunks)
    return float(np.mean(np.abs(samples - observed) >= abs(observed) - 1e-12))
