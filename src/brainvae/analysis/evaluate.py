"""Nested, participant-grouped cross-validation of one task on one feature set, with every estimator.

Per (feature set, estimator): out-of-fold predictions of every outer repeat; the score of a repeat
is the metric of its pooled test predictions, the reported score the mean over repeats. The
confidence interval resamples participants (bootstrap) and rescores the same predictions; the
permutation test (ridge only, brainvae.analysis.ridge) reruns the first outer repeat's whole nested CV on
labels permuted among the participants of each of its test folds, all permutations at once. External datasets are never in the CV: each estimator
is fitted on every CV scan (inner CV for its hyper-parameters) and applied to them unchanged.

Folds (outer and inner) are made once from the observed labels (stratified, grouped by participant)
and reused for every estimator, feature set and permutation, so all comparisons are paired.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from sklearn.ensemble import RandomForestRegressor
from sklearn.linear_model import Ridge
from sklearn.metrics import cohen_kappa_score, make_scorer
from sklearn.model_selection import GridSearchCV
from sklearn.neighbors import KNeighborsRegressor
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVR
from sklearn.decomposition import PCA
from threadpoolctl import threadpool_limits

from brainvae.analysis import ridge as ridge_model
from brainvae.analysis.classify import _best_auc_plus_balanced_accuracy, _scores, build_pipeline, finish_pipeline
from brainvae.analysis.cv import OuterFold, check_labels, inner_splits, make_outer_folds, participant_groups, \
    permutation_matrix
from brainvae.analysis.errors import AnalysisError
from brainvae.analysis.features import FeatureSet
from brainvae.analysis.metrics import LOWER_IS_BETTER, score
from brainvae.analysis.stats import permutation_p_value
from brainvae.analysis.tasks import Task, TaskKind, encode_target, strata, task_rows

__all__ = ["RESULT_COLUMNS", "TaskData", "build_regressor", "evaluate_feature_set", "prepare_task"]

#: Columns of the tasks table (results/tables/classification.tsv), in order.
RESULT_COLUMNS = ("task", "kind", "model", "feature_set", "classifier", "evaluated_on", "n_scans", "n_participants",
                  "metric", "score", "ci_low", "ci_high", "second_metric", "second_score", "second_ci_low",
                  "second_ci_high", "p_perm", "n_perm", "split_used")


@dataclass
class TaskData:
    """The scans of one task, split into the CV part and the held-out external part, with fixed folds."""

    task: Task
    scans: pd.DataFrame  # CV scans
    target: np.ndarray  # codes (classification) or values (regression) of the CV scans
    classes: tuple[str, ...]
    groups: np.ndarray
    folds: list[OuterFold]
    inner: list[list[tuple[np.ndarray, np.ndarray]]]  # per outer fold, row indices into its training set
    full_inner: list[tuple[np.ndarray, np.ndarray]]  # inner folds over all CV scans (external fits)
    external: pd.DataFrame
    external_target: np.ndarray
    external_groups: np.ndarray

    @property
    def n_classes(self) -> int:
        return len(self.classes)


def prepare_task(task: Task, scans: pd.DataFrame, *, external_datasets: Sequence[str], n_splits: int,
                 n_repeats: int, n_inner: int, seed: int) -> TaskData:
    """The task's scans of the analysed set, its target, and its outer/inner participant-grouped folds."""
    where = f"task {task.name}"
    rows = task_rows(scans, task)
    used = scans[rows].reset_index(drop=True)
    is_external = used["dataset"].astype(str).isin(list(external_datasets)).to_numpy() if task.hold_out_external \
        else np.zeros(len(used), bool)
    cv, external = used[~is_external].reset_index(drop=True), used[is_external].reset_index(drop=True)
    if cv.empty:
        raise AnalysisError(where, f"no scans to cross-validate: none of the analysed scans has a '{task.column}' "
                                   f"value{' and ' + task.describe() if task.where else ''} outside the external "
                                   f"dataset(s) {', '.join(external_datasets) or '(none)'}")
    target, classes = encode_target(task, cv[task.table_column].to_numpy())
    groups = participant_groups(cv)
    labels = strata(task, target, groups)
    if task.is_classification:
        check_labels(labels, groups, label_name=task.column)
    folds = make_outer_folds(labels, groups, n_splits=n_splits, n_repeats=n_repeats, seed=seed)
    inner = [inner_splits(labels[f.train], groups[f.train], n_inner, seed=seed + 1000 * f.repeat + f.fold)
             for f in folds]
    full_inner = inner_splits(labels, groups, n_inner, seed=seed)
    external_target = np.zeros(0)
    if len(external):
        if task.is_classification:
            unknown = sorted(set(external[task.table_column].astype(str)) - set(classes))
            if unknown:
                raise AnalysisError(where, f"external scans have '{task.column}' value(s) {unknown} that the CV "
                                           f"scans lack (classes {list(classes)})")
            lookup = {c: i for i, c in enumerate(classes)}
            external_target = np.array([lookup[v] for v in external[task.table_column].astype(str)], dtype=np.int64)
        else:
            external_target, _ = encode_target(task, external[task.table_column].to_numpy())
    return TaskData(task, cv, target, classes, groups, folds, inner, full_inner, external, external_target,
                    participant_groups(external) if len(external) else np.zeros(0, dtype=object))


