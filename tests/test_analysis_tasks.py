"""Tasks of the analysis: metrics by hand, the vectorised ridge nested CV against scikit-learn, participant-level
permutations (subjects' scans together, p-values uniform under a null), and the start-up checks of the tasks."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import Ridge
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from brainvae.analysis import ridge as ridge_model
from brainvae.analysis.cv import permutation_matrix, permute_labels_by_group
from brainvae.analysis.evaluate import evaluate_feature_set, prepare_task
from brainvae.analysis.features import FeatureSet
from brainvae.analysis.metrics import auc, balanced_accuracy, kappa_quadratic, macro_f1, mae, r2
from brainvae.analysis.tasks import TaskKind, parse_tasks, plan_tasks
from brainvae.errors import ConfigError

DEFAULT_TASKS = {
    "ds_vs_euploid": {"column": "group", "kind": "binary", "positive": "DS"},
    "ad_stage": {"column": "ad_stage", "kind": "ordinal", "where": {"group": ["DS"]},
                 "levels": ["asymptomatic", "prodromal", "dementia"]},
    "brain_age": {"column": "age", "kind": "regression"},
}


# --- metrics, by hand -----------------------------------------------------------------------------------------------

def test_auc_by_hand_with_a_tie_and_per_column():
    # positives score 0.9, 0.4; negatives 0.4, 0.1: pairs (0.9>0.4) (0.9>0.1) (0.4=0.4 half) (0.4>0.1) = 3.5 / 4
    positive = np.array([True, True, False, False])
    scores = np.array([0.9, 0.4, 0.4, 0.1])
    assert auc(positive, scores) == pytest.approx([0.875])
    both = auc(np.column_stack([positive, ~positive]), scores)
    assert both == pytest.approx([0.875, 0.125])
    # weights = how often a participant was drawn: drawing the first positive twice adds its 2 wins again.
    assert auc(positive, scores, np.array([2.0, 1, 1, 1])) == pytest.approx([(2 * 2 + 1.5) / 6])


def test_balanced_accuracy_f1_and_quadratic_kappa_by_hand():
    y = np.array([0, 0, 0, 1, 1, 2])
    pred = np.array([0, 0, 1, 1, 2, 2])
    # recalls 2/3, 1/2, 1
    assert balanced_accuracy(y, pred, n_classes=3) == pytest.approx([(2 / 3 + 1 / 2 + 1) / 3])
    # F1 per class: 0: 2*2/(3+2)=0.8; 1: 2*1/(2+2)=0.5; 2: 2*1/(1+2)=2/3
    assert macro_f1(y, pred, n_classes=3) == pytest.approx([(0.8 + 0.5 + 2 / 3) / 3])
    # quadratic kappa: observed disagreements (0->1: 1, 1->2: 1) weigh 1 each: sum w*O = 2 (counts);
    # expected E = rows (3,2,1) x cols (2,2,2) / 6; sum w*E = (3*2*(1+4) + 2*2*(1+1) + 1*2*(4+1)) / 6 = 48/6 = 8
    assert kappa_quadratic(y, pred, n_classes=3) == pytest.approx([1 - 2 / 8])
    assert kappa_quadratic(y, y, n_classes=3) == pytest.approx([1.0])


def test_mae_and_r2_by_hand():
    y = np.array([1.0, 2.0, 3.0, 4.0])
    pred = np.array([1.0, 3.0, 3.0, 2.0])
    assert mae(y, pred) == pytest.approx([0.75])
    # SS_res = 0 + 1 + 0 + 4 = 5; SS_tot = 1.5² + 0.5² + 0.5² + 1.5² = 5
    assert r2(y, pred) == pytest.approx([0.0])
    assert r2(y, y) == pytest.approx([1.0])


# --- permutations -----------------------------------------------------------------------------------------------

def test_permutations_keep_a_participants_scans_together():
    groups = np.array(["A/1", "A/1", "A/2", "B/1", "B/1", "B/1", "A/3"])
    labels = np.array(["DS", "DS", "euploid", "DS", "DS", "DS", "euploid"])
    matrix = permutation_matrix(labels, groups, 200, seed=3)
    assert matrix.shape == (7, 201) and (matrix[:, 0] == labels).all()
    for g in np.unique(groups):
        rows = matrix[groups == g]
        assert (rows == rows[0]).all()  # every scan of a participant has one label in every permutation
    # Each permutation relabels participants: as many DS participants as observed.
    first = pd.DataFrame(matrix[:, 1:]).groupby(groups).first()
    assert ((first == "DS").sum(axis=0) == 2).all()
    assert len({tuple(c) for c in matrix[:, 1:].T}) > 1
    one = permute_labels_by_group(labels, groups, np.random.default_rng(0))
    assert pd.Series(one).groupby(groups).nunique().max() == 1


def test_permutations_of_values_that_vary_within_participants_move_whole_vectors():
    groups = np.repeat(np.arange(30), 2).astype(str)
    age = np.arange(60, dtype=float)  # every scan its own value; a participant's two sessions 1 year apart
    matrix = permutation_matrix(age, groups, 50, seed=0)
    for column in matrix[:, 1:].T:
        assert sorted(column) == sorted(age)
        assert (column[1::2] - column[0::2] == 1).all()  # a participant's sessions stay together, in order


def test_permutations_within_blocks_keep_every_blocks_values():
    groups = np.repeat(np.arange(40), 2).astype(str)
    labels = np.repeat(np.arange(40) % 2, 2)
    folds = np.repeat(np.arange(40) // 2 % 4, 2)  # e.g. the outer test fold of each participant
    matrix = permutation_matrix(labels, groups, 100, seed=1, blocks=folds)
    for fold in range(4):
        rows = folds == fold
        assert (matrix[rows].sum(axis=0) == labels[rows].sum()).all()  # the class balance of every fold is kept
    assert (matrix[:, 1:] != labels[:, None]).any(axis=0).all()
    with pytest.raises(Exception, match="different blocks"):
        permutation_matrix(labels, groups, 3, blocks=np.arange(80) % 4)


def test_permutation_of_1000_label_vectors_is_fast():
    import time

    groups = np.repeat(np.arange(500), 2).astype(str)
    labels = np.repeat(np.arange(500) % 2, 2)
    start = time.perf_counter()
    permutation_matrix(labels, groups, 1000, seed=0)
    assert time.perf_counter() - start < 1.0


# --- ridge nested CV against scikit-learn ----------------------------------------------------------------------------

def test_ridge_of_every_alpha_and_column_matches_scikit_learn():
    rng = np.random.default_rng(1)
    X, X_test = rng.normal(size=(30, 5)), rng.normal(size=(7, 5))
    Y = rng.normal(size=(30, 3))
    alphas = np.array([0.1, 1.0, 10.0])
    ours = ridge_model._all_alphas(X, Y[:, :, None], X_test, alphas, None)
    for a, alpha in enumerate(alphas):
        for c in range(3):
            theirs = make_pipeline(StandardScaler(), Ridge(alpha=alpha)).fit(X, Y[:, c]).predict(X_test)
            assert ours[a, :, c, 0] == pytest.approx(theirs, rel=1e-8, abs=1e-10)


def test_ridge_inner_choice_of_alpha_matches_a_scikit_learn_grid_search():
    from sklearn.model_selection import cross_val_predict

    rng = np.random.default_rng(2)
    X = rng.normal(size=(40, 6))
    y = (X[:, 0] + 0.8 * rng.normal(size=40) > 0).astype(int)
    X_test = rng.normal(size=(9, 6))
    inner = [(np.setdiff1d(np.arange(40), part), part) for part in np.array_split(rng.permutation(40), 4)]
    inner = [(np.sort(a), np.sort(b)) for a, b in inner]
    alphas = [0.01, 1.0, 100.0, 1e4]
    out, chosen = ridge_model.fit_predict(X, y[:, None], X_test, inner, kind=TaskKind.BINARY, n_classes=2,
                                          metric="auc", alphas=alphas)
    # The same procedure with scikit-learn: RidgeClassifier-style ±1 targets, pooled inner predictions, best AUC.
    pooled_auc = []
    for alpha in alphas:
        pipe = make_pipeline(StandardScaler(), Ridge(alpha=alpha))
        pooled = cross_val_predict(pipe, X, np.where(y == 1, 1.0, -1.0), cv=inner)
        pooled_auc.append(auc(y == 1, pooled)[0])
    best = alphas[int(np.argmax(pooled_auc))]
    assert chosen[0] == best
    theirs = make_pipeline(StandardScaler(), Ridge(alpha=best)).fit(X, np.where(y == 1, 1.0, -1.0)).predict(X_test)
    assert out["score"][:, 0] == pytest.approx(theirs, rel=1e-8)
    assert (out["code"][:, 0] == (theirs > 0)).all()
    from sklearn.linear_model import RidgeClassifier

    rc = make_pipeline(StandardScaler(), RidgeClassifier(alpha=best)).fit(X, y)
    assert (rc.predict(X_test) == out["code"][:, 0]).all()


# --- the permutation test of a whole nested CV ------------------------------------------------------------------------

def _cohort(n: int, rng: np.random.Generator, *, effect: float, sessions: int = 1) -> tuple[pd.DataFrame, np.ndarray]:
    group = np.where(np.arange(n) % 3 == 0, "DS", "euploid")
    rows = pd.DataFrame({"dataset": "A", "participant": np.repeat([f"sub-{i:03d}" for i in range(n)], sessions),
                         "group": np.repeat(group, sessions), "age": np.repeat(rng.uniform(20, 60, n), sessions)})
    rows["scan"] = [f"{p}/ses-{k}" for p, k in zip(rows["participant"], np.tile(np.arange(sessions), n))]
    X = rng.normal(size=(len(rows), 4))
    X[:, 0] += effect * (rows["group"] == "DS").to_numpy()
    return rows, X


def _p_values(effect: float, seeds: range, n_perm: int = 99) -> list[float]:
    task = parse_tasks({"ds": DEFAULT_TASKS["ds_vs_euploid"]})[0]
    out = []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        scans, X = _cohort(24, rng, effect=effect, sessions=2)
        data = prepare_task(task, scans, external_datasets=[], n_splits=3, n_repeats=1, n_inner=2, seed=seed)
        rows, *_ = evaluate_feature_set(data, FeatureSet("latents", X), None, estimators=["ridge"],
                                        alphas=[1.0, 100.0], n_permutations=n_perm, n_bootstrap=0, confidence=0.95,
                                        seed=seed, n_estimators=10, grids={})
        out.append(rows[0]["p_perm"])
    return out


def test_permutation_p_value_is_about_uniform_under_the_null_and_small_under_an_effect():
    null = np.array(_p_values(0.0, range(80)))
    assert ((null > 0) & (null <= 1)).all()
    # Uniform: about 10% at or below 0.1 (binomial sd 3.4% for 80 draws), mean about 0.5 (sd 0.032).
    assert np.mean(null <= 0.1) < 0.2 and 0.4 < null.mean() < 0.6
    strong = _p_values(3.0, range(3))
    assert max(strong) <= 0.02


def test_evaluation_reports_cv_and_external_rows_for_each_kind():
    rng = np.random.default_rng(0)
    n = 60
    scans = pd.DataFrame({"scan": [f"s{i}" for i in range(n)], "dataset": np.where(np.arange(n) < 45, "A", "B"),
                          "participant": [f"p{i}" for i in range(n)],
                          "group": np.where(np.arange(n) % 2 == 0, "DS", "euploid"), "age": rng.uniform(20, 60, n),
                          "ad_stage": np.array(["asymptomatic", "prodromal", "dementia"])[np.arange(n) // 2 % 3]})
    scans.loc[scans["group"] == "euploid", "ad_stage"] = "n/a"
    X = rng.normal(size=(n, 6))
    X[:, 0] += 2 * (scans["group"] == "DS").to_numpy()
    X[:, 1] += scans["age"].to_numpy() / 5
    scans["grade"] = np.array(["mild", "moderate", "severe"])[np.arange(n) % 3]
    X[:, 2] += 2 * (np.arange(n) % 3)
    grade = {"grade": {"column": "grade", "kind": "multiclass"}}
    for task in parse_tasks({**DEFAULT_TASKS, **grade}):
        data = prepare_task(task, scans, external_datasets=["B"], n_splits=3, n_repeats=2, n_inner=2, seed=0)
        assert set(data.scans["dataset"]) == {"A"} and set(data.external["dataset"]) == {"B"}
        cv_x, ext_x = (X[scans["scan"].isin(part["scan"]).to_numpy()] for part in (data.scans, data.external))
        rows, preds, ext_rows, ext_preds = evaluate_feature_set(
            data, FeatureSet("latents", cv_x), ext_x, estimators=["ridge", "knn"], alphas=[0.1, 10.0],
            n_permutations=50, n_bootstrap=100, confidence=0.95, seed=0, n_estimators=10, grids={})
        assert [r["classifier"] for r in rows] == ["ridge", "knn"] and len(ext_rows) == 2
        main, second = task.metrics
        for row in rows + ext_rows:
            assert row["metric"] == main and row["second_metric"] == second
            assert row["ci_low"] <= row["score"] <= row["ci_high"] or not np.isfinite(row["ci_low"])
        assert rows[0]["n_perm"] == 50 and rows[1]["n_perm"] == 0 and 0 < rows[0]["p_perm"] <= 1
        if task.name == "ds_vs_euploid":
            assert rows[0]["score"] > 0.8 and rows[0]["p_perm"] < 0.05
        if task.name == "grade":
            assert rows[0]["metric"] == "macro_f1" and rows[0]["score"] > 0.45  # chance: 1/3
        if task.name == "ad_stage":
            assert rows[0]["n_scans"] == (data.scans["group"] == "DS").sum()
        assert len(preds) == 2 * 2 * len(data.scans)  # estimators x repeats x scans
        assert len(ext_preds) == 2 * len(data.external)


# --- start-up checks --------------------------------------------------------------------------------------------------

def _samples(n_per_class: int = 4) -> tuple[pd.DataFrame, list[dict]]:
    rows = []
    for dataset, role in (("IXI", "train"), ("SantPau", "analyse"), ("ABCDS", "analyse")):
        for i in range(2 * n_per_class):
            ds = i % 2 == 0
            rows.append({"scan": f"{dataset}/sub-{i}", "dataset": dataset, "subject": f"{i}",
                         "label": "DS" if ds and role != "train" else "euploid", "analyse": role != "train",
                         "age": str(20 + i), "sex": "F" if i % 3 else "M",
                         "ad_stage": ["asymptomatic", "prodromal", "dementia"][i // 2 % 3] if ds else "n/a"})
    datasets = [{"name": d, "role": r, "label_column": "group", "labels": ["euploid", "DS"]}
                for d, r in (("IXI", "train"), ("SantPau", "analyse"), ("ABCDS", "analyse"))]
    return pd.DataFrame(rows), datasets


def test_plan_resolves_the_label_column_and_keeps_every_default_task():
    samples, datasets = _samples(n_per_class=9)
    plan = plan_tasks(DEFAULT_TASKS, samples, datasets, external_datasets=["ABCDS"])
    assert [t.name for t in plan.tasks] == list(DEFAULT_TASKS) and not plan.notes
    ds = plan.tasks[0]
    assert ds.column == "group" and ds.table_column == "label"
    assert plan.tasks[1].where == {"label": ("DS",)}


@pytest.mark.parametrize("change, key", [
    (lambda t: t["ds_vs_euploid"].update(positive="Ds"), "analysis.tasks.ds_vs_euploid.positive"),
    (lambda t: t["ad_stage"].update(levels=["asymptomatic", "dementia"]), "analysis.tasks.ad_stage.levels"),
    (lambda t: t.update(x={"column": "id_grade", "kind": "multiclass"}), "analysis.tasks.x.column"),
    (lambda t: t.update(x={"column": "sex", "kind": "regression"}), "analysis.tasks.x.column"),
    (lambda t: t["ds_vs_euploid"].pop("positive"), "analysis.tasks.ds_vs_euploid"),
])
def test_configuration_mistakes_of_tasks_are_config_errors_naming_the_key(change, key):
    samples, datasets = _samples(n_per_class=9)
    tasks = {k: dict(v) for k, v in DEFAULT_TASKS.items()}
    change(tasks)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        plan_tasks(tasks, samples, datasets)


def test_a_task_the_data_cannot_give_is_an_error_when_required_and_a_note_otherwise():
    """One class only (a euploid-only study) or a text target: the data's limits, not a typo of the config."""
    samples, datasets = _samples(n_per_class=9)
    euploid_only = samples.assign(label="euploid", age="unknown")
    datasets = [{**d, "labels": None} for d in datasets]
    tasks = {"ds_vs_euploid": dict(DEFAULT_TASKS["ds_vs_euploid"]), "brain_age": dict(DEFAULT_TASKS["brain_age"])}
    with pytest.raises(ConfigError, match="analysis.tasks.ds_vs_euploid.positive: column 'group' has one value only"):
        plan_tasks(tasks, euploid_only, datasets)
    with pytest.raises(ConfigError, match="analysis.tasks.brain_age.column: regression needs numbers"):
        plan_tasks({"brain_age": tasks["brain_age"]}, euploid_only, datasets)
    plan = plan_tasks({k: {**v, "required": False} for k, v in tasks.items()}, euploid_only, datasets)
    assert not plan.tasks and len(plan.notes) == 2 and "one value only (euploid)" in plan.notes[0]
    # Two classes present and a positive class that is neither: a typo, an error even for an optional task.
    typo = {"ds_vs_euploid": {**tasks["ds_vs_euploid"], "positive": "Ds", "required": False}}
    with pytest.raises(ConfigError, match="'Ds' is not a value of column 'group'"):
        plan_tasks(typo, samples, datasets)


def test_too_few_participants_is_an_error_for_required_tasks_and_a_note_otherwise():
    samples, datasets = _samples(n_per_class=1)
    with pytest.raises(ConfigError, match="analysis.tasks.ds_vs_euploid: needs two or more classes"):
        plan_tasks(DEFAULT_TASKS, samples, datasets)
    optional = {k: {**v, "required": False} for k, v in DEFAULT_TASKS.items()}
    plan = plan_tasks(optional, samples, datasets)
    assert not plan.tasks and len(plan.notes) == 3
    no_analysed = samples.assign(analyse=False)
    with pytest.raises(ConfigError, match="no scans of a dataset with role analyse or both"):
        plan_tasks(DEFAULT_TASKS, no_analysed, datasets)
    with pytest.raises(ConfigError, match="analysis.external_datasets: 'IXI' is not a dataset with role analyse"):
        plan_tasks(DEFAULT_TASKS, samples, datasets, external_datasets=["IXI"])
    enough, _ = _samples(n_per_class=9)
    plan = plan_tasks(DEFAULT_TASKS, enough, datasets, external_datasets=["ABCD"])
    assert len(plan.tasks) == 3 and plan.notes == ["external dataset ABCD is not configured: nothing is held out for it"]
