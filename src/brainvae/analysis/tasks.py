"""Prediction tasks of the analysis: what is predicted (a column), from which scans, scored how.

A task is named in ``analysis.tasks`` of the configuration, e.g. ``ad_stage: {column: ad_stage, kind:
ordinal, where: {group: [DS]}, levels: [asymptomatic, prodromal, dementia]}``. Kept free of
scikit-learn so that the workflow can check tasks when the DAG is built.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

import numpy as np
import pandas as pd

from brainvae.analysis.errors import AnalysisError
from brainvae.analysis.names import MIN_PARTICIPANTS_PER_CLASS
from brainvae.errors import ConfigError

__all__ = ["CLASSIFICATION_ESTIMATORS", "CONFOUNDS", "METRICS", "MISSING", "REGRESSION_ESTIMATORS", "Task",
           "TaskKind", "TaskPlan", "encode_target", "estimators_for", "feature_sets_for", "parse_tasks", "plan_tasks",
           "resolve_column", "task_from_dict", "task_rows", "task_to_dict"]


class TaskKind(str, Enum):
    BINARY = "binary"
    MULTICLASS = "multiclass"
    ORDINAL = "ordinal"
    REGRESSION = "regression"


#: (main metric, second metric) of each kind; the main one is the table's ``score``, the permutation
#: test's statistic and the inner selection criterion of the ridge models.
METRICS: dict[TaskKind, tuple[str, str]] = {
    TaskKind.BINARY: ("auc", "balanced_accuracy"),
    TaskKind.MULTICLASS: ("macro_f1", "balanced_accuracy"),
    TaskKind.ORDINAL: ("kappa_quadratic", "macro_f1"),
    TaskKind.REGRESSION: ("mae", "r2"),
}
#: Estimators by kind; ``ridge`` is the vectorised ridge model of brainvae.analysis.ridge (the one with
#: the permutation test), the others scikit-learn pipelines with an inner grid search.
CLASSIFICATION_ESTIMATORS = ("ridge", "logreg", "linear_svm", "rbf_svm", "random_forest", "knn")
REGRESSION_ESTIMATORS = ("ridge", "svr", "random_forest", "knn")
#: Confound feature sets and the analysis-table columns each is built from (``tiv_ml``: the participants'
#: ``icv_ml`` where given, else the QC brain volume; see brainvae.analysis.steps.scan_table).
CONFOUNDS: dict[str, tuple[str, ...]] = {
    "age": ("age",), "sex": ("sex",), "tiv": ("tiv_ml",), "site": ("dataset",),
}
#: Feature sets of the analysis: ``latents``, ``latents_confounds`` and ``deviation`` (the normative deviation
#: scores of the latents table) are per model, the rest baselines.
MODEL_FEATURE_SETS = ("latents", "latents_confounds", "deviation")
BASELINE_FEATURE_SETS = ("voxels_pca", *CONFOUNDS, "confounds")
FEATURE_SETS = (*MODEL_FEATURE_SETS, *BASELINE_FEATURE_SETS)
#: Cell values that mean "no value" in the samples and analysis tables.
MISSING = ("", "n/a", "nan", "NaN", "None")


@dataclass(frozen=True)
class Task:
    """One prediction task; see the schema's ``analysis.tasks`` for the meaning of each field."""

    name: str
    column: str
    kind: TaskKind
    where: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    positive: str | None = None
    levels: tuple[str, ...] = ()
    hold_out_external: bool = True
    required: bool = True
    #: The analysis-table column holding ``column``: ``column`` itself, or ``label`` when ``column`` is the
    #: datasets' ``label_column`` (the samples table calls it ``label``); see :func:`resolve_column`.
    source: str = ""

    @property
    def table_column(self) -> str:
        return self.source or self.column

    @property
    def metrics(self) -> tuple[str, str]:
        return METRICS[self.kind]

    @property
    def is_classification(self) -> bool:
        return self.kind is not TaskKind.REGRESSION

    def describe(self) -> str:
        scope = "; ".join(f"{c} in {', '.join(v)}" for c, v in self.where.items())
        detail = {TaskKind.BINARY: f", positive {self.positive}", TaskKind.ORDINAL: f", {' < '.join(self.levels)}"}
        return f"{self.name}: {self.kind.value} '{self.column}'{detail.get(self.kind, '')}" + (
            f" (scans with {scope})" if scope else "")


