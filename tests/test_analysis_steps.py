"""File-level analysis steps (brainvae.analysis.steps / names): what the workflow's analysis rules run."""

import json

import numpy as np
import pandas as pd
import pytest

from brainvae.analysis import (
    AnalysisError,
    block_mean,
    classification_figure_names,
    classification_output_files,
    pca_output_files,
    pca_report,
    reconstruction_summary_table,
    to_html,
    voxel_matrix_from_cohort,
)
from brainvae.analysis.steps import (
    confounds_from_files,
    feature_set,
    read_scan_table,
    reconstruction_tables,
    scan_table,
    site_check_step,
    site_check_tables,
)
from synthetic_latents import synthetic_cohort
from brainvae.analysis.tables import format_reconstruction_summary, write_tsv

def _write_json(path, obj):
    path.write_text(json.dumps(obj))
    return path


def _affine(scale):
    a = np.eye(4)
    a[:3, :3] *= scale
    a[:3, 3] = [1.0, -2.0, 3.0]
    return a.tolist()


def test_confounds_from_qc_metrics_and_transform(tmp_path):
    qc = _write_json(tmp_path / "qc.json", {"scan": "sub-01", "brain_volume_ml": 1234.5})
    xfm = _write_json(tmp_path / "xfm.json", {"affine_native_to_mni_ras": _affine(1.1)})
    values = confounds_from_files(qc, xfm)
    assert values["brain_volume_ml"] == 1234.5
    assert values["affine_scale"] == pytest.approx(1.1)


@pytest.mark.parametrize(("qc", "xfm", "bad"), [
    ({"brain_volume_ml": None}, {"affine_native_to_mni_ras": _affine(1.0)}, "qc.json"),
    ({"brain_volume_ml": 1200.0}, {"other": 1}, "xfm.json"),
    ({"brain_volume_ml": 1200.0}, {"affine_native_to_mni_ras": [[1, 2], [3, 4]]}, "xfm.json"),
])
def test_confounds_errors_name_the_file(tmp_path, qc, xfm, bad):
    q = _write_json(tmp_path / "qc.json", qc)
    x = _write_json(tmp_path / "xfm.json", xfm)
    with pytest.raises(AnalysisError, match=bad):
        confounds_from_files(q, x)


