"""Nested, participant-grouped cross-validation of classifiers, with participant-level permutation tests.

Design (what a reviewer checks for leakage):

* Everything learnt from data — PCA (voxel baseline), StandardScaler, hyper-parameters — is inside
  a scikit-learn Pipeline that a GridSearchCV fits on the *outer training set only*, with its own
  grouped, stratified inner folds. The outer test participants are touched once, for scoring.
* Folds are on participants (:mod:`brainvae.analysis.cv`), identical for every feature set and
  classifier given the same labels, groups and seed, so comparisons are paired.
* The permutation test permutes labels among participants and reruns the *whole* procedure
  (new stratified folds on the permuted labels, inner search, refit) for every permutation.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from joblib import Memory, Parallel, delayed
from sklearn.decomposition import PCA
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, recall_score, roc_auc_score
from sklearn.model_selection import GridSearchCV
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC
from threadpoolctl import threadpool_limits

from brainvae.analysis.cv import (
    OuterFold,
    check_labels,
    inner_splits,
    make_outer_folds,
    participant_groups,
    permute_labels_by_group,
)
from brainvae.analysis.errors import AnalysisError
from brainvae.analysis.features import FeatureSet
from brainvae.analysis.stats import permutation_p_value

__all__ = [
    "CLASSIFIERS",
    "METRICS",
    "ClassificationResult",
    "NestedCVResult",
    "build_pipeline",
    "encode_labels",
    "fold_metrics",
    "nested_cv",
    "permutation_null",
    "run_classification",
    "site_check",
]

CLASSIFIERS = ("logreg", "linear_svm", "rbf_svm", "random_forest", "knn")
METRICS = ("accuracy", "balanced_accuracy", "roc_auc", "f1", "sensitivity", "specificity")


# --------------------------------------------------------------------------------------------------
# Labels and estimators
# --------------------------------------------------------------------------------------------------

def encode_labels(labels: Sequence | np.ndarray, positive: str | None = None) -> tuple[np.ndarray, tuple[str, ...]]:
    """Integer codes and the class names they stand for.

    Binary: code 1 is ``positive`` (default: the second class in sorted order), code 0 the other.
    Multi-class (e.g. the site check): codes follow the sorted class names; ``positive`` ignored.
    """
    labels = np.asarray(labels).astype(str)
    classes = sorted(set(labels.tolist()))
    if len(classes) == 2:
        pos = positive if positive is not None else classes[1]
        if pos not in classes:
            raise AnalysisError("labels", f"positive class '{pos}' not among {classes}")
        neg = classes[0] if classes[1] == pos else classes[1]
        order = (neg, pos)
    else:
        order = tuple(classes)
    lookup = {c: i for i, c in enumerate(order)}
    return np.array([lookup[v] for v in labels], dtype=np.int64), tuple(order)


def build_pipeline(
    classifier: str,
    *,
    n_features: int,
    min_train_size: int,
    pca_components: int | None = None,
    seed: int = 0,
    n_estimators: int = 100,
    param_grid: Mapping[str, Sequence[Any]] | None = None,
) -> tuple[Pipeline, dict[str, list[Any]]]:
    """The Pipeline ``[pca?] → StandardScaler → classifier`` and its small inner grid.

    ``min_train_size``: the smallest inner training set; bounds PCA components and k of k-NN so
    every grid point is fittable. RBF gamma is searched relative to the input dimension (the
    classic 1/d after standardisation) so one grid serves 2 latent PCs or 20 voxel PCs.
    ``param_grid`` (keys without the ``clf__`` prefix) replaces the default grid.
    """
    steps: list[tuple[str, Any]] = []
    dim = n_features
    if pca_components is not None:
        dim = int(max(1, min(pca_components, n_features, min_train_size - 1)))
        # "full" SVD: exact and deterministic (randomized SVD would add a seed-dependent error).
        steps.append(("pca", PCA(n_components=dim, svd_solver="full")))
    steps.append(("scale", StandardScaler()))
    # class_weight="balanced": DS is the minority class; unweighted fits drift to the majority.
    if classifier == "logreg":
        clf: Any = LogisticRegression(class_weight="balanced", max_iter=5000)
        grid: dict[str, list[Any]] = {"C": [0.01, 0.1, 1.0, 10.0]}
    elif classifier == "linear_svm":
        clf = SVC(kernel="linear", class_weight="balanced")
        grid = {"C": [0.001, 0.01, 0.1, 1.0]}
    elif classifier == "rbf_svm":
        clf = SVC(kernel="rbf", class_weight="balanced")
        grid = {"C": [0.1, 1.0, 10.0], "gamma": [f / dim for f in (0.1, 1.0, 10.0)]}
    elif classifier == "random_forest":
        clf = RandomForestClassifier(n_estimators=n_estimators, class_weight="balanced", random_state=seed, n_jobs=1)
        # Forests are the costly model (n_estimators trees per grid point and inner fold): two points.
        grid = {"min_samples_leaf": [1, 5]}
    elif classifier == "knn":
        clf = KNeighborsClassifier()
        ks = [k for k in (3, 5, 9, 15) if k <= min_train_size] or [1]
        grid = {"n_neighbors": ks, "weights": ["uniform", "distance"]}
    else:
        raise AnalysisError("classifier", f"unknown classifier {classifier!r}; choose from {', '.join(CLASSIFIERS)}")
    return finish_pipeline(steps, "clf", clf, grid, param_grid)


def finish_pipeline(steps: list, name: str, estimator: Any, grid: Mapping[str, Sequence[Any]],
                    param_grid: Mapping[str, Sequence[Any]] | None) -> tuple[Pipeline, dict[str, list[Any]]]:
    """``steps`` + ``(name, estimator)`` as a Pipeline, and its inner-CV grid: ``param_grid`` (the user's) if
    given, else ``grid`` (the built-in one), with keys prefixed for the pipeline step."""
    if param_grid is not None:
        grid = param_grid
    steps.append((name, estimator))
    return Pipeline(steps), {f"{name}__{k}": list(v) for k, v in grid.items()}


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------

def _scores(estimator: Any, X: np.ndarray, n_classes: int) -> np.ndarray:
    """Continuous scores for ROC: positive-class score (binary) or an n × K matrix (multi-class).

    Probabilities when the estimator has them, else the decision function (SVC without Platt
    scaling: Platt scaling would add an internal, seed-dependent CV for no gain in AUC).
    """
    fitted_classes = list(estimator.classes_)
    if hasattr(estimator, "predict_proba"):
        raw = estimator.predict_proba(X)
    else:
        raw = estimator.decision_function(X)
    if n_classes == 2:
        if raw.ndim == 1:
            return raw if fitted_classes[-1] == 1 else -raw
        return raw[:, fitted_classes.index(1)]
    full = np.full((X.shape[0], n_classes), np.nan)
    raw = raw if raw.ndim == 2 else raw[:, None]
    for j, c in enumerate(fitted_classes):
        full[:, int(c)] = raw[:, j]
    return full


def fold_metrics(y_true: np.ndarray, y_pred: np.ndarray, scores: np.ndarray, n_classes: int) -> dict[str, float]:
    """Accuracy, balanced accuracy, ROC AUC, F1, sensitivity, specificity of one test fold.

    Binary: F1/sensitivity for code 1 (the positive class), specificity = recall of code 0.
    Multi-class: macro F1, one-vs-rest macro AUC over the classes present (with at least one
    negative); sensitivity/specificity are not defined (NaN). AUC is NaN when undefined.
    """
    out = {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
    }
    if n_classes == 2:
        both = len(np.unique(y_true)) == 2
        out["roc_auc"] = float(roc_auc_score(y_true, scores)) if both else float("nan")
        out["f1"] = float(f1_score(y_true, y_pred, pos_label=1, zero_division=0))
        out["sensitivity"] = float(recall_score(y_true, y_pred, pos_label=1, zero_division=0)) if (y_true == 1).any() else float("nan")
        out["specificity"] = float(recall_score(y_true, y_pred, pos_label=0, zero_division=0)) if (y_true == 0).any() else float("nan")
    else:
        aucs = []
        for c in range(n_classes):
            pos = y_true == c
            if pos.any() and (~pos).any() and np.isfinite(scores[:, c]).all():
                aucs.append(roc_auc_score(pos, scores[:, c]))
        out["roc_auc"] = float(np.mean(aucs)) if aucs else float("nan")
        out["f1"] = float(f1_score(y_true, y_pred, average="macro", zero_division=0))
        out["sensitivity"] = float("nan")
        out["specificity"] = float("nan")
    return out


# --------------------------------------------------------------------------------------------------
# Nested cross-validation
# --------------------------------------------------------------------------------------------------

@dataclass
class NestedCVResult:
    """One (feature set, classifier) nested CV: per-fold metrics and per-scan test predictions."""

    feature_set: str
    classifier: str
    classes: tuple[str, ...]
    folds: pd.DataFrame  # repeat, fold, n_train, n_test, METRICS..., best_params (JSON)
    predictions: pd.DataFrame  # repeat, fold, row, y_true, y_pred, score / score_<class>

    def statistic(self, metric: str = "roc_auc") -> float:
        """Mean of ``metric`` over all outer folds (NaN folds ignored)."""
        values = self.folds[metric].to_numpy(dtype=float)
        return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def _best_auc_plus_balanced_accuracy(cv_results: Mapping[str, Any]) -> int:
    """Grid point with the highest mean inner ROC AUC + balanced accuracy (NaN folds ignored; ties: first)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)  # all-NaN point → -inf below
        total = np.asarray(cv_results["mean_test_roc_auc"], float) + np.asarray(
            cv_results["mean_test_balanced_accuracy"], float)
    return int(np.argmax(np.where(np.isfinite(total), total, -np.inf)))