def build_regressor(estimator: str, *, pca_components: int | None, min_train_size: int, n_features: int, seed: int,
                    n_estimators: int, param_grid: Mapping[str, Sequence[Any]] | None) -> tuple[Pipeline, dict]:
    """``[pca?] → StandardScaler → regressor`` and its inner grid (``param_grid`` replaces the default)."""
    steps: list[tuple[str, Any]] = []
    if pca_components is not None:
        steps.append(("pca", PCA(n_components=int(max(1, min(pca_components, n_features, min_train_size - 1))),
                                 svd_solver="full")))
    steps.append(("scale", StandardScaler()))
    if estimator == "ridge":
        reg: Any = Ridge()
        grid: dict[str, list[Any]] = {"alpha": [0.1, 1.0, 10.0, 100.0]}
    elif estimator == "svr":
        reg = SVR(kernel="rbf")
        grid = {"C": [1.0, 10.0, 100.0], "epsilon": [0.1, 1.0]}
    elif estimator == "random_forest":
        reg = RandomForestRegressor(n_estimators=n_estimators, random_state=seed, n_jobs=1)
        grid = {"min_samples_leaf": [1, 5]}
    elif estimator == "knn":
        reg = KNeighborsRegressor()
        grid = {"n_neighbors": [k for k in (3, 5, 9) if k <= min_train_size] or [1], "weights": ["uniform", "distance"]}
    else:
        raise AnalysisError("regressor", f"unknown regressor {estimator!r}")
    return finish_pipeline(steps, "reg", reg, grid, param_grid)


def _sklearn_fit_predict(data: TaskData, X_train: np.ndarray, y_train: np.ndarray, X_test: np.ndarray,
                         inner: Sequence[tuple[np.ndarray, np.ndarray]], estimator: str, *,
                         pca_components: int | None, seed: int, n_estimators: int,
                         grids: Mapping[str, Mapping[str, Sequence[Any]]]) -> dict[str, np.ndarray]:
    kind = data.task.kind
    min_train = min(len(tr) for tr, _ in inner)
    common = dict(n_features=X_train.shape[1], min_train_size=min_train, pca_components=pca_components, seed=seed,
                  n_estimators=n_estimators, param_grid=grids.get(estimator))
    if kind is TaskKind.REGRESSION:
        pipe, grid = build_regressor(estimator, **common)
        search = GridSearchCV(pipe, grid, scoring="neg_mean_absolute_error", cv=inner, n_jobs=1, error_score="raise")
    else:
        pipe, grid = build_pipeline(estimator, **common)
        if kind is TaskKind.BINARY:
            search = GridSearchCV(pipe, grid, scoring={"roc_auc": "roc_auc", "balanced_accuracy": "balanced_accuracy"},
                                  cv=inner, refit=_best_auc_plus_balanced_accuracy, n_jobs=1, error_score="raise")
        else:
            scoring = "f1_macro" if kind is TaskKind.MULTICLASS else make_scorer(cohen_kappa_score,
                                                                                 weights="quadratic")
            search = GridSearchCV(pipe, grid, scoring=scoring, cv=inner, n_jobs=1, error_score="raise")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # single-class inner folds, convergence on tiny folds: scored, not fatal
        search.fit(X_train, y_train)
    best = search.best_estimator_
    if kind is TaskKind.REGRESSION:
        return {"value": best.predict(X_test)}
    code = best.predict(X_test).astype(np.int64)
    if kind is TaskKind.BINARY:
        return {"score": _scores(best, X_test, 2), "code": code}
    return {"code": code, "value": code.astype(np.float64)}


def _repeat_scores(metric: str, truth: np.ndarray, oof: Mapping[str, np.ndarray], n_classes: int,
                   weights: np.ndarray | None = None) -> np.ndarray:
    """Mean over repeats of the metric of each repeat's pooled predictions (one value per column)."""
    pred = ridge_model.prediction_for(metric, oof)
    with np.errstate(invalid="ignore"):
        return np.mean([score(metric, truth, pred[r], weights, n_classes=n_classes) for r in range(pred.shape[0])],
                       axis=0)


