"""Ridge models whose whole nested CV is solved for many label vectors at once (the permutation test).

For a training set with standardised features Z = U diag(s) Vᵀ, the ridge weights of every target
column are W = V diag(s / (s² + α)) Uᵀ Y: one SVD per training set serves every α of the inner grid
and every column of Y, and Y holds the observed labels (column 0) and each permuted label vector
(one column each). The inner choice of α is made per column, on the pooled inner out-of-fold
predictions, with the task's main metric, so the observed score and each null score come from
exactly the same procedure.

Targets by kind: binary ±1 (a ridge classifier, positive score = positive class), multiclass one
±1 column per class (one-vs-rest, predicted class = largest score), ordinal the level codes
(rounded and clipped to a level), regression the value.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from brainvae.analysis.metrics import LOWER_IS_BETTER, score
from brainvae.analysis.tasks import TaskKind

__all__ = ["decode", "fit_predict", "prediction_for", "ridge_targets"]


def ridge_targets(kind: TaskKind, codes: np.ndarray, n_classes: int) -> np.ndarray:
    """(n, P, K) regression targets from (n, P) codes/values (K = classes for multiclass, else 1)."""
    codes = np.asarray(codes)
    if kind is TaskKind.BINARY:
        return np.where(codes == 1, 1.0, -1.0)[..., None]
    if kind is TaskKind.MULTICLASS:
        return np.where(codes[..., None] == np.arange(n_classes), 1.0, -1.0)
    return codes.astype(np.float64)[..., None]


def decode(kind: TaskKind, raw: np.ndarray, n_classes: int) -> dict[str, np.ndarray]:
    """Predictions for the metrics from raw ridge outputs (…, P, K): ``score``/``code`` or ``value``."""
    if kind is TaskKind.BINARY:
        return {"score": raw[..., 0], "code": (raw[..., 0] > 0).astype(np.int64)}
    if kind is TaskKind.MULTICLASS:
        return {"code": np.argmax(raw, axis=-1)}
    if kind is TaskKind.ORDINAL:
        return {"code": np.clip(np.rint(raw[..., 0]), 0, n_classes - 1).astype(np.int64), "value": raw[..., 0]}
    return {"value": raw[..., 0]}


def prediction_for(metric: str, decoded: dict[str, np.ndarray]) -> np.ndarray:
    """The prediction a metric scores: the continuous score for AUC, the value for MAE/R², else the code."""
    if metric == "auc":
        return decoded["score"]
    if metric in ("mae", "r2"):
        return decoded["value"]
    return decoded["code"]


def _project(X_train: np.ndarray, X_test: np.ndarray, pca_components: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Standardised features (and first a PCA, fitted on the training rows only, when asked)."""
    X_train = np.asarray(X_train, dtype=np.float64)
    X_test = np.asarray(X_test, dtype=np.float64)
    if pca_components is not None:
        centre = X_train.mean(axis=0)
        _, _, vt = np.linalg.svd(X_train - centre, full_matrices=False)
        k = max(1, min(pca_components, vt.shape[0], X_train.shape[0] - 1))
        X_train, X_test = (X_train - centre) @ vt[:k].T, (X_test - centre) @ vt[:k].T
    mean = X_train.mean(axis=0)
    sd = X_train.std(axis=0)
    sd[sd == 0] = 1.0  # a constant column (e.g. one site in this fold) carries nothing
    return (X_train - mean) / sd, (X_test - mean) / sd


def _all_alphas(X_train: np.ndarray, Y_train: np.ndarray, X_test: np.ndarray, alphas: np.ndarray,
                pca_components: int | None) -> np.ndarray:
    """Raw predictions (n_alpha, n_test, P, K) of ridge fits of every column for every alpha."""
    Z, Zt = _project(X_train, X_test, pca_components)
    n, p, k = Y_train.shape
    flat = Y_train.reshape(n, p * k)
    mean = flat.mean(axis=0)
    u, s, vt = np.linalg.svd(Z, full_matrices=False)
    uty = u.T @ (flat - mean)
    shrink = s[None, :] / (s[None, :] ** 2 + alphas[:, None])
    out = np.einsum("tr,ar,rc->atc", Zt @ vt.T, shrink, uty, optimize=True) + mean
    return out.reshape(len(alphas), Zt.shape[0], p, k)


def fit_predict(
    X_train: np.ndarray,
    codes_train: np.ndarray,
    X_test: np.ndarray,
    inner: Sequence[tuple[np.ndarray, np.ndarray]],
    *,
    kind: TaskKind,
    n_classes: int,
    metric: str,
    alphas: Sequence[float],
    pca_components: int | None = None,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Choose alpha per column by inner CV, refit on the whole training set, predict ``X_test``.

    ``codes_train``: (n_train, P) targets (codes or values), one column per label vector. Returns
    the decoded test predictions (each (n_test, P)) and the chosen alpha of each column.
    """
    alphas = np.asarray(alphas, dtype=np.float64)
    codes_train = np.asarray(codes_train)
    Y = ridge_targets(kind, codes_train, n_classes)
    pooled = np.empty((len(alphas), *Y.shape))
    for fit_rows, val_rows in inner:
        pooled[:, val_rows] = _all_alphas(X_train[fit_rows], Y[fit_rows], X_train[val_rows], alphas, pca_components)
    inner_scores = np.stack([score(metric, codes_train, prediction_for(metric, decode(kind, pooled[a], n_classes)),
                                   n_classes=n_classes) for a in range(len(alphas))])
    if metric in LOWER_IS_BETTER:
        inner_scores = -inner_scores
    best = np.argmax(np.where(np.isfinite(inner_scores), inner_scores, -np.inf), axis=0)
    raw = _all_alphas(X_train, Y, X_test, alphas, pca_components)
    chosen = np.take_along_axis(raw, best[None, None, :, None], axis=0)[0]
    return decode(kind, chosen, n_classes), alphas[best]