def _fit_outer_fold(
    X: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    fold: OuterFold,
    *,
    classifier: str,
    n_classes: int,
    pca_components: int | None,
    n_inner: int,
    seed: int,
    n_estimators: int,
    param_grid: Mapping[str, Sequence[Any]] | None,
) -> tuple[dict[str, Any], pd.DataFrame]:
    train, test = fold.train, fold.test
    y_train = y[train]
    # A fold-specific inner seed: different inner splits per outer fold, reproducible.
    inner = inner_splits(y_train, groups[train], n_inner, seed=seed + 1000 * fold.repeat + fold.fold)
    min_train = min(len(tr) for tr, _ in inner)
    pipe, grid = build_pipeline(
        classifier,
        n_features=X.shape[1],
        min_train_size=min_train,
        pca_components=pca_components,
        seed=seed,
        n_estimators=n_estimators,
        param_grid=param_grid,
    )
    # Binary: tune on ROC AUC (threshold-free, robust to imbalance) plus balanced accuracy: on AUC alone a
    # strongly regularised SVM can rank perfectly yet put every participant in one class (balanced accuracy
    # 0.5), and the reported accuracy, sensitivity and specificity would describe that degenerate threshold.
    # Multi-class: balanced accuracy, because an inner test fold may lack a rare site and OvR AUC is then
    # undefined.
    if n_classes == 2:
        search = GridSearchCV(pipe, grid, scoring={"roc_auc": "roc_auc", "balanced_accuracy": "balanced_accuracy"},
                              cv=inner, refit=_best_auc_plus_balanced_accuracy, n_jobs=1, error_score="raise")
    else:
        search = GridSearchCV(pipe, grid, scoring="balanced_accuracy", cv=inner, refit=True, n_jobs=1,
                              error_score="raise")
    # float32 voxels stay float32 (half the memory of a copy); everything else is float64.
    dtype = np.float32 if X.dtype == np.float32 else np.float64
    X_train = np.asarray(X[train], dtype=dtype)
    X_test = np.asarray(X[test], dtype=dtype)
    with contextlib.ExitStack() as stack:
        if pca_components is not None:
            # The PCA of an inner training set does not depend on the classifier's grid point:
            # cache it (per outer fold, in a throw-away folder) instead of refitting it per point.
            pipe.set_params(memory=Memory(stack.enter_context(tempfile.TemporaryDirectory()), verbose=0))
        # One BLAS thread: these matrices are small, and multi-threaded BLAS on a shared machine
        # (or under n_jobs > 1) oversubscribes the cores and runs several times slower.
        stack.enter_context(threadpool_limits(limits=1))
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore", category=UserWarning)  # e.g. single-class inner test fold → AUC nan
        search.fit(X_train, y_train)
        best = search.best_estimator_
        y_pred = best.predict(X_test)
        scores = _scores(best, X_test, n_classes)
    metrics = fold_metrics(y[test], y_pred, scores, n_classes)
    row: dict[str, Any] = {
        "repeat": fold.repeat,
        "fold": fold.fold,
        "n_train": len(train),
        "n_test": len(test),
        **metrics,
        "inner_score": float(search.cv_results_["mean_test_roc_auc" if n_classes == 2 else "mean_test_score"]
                             [search.best_index_]),
        "best_params": json.dumps({k.removeprefix("clf__"): v for k, v in search.best_params_.items()}, default=str),
    }
    preds = pd.DataFrame({"repeat": fold.repeat, "fold": fold.fold, "row": test, "y_true": y[test], "y_pred": y_pred})
    if n_classes == 2:
        preds["score"] = scores
    else:
        for c in range(n_classes):
            preds[f"score_{c}"] = scores[:, c]
    return row, preds


