"""Confidence intervals for metrics estimated by repeated cross-validation, and permutation p-values.

Outer-fold scores of repeated k-fold CV are not independent (training sets overlap), so a plain
t-interval over folds is too narrow. The default here is the corrected resampled t-interval of
Nadeau & Bengio (2003, Machine Learning 52:239), which inflates the variance by the train/test
overlap: se = sd · sqrt(1/J + n_test/n_train) with J folds and J - 1 degrees of freedom. It is an
approximation too (conservative in their simulations); the permutation test is the exact test of
"no signal".
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import stats

__all__ = ["CI_METHODS", "confidence_interval", "permutation_p_value"]

CI_METHODS = ("corrected_t", "t", "bootstrap")


def confidence_interval(
    values: Sequence[float] | np.ndarray,
    *,
    method: str = "corrected_t",
    confidence: float = 0.95,
    test_train_ratio: float | None = None,
    n_boot: int = 10_000,
    seed: int = 0,
) -> tuple[float, float]:
    """Two-sided ``confidence`` interval of the mean of per-fold ``values`` (NaNs ignored).

    ``method``: ``corrected_t`` (Nadeau-Bengio; needs ``test_train_ratio`` = mean n_test/n_train),
    ``t`` (plain t over folds, optimistic), or ``bootstrap`` (percentile bootstrap of the mean over
    folds, same optimism as ``t``). Fewer than 2 finite values give (nan, nan).
    """
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if method not in CI_METHODS:
        raise ValueError(f"unknown CI method {method!r}; choose from {', '.join(CI_METHODS)}")
    if v.size < 2:
        return (float("nan"), float("nan"))
    mean, sd, j = float(v.mean()), float(v.std(ddof=1)), v.size
    alpha = 1.0 - confidence
    if method == "bootstrap":
        rng = np.random.default_rng(seed)
        means = v[rng.integers(0, j, size=(n_boot, j))].mean(axis=1)
        lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
        return (float(lo), float(hi))
    if method == "corrected_t":
        if test_train_ratio is None:
            raise ValueError("corrected_t needs test_train_ratio (mean n_test / n_train of the folds)")
        se = sd * np.sqrt(1.0 / j + test_train_ratio)
    else:
        se = sd / np.sqrt(j)
    half = float(stats.t.ppf(1 - alpha / 2, df=j - 1)) * se
    return (mean - half, mean + half)


def permutation_p_value(observed: float, null: Sequence[float] | np.ndarray) -> float:
    """p = (1 + #{null >= observed}) / (1 + n): never 0, valid for a finite number of permutations.

    A permutation whose statistic is undefined (NaN) counts as exceeding the observed value, so
    undefined permutations can only make the p-value larger (conservative), never smaller.
    """
    null = np.asarray(null, dtype=np.float64)
    if not np.isfinite(observed):
        return float("nan")
    exceed = int(np.sum(~np.isfinite(null) | (null >= observed)))
    return (1.0 + exceed) / (1.0 + null.size)