def _participant_weights(groups: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_scans, n_boot) weights: how often each scan's participant was drawn in each bootstrap sample."""
    unique, index = np.unique(groups, return_inverse=True)
    draws = rng.integers(0, len(unique), size=(n_boot, len(unique)))
    counts = np.zeros((n_boot, len(unique)))
    np.add.at(counts, (np.repeat(np.arange(n_boot), len(unique)), draws.ravel()), 1.0)
    return counts[:, index].T


def _interval(metric: str, truth: np.ndarray, oof: Mapping[str, np.ndarray], groups: np.ndarray, n_classes: int,
              n_boot: int, seed: int, confidence: float) -> tuple[float, float]:
    if n_boot == 0:
        return float("nan"), float("nan")
    weights = _participant_weights(groups, n_boot, np.random.default_rng([seed, 7]))
    observed_only = {k: v[..., :1] for k, v in oof.items()}
    values = _repeat_scores(metric, truth, {k: np.broadcast_to(v, (*v.shape[:2], n_boot)) for k, v in
                                            observed_only.items()}, n_classes, weights)
    if not np.isfinite(values).any():
        return float("nan"), float("nan")
    lo, hi = np.nanquantile(values, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(lo), float(hi)


def _p_value(metric: str, observed: float, null: np.ndarray) -> float:
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    return permutation_p_value(sign * observed, sign * null)


def _label_matrix(target: np.ndarray, groups: np.ndarray, n_permutations: int, seed: int) -> np.ndarray:
    """(n, 1 + n_permutations): the observed target, then permutations among participants."""
    return permutation_matrix(target, groups, n_permutations, seed=seed)


def evaluate_feature_set(
    data: TaskData,
    features: FeatureSet,
    external_features: np.ndarray | None,
    *,
    estimators: Sequence[str],
    alphas: Sequence[float],
    n_permutations: int,
    n_bootstrap: int,
    confidence: float,
    seed: int,
    n_estimators: int,
    grids: Mapping[str, Mapping[str, Sequence[Any]]],
) -> tuple[list[dict[str, Any]], pd.DataFrame, list[dict[str, Any]], pd.DataFrame]:
    """Every estimator on one feature set: (CV rows, CV predictions, external rows, external predictions).

    Rows hold the metric columns of :data:`RESULT_COLUMNS` (the caller adds task/model/split/note).
    Only ``ridge`` gets a permutation test (``n_permutations`` label vectors solved at once).
    """
    task, X, n_classes = data.task, features.X, data.n_classes
    main, second = task.metrics
    n_repeats = max(f.repeat for f in data.folds) + 1
    cv_rows, ext_rows, preds, ext_preds = [], [], [], []
    # The permutation test reruns the first outer repeat's nested CV with labels permuted among the
    # participants of each of its test folds: every training set keeps the observed class balance (value
    # distribution), as in the stratified observed CV. Permuting across folds would shift training means
    # against test folds, bias the null below chance and make p-values too small.
    first_test_fold = np.zeros(len(data.target), dtype=np.int64)
    for f in data.folds:
        if f.repeat == 0:
            first_test_fold[f.test] = f.fold
    for estimator in estimators:
        is_ridge = estimator == "ridge"
        n_perm = n_permutations if is_ridge else 0
        labels = permutation_matrix(data.target, data.groups, n_perm, seed=seed, blocks=first_test_fold)
        oof: dict[str, np.ndarray] = {}
        null_oof: dict[str, np.ndarray] = {}
        with threadpool_limits(limits=1):
            for f, inner in zip(data.folds, data.inner):
                if is_ridge:
                    columns = labels[f.train] if f.repeat == 0 else labels[f.train, :1]
                    out, _ = ridge_model.fit_predict(X[f.train], columns, X[f.test], inner, kind=task.kind,
                                                     n_classes=n_classes, metric=main, alphas=alphas,
                                                     pca_components=features.pca_components)
                else:
                    out = {k: v[:, None] for k, v in _sklearn_fit_predict(
                        data, np.asarray(X[f.train]), data.target[f.train], np.asarray(X[f.test]), inner, estimator,
                        pca_components=features.pca_components, seed=seed, n_estimators=n_estimators,
                        grids=grids).items()}
                for k, v in out.items():
                    oof.setdefault(k, np.full((n_repeats, len(data.target), 1), np.nan))[f.repeat, f.test] = v[:, :1]
                    if n_perm and f.repeat == 0:
                        null_oof.setdefault(k, np.full((1, len(data.target), n_perm), np.nan))[0, f.test] = v[:, 1:]
        null = None
        if n_perm:
            observed_first = float(_repeat_scores(main, data.target, {k: v[:1] for k, v in oof.items()},
                                                  n_classes)[0])
            null = (observed_first, _repeat_scores(main, labels[:, 1:], null_oof, n_classes))
        row = _row(data.target, data.groups, oof, main, second, n_classes, null=null, n_bootstrap=n_bootstrap,
                   confidence=confidence, seed=seed)
        cv_rows.append({"feature_set": features.name, "classifier": estimator, **row})
        preds.append(_prediction_table(data.scans, data.target, {k: v[..., 0] for k, v in oof.items()},
                                       features.name, estimator, data.classes))
        if len(data.external) and external_features is not None:
            if is_ridge:
                out, _ = ridge_model.fit_predict(X, data.target[:, None], external_features, data.full_inner,
                                                 kind=task.kind, n_classes=n_classes, metric=main, alphas=alphas,
                                                 pca_components=features.pca_components)
                out = {k: v[:, 0] for k, v in out.items()}
            else:
                out = _sklearn_fit_predict(data, np.asarray(X), data.target, np.asarray(external_features),
                                           data.full_inner, estimator, pca_components=features.pca_components,
                                           seed=seed, n_estimators=n_estimators, grids=grids)
            ext_rows.append({"feature_set": features.name, "classifier": estimator,
                             **_external_row(data, out, n_permutations, n_bootstrap, confidence, seed)})
            ext_preds.append(_prediction_table(data.external, data.external_target, {k: v[None] for k, v in
                                                                                     out.items()},
                                               features.name, estimator, data.classes))
    return cv_rows, pd.concat(preds, ignore_index=True), ext_rows, (
        pd.concat(ext_preds, ignore_index=True) if ext_preds else pd.DataFrame())


def _row(truth: np.ndarray, groups: np.ndarray, oof: Mapping[str, np.ndarray], main: str, second: str,
         n_classes: int, *, null: tuple[float, np.ndarray] | None, n_bootstrap: int, confidence: float,
         seed: int) -> dict[str, Any]:
    """Scores of fixed predictions (``oof``: (repeats, n, 1)): both metrics, their participant-bootstrap
    intervals, and the permutation p-value of the main metric: ``null`` = (the observed statistic the
    null is made for, the null statistics), or None for no test."""
    observed = float(_repeat_scores(main, truth, oof, n_classes)[0])
    second_value = float(_repeat_scores(second, truth, oof, n_classes)[0])
    lo, hi = _interval(main, truth, oof, groups, n_classes, n_bootstrap, seed, confidence)
    lo2, hi2 = _interval(second, truth, oof, groups, n_classes, n_bootstrap, seed, confidence)
    n_perm = 0 if null is None else int(np.asarray(null[1]).size)
    return {"n_scans": len(truth), "n_participants": len(set(np.asarray(groups).tolist())), "metric": main,
            "score": observed, "ci_low": lo, "ci_high": hi, "second_metric": second, "second_score": second_value,
            "second_ci_low": lo2, "second_ci_high": hi2,
            "p_perm": _p_value(main, null[0], null[1]) if n_perm else float("nan"), "n_perm": n_perm}


def _external_row(data: TaskData, out: Mapping[str, np.ndarray], n_permutations: int, n_bootstrap: int,
                  confidence: float, seed: int) -> dict[str, Any]:
    """Scores of fixed external predictions; the null permutes the external labels among participants."""
    main, second = data.task.metrics
    truth, groups, k = data.external_target, data.external_groups, data.n_classes
    oof = {key: v[None, :, None] for key, v in out.items()}
    null = None
    if n_permutations and len(set(groups.tolist())) > 1:
        labels = _label_matrix(truth, groups, n_permutations, seed)
        observed = float(_repeat_scores(main, truth, oof, k)[0])
        null = (observed, _repeat_scores(main, labels[:, 1:], oof, k))  # fixed predictions, permuted truth
    return _row(truth, groups, oof, main, second, k, null=null, n_bootstrap=n_bootstrap, confidence=confidence,
                seed=seed)


def _prediction_table(scans: pd.DataFrame, truth: np.ndarray, oof: Mapping[str, np.ndarray], feature_set: str,
                      estimator: str, classes: tuple[str, ...]) -> pd.DataFrame:
    """Long table of the predictions of every repeat (observed labels only), for figures."""
    ids = scans[[c for c in ("scan", "dataset", "participant") if c in scans.columns]].reset_index(drop=True)
    parts = []
    for r in range(next(iter(oof.values())).shape[0]):
        part = ids.assign(feature_set=feature_set, classifier=estimator, repeat=r, y_true=truth)
        for key, v in oof.items():
            part[key] = v[r]
        if classes:
            part["true_label"] = np.asarray(classes, dtype=object)[np.asarray(truth, dtype=np.int64)]
            if "code" in oof:
                part["pred_label"] = np.asarray(classes, dtype=object)[part["code"].to_numpy(dtype=np.int64)]
        parts.append(part)
    return pd.concat(parts, ignore_index=True)
