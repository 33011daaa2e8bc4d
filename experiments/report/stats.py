"""Statistics of the report: mean, spread and 95% intervals over seeds, and tests against the best method.

Over seeds: Student-t intervals. Two rows are compared by a paired bootstrap over the evaluation items (or held-out
items) that both rows' runs of the same seed scored (their prediction files), hierarchical over seeds when they share
more than one; Welch's t-test over the seeds' values (scipy) only for rows without shared items (e.g. W&B runs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import t as student_t
from scipy.stats import ttest_1samp, ttest_ind

ALPHA = 0.05
BOOTSTRAP_SAMPLES = 10_000  # Monte Carlo error of a p-value near 0.05: +-0.002
CHUNK = 1000  # resamples drawn at once: one index matrix of all of them can be large


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
    std = float(np.std(values, ddof=1))
    return Estimate(float(np.mean(values)), std, float(student_t.ppf(1 - ALPHA / 2, n - 1)) * std / math.sqrt(n), n)


def welch_p(a: list[float], b: list[float]) -> float:
    """Two-sided p-value of Welch's t-test (unequal variances); 1.0 when both samples are constant and equal."""
    if np.std(a) == 0 and np.std(b) == 0:
        return 1.0 if np.mean(a) == np.mean(b) else 0.0
    return float(ttest_ind(a, b, equal_var=False).pvalue)


def seed_level_p(differences: list[float]) -> float | None:
    """Two-sided p-value of a one-sample t-test that the per-seed differences of two rows average zero (n - 1 degrees
    of freedom); None for fewer than two seeds, 0 or 1 when the differences are all equal.

    The seed-level reading of a comparison: with two or three seeds the hierarchical bootstrap can resample only a
    handful of seed sets, so two seeds that agree in sign give it p near 0 whatever their spread; this test charges
    the spread in full (and is conservative with few seeds).
    """
    if len(differences) < 2:
        return None
    if np.std(differences) == 0:
        return 0.0 if differences[0] != 0 else 1.0
    return float(ttest_1samp(differences, 0.0).pvalue)


def paired_bootstrap_p(
    a: list[float],
    b: list[float],
    *,
    seed: int = 0,
    weights: list[float] | None = None,
    clusters: list | None = None,
) -> float:
    """Two-sided p-value that two rows' scores on the same items differ (paired, optionally hierarchical, bootstrap).

    The statistic is ``sum(a - b) / sum(weights)`` over the items: the accuracy difference for correct/incorrect
    items (unit weights), or the per-token loss difference for summed item losses weighted by their token counts.
    Resamples items with replacement and counts how often the resampled statistic, re-centred on zero (the null), is
    at least as extreme as the observed one.

    ``clusters`` labels each item with the training run pair it came from (the seed). With two or more clusters the
    bootstrap is hierarchical: clusters are resampled first, then items within each drawn cluster, so a difference
    that one seed shows and another does not is not mistaken for a certain one (a flat item bootstrap over the pooled
    items would be). With few seeds the seed-to-seed spread is still underestimated ((n-1)/n of it), never ignored.
    """
    if len(a) != len(b) or not a or (weights is not None and len(weights) != len(a)):
        raise ValueError(f"paired bootstrap needs two equally long non-empty item lists, got {len(a)} and {len(b)}")
    if clusters is not None and len(clusters) != len(a):
        raise ValueError(f"clusters must label every item: {len(clusters)} labels for {len(a)} items")
    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    w = np.ones_like(diff) if weights is None else np.asarray(weights, dtype=float)
    observed = diff.sum() / w.sum()
    labels = [0] * len(diff) if clusters is None else clusters
    groups = [np.flatnonzero([label == c for label in labels]) for c in dict.fromkeys(labels)]
    rng = np.random.default_rng(seed)
    samples = np.concatenate([_resample(diff, w, groups, rng) for _ in range(BOOTSTRAP_SAMPLES // CHUNK)])
    return float(np.mean(np.abs(samples - observed) >= abs(observed) - 1e-12))


def _resample(diff: np.ndarray, w: np.ndarray, groups: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """CHUNK bootstrap statistics: draw len(groups) clusters with replacement, then each drawn cluster's items."""
    if len(groups) == 1:
        index = rng.integers(0, len(diff), size=(CHUNK, len(diff)))
        return diff[index].sum(axis=1) / w[index].sum(axis=1)
    picks = rng.integers(0, len(groups), size=(CHUNK, len(groups)))
    num, den = np.zeros(CHUNK), np.zeros(CHUNK)
    for slot in range(len(groups)):
        for c, items in enumerate(groups):
            drawn = np.flatnonzero(picks[:, slot] == c)
            index = items[rng.integers(0, len(items), size=(len(drawn), len(items)))]
            num[drawn] += diff[index].sum(axis=1)
            den[drawn] += w[index].sum(axis=1)
    return num / den