def nested_cv(
    X: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    folds: Sequence[OuterFold],
    *,
    classifier: str,
    classes: tuple[str, ...],
    feature_set: str = "features",
    pca_components: int | None = None,
    n_inner: int = 3,
    seed: int = 0,
    n_estimators: int = 100,
    param_grid: Mapping[str, Sequence[Any]] | None = None,
    n_jobs: int = 1,
) -> NestedCVResult:
    """Run the inner grid search and outer evaluation of one classifier on given outer folds.

    ``y``: integer codes from :func:`encode_labels` (``classes[i]`` names code i). ``n_jobs``
    parallelises over outer folds (results identical to ``n_jobs=1``).
    """
    if X.shape[0] != len(y) or len(y) != len(groups):
        raise AnalysisError(feature_set, f"{X.shape[0]} rows of features but {len(y)} labels / {len(groups)} groups")
    n_classes = len(classes)
    kwargs = dict(
        classifier=classifier, n_classes=n_classes, pca_components=pca_components, n_inner=n_inner, seed=seed,
        n_estimators=n_estimators, param_grid=param_grid,
    )
    if n_jobs == 1:
        out = [_fit_outer_fold(X, y, groups, f, **kwargs) for f in folds]
    else:
        out = Parallel(n_jobs=n_jobs)(delayed(_fit_outer_fold)(X, y, groups, f, **kwargs) for f in folds)
    rows, preds = zip(*out)
    fold_table = pd.DataFrame(list(rows))
    if n_classes == 2 and fold_table["roc_auc"].isna().any():
        warnings.warn(
            f"{feature_set}/{classifier}: {int(fold_table['roc_auc'].isna().sum())} outer test fold(s) hold one class; "
            "their ROC AUC is undefined and left out of the mean",
            UserWarning,
            stacklevel=2,
        )
    predictions = pd.concat(preds, ignore_index=True)
    predictions["true_label"] = np.asarray(classes, dtype=object)[predictions["y_true"].to_numpy()]
    predictions["pred_label"] = np.asarray(classes, dtype=object)[predictions["y_pred"].to_numpy()]
    return NestedCVResult(feature_set, classifier, classes, fold_table, predictions)


