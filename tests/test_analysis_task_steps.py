"""File-level steps of the prediction tasks (brainvae.analysis.task_steps): the per-model split selection, every
task on every feature set with external validation, and the combined tables and figures of the report."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from brainvae.analysis import AnalysisError
from brainvae.analysis.evaluate import RESULT_COLUMNS
from brainvae.analysis.steps import scan_table
from synthetic_latents import synthetic_cohort
from brainvae.analysis.tables import write_tsv
from brainvae.analysis.task_steps import NO_MODEL, select_scans, tasks_step, tasks_tables
from brainvae.analysis.tasks import BASELINE_FEATURE_SETS, parse_tasks, task_to_dict

TASKS = parse_tasks({
    "ds_vs_euploid": {"column": "label", "kind": "binary", "positive": "DS"},
    "ad_stage": {"column": "ad_stage", "kind": "ordinal", "where": {"label": ["DS"]},
                 "levels": ["asymptomatic", "prodromal", "dementia"]},
    "brain_age": {"column": "age", "kind": "regression"},
})
FAST = dict(alphas=[1.0, 100.0], n_splits=3, n_repeats=1, n_inner=2, seed=0, n_permutations=50, n_bootstrap=50,
            external_datasets=["ABCDS"])


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """scans.tsv, one model's latents (its own splits: a few scans of an analysed dataset in its training split),
    and a voxel matrix, for a cohort of one analysed site and a small external one plus a training site."""
    root = tmp_path_factory.mktemp("tasks")
    c = synthetic_cohort(n_subjects=60, n_latent=6, n_voxels=300, effect=3.0, site_effect=0.0,
                         sites=("SantPau", "SantPau", "ABCDS", "IXI"), seed=5)
    meta = c.meta.rename(columns={"group": "label"})
    rng = np.random.default_rng(0)
    age = dict(zip(meta["participant"].unique(), rng.uniform(20, 65, meta["participant"].nunique())))
    meta["age"] = meta["participant"].map(age).round(1)
    meta["sex"] = np.where(meta["participant"].str[-1].astype(int) % 2 == 0, "F", "M")
    stages = np.array(["asymptomatic", "prodromal", "dementia"])
    meta["ad_stage"] = np.where(meta["label"] == "DS", stages[meta["participant"].str[-2:].astype(int) % 3], "n/a")
    meta.loc[meta["dataset"] == "IXI", "label"] = "euploid"
    meta.loc[meta["dataset"] == "IXI", "ad_stage"] = "n/a"
    c.latents[:, 2] += meta["age"].to_numpy() / 10  # brain age signal
    index = meta.assign(subject=meta["participant"], row=np.arange(len(meta)), analyse=meta["dataset"] != "IXI")
    confounds = {s: {"brain_volume_ml": v, "affine_scale": a}
                 for s, v, a in zip(meta["scan"], meta["icv_ml"], meta["affine_scale"])}
    table = scan_table(index.drop(columns=["participant", "affine_scale", "split"]), None, confounds)
    write_tsv(table, root / "scans.tsv")
    # The model's own splits: IXI scans and 4 SantPau scans were in training; the rest it never saw.
    split = np.where(meta["dataset"] == "IXI", "train", "none")
    seen = meta.index[meta["dataset"] == "SantPau"][:4]
    split[seen] = "train"
    latents = meta[["dataset", "participant", "session", "run", "scan", "label"]].assign(split=split)
    for j in range(c.latents.shape[1]):
        latents[f"mu_{j}"] = c.latents[:, j].astype(np.float32)
    latents.iloc[::-1].to_parquet(root / "latents.parquet")
    np.save(root / "voxels.npy", c.voxels)
    index[["row", "scan", "dataset", "subject"]].to_csv(root / "voxels_index.tsv", sep="\t", index=False)
    return root, table, latents, meta.loc[seen, "scan"].tolist()


def test_the_models_own_split_decides_which_scans_are_analysed(inputs):
    _, table, latents, seen = inputs
    chosen = select_scans(table, [latents[["scan", "split"]]], ["none"])
    assert not set(seen) & set(chosen["scan"])  # in this model's training split: left out by default
    assert set(chosen["dataset"]) == {"SantPau", "ABCDS"} and set(chosen["split"]) == {"none"}
    everything = select_scans(table, [latents[["scan", "split"]]], ["train", "none"])
    assert set(seen) <= set(everything["scan"]) and "IXI" not in set(everything["dataset"])  # role train: never
    # Baselines: scans in the selection of every model (another model saw other scans).
    other = latents[["scan", "split"]].assign(split="none")
    other.loc[other["scan"] == chosen["scan"].iloc[0], "split"] = "val"
    both = select_scans(table, [latents[["scan", "split"]], other], ["none"])
    assert len(both) == len(chosen) - 1
    with pytest.raises(AnalysisError, match="analysis.splits"):
        select_scans(table, [latents[["scan", "split"]]], ["test"])


def test_tasks_step_scores_every_task_and_feature_set_in_cv_and_on_the_external_dataset(inputs, tmp_path):
    root, table, latents, _ = inputs
    scans = select_scans(table, [latents[["scan", "split"]]], ["none"])
    model = tasks_step(scans, [task_to_dict(t) for t in TASKS], tmp_path / "model", feature_sets=["latents",
                       "latents_confounds"], model="vae", latents=root / "latents.parquet", **FAST)
    baselines = tasks_step(scans, TASKS, tmp_path / "baselines", feature_sets=list(BASELINE_FEATURE_SETS),
                           voxels=root / "voxels.npy", voxel_index=root / "voxels_index.tsv", voxel_pca_components=3,
                           **FAST)
    result = pd.read_csv(model["results"], sep="\t")
    assert list(result.columns) == [*RESULT_COLUMNS, "note"] and result["note"].isna().all()
    assert set(result["evaluated_on"]) == {"cv", "ABCDS"} and set(result["split_used"]) == {"none"}
    ds = result[(result["task"] == "ds_vs_euploid") & (result["feature_set"] == "latents")].set_index("evaluated_on")
    assert ds.loc["cv", "metric"] == "auc" and ds.loc["cv", "score"] > 0.85 and ds.loc["cv", "p_perm"] < 0.05
    assert ds.loc["cv", "n_perm"] == 50 and ds.loc["ABCDS", "score"] > 0.8
    assert ds.loc["cv", "ci_low"] <= ds.loc["cv", "score"] <= ds.loc["cv", "ci_high"]
    assert ds.loc["cv", "second_metric"] == "balanced_accuracy" and np.isfinite(ds.loc["cv", "second_ci_low"])
    age = result[(result["task"] == "brain_age") & (result["feature_set"] == "latents")].set_index("evaluated_on")
    assert age.loc["cv", "metric"] == "mae" and age.loc["cv", "second_score"] > 0.3
    stage = result[result["task"] == "ad_stage"]
    assert set(stage["metric"]) == {"kappa_quadratic"}
    n_ds = ((scans["label"] == "DS") & (scans["dataset"] != "ABCDS")).sum()
    assert (stage.loc[stage["evaluated_on"] == "cv", "n_scans"] == n_ds).all()

    base = pd.read_csv(baselines["results"], sep="\t")
    assert set(base["model"]) == {NO_MODEL}
    by_task = base.groupby("task")["feature_set"].apply(set)
    assert by_task["ds_vs_euploid"] == set(BASELINE_FEATURE_SETS)
    assert by_task["brain_age"] == set(BASELINE_FEATURE_SETS) - {"age"}  # age does not predict itself
    # Latents and baselines are scored on the same participants (paired).
    preds = [pd.read_csv(p["predictions"], sep="\t") for p in (model, baselines)]
    cv_scans = [set(p.loc[(p["task"] == "ds_vs_euploid") & (p["evaluated_on"] == "cv"), "scan"]) for p in preds]
    assert cv_scans[0] == cv_scans[1]

    figures = {t.name: tmp_path / "figures" / f"{t.name}.png" for t in TASKS}
    task_tables = {t.name: tmp_path / "tables" / "tasks" / f"{t.name}.html" for t in TASKS}
    paths = tasks_tables([model["results"], baselines["results"]], [model["predictions"], baselines["predictions"]],
                         tmp_path / "tables", figures, task_tables)
    combined = pd.read_csv(paths["tsv"], sep="\t")
    assert len(combined) == len(result) + len(base)
    assert "ROC AUC" in paths["md"].read_text() and "never saw" in paths["md"].read_text()
    assert all(p.stat().st_size > 5_000 for p in figures.values())
    assert "brain_age" in task_tables["brain_age"].read_text()


def test_training_scans_when_asked_are_said_so(inputs, tmp_path):
    root, table, latents, seen = inputs
    scans = select_scans(table, [latents[["scan", "split"]]], ["train", "none"])
    out = tasks_step(scans, TASKS[:1], tmp_path, feature_sets=["latents"], model="vae",
                     latents=root / "latents.parquet", **{**FAST, "n_permutations": 0, "n_bootstrap": 0})
    result = pd.read_csv(out["results"], sep="\t")
    assert result.loc[result["evaluated_on"] == "cv", "split_used"].item() == "none,train"
    paths = tasks_tables([out["results"]], [out["predictions"]], tmp_path / "t", {}, {})
    assert "split train" in paths["md"].read_text()


def test_a_task_the_scans_cannot_support_is_left_out_with_a_note_unless_required(inputs, tmp_path):
    root, table, latents, _ = inputs
    scans = select_scans(table, [latents[["scan", "split"]]], ["none"])
    only_ds = scans[scans["label"] == "DS"]
    optional = [task_to_dict(TASKS[0]) | {"required": False}, task_to_dict(TASKS[2])]
    out = tasks_step(only_ds, optional, tmp_path / "a", feature_sets=["latents"], model="vae",
                     latents=root / "latents.parquet", **{**FAST, "n_permutations": 0, "n_bootstrap": 0})
    result = pd.read_csv(out["results"], sep="\t")
    note = result[result["task"] == "ds_vs_euploid"]
    assert len(note) == 1 and "needs two classes" in note["note"].item() and note["score"].isna().all()
    paths = tasks_tables([out["results"]], [out["predictions"]], tmp_path / "t",
                         {"ds_vs_euploid": tmp_path / "ds.png"}, {})
    assert (tmp_path / "ds.png").exists() and "Left out: ds_vs_euploid" in paths["md"].read_text()
    assert len(pd.read_csv(paths["tsv"], sep="\t")) == len(result) - 1
    with pytest.raises(AnalysisError, match="needs two classes"):
        tasks_step(only_ds, TASKS[:1], tmp_path / "b", feature_sets=["latents"], model="vae",
                   latents=root / "latents.parquet", **FAST)
    empty = select_scans(table, [latents[["scan", "split"]]], ["test"], allow_empty=True)
    out = tasks_step(empty, optional[:1], tmp_path / "c", feature_sets=["latents", "voxels_pca"], model="vae",
                     latents=root / "latents.parquet", voxels=root / "voxels.npy",
                     voxel_index=root / "voxels_index.tsv", **FAST)
    assert "left out" in pd.read_csv(out["results"], sep="\t")["note"].item()


def test_deviation_feature_set_reads_the_latents_tables_scores() -> None:
    from brainvae.analysis.task_steps import task_feature_matrix
    from brainvae.analysis.tasks import task_from_dict
    from brainvae.analysis.errors import AnalysisError

    task = task_from_dict({"name": "ds_vs_euploid", "column": "label", "kind": "binary", "positive": "DS"})
    scans = pd.DataFrame({"scan": ["a", "b"], "label": ["DS", "euploid"]})
    scores = np.array([[3.0, 1.5], [1.0, -0.2]])
    features = task_feature_matrix("deviation", task, scans, latents=None, voxels=None, voxel_pca_components=2,
                                   deviation=scores)
    assert features.name == "deviation" and np.array_equal(features.X, scores)
    with pytest.raises(AnalysisError, match="no deviation scores"):
        task_feature_matrix("deviation", task, scans, latents=None, voxels=None, voxel_pca_components=2)
    with pytest.raises(AnalysisError, match="no deviation score"):
        task_feature_matrix("deviation", task, scans, latents=None, voxels=None, voxel_pca_components=2,
                            deviation=np.array([[1.0, np.nan], [1.0, 2.0]]))
