"""Descriptive PCA, statistics, tables and figures (brainvae.analysis.pca / stats / tables / plots / outputs)."""

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.decomposition import PCA

from brainvae.analysis import (
    AnalysisError,
    FeatureSet,
    confidence_interval,
    explained_variance_table,
    fit_pca,
    format_reconstruction_table,
    pca_report,
    permutation_p_value,
    reconstruction_table,
    run_classification,
    site_check,
    summarise_folds,
    to_markdown,
    write_classification_outputs,
)
from brainvae.analysis.plots import plot_confusion, plot_explained_variance, plot_pca_scatter, plot_roc
from synthetic_latents import synthetic_cohort

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def cohort():
    return synthetic_cohort(n_subjects=40, n_voxels=300, seed=21)


def _assert_png(path):
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5_000, path


@pytest.mark.parametrize("shape", [(50, 8), (30, 400)])  # latents-like (p < n) and voxel-like (p > n)
def test_fit_pca_matches_sklearn_up_to_sign(shape):
    X = np.random.default_rng(0).normal(size=shape) @ np.diag(np.linspace(3, 0.5, shape[1]))
    res = fit_pca(X, 5, chunk_columns=37)  # odd chunk size: exercises the chunked accumulation
    ref = PCA(5, svd_solver="full").fit(X)
    ref_scores = ref.transform(X)
    for j in range(5):
        corr = np.corrcoef(res.scores[:, j], ref_scores[:, j])[0, 1]
        assert abs(corr) == pytest.approx(1.0, abs=1e-8)
        assert np.abs(res.scores[:, j]).max() == -(-res.scores[:, j]).min() or res.scores[np.abs(res.scores[:, j]).argmax(), j] > 0
    np.testing.assert_allclose(res.explained_variance, ref.explained_variance_, rtol=1e-8)
    np.testing.assert_allclose(res.explained_variance_ratio, ref.explained_variance_ratio_, rtol=1e-8)


def test_fit_pca_standardize_and_memmap(tmp_path):
    X = np.random.default_rng(1).normal(size=(20, 100)).astype(np.float32)
    X[:, :10] = 0.0  # background voxels: zero variance
    path = tmp_path / "v.npy"
    np.save(path, X)
    mm = np.load(path, mmap_mode="r")
    a, b = fit_pca(mm, 4, standardize=True), fit_pca(np.asarray(X, dtype=np.float64), 4, standardize=True)
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-8)
    assert np.isfinite(a.scores).all()
    ev = explained_variance_table(a)
    assert list(ev.columns) == ["component", "explained_variance", "explained_variance_ratio", "cumulative_ratio"]
    assert ev["cumulative_ratio"].is_monotonic_increasing and ev["cumulative_ratio"].iloc[-1] <= 1 + 1e-12
    with pytest.raises(AnalysisError):
        fit_pca(X[:1])


def test_pca_report_writes_tables_and_figures(cohort, tmp_path):
    meta = cohort.meta.rename(columns={"group": "label"})
    paths = pca_report(meta, cohort.latents, tmp_path, name="latent_pca_modelA", title="model A: latent means")
    scores = pd.read_csv(paths["scores"], sep="\t")
    assert {"dataset", "participant", "scan", "label", "PC1", "PC2"} <= set(scores.columns)
    assert len(scores) == len(meta)
    ev = pd.read_csv(paths["explained_variance"], sep="\t")
    assert len(ev) == 16
    for key in ("scatter", "variance_plot"):
        _assert_png(paths[key])
    # the voxel baseline goes through the same function (Gram route, p > n)
    vox = pca_report(meta, cohort.voxels, tmp_path, name="voxel_pca", n_components=10)
    assert len(pd.read_csv(vox["explained_variance"], sep="\t")) == 10
    _assert_png(vox["scatter"])


def test_scatter_handles_tiny_and_degenerate_groups(tmp_path):
    scores = pd.DataFrame({"PC1": [0, 1, 2, 3, 4, 5.0], "PC2": [0, 1, 2, 3, 4, 5.0],  # collinear: no KDE
                           "dataset": ["A"] * 5 + ["B"], "label": ["x"] * 6})
    _assert_png(plot_pca_scatter(scores, tmp_path / "s.png"))
    _assert_png(plot_explained_variance([0.5, 0.3, 0.2], tmp_path / "ev.png", title="t"))


def test_confidence_intervals():
    v = np.array([0.8, 0.85, 0.9, 0.95, 0.7, 0.75, 0.8, 0.9, 0.85, 0.8])
    lo_t, hi_t = confidence_interval(v, method="t")
    lo_c, hi_c = confidence_interval(v, method="corrected_t", test_train_ratio=0.25)
    lo_b, hi_b = confidence_interval(v, method="bootstrap", seed=0)
    assert lo_c < lo_t < v.mean() < hi_t < hi_c  # the correction widens the interval
    assert lo_b < v.mean() < hi_b
    assert confidence_interval(v, method="bootstrap", seed=0) == (lo_b, hi_b)
    assert all(np.isnan(confidence_interval([0.5], method="t")))
    with pytest.raises(ValueError):
        confidence_interval(v, method="corrected_t")
    assert permutation_p_value(0.9, [0.5, 0.6, 0.95]) == pytest.approx(2 / 4)
    assert permutation_p_value(0.9, [np.nan, 0.5]) == pytest.approx(2 / 3)  # undefined counts against