def permutation_null(
    X: np.ndarray,
    labels: np.ndarray,
    groups: np.ndarray,
    *,
    classifier: str,
    positive: str | None,
    n_permutations: int,
    n_splits: int,
    n_repeats: int,
    n_inner: int = 3,
    seed: int = 0,
    metric: str = "roc_auc",
    pca_components: int | None = None,
    n_estimators: int = 100,
    param_grid: Mapping[str, Sequence[Any]] | None = None,
    n_jobs: int = 1,
) -> np.ndarray:
    """``metric`` (mean over outer folds) of the whole nested CV rerun on participant-permuted labels.

    Permutation i uses the generator ``default_rng([seed, i])``: the same permuted labels for every
    feature set and classifier (paired nulls), and independent of ``n_jobs``. Folds are rebuilt on
    the permuted labels with the same seed, exactly as for the observed labels.
    """
    labels = np.asarray(labels).astype(str)

    def one(i: int) -> float:
        perm = permute_labels_by_group(labels, groups, np.random.default_rng([seed, i]))
        y, classes = encode_labels(perm, positive)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # k reductions etc. were reported for the real labels
            folds = make_outer_folds(perm, groups, n_splits=n_splits, n_repeats=n_repeats, seed=seed)
            res = nested_cv(
                X, y, groups, folds, classifier=classifier, classes=classes, pca_components=pca_components,
                n_inner=n_inner, seed=seed, n_estimators=n_estimators, param_grid=param_grid,
            )
        return res.statistic(metric)

    if n_jobs == 1:
        return np.array([one(i) for i in range(n_permutations)], dtype=np.float64)
    return np.array(Parallel(n_jobs=n_jobs)(delayed(one)(i) for i in range(n_permutations)), dtype=np.float64)