def parse_tasks(settings: Mapping[str, Mapping[str, Any]], *, where: str = "analysis.tasks") -> list[Task]:
    """Tasks from the validated configuration mapping name -> settings (kind-specific fields checked here)."""
    tasks = []
    for name, s in settings.items():
        key = f"{where}.{name}"
        kind = TaskKind(s["kind"])
        positive = s.get("positive")
        levels = tuple(map(str, s.get("levels") or ()))
        if kind is TaskKind.BINARY and positive is None:
            raise AnalysisError(key, "a binary task needs 'positive' (the class counted as positive)")
        if kind is TaskKind.ORDINAL and len(levels) < 2:
            raise AnalysisError(key, "an ordinal task needs 'levels' (two or more, lowest first)")
        if kind is not TaskKind.BINARY and positive is not None:
            raise AnalysisError(key, f"'positive' is only for binary tasks, not {kind.value}")
        if kind is not TaskKind.ORDINAL and levels:
            raise AnalysisError(key, f"'levels' is only for ordinal tasks, not {kind.value}")
        tasks.append(Task(name=name, column=str(s["column"]), kind=kind,
                          where={str(c): tuple(map(str, v)) for c, v in (s.get("where") or {}).items()},
                          positive=None if positive is None else str(positive), levels=levels,
                          hold_out_external=bool(s.get("hold_out_external", True)),
                          required=bool(s.get("required", True))))
    return tasks


def resolve_column(column: str, columns: Sequence[str], label_columns: Sequence[str] = ()) -> str:
    """The table column that holds ``column``: itself when present, else ``label`` when ``column`` is a
    dataset's ``label_column`` (the samples and analysis tables store it as ``label``)."""
    if column in columns:
        return column
    if column in label_columns and "label" in columns:
        return "label"
    return column


def task_rows(table: pd.DataFrame, task: Task) -> np.ndarray:
    """Boolean mask of the rows of ``table`` the task uses: its ``where`` filters and a value in its column."""
    for column in (task.table_column, *task.where):
        if column not in table.columns:
            raise AnalysisError(f"task {task.name}", f"column '{column}' is not in the table "
                                                     f"(columns: {', '.join(map(str, table.columns))})")
    keep = ~table[task.table_column].astype(str).isin(MISSING).to_numpy()
    for column, values in task.where.items():
        keep &= table[column].astype(str).isin(values).to_numpy()
    return keep


def encode_target(task: Task, values: Sequence | np.ndarray) -> tuple[np.ndarray, tuple[str, ...]]:
    """The task's target as numbers, and the class names of the codes (empty for regression).

    Binary: 1 = ``positive``, 0 = the other class; multiclass: sorted class names; ordinal: codes
    0..L-1 in the order of ``levels``; regression: the values as floats.
    """
    values = np.asarray(values).astype(str)
    if task.kind is TaskKind.REGRESSION:
        numbers = pd.to_numeric(pd.Series(values), errors="coerce").to_numpy(dtype=np.float64)
        if not np.isfinite(numbers).all():
            bad = sorted(set(values[~np.isfinite(numbers)].tolist()))[:5]
            raise AnalysisError(f"task {task.name}", f"column '{task.column}' has non-numeric value(s) {bad}")
        return numbers, ()
    present = sorted(set(values.tolist()))
    if task.kind is TaskKind.BINARY:
        if task.positive not in present or len(present) != 2:
            raise AnalysisError(f"task {task.name}", f"a binary task needs two classes of '{task.column}' with "
                                                     f"'{task.positive}' one of them; found {present}")
        classes = (next(c for c in present if c != task.positive), task.positive)
    elif task.kind is TaskKind.ORDINAL:
        unknown = sorted(set(present) - set(task.levels))
        if unknown:
            raise AnalysisError(f"task {task.name}", f"value(s) {unknown} of '{task.column}' are not among its "
                                                     f"levels {list(task.levels)}")
        classes = task.levels
    else:
        classes = tuple(present)
    if len(set(values.tolist())) < 2:
        raise AnalysisError(f"task {task.name}", f"column '{task.column}' has a single value {present}; "
                                                 "nothing to predict")
    lookup = {c: i for i, c in enumerate(classes)}
    return np.array([lookup[v] for v in values], dtype=np.int64), tuple(classes)


