"""Task metrics computed column-wise, with optional per-scan weights.

One definition serves the point estimate, the bootstrap (weights = how often each scan's participant
was drawn) and the permutation null (one column per permuted label vector), so the three can never
disagree on what "the metric" is. Arrays are (n,) or (n, C); every result has one value per column.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = ["LOWER_IS_BETTER", "METRIC_FUNCTIONS", "auc", "balanced_accuracy", "kappa_quadratic", "macro_f1", "mae",
           "r2", "score"]


def _columns(*arrays: np.ndarray | None) -> list[np.ndarray]:
    present = [np.asarray(a) for a in arrays if a is not None]
    n = present[0].shape[0]
    width = max(a.shape[1] if a.ndim == 2 else 1 for a in present)
    out = []
    for a in arrays:
        a = np.ones((n, width)) if a is None else np.asarray(a)
        out.append(np.broadcast_to(a[:, None] if a.ndim == 1 else a, (n, width)))
    return out


def auc(positive: np.ndarray, scores: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Mann-Whitney ROC AUC per column: P(score of a positive > score of a negative), ties count half.

    ``positive``: bool (n,) or (n, C); NaN for a column without positives or negatives.
    """
    positive, scores, weights = _columns(positive, scores, weights)
    order = np.argsort(scores, axis=0, kind="stable")
    s = np.take_along_axis(scores, order, axis=0)
    w = np.take_along_axis(weights, order, axis=0).astype(np.float64)
    pos = np.take_along_axis(positive, order, axis=0).astype(bool)
    w_neg, w_pos = np.where(pos, 0.0, w), np.where(pos, w, 0.0)
    n = s.shape[0]
    index = np.arange(n)[:, None] * np.ones((1, s.shape[1]), dtype=np.int64)
    new_group = np.vstack([np.ones((1, s.shape[1]), bool), s[1:] != s[:-1]])
    start = np.maximum.accumulate(np.where(new_group, index, 0), axis=0)
    last_of_group = np.vstack([s[1:] != s[:-1], np.ones((1, s.shape[1]), bool)])
    end = np.flip(np.minimum.accumulate(np.flip(np.where(last_of_group, index, n - 1), axis=0), axis=0), axis=0)
    inclusive = np.cumsum(w_neg, axis=0)
    exclusive = inclusive - w_neg
    below = np.take_along_axis(exclusive, start, axis=0)
    tied = np.take_along_axis(inclusive, end, axis=0) - below
    total = w_pos.sum(axis=0) * w_neg.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, (w_pos * (below + 0.5 * tied)).sum(axis=0) / total, np.nan)


def _confusion(y: np.ndarray, pred: np.ndarray, weights: np.ndarray | None, n_classes: int) -> np.ndarray:
    """Weighted confusion matrices, (C, K true, K predicted)."""
    y, pred, weights = _columns(y, pred, weights)
    classes = np.arange(n_classes)
    true_hot = (y[..., None] == classes) * weights[..., None]
    pred_hot = (pred[..., None] == classes).astype(np.float64)
    return np.einsum("nck,ncl->ckl", true_hot, pred_hot)


def balanced_accuracy(y: np.ndarray, pred: np.ndarray, weights: np.ndarray | None = None, *,
                      n_classes: int) -> np.ndarray:
    """Mean recall over the classes present (integer codes 0..K-1)."""
    conf = _confusion(y, pred, weights, n_classes)
    support = conf.sum(axis=2)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(support > 0, np.diagonal(conf, axis1=1, axis2=2) / support, np.nan)
    present = (support > 0).sum(axis=1)
    return np.where(present > 0, np.nansum(recall, axis=1) / np.maximum(present, 1), np.nan)


def macro_f1(y: np.ndarray, pred: np.ndarray, weights: np.ndarray | None = None, *, n_classes: int) -> np.ndarray:
    """Unweighted mean F1 over the classes that occur as truth or prediction (scikit-learn's macro F1)."""
    conf = _confusion(y, pred, weights, n_classes)
    tp = np.diagonal(conf, axis1=1, axis2=2)
    denominator = conf.sum(axis=2) + conf.sum(axis=1)
    occurs = denominator > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(occurs, 2 * tp / denominator, 0.0)
    return np.where(occurs.any(axis=1), f1.sum(axis=1) / np.maximum(occurs.sum(axis=1), 1), np.nan)


def kappa_quadratic(y: np.ndarray, pred: np.ndarray, weights: np.ndarray | None = None, *,
                    n_classes: int) -> np.ndarray:
    """Cohen's kappa with quadratic weights (ordinal agreement) of level codes 0..K-1."""
    conf = _confusion(y, pred, weights, n_classes)
    total = conf.sum(axis=(1, 2))
    expected = np.einsum("ck,cl->ckl", conf.sum(axis=2), conf.sum(axis=1)) / np.maximum(total, 1e-300)[:, None, None]
    levels = np.arange(n_classes)
    penalty = (levels[:, None] - levels[None, :]) ** 2
    disagreement = (penalty * expected).sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(disagreement > 0, 1.0 - (penalty * conf).sum(axis=(1, 2)) / disagreement, np.nan)


def mae(y: np.ndarray, pred: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Mean absolute error."""
    y, pred, weights = _columns(y, pred, weights)
    return (weights * np.abs(y - pred)).sum(axis=0) / weights.sum(axis=0)


def r2(y: np.ndarray, pred: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Coefficient of determination, 1 - SS_res / SS_tot (weighted mean of the truth as reference)."""
    y, pred, weights = _columns(y, pred, weights)
    total = weights.sum(axis=0)
    mean = (weights * y).sum(axis=0) / total
    ss_tot = (weights * (y - mean) ** 2).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ss_tot > 0, 1.0 - (weights * (y - pred) ** 2).sum(axis=0) / ss_tot, np.nan)


#: metric name -> f(truth, prediction, weights, n_classes); classification metrics get integer codes,
#: ``auc`` gets the positive-class score as prediction.
METRIC_FUNCTIONS: dict[str, Callable[..., np.ndarray]] = {
    "auc": lambda y, p, w, k: auc(y == 1, p, w),
    "balanced_accuracy": lambda y, p, w, k: balanced_accuracy(y, p, w, n_classes=k),
    "macro_f1": lambda y, p, w, k: macro_f1(y, p, w, n_classes=k),
    "kappa_quadratic": lambda y, p, w, k: kappa_quadratic(y, p, w, n_classes=k),
    "mae": lambda y, p, w, k: mae(y, p, w),
    "r2": lambda y, p, w, k: r2(y, p, w),
}
#: Metrics where a smaller value is better (the permutation test counts null <= observed for them).
LOWER_IS_BETTER = frozenset({"mae"})


def score(metric: str, y: np.ndarray, prediction: np.ndarray, weights: np.ndarray | None = None, *,
          n_classes: int = 0) -> np.ndarray:
    """``metric`` per column (see :data:`METRIC_FUNCTIONS`)."""
    return METRIC_FUNCTIONS[metric](np.asarray(y), np.asarray(prediction), weights, n_classes)