# --------------------------------------------------------------------------------------------------
# Orchestration
# --------------------------------------------------------------------------------------------------

@dataclass
class ClassificationResult:
    """All (feature set × classifier) results of one label, on one set of outer folds."""

    label: str
    positive: str | None
    classes: tuple[str, ...]
    outer_folds: list[OuterFold]
    groups: np.ndarray
    folds: pd.DataFrame  # feature_set, classifier, repeat, fold, n_train, n_test, METRICS..., best_params
    predictions: pd.DataFrame  # feature_set, classifier, repeat, fold, row, y_true, y_pred, score..., labels
    permutations: pd.DataFrame  # feature_set, classifier, metric, observed, n_permutations, p_value, null_mean, null_sd
    null: pd.DataFrame  # feature_set, classifier, permutation, value
    settings: dict[str, Any] = field(default_factory=dict)

    def summary(self, *, ci: str = "corrected_t", confidence: float = 0.95) -> pd.DataFrame:
        """Long summary: one row per (feature set, classifier, metric) with mean, sd, CI; see tables."""
        from brainvae.analysis.tables import summarise_folds

        return summarise_folds(self.folds, ci=ci, confidence=confidence)


def run_classification(
    meta: pd.DataFrame,
    feature_sets: Sequence[FeatureSet] | Mapping[str, FeatureSet],
    *,
    label: str = "group",
    positive: str | None = "DS",
    classifiers: Sequence[str] = CLASSIFIERS,
    n_splits: int = 5,
    n_repeats: int = 5,
    n_inner: int = 3,
    seed: int = 0,
    n_permutations: int = 100,
    permutation_metric: str = "roc_auc",
    permutation_classifiers: Sequence[str] | None = None,
    n_estimators: int = 100,
    param_grids: Mapping[str, Mapping[str, Sequence[Any]]] | None = None,
    dataset: str | None = None,
    dataset_col: str = "dataset",
    participant_col: str = "participant",
    folds: Sequence[OuterFold] | None = None,
    n_jobs: int = 1,
) -> ClassificationResult:
    """Nested CV of every classifier on every feature set, all on the same outer folds.

    ``meta``: one row per scan, aligned with every ``FeatureSet.X``. ``label``: the column to
    predict; ``positive``: its positive class (None for multi-class or "second in sorted order").
    ``dataset``: restrict to one dataset (errors then name it). ``folds``: reuse precomputed outer
    folds (e.g. :func:`~brainvae.analysis.cv.folds_from_table`); default: built here from the
    labels, participants and ``seed``. ``permutation_classifiers``: the classifiers that get a
    permutation test (default all; each permutation costs one full nested CV).
    """
    sets = list(feature_sets.values()) if isinstance(feature_sets, Mapping) else list(feature_sets)
    if not sets:
        raise AnalysisError("classification", "no feature sets given")
    names = [fs.name for fs in sets]
    if len(set(names)) != len(names):
        raise AnalysisError("classification", f"duplicate feature set names: {names}")
    if label not in meta.columns:
        raise AnalysisError("classification", f"label column '{label}' not in the table (columns: {', '.join(map(str, meta.columns))})")
    for fs in sets:
        if fs.X.shape[0] != len(meta):
            raise AnalysisError(f"feature set '{fs.name}'", f"{fs.X.shape[0]} rows but the table has {len(meta)} scans")
    rows = np.arange(len(meta))
    if dataset is not None:
        if dataset_col not in meta.columns or not (meta[dataset_col].astype(str) == dataset).any():
            raise AnalysisError(f"dataset {dataset}", "no scans of this dataset in the table")
        rows = np.flatnonzero(meta[dataset_col].astype(str).to_numpy() == dataset)
    sub = meta.iloc[rows].reset_index(drop=True)
    if sub[label].isna().any():
        raise AnalysisError("classification", f"{int(sub[label].isna().sum())} scan(s) have no '{label}' value")
    labels = sub[label].astype(str).to_numpy()
    groups = participant_groups(sub, dataset_col=dataset_col, participant_col=participant_col)
    datasets = sub[dataset_col].astype(str).to_numpy() if dataset_col in sub.columns else None
    multiclass = len(set(labels.tolist())) > 2
    check_labels(labels, groups, datasets=datasets if label != dataset_col else None,
                 positive=None if multiclass else positive, label_name=label)
    y, classes = encode_labels(labels, None if multiclass else positive)
    if folds is None:
        folds = make_outer_folds(labels, groups, n_splits=n_splits, n_repeats=n_repeats, seed=seed)
    folds = list(folds)
    perm_clfs = set(classifiers if permutation_classifiers is None else permutation_classifiers)
    unknown = perm_clfs - set(classifiers)
    if unknown:
        raise AnalysisError("permutation_classifiers", f"{sorted(unknown)} not among the classifiers run")

    fold_tables, pred_tables, perm_rows, null_rows = [], [], [], []
    for fs in sets:
        X = fs.X if dataset is None else np.asarray(fs.X[rows])
        for clf in classifiers:
            grid = (param_grids or {}).get(clf)
            res = nested_cv(
                X, y, groups, folds, classifier=clf, classes=classes, feature_set=fs.name,
                pca_components=fs.pca_components, n_inner=n_inner, seed=seed, n_estimators=n_estimators,
                param_grid=grid, n_jobs=n_jobs,
            )
            fold_tables.append(res.folds.assign(feature_set=fs.name, classifier=clf))
            pred_tables.append(res.predictions.assign(feature_set=fs.name, classifier=clf))
            if n_permutations > 0 and clf in perm_clfs:
                observed = res.statistic(permutation_metric)
                null = permutation_null(
                    X, labels, groups, classifier=clf, positive=None if multiclass else positive,
                    n_permutations=n_permutations, n_splits=n_splits, n_repeats=n_repeats, n_inner=n_inner,
                    seed=seed, metric=permutation_metric, pca_components=fs.pca_components,
                    n_estimators=n_estimators, param_grid=grid, n_jobs=n_jobs,
                )
                perm_rows.append({
                    "feature_set": fs.name, "classifier": clf, "metric": permutation_metric,
                    "observed": observed, "n_permutations": n_permutations,
                    "p_value": permutation_p_value(observed, null),
                    "null_mean": float(np.nanmean(null)) if np.isfinite(null).any() else float("nan"),
                    "null_sd": float(np.nanstd(null, ddof=1)) if np.isfinite(null).sum() > 1 else float("nan"),
                    "null_undefined": int((~np.isfinite(null)).sum()),
                })
                null_rows.append(pd.DataFrame({
                    "feature_set": fs.name, "classifier": clf, "permutation": np.arange(n_permutations), "value": null,
                }))

    front = ["feature_set", "classifier"]
    fold_df = pd.concat(fold_tables, ignore_index=True)
    fold_df = fold_df[front + [c for c in fold_df.columns if c not in front]]
    pred_df = pd.concat(pred_tables, ignore_index=True)
    # Map the local row numbers back to the caller's table (and its scan identifiers).
    pred_df["row"] = rows[pred_df["row"].to_numpy()]
    pred_df = pred_df[front + [c for c in pred_df.columns if c not in front]]
    perm_cols = ["feature_set", "classifier", "metric", "observed", "n_permutations", "p_value", "null_mean", "null_sd",
                 "null_undefined"]
    perm_df = pd.DataFrame(perm_rows, columns=perm_cols)
    null_df = (pd.concat(null_rows, ignore_index=True) if null_rows
               else pd.DataFrame(columns=["feature_set", "classifier", "permutation", "value"]))
    settings = dict(
        label=label, positive=None if multiclass else classes[1], classes=list(classes), n_splits_requested=n_splits,
        n_splits=int(max(f.fold for f in folds) + 1), n_repeats=int(max(f.repeat for f in folds) + 1), n_inner=n_inner,
        seed=seed, n_permutations=n_permutations, permutation_metric=permutation_metric, dataset=dataset,
        n_scans=len(sub), n_participants=int(len(set(groups.tolist()))),
    )
    return ClassificationResult(
        label=label, positive=settings["positive"], classes=classes, outer_folds=folds, groups=groups,
        folds=fold_df, predictions=pred_df, permutations=perm_df, null=null_df, settings=settings,
    )