def test_summary_and_reconstruction_tables():
    folds = pd.DataFrame({"feature_set": ["a"] * 4, "classifier": ["lr"] * 4, "n_train": 30, "n_test": 10,
                          "roc_auc": [1.0, 0.95, 1.0, 0.9], "accuracy": [0.9, 0.8, np.nan, 0.85]})
    s = summarise_folds(folds, metrics=("roc_auc", "accuracy"))
    auc = s[s.metric == "roc_auc"].iloc[0]
    assert auc["mean"] == pytest.approx(0.9625) and auc["ci_high"] <= 1.0 and auc["ci_method"] == "corrected_t"
    assert s[s.metric == "accuracy"].iloc[0]["n_folds"] == 3
    per_scan = pd.DataFrame({"model": ["m1"] * 3 + ["m2"] * 2, "scan": list("abcde"), "mse": [1.0, 2, 3, 4, 6],
                             "ssim": [0.9, 0.8, 0.7, 0.95, 0.85], "mu_0": 0.0, "age": 30})
    rec = reconstruction_table(per_scan)
    assert list(rec.columns) == ["model", "n", "mse_mean", "mse_sd", "ssim_mean", "ssim_sd"]
    assert rec.set_index("model").loc["m2", "mse_mean"] == 5
    md = to_markdown(format_reconstruction_table(rec))
    assert md.splitlines()[0] == "| model | n | mse | ssim |" and "2 ± 1" in md
    latents_like = per_scan.assign(recon_mse=per_scan["mse"], split="test")
    assert list(reconstruction_table(latents_like, by=("model", "split")).columns) == [
        "model", "split", "n", "recon_mse_mean", "recon_mse_sd"]  # recon_* columns preferred
    with pytest.raises(AnalysisError, match="grouping column"):
        reconstruction_table(per_scan, by=("model", "split"))


def test_write_classification_outputs(cohort, tmp_path):
    res = run_classification(cohort.meta, [FeatureSet("latents", cohort.latents)], classifiers=["logreg", "knn"],
                             n_splits=3, n_repeats=2, n_inner=2, n_permutations=2, permutation_classifiers=["logreg"])
    paths = write_classification_outputs(res, tmp_path / "cls", model="modelA", meta=cohort.meta)
    table = pd.read_csv(paths["classification"], sep="\t")
    assert list(table[["model", "feature_set", "classifier"]].itertuples(index=False, name=None)) == [
        ("modelA", "latents", "logreg"), ("modelA", "latents", "knn")]
    assert {"roc_auc_mean", "roc_auc_sd", "roc_auc_ci_low", "roc_auc_ci_high", "p_value", "n_permutations"} <= set(table)
    assert table["p_value"].notna().tolist() == [True, False]  # permutation test only where asked
    md = paths["classification_md"].read_text()
    assert "| Model | Features | Classifier | ROC AUC |" in md and "corrected_t" in md and "(n=2)" in md
    preds = pd.read_csv(paths["predictions"], sep="\t")
    assert {"scan", "participant", "score", "true_label"} <= set(preds.columns)
    folds = pd.read_csv(paths["outer_folds"], sep="\t")
    assert set(folds["repeat"]) == {0, 1}
    settings = json.loads(paths["settings"].read_text())
    assert settings["positive"] == "DS" and settings["n_splits"] == 3 and settings["model"] == "modelA"
    for key, path in paths.items():
        assert path.exists() and path.stat().st_size > 0, key
        if path.suffix == ".png":
            _assert_png(path)
    assert {"roc_latents_logreg", "confusion_latents_knn", "summary_plot"} <= set(paths)


def test_multiclass_site_check_outputs_have_no_roc_but_a_confusion(tmp_path):
    c = synthetic_cohort(n_subjects=36, sites=("A", "B", "C"), seed=2)
    res = site_check(c.meta, [FeatureSet("latents", c.latents)], n_splits=3, n_repeats=1, n_inner=2)
    paths = write_classification_outputs(res, tmp_path)
    assert "confusion_latents_logreg" in paths and not any(k.startswith("roc_") for k in paths)
    assert "Balanced accuracy" in paths["classification_md"].read_text()


def test_roc_and_confusion_figures(tmp_path):
    rng = np.random.default_rng(0)
    preds = pd.DataFrame({"repeat": 0, "fold": np.repeat([0, 1, 2], 10), "y_true": np.tile([0, 1], 15)})
    preds["score"] = preds["y_true"] + rng.normal(0, 0.7, len(preds))
    preds["y_pred"] = (preds["score"] > 0.5).astype(int)
    _assert_png(plot_roc(preds, tmp_path / "roc.png", positive_label="DS"))
    _assert_png(plot_confusion(preds, ("euploid", "DS"), tmp_path / "cm.png"))