def _index(n=4):
    return pd.DataFrame({
        "row": list(range(n))[::-1],  # out of order on purpose: the table follows row, not file order
        "scan": [f"sub-{i:02d}/anat/sub-{i:02d}" for i in range(n)],
        "scan_key": [f"sub-{i:02d}" for i in range(n)],
        "dataset": ["A", "B"] * (n // 2),
        "subject": [f"{i:02d}" for i in range(n)],
        "session": [""] * n,
        "run": [""] * n,
        "label": ["DS", "euploid"] * (n // 2),
        "age": ["30", "n/a", "41", "25"][:n],
    })


def test_scan_table_adds_split_and_confounds_in_cohort_row_order(tmp_path):
    index = _index().assign(icv_ml=["1500", "n/a", "", "1400.5"])
    splits = pd.DataFrame({"scan": [index["scan"][1]], "split": ["train"]})
    confounds = {s: {"brain_volume_ml": 1000.0 + i, "affine_scale": 1.0} for i, s in enumerate(index["scan"])}
    table = scan_table(index, splits, confounds)
    assert list(table.columns[:12]) == ["scan", "scan_key", "dataset", "participant", "session", "run", "label",
                                        "split", "tiv_ml", "tiv_source", "brain_volume_ml", "affine_scale"]
    assert table["scan"].tolist() == index.sort_values("row")["scan"].tolist()
    assert dict(zip(table["scan"], table["split"]))[index["scan"][1]] == "train"
    assert (table["split"] == "none").sum() == 3
    # TIV: the participants' icv_ml where given, else the QC brain volume.
    tiv = dict(zip(table["scan"], table["tiv_ml"]))
    assert tiv[index["scan"][0]] == 1500.0 and tiv[index["scan"][1]] == 1001.0 and tiv[index["scan"][3]] == 1400.5
    assert set(table["tiv_source"]) == {"participants icv_ml", "qc brain_volume_ml"}
    assert "split" not in scan_table(index, None, confounds).columns  # the workflow: each model has its own
    write_tsv(table, tmp_path / "scans.tsv")
    back = read_scan_table(tmp_path / "scans.tsv")
    assert back["session"].tolist() == [""] * 4 and back["tiv_ml"].dtype == float
    assert back["age"].isna().sum() == 1
    with pytest.raises(AnalysisError, match="no QC/transform values for 1 scan"):
        scan_table(index, splits, {k: v for k, v in list(confounds.items())[1:]})


def test_block_mean_averages_whole_blocks_and_pads_edges():
    v = np.arange(27, dtype=np.float32).reshape(3, 3, 3)
    out = block_mean(v, 2)
    assert out.shape == (2, 2, 2)
    assert out[0, 0, 0] == pytest.approx(v[:2, :2, :2].mean())
    assert out[1, 1, 1] == pytest.approx(v[2, 2, 2] / 8)  # one voxel, seven zero-padded
    np.testing.assert_array_equal(block_mean(v, 1), v)


def test_voxel_matrix_from_cohort_keeps_union_of_masks(tmp_path):
    rng = np.random.default_rng(0)
    volumes = rng.normal(size=(3, 4, 5, 6)).astype(np.float16)
    masks = np.zeros((3, 4, 5, 6), dtype=np.uint8)
    masks[0, 1:3, 1:3, 1:3] = 1
    masks[1, 2:4, 2:4, 2:4] = 1
    np.save(tmp_path / "cohort.npy", volumes)
    np.save(tmp_path / "cohort_mask.npy", masks)
    X = voxel_matrix_from_cohort(tmp_path / "cohort.npy", tmp_path / "cohort_mask.npy", tmp_path / "voxels.npy")
    union = masks.any(axis=0)
    assert X.shape == (3, int(union.sum())) and X.dtype == np.float32
    np.testing.assert_allclose(X[2], volumes[2][union].astype(np.float32))
    coarse = voxel_matrix_from_cohort(tmp_path / "cohort.npy", tmp_path / "cohort_mask.npy", tmp_path / "v2.npy",
                                      downsample=2)
    keep = block_mean(union, 2) > 0
    np.testing.assert_allclose(coarse[1], block_mean(volumes[1], 2)[keep], rtol=1e-6)
    np.save(tmp_path / "empty_mask.npy", np.zeros_like(masks))
    with pytest.raises(AnalysisError, match="every brain mask is empty"):
        voxel_matrix_from_cohort(tmp_path / "cohort.npy", tmp_path / "empty_mask.npy", tmp_path / "v3.npy")


def _evaluation_summary(offset):
    rows = []
    for method in ("vae", "pca"):
        for region in ("mask", "whole"):
            for metric, value in (("mse", 0.01), ("ssim", 0.9)):
                v = value + offset + (0.001 if method == "pca" else 0.0)
                rows.append({"method": method, "metric": metric, "region": region, "n": 6, "mean": v, "sd": 0.002,
                             "ci_low": v - 0.001, "ci_high": v + 0.001})
    return pd.DataFrame(rows)


def test_reconstruction_summary_table_one_row_per_model_method_region(tmp_path):
    table = reconstruction_summary_table({"vae": _evaluation_summary(0.0), "vae_small": _evaluation_summary(0.01)})
    assert len(table) == 8
    row = table[(table.model == "vae_small") & (table.method == "pca") & (table.region == "mask")].iloc[0]
    assert row["mse_mean"] == pytest.approx(0.021) and row["ssim_ci_high"] == pytest.approx(0.912)
    shown = format_reconstruction_summary(table)
    assert {"Model", "Method", "Region", "MSE", "SSIM"} <= set(shown.columns)
    assert shown["MSE"].iloc[0].startswith("0.01 ± 0.002 [")
    with pytest.raises(AnalysisError, match="model 'x'.*missing column"):
        reconstruction_summary_table({"x": _evaluation_summary(0.0).drop(columns="ci_low")})
    _evaluation_summary(0.0).to_csv(tmp_path / "summary.tsv", sep="\t", index=False)
    paths = reconstruction_tables({"vae": tmp_path / "summary.tsv"}, tmp_path / "tables")
    assert "<table" in paths["html"].read_text() and paths["md"].read_text().count("\n| vae |") == 4


def test_to_html_escapes_cells():
    page = to_html(pd.DataFrame({"a": ["<b>x</b>"], "b": [np.nan]}), title="T & U", caption="c")
    assert "&lt;b&gt;x&lt;/b&gt;" in page and "T &amp; U" in page and "–" in page


def test_declared_file_names_follow_the_wildcard_and_the_writer():
    assert classification_figure_names("{baseline}", "linear_svm") == {
        "roc": "roc_{baseline}_linear_svm.png", "confusion": "confusion_{baseline}_linear_svm.png"}
    assert classification_figure_names("voxels pca", "knn", binary=False) == {"confusion": "confusion_voxels-pca_knn.png"}
    marked = classification_output_files("d", "latents", ["knn"], mark=lambda p, kind, clf: (p, kind, clf))
    assert marked["roc"] == [("d/roc_latents_knn.png", "ROC curves", "knn")]
    assert marked["table_html"] == ("d/classification.html", "table", "all")
    assert "roc" not in classification_output_files("d", "latents", ["knn"], binary=False)


def test_pca_output_files_are_what_pca_report_writes(tmp_path):
    c = synthetic_cohort(n_subjects=12, n_latent=4, seed=1)
    written = pca_report(c.meta.rename(columns={"group": "label"}), c.latents, tmp_path, name="latents")
    declared = pca_output_files(str(tmp_path), "latents")
    assert {k: str(v) for k, v in written.items()} == declared
    assert all((tmp_path / p).exists() for p in declared.values())


@pytest.fixture(scope="module")
def analysis_inputs(tmp_path_factory):
    """A synthetic cohort as the workflow would hold it: scans.tsv, a latents Parquet and a voxel matrix."""
    root = tmp_path_factory.mktemp("analysis")
    c = synthetic_cohort(n_subjects=24, n_latent=6, n_voxels=200, effect=3.0, size_effect=1.0, seed=3)
    meta = c.meta.rename(columns={"group": "label"})
    index = meta.assign(subject=meta["participant"], row=np.arange(len(meta)))
    confounds = {s: {"brain_volume_ml": v, "affine_scale": a}
                 for s, v, a in zip(meta["scan"], meta["icv_ml"], meta["affine_scale"])}
    table = scan_table(index.drop(columns=["participant", "icv_ml", "affine_scale", "split"]), None, confounds)
    table["analyse"] = "True"
    table["age"] = np.random.default_rng(0).uniform(20, 60, len(table)).round(1)
    table["sex"] = np.where(np.arange(len(table)) % 2 == 0, "F", "M")
    write_tsv(table, root / "scans.tsv")
    latents = meta[["dataset", "participant", "session", "run", "scan", "label"]].assign(split="none")
    for j in range(c.latents.shape[1]):
        latents[f"mu_{j}"] = c.latents[:, j].astype(np.float32)
    latents.iloc[::-1].to_parquet(root / "latents.parquet")  # another row order than scans.tsv
    np.save(root / "voxels.npy", c.voxels)
    index[["row", "scan", "dataset", "subject"]].to_csv(root / "voxels_index.tsv", sep="\t", index=False)
    return root, c


def test_site_check_step_and_table(analysis_inputs):
    root, _ = analysis_inputs
    scans = read_scan_table(root / "scans.tsv")
    fs = feature_set("latents", scans, latents=root / "latents.parquet")
    site_check_step(scans, fs, root / "site", model="vae", classifiers=["logreg"], n_splits=3, n_repeats=1, n_inner=2)
    paths = site_check_tables([root / "site"], root / "tables")
    table = pd.read_csv(paths["tsv"], sep="\t")
    assert table["model"].tolist() == ["vae"] and table["balanced_accuracy_mean"].item() > 0.7  # synthetic site shift
    with pytest.raises(AnalysisError, match="unknown kind"):
        feature_set("voxels", scans)