def strata(task: Task, target: np.ndarray, groups: np.ndarray, *, n_bins: int = 3) -> np.ndarray:
    """Labels to stratify folds on: the class codes, or for regression tertiles of the participants' values.

    Tertiles of participants (not scans) so every bin has a third of the participants and the
    minimum-per-class checks of brainvae.analysis.cv hold whenever there are enough participants.
    """
    if task.is_classification:
        return np.asarray(target).astype(str)
    per_participant = pd.Series(target).groupby(np.asarray(groups)).first()
    ranks = per_participant.rank(method="first").to_numpy()
    bins = np.minimum((n_bins * (ranks - 1) / len(ranks)).astype(int), n_bins - 1)
    of = dict(zip(per_participant.index, bins))
    return np.array([f"bin{of[g]}" for g in groups])


def estimators_for(kind: TaskKind, estimators: Sequence[str]) -> list[str]:
    """The configured estimators that fit ``kind`` (e.g. no logistic regression for a regression task)."""
    allowed = REGRESSION_ESTIMATORS if kind is TaskKind.REGRESSION else CLASSIFICATION_ESTIMATORS
    return [e for e in estimators if e in allowed]


def feature_sets_for(task: Task, feature_sets: Sequence[str]) -> list[str]:
    """The configured feature sets a task is scored on: a confound set that holds the task's own column
    (``age`` for brain age) would predict the target from itself, so it is left out (and from
    ``confounds``/``latents_confounds`` that column is dropped, see brainvae.analysis.features)."""
    own = {name for name, columns in CONFOUNDS.items() if task.table_column in columns}
    return [f for f in feature_sets if f not in own]


@dataclass(frozen=True)
class TaskPlan:
    """What the workflow runs, decided when the DAG is built: the tasks, and a note per task left out."""

    tasks: list[Task]
    notes: list[str]


def _participants(rows: pd.DataFrame) -> int:
    return int(rows.drop_duplicates(["dataset", "subject"]).shape[0])


