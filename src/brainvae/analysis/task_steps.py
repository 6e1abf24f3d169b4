"""File-level steps of the prediction tasks: which scans each model is scored on, every task on every
feature set, and the combined tables and per-task figures of the report.

Which scans are analysed (``select_scans``): scans of datasets with role analyse or both whose split
*in the model being analysed* (its own ``splits.tsv``, carried in its latents table as ``split``; a
scan absent from it is ``none``) is one of ``analysis.splits``. The default ``[none]`` keeps only
scans the model never saw. Baselines (voxels, confounds) use no model, so they take the scans that
are in the selection of *every* model: by default the same scans, so latents and baselines are
scored on the same participants and folds (paired).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from brainvae.analysis.errors import AnalysisError
from brainvae.analysis.evaluate import RESULT_COLUMNS, evaluate_feature_set, prepare_task
from brainvae.analysis.features import (
    FeatureSet,
    align_rows,
    confound_features,
    latent_matrix,
    load_latents,
    load_voxel_matrix,
    row_space,
)
from brainvae.analysis.tables import to_html, to_markdown, write_tsv
from brainvae.analysis.tasks import CONFOUNDS, Task, estimators_for, feature_sets_for, task_from_dict
from brainvae.io import atomic_write_text
from brainvae.latents_table import DEVIATION_COLUMNS

__all__ = ["NOT_IN_SPLIT", "NO_MODEL", "select_scans", "task_feature_matrix", "tasks_step", "tasks_tables"]

#: Split of a scan the model never saw (the latents table's word, brainvae.vae.latents).
NOT_IN_SPLIT = "none"
#: Model column of baseline rows (voxels, confounds): they use no VAE.
NO_MODEL = "(none)"


def select_scans(scans: pd.DataFrame, split_tables: Sequence[pd.DataFrame], include_splits: Sequence[str], *,
                 allow_empty: bool = False) -> pd.DataFrame:
    """The analysed scans: datasets with role analyse/both (column ``analyse``), split in every table
    of ``split_tables`` (scan, split; a scan absent is ``none``) among ``include_splits``.

    The result's ``split`` column holds the scan's split (``a/b`` when the tables disagree). No scan
    left is an error unless ``allow_empty``.
    """
    if not split_tables:
        raise AnalysisError("analysed scans", "no split table given (one per model)")
    keep = np.ones(len(scans), dtype=bool)
    if "analyse" in scans.columns:
        keep &= scans["analyse"].astype(str).isin(["True", "true", "1"]).to_numpy()
    per_table = []
    for table in split_tables:
        split_of = dict(zip(table["scan"].astype(str), table["split"].astype(str)))
        splits = np.array([split_of.get(s, NOT_IN_SPLIT) for s in scans["scan"].astype(str)], dtype=object)
        keep &= np.isin(splits, list(include_splits))
        per_table.append(splits)
    combined = ["/".join(dict.fromkeys(values)) for values in zip(*per_table)]
    out = scans.drop(columns=["split"], errors="ignore").assign(split=combined)[keep].reset_index(drop=True)
    if out.empty and not allow_empty:
        raise AnalysisError("analysed scans", f"no scan of a dataset with role analyse or both has a split in "
                                              f"{', '.join(include_splits)} (analysis.splits)")
    return out


def task_feature_matrix(name: str, task: Task, scans: pd.DataFrame, *, latents: np.ndarray | None,
                        voxels: np.ndarray | None, voxel_pca_components: int,
                        deviation: np.ndarray | None = None) -> FeatureSet:
    """The feature set ``name`` for ``task``, rows aligned to ``scans``. ``deviation``: the latents table's
    :data:`~brainvae.latents_table.DEVIATION_COLUMNS` (latent Mahalanobis distance, reconstruction-error z).

    Confound columns equal to the task's column (age, for brain age) are left out of ``confounds``
    and ``latents_confounds``; brainvae.analysis.tasks.feature_sets_for drops the ``age`` set itself.
    """
    exclude = (task.table_column,)
    if name == "deviation":
        if deviation is None:
            raise AnalysisError("feature set 'deviation'", "the latents table has no deviation scores "
                                                           f"({', '.join(DEVIATION_COLUMNS)})")
        if not np.isfinite(deviation).all():
            raise AnalysisError("feature set 'deviation'", "some analysed scans have no deviation score (the model's "
                                                           "splits give fewer than two reference scans)")
        return FeatureSet(name, deviation)
    if name in ("latents", "latents_confounds"):
        if latents is None:
            raise AnalysisError(f"feature set '{name}'", "no latents given")
        if name == "latents":
            return FeatureSet("latents", latents)
        conf = confound_features(scans, list(CONFOUNDS), exclude=exclude)
        return FeatureSet(name, np.hstack([latents, conf.X]))
    if name == "voxels_pca":
        if voxels is None:
            raise AnalysisError("feature set 'voxels_pca'", "no voxel matrix given")
        return FeatureSet(name, voxels, pca_components=voxel_pca_components)
    if name == "confounds":
        return confound_features(scans, list(CONFOUNDS), exclude=exclude, name=name)
    return confound_features(scans, [name], exclude=exclude, name=name)


def _splits_used(table: pd.DataFrame) -> str:
    return ",".join(sorted(set("/".join(sorted(set(str(s).split("/")))) for s in table["split"])))


def tasks_step(
    scans: pd.DataFrame,
    tasks: Sequence[Mapping[str, Any] | Task],
    out_dir: str | os.PathLike[str],
    *,
    feature_sets: Sequence[str],
    model: str | None = None,
    latents: str | os.PathLike[str] | None = None,
    voxels: str | os.PathLike[str] | None = None,
    voxel_index: str | os.PathLike[str] | None = None,
    voxel_pca_components: int = 10,
    estimators: Sequence[str] = ("ridge",),
    alphas: Sequence[float] = (0.1, 1.0, 10.0, 100.0, 1000.0),
    n_splits: int = 5,
    n_repeats: int = 2,
    n_inner: int = 3,
    seed: int = 0,
    n_permutations: int = 1000,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    external_datasets: Sequence[str] = (),
    n_estimators: int = 50,
    grids: Mapping[str, Mapping[str, Sequence[Any]]] | None = None,
) -> dict[str, Path]:
    """Every task on every feature set (those of ``feature_sets`` it fits) with every estimator of its kind:
    ``results.tsv`` (columns :data:`~brainvae.analysis.evaluate.RESULT_COLUMNS`; cross-validated rows
    ``evaluated_on = cv``, rows of the external datasets named by them) and ``predictions.tsv`` in ``out_dir``.

    ``scans``: the analysed scans (:func:`select_scans`). External datasets' scans are never in the
    cross-validation: each estimator is fitted on all cross-validated scans and applied to them unchanged.
    A task with ``required: false`` that these scans cannot support (one class, too few participants)
    gets one row with only its ``note`` filled; a required one raises.
    """
    out = Path(out_dir)
    scans = scans.reset_index(drop=True)
    L = V = D = None
    if len(scans) and latents is not None:
        table = load_latents(latents, required=("scan", "dataset", "participant"))
        L = np.asarray(align_rows(scans, table, latent_matrix(table), what=str(latents)), dtype=np.float64)
        if set(DEVIATION_COLUMNS) <= set(table.columns):
            scores = table[list(DEVIATION_COLUMNS)].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
            D = np.asarray(align_rows(scans, table, scores, what=str(latents)), dtype=np.float64)
    if len(scans) and voxels is not None and any(f == "voxels_pca" for f in feature_sets):
        X, index = load_voxel_matrix(voxels, voxel_index)
        V = row_space(align_rows(scans, index, X, what=str(voxels)))
    position = pd.Series(np.arange(len(scans)), index=scans["scan"].astype(str))
    rows, predictions, notes = [], [], []
    for task in (t if isinstance(t, Task) else task_from_dict(t) for t in tasks):
        try:
            data = prepare_task(task, scans, external_datasets=external_datasets, n_splits=n_splits,
                                n_repeats=n_repeats, n_inner=n_inner, seed=seed)
        except AnalysisError as error:
            if task.required:
                raise
            # required: false: left out when the analysed scans cannot support it (e.g. one class only).
            notes.append({"task": task.name, "kind": task.kind.value, "model": model or NO_MODEL,
                          "note": f"left out: {error}"})
            continue
        cv_at = position.loc[data.scans["scan"].astype(str)].to_numpy()
        ext_at = position.loc[data.external["scan"].astype(str)].to_numpy()
        evaluated_ext = "+".join(sorted(set(data.external["dataset"].astype(str)))) if len(ext_at) else ""
        tag = {"task": task.name, "kind": task.kind.value, "model": model or NO_MODEL}
        for name in feature_sets_for(task, feature_sets):
            try:
                features = task_feature_matrix(name, task, scans, latents=L, voxels=V,
                                               voxel_pca_components=voxel_pca_components, deviation=D)
            except AnalysisError as error:
                if name != "deviation":
                    raise
                # A model whose splits hold too few reference scans has no deviation scores: said, not fatal.
                notes.append({**tag, "note": f"feature set deviation left out: {error}"})
                continue
            cv_features = FeatureSet(name, features.X[cv_at], pca_components=features.pca_components)
            ext_features = features.X[ext_at] if len(ext_at) else None
            cv_rows, cv_preds, ext_rows, ext_preds = evaluate_feature_set(
                data, cv_features, ext_features, estimators=estimators_for(task.kind, estimators), alphas=alphas,
                n_permutations=n_permutations, n_bootstrap=n_bootstrap, confidence=confidence, seed=seed,
                n_estimators=n_estimators, grids=grids or {})
            rows += [{**tag, **r, "evaluated_on": "cv", "split_used": _splits_used(data.scans)} for r in cv_rows]
            rows += [{**tag, **r, "evaluated_on": evaluated_ext, "split_used": _splits_used(data.external)}
                     for r in ext_rows]
            predictions.append(cv_preds.assign(**tag, evaluated_on="cv"))
            if len(ext_preds):
                predictions.append(ext_preds.assign(**tag, evaluated_on=evaluated_ext))
    result = pd.DataFrame(rows + notes, columns=[*RESULT_COLUMNS, "note"])
    lead = ["task", "model", "feature_set", "classifier", "evaluated_on"]
    preds = pd.concat(predictions, ignore_index=True) if predictions else pd.DataFrame(columns=lead)
    preds = preds[lead + [c for c in preds.columns if c not in lead]]
    return {"results": write_tsv(result, out / "results.tsv"), "predictions": write_tsv(preds, out / "predictions.tsv")}


def _read(path: str | os.PathLike[str]) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        raise AnalysisError(str(path), "does not exist")
    return pd.read_csv(path, sep="\t", na_values=["n/a"], keep_default_na=False, dtype={"model": str})


METRIC_LABELS = {"auc": "ROC AUC", "balanced_accuracy": "balanced accuracy", "macro_f1": "macro F1",
                 "kappa_quadratic": "quadratic kappa", "mae": "MAE", "r2": "R²"}


def _fmt(x: float) -> str:
    return "–" if not np.isfinite(x) else f"{x:.3g}" if abs(x) >= 10 else f"{x:.2f}"


def format_tasks_table(table: pd.DataFrame) -> pd.DataFrame:
    """Strings for the report: ``score [ci_low, ci_high]`` of both metrics, ``p (n=perms)``."""
    def metric(r: pd.Series, prefix: str) -> str:
        name = r["metric"] if prefix == "" else r["second_metric"]
        score = r["score"] if prefix == "" else r["second_score"]
        return (f"{METRIC_LABELS.get(name, name)} {_fmt(score)} [{_fmt(r[f'{prefix}ci_low'])}, "
                f"{_fmt(r[f'{prefix}ci_high'])}]")

    return pd.DataFrame({
        "Task": table["task"], "Model": table["model"], "Features": table["feature_set"],
        "Estimator": table["classifier"], "Evaluated on": table["evaluated_on"], "Scans": table["n_scans"],
        "Score [CI]": [metric(r, "") for _, r in table.iterrows()],
        "Second [CI]": [metric(r, "second_") for _, r in table.iterrows()],
        "p (permutation)": ["–" if not np.isfinite(p) else f"{p:.3g} (n={int(n)})"
                            for p, n in zip(table["p_perm"], table["n_perm"])],
        "Splits": table["split_used"],
    })


def _caption(splits: Sequence[str]) -> str:
    trained = sorted(set(splits) - {NOT_IN_SPLIT})
    seen = (f" Scans the VAE trained, validated or was tested on (split {', '.join(trained)}) are included as asked "
            "by analysis.splits: those latents are fitted to the scans." if trained else
            " Only scans the VAE never saw (split none).")
    return ("Per task, feature set and estimator: the score of the pooled out-of-fold predictions of a nested, "
            "participant-grouped cross-validation (mean over outer repeats; evaluated_on = cv), and of a model "
            "fitted on every cross-validated scan applied unchanged to the external dataset(s). [CI]: "
            "participant bootstrap of the same predictions. p: permutation test (labels permuted among "
            "participants, the whole nested CV rerun for ridge; fixed predictions for external rows). Model "
            f"'{NO_MODEL}': baselines that use no VAE." + seen)


def tasks_tables(
    result_files: Sequence[str | os.PathLike[str]],
    prediction_files: Sequence[str | os.PathLike[str]],
    tables_dir: str | os.PathLike[str],
    figures: Mapping[str, str | os.PathLike[str]],
    task_tables: Mapping[str, str | os.PathLike[str]],
) -> dict[str, Path]:
    """The tasks table of every model and baseline (``classification.{tsv,md,html}`` in ``tables_dir``), its
    external-validation rows alone (``external.tsv``: the same columns, fitted on the analysis datasets and
    applied unchanged to each external dataset named in ``evaluated_on``), and per task an HTML table (``task_tables[task]``) and one figure (``figures[task]``): ROC curves
    (binary) or predicted against true values (ordinal, multiclass, regression), cross-validated
    predictions of the first estimator, one curve or panel per feature set."""
    from brainvae.analysis.plots import plot_message, plot_task_figure

    out = Path(tables_dir)
    every = pd.concat([_read(p) for p in result_files], ignore_index=True)
    preds = pd.concat([_read(p) for p in prediction_files], ignore_index=True)
    left_out = every["metric"].isna() if "metric" in every.columns else pd.Series(False, index=every.index)
    notes = every[left_out.to_numpy()]
    table = every[~left_out.to_numpy()].reset_index(drop=True).drop(columns=["note"], errors="ignore")
    shown = format_tasks_table(table)
    caption = _caption([s for v in table["split_used"].astype(str) for s in v.replace("/", ",").split(",")])
    if len(notes):
        caption += " Left out: " + "; ".join(sorted({f"{r.task} ({r.note})" for r in notes.itertuples()})) + "."
    paths = {"tsv": write_tsv(table, out / "classification.tsv"),
             "external": write_tsv(table[table["evaluated_on"].astype(str) != "cv"].reset_index(drop=True),
                                   out / "external.tsv"),
             "md": atomic_write_text(f"{caption}\n\n{to_markdown(shown)}", out / "classification.md"),
             "html": atomic_write_text(to_html(shown, title="Prediction tasks", caption=caption),
                                       out / "classification.html")}
    for task, path in task_tables.items():
        part = table["task"] == task
        paths[f"table_{task}"] = atomic_write_text(to_html(shown[part.to_numpy()], title=f"Task {task}",
                                                           caption=caption), path)
    for task, path in figures.items():
        part = preds[(preds["task"] == task) & (preds["evaluated_on"] == "cv")]
        kinds = table.loc[table["task"] == task, "kind"]
        if part.empty or kinds.empty:
            reasons = sorted(set(notes.loc[notes["task"] == task, "note"].astype(str))) or ["no predictions"]
            paths[f"figure_{task}"] = plot_message(path, f"Task {task}", "; ".join(reasons))
            continue
        part = part[part["classifier"] == part["classifier"].iloc[0]]
        paths[f"figure_{task}"] = plot_task_figure(part, path, kind=str(kinds.iloc[0]), title=f"Task {task}")
    return paths