def site_check(
    meta: pd.DataFrame,
    feature_sets: Sequence[FeatureSet] | Mapping[str, FeatureSet],
    *,
    site_col: str = "dataset",
    classifiers: Sequence[str] = ("logreg",),
    n_permutations: int = 0,
    **settings: Any,
) -> ClassificationResult:
    """How well features predict the site: nested CV with the site as label (two or more sites).

    Chance is 1/K for balanced accuracy and 0.5 for AUC (one-vs-rest macro when K > 2). A high
    score means the representation encodes scanner/site, which can masquerade as a DS effect
    when the groups are unevenly spread over sites. Folds are stratified by site. ``settings``: the
    other keywords of :func:`run_classification` (folds, repeats, seed, jobs), with its defaults.
    """
    if site_col not in meta.columns:
        raise AnalysisError("site check", f"column '{site_col}' not in the table")
    if meta[site_col].astype(str).nunique() < 2:
        only = meta[site_col].astype(str).iloc[0] if len(meta) else "(none)"
        raise AnalysisError(f"dataset {only}", "site check needs at least two sites/datasets")
    return run_classification(
        meta, feature_sets, label=site_col, positive=None, classifiers=classifiers,
        n_permutations=n_permutations, permutation_metric="balanced_accuracy", **settings,
    )