def plan_tasks(
    settings: Mapping[str, Mapping[str, Any]],
    samples: pd.DataFrame,
    datasets: Sequence[Mapping[str, Any]],
    *,
    external_datasets: Sequence[str] = (),
    key: str = "analysis",
) -> TaskPlan:
    """Check the configured tasks against the samples table when the DAG is built.

    ``external_datasets``: names held out as external validation; one that is a configured dataset
    without role analyse/both is an error, one that is not configured at all only a note.

    ``samples``: the cohort's scans (columns dataset, subject, label, analyse and the covariates);
    the analysed scans are those of datasets with role analyse or both. Raises
    :class:`~brainvae.errors.ConfigError` naming the key for a mistake in the configuration: a
    positive class or ordinal level that no dataset has, an external dataset that is not an
    analysed dataset, more than two classes for a binary task; and, for a task with ``required: true``,
    what the data cannot give: a column missing from the samples table, one class only, a non-numeric
    regression target, too few participants. A task with ``required: false`` is left out with a note instead.
    """
    names = {str(d["name"]): d for d in datasets}
    analysed_names = [n for n, d in names.items() if d.get("role") in ("analyse", "both")]
    notes: list[str] = []
    for name in external_datasets:
        if name not in names:
            # A configuration that replaces the dataset list keeps the demo's external dataset name: not an error.
            notes.append(f"external dataset {name} is not configured: nothing is held out for it")
        elif name not in analysed_names:
            raise ConfigError(f"{key}.external_datasets: '{name}' is not a dataset with role analyse or both "
                              f"(those: {', '.join(analysed_names) or 'none'})")
    external_datasets = [n for n in external_datasets if n in names]
    label_columns = sorted({str(d["label_column"]) for d in datasets if d.get("label_column")})
    declared = {str(v) for d in datasets for v in (d.get("labels") or ())}
    analyse = samples["analyse"].astype(str).isin(["True", "true", "1"]) if "analyse" in samples.columns else \
        samples["dataset"].astype(str).isin(analysed_names)
    analysed = samples[analyse.to_numpy()]
    columns = [str(c) for c in samples.columns]
    tasks = []
    for task in parse_tasks_config(settings, key=f"{key}.tasks"):
        where_key = f"{key}.tasks.{task.name}"

        def skip(reason: str, field_: str = "") -> None:
            if task.required:
                raise ConfigError(f"{where_key}{'.' + field_ if field_ else ''}: {reason} (set required: false "
                                  "to leave the task out instead)")
            notes.append(f"task {task.name} is left out: {reason}")

        if analysed.empty:
            skip("no scans of a dataset with role analyse or both")
            continue
        source = resolve_column(task.column, columns, label_columns)
        where = {resolve_column(c, columns, label_columns): v for c, v in task.where.items()}
        missing = [c for c in (source, *where) if c not in columns]
        if missing:
            skip(f"column(s) {', '.join(missing)} not in the samples table (add them to the datasets' covariates; "
                 f"columns: {', '.join(columns)})", "column")
            continue
        task = replace(task, source=source, where=where)
        rows = analysed[task_rows(analysed, task)]
        values = rows[source].astype(str)
        present = sorted(set(values))
        if task.kind is TaskKind.BINARY:
            if task.positive not in present and task.positive not in declared:
                if len(set(present) | declared) < 2:  # one class only: the task cannot run, not a typo
                    skip(f"column '{task.column}' has one value only ({', '.join(present) or 'none'}); "
                         f"positive class '{task.positive}' has no scans", "positive")
                    continue
                raise ConfigError(f"{where_key}.positive: '{task.positive}' is not a value of column '{task.column}' "
                                  f"(values: {', '.join(present) or 'none'}; datasets' labels: "
                                  f"{', '.join(sorted(declared)) or 'none'})")
            if len(present) > 2:
                raise ConfigError(f"{where_key}.kind: binary, but column '{task.column}' has {len(present)} values "
                                  f"({', '.join(present)}); narrow it with 'where' or use kind multiclass")
        if task.kind is TaskKind.ORDINAL:
            unknown = sorted(set(present) - set(task.levels))
            if unknown:
                raise ConfigError(f"{where_key}.levels: value(s) {', '.join(unknown)} of column '{task.column}' are "
                                  f"not among the levels {', '.join(task.levels)}")
        if task.kind is TaskKind.REGRESSION:
            numbers = pd.to_numeric(values, errors="coerce")
            if numbers.isna().any():
                bad = sorted(set(values[numbers.isna().to_numpy()]))[:5]
                skip(f"regression needs numbers; column '{task.column}' has {', '.join(bad)}", "column")
                continue
        cv = rows[~rows["dataset"].astype(str).isin(list(external_datasets))] if task.hold_out_external else rows
        if task.is_classification:
            per_class = {c: _participants(cv[cv[source].astype(str) == c]) for c in sorted(set(cv[source].astype(str)))}
            small = {c: n for c, n in per_class.items() if n < MIN_PARTICIPANTS_PER_CLASS}
            if len(per_class) < 2 or small:
                counts = ", ".join(f"{c}: {n}" for c, n in per_class.items()) or "no scans"
                skip(f"needs two or more classes of '{task.column}' with at least {MIN_PARTICIPANTS_PER_CLASS} "
                     f"participants each in the analysed datasets outside the external ones ({counts})")
                continue
        elif _participants(cv) < 3 * MIN_PARTICIPANTS_PER_CLASS:
            skip(f"needs at least {3 * MIN_PARTICIPANTS_PER_CLASS} participants with a '{task.column}' value in the "
                 f"analysed datasets outside the external ones ({_participants(cv)})")
            continue
        tasks.append(task)
    return TaskPlan(tasks, notes)


def parse_tasks_config(settings: Mapping[str, Mapping[str, Any]], *, key: str = "analysis.tasks") -> list[Task]:
    """:func:`parse_tasks`, with its errors as :class:`~brainvae.errors.ConfigError` (for DAG-time checks)."""
    try:
        return parse_tasks(settings, where=key)
    except AnalysisError as error:
        raise ConfigError(str(error)) from error


def task_to_dict(task: Task) -> dict[str, Any]:
    """A plain mapping of ``task`` (for Snakemake params and settings files); :func:`task_from_dict` reverses it."""
    return {"name": task.name, "column": task.column, "kind": task.kind.value,
            "where": {c: list(v) for c, v in task.where.items()}, "positive": task.positive,
            "levels": list(task.levels), "hold_out_external": task.hold_out_external, "required": task.required,
            "source": task.source}


def task_from_dict(data: Mapping[str, Any]) -> Task:
    return Task(name=str(data["name"]), column=str(data["column"]), kind=TaskKind(data["kind"]),
                where={str(c): tuple(map(str, v)) for c, v in (data.get("where") or {}).items()},
                positive=data.get("positive"), levels=tuple(map(str, data.get("levels") or ())),
                hold_out_external=bool(data.get("hold_out_external", True)), required=bool(data.get("required", True)),
                source=str(data.get("source") or ""))
