"""Feature loading and alignment (brainvae.analysis.features)."""

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from brainvae.analysis import (
    AnalysisError,
    FeatureSet,
    affine_scale,
    align_rows,
    confound_matrix,
    icv_ml,
    latent_matrix,
    load_latents,
    load_voxel_matrix,
    voxel_matrix_from_images,
)
from brainvae.analysis.features import latent_columns


def _latents_table(n: int = 4, d: int = 12) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    table = pd.DataFrame({"dataset": "IXI", "participant": [f"sub-{i}" for i in range(n)], "session": "",
                          "run": "", "scan": [f"sub-{i}" for i in range(n)], "label": "euploid", "split": "train"})
    for j in range(d):
        table[f"mu_{j}"] = rng.normal(size=n)
        table[f"logvar_{j}"] = rng.normal(size=n)
    table["recon_mse"] = 0.01
    return table


def test_latent_columns_in_numeric_order_and_parquet_round_trip(tmp_path):
    table = _latents_table()
    shuffled = table[list(reversed(table.columns))]
    assert latent_columns(shuffled) == [f"mu_{j}" for j in range(12)]
    assert latent_columns(shuffled, "logvar_")[:3] == ["logvar_0", "logvar_1", "logvar_2"]
    path = tmp_path / "m.parquet"
    table.to_parquet(path)
    loaded = load_latents(path)
    X = latent_matrix(loaded)
    assert X.shape == (4, 12) and X.dtype == np.float64
    np.testing.assert_array_equal(X[:, 10], table["mu_10"].to_numpy())
    with pytest.raises(AnalysisError, match="does not exist"):
        load_latents(tmp_path / "none.parquet")
    with pytest.raises(AnalysisError, match="no 'mu_<i>' columns"):
        latent_columns(table.drop(columns=[c for c in table if c.startswith("mu_")]))


def test_non_finite_latents_name_the_scan():
    table = _latents_table()
    table.loc[2, "mu_3"] = np.nan
    with pytest.raises(AnalysisError, match="sub-2"):
        latent_matrix(table)


def test_align_rows_reorders_by_scan_and_reports_missing(tmp_path):
    meta = _latents_table(5)
    X = np.arange(5 * 3, dtype=np.float32).reshape(5, 3)
    index = meta[["dataset", "participant", "session", "run", "scan"]]
    assert align_rows(meta, index, X) is X  # same order: untouched (memmaps stay memmaps)
    rev = index.iloc[::-1].reset_index(drop=True)
    np.testing.assert_array_equal(align_rows(meta, rev, X[::-1]), X)
    np.testing.assert_array_equal(align_rows(meta.iloc[[3, 1]], index, X), X[[3, 1]])
    with pytest.raises(AnalysisError, match="sub-4"):
        align_rows(meta, index.iloc[:4], X[:4])
    with pytest.raises(AnalysisError, match="index has 4 rows"):
        align_rows(meta, index.iloc[:4], X)

    np.save(tmp_path / "v.npy", X)
    index.to_csv(tmp_path / "v.tsv", sep="\t", index=False)
    mm, idx = load_voxel_matrix(tmp_path / "v.npy", tmp_path / "v.tsv")
    assert isinstance(mm, np.memmap) and list(idx["scan"]) == list(meta["scan"])
    np.testing.assert_array_equal(align_rows(meta, idx, mm), X)
    index.iloc[:3].to_csv(tmp_path / "short.tsv", sep="\t", index=False)
    with pytest.raises(AnalysisError, match="3 rows but v.npy has 5"):
        load_voxel_matrix(tmp_path / "v.npy", tmp_path / "short.tsv")


def test_confound_matrix_and_helpers():
    meta = pd.DataFrame({"dataset": ["B", "A", "A"], "participant": ["1", "2", "3"], "icv_ml": [1400.0, 1500, 1300],
                         "affine_scale": [1.0, 0.98, 1.02]})
    fs = confound_matrix(meta)
    assert fs.name == "confounds" and fs.columns == ("icv_ml", "affine_scale", "site_A", "site_B")
    np.testing.assert_array_equal(fs.X[:, 2:], [[0, 1], [1, 0], [1, 0]])
    assert confound_matrix(meta.assign(dataset="A")).columns == ("icv_ml", "affine_scale")  # one site: no indicator
    with pytest.raises(AnalysisError, match="missing column"):
        confound_matrix(meta.drop(columns="icv_ml"))
    with pytest.raises(AnalysisError, match="non-finite"):
        confound_matrix(meta.assign(icv_ml=[1400.0, np.nan, 1300]))
    A = np.diag([1.1, 1.2, 0.9, 1.0])
    A[:3, 3] = [5, -3, 2]
    assert affine_scale(A) == pytest.approx((1.1 * 1.2 * 0.9) ** (1 / 3))
    assert affine_scale(-np.eye(3) * 2) == pytest.approx(2.0)  # reflections: absolute determinant
    mask = np.zeros((10, 10, 10))
    mask[:5, :4, :2] = 1
    assert icv_ml(mask, voxel_volume_mm3=8.0) == pytest.approx(40 * 8 / 1000)
    with pytest.raises(AnalysisError):
        FeatureSet("x", np.zeros(3))
    with pytest.raises(AnalysisError):
        FeatureSet("x", np.zeros((3, 2)), columns=("a",))


def test_voxel_matrix_from_images(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        img = nib.Nifti1Image(rng.normal(size=(6, 5, 4)).astype(np.float32), np.eye(4))
        paths.append(tmp_path / f"s{i}.nii.gz")
        nib.save(img, paths[-1])
    mask = np.zeros((6, 5, 4), bool)
    mask[1:4, 1:3, :] = True
    X = voxel_matrix_from_images(paths, tmp_path / "vox.npy", mask=mask)
    assert X.shape == (3, int(mask.sum()))
    np.testing.assert_allclose(X[1], np.asanyarray(nib.load(paths[1]).dataobj)[mask])
    nib.save(nib.Nifti1Image(np.zeros((6, 5, 3), np.float32), np.eye(4)), tmp_path / "bad.nii.gz")
    with pytest.raises(AnalysisError, match="grid differs"):
        voxel_matrix_from_images([*paths, tmp_path / "bad.nii.gz"], tmp_path / "vox2.npy")
    assert not (tmp_path / "vox2.npy").exists()  # atomic: no partial output
