"""Reconstruction metrics, bootstrap CIs, the PCA baseline and the evaluation outputs."""

from __future__ import annotations

import json

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from brainvae.vae.cohort import make_splits, read_index, select_training
from brainvae.vae.evaluate import PCABaseline, bootstrap_ci, evaluate_vae, scan_metrics, summarise
from synthetic_brains import synthetic_brains, write_synthetic_cohort
from brainvae.vae.train import train_vae


def test_scan_metrics_perfect_and_known_error() -> None:
    vols, masks = synthetic_brains(1, (16, 16, 16), seed=0)
    x, m = vols[0], masks[0]
    perfect = scan_metrics(x, x, m)
    assert perfect["mse_mask"] == 0 and perfect["ssim_mask"] == pytest.approx(1.0)
    assert perfect["psnr_whole"] == float("inf")
    y = x + np.where(m > 0, 0.5, 0.0).astype(np.float32)  # error only inside the brain
    got = scan_metrics(x, y, m)
    assert got["mse_mask"] == pytest.approx(0.25) and got["mae_mask"] == pytest.approx(0.5)
    assert got["mse_whole"] == pytest.approx(0.25 * m.mean(), rel=1e-5)
    data_range = float(x.max() - x.min())
    assert got["psnr_mask"] == pytest.approx(10 * np.log10(data_range ** 2 / 0.25), rel=1e-6)
    assert got["ssim_whole"] == pytest.approx(_gaussian_ssim(x, y, data_range).mean(), rel=1e-4)
    assert got["ssim_mask"] == pytest.approx(_gaussian_ssim(x, y, data_range)[m > 0].mean(), rel=1e-4)
    assert got["ssim_mask"] < 1.0


def test_ssim_map_matches_monai() -> None:
    import torch
    from monai.metrics.regression import compute_ssim_and_cs

    from brainvae.vae.evaluate import ssim_map_3d

    vols, _ = synthetic_brains(2, (16, 16, 16), seed=1)
    x, y = vols[0], vols[1]
    pad = lambda a: torch.nn.functional.pad(torch.from_numpy(a)[None, None], (3,) * 6)  # noqa: E731
    monai_map, _ = compute_ssim_and_cs(pad(y), pad(x), spatial_dims=3, kernel_size=[7] * 3, kernel_sigma=[1.5] * 3,
                                       data_range=float(x.max() - x.min()))
    np.testing.assert_allclose(ssim_map_3d(x, y, float(x.max() - x.min())), monai_map[0, 0].numpy(), atol=1e-4)


def _gaussian_ssim(x: np.ndarray, y: np.ndarray, data_range: float) -> np.ndarray:
    """Reference SSIM map: Gaussian window 7 (sigma 1.5), zero padding (scipy, independent of MONAI)."""
    from scipy import ndimage

    g = np.exp(-0.5 * (np.arange(7) - 3) ** 2 / 1.5 ** 2)
    g /= g.sum()
    k = g[:, None, None] * g[None, :, None] * g[None, None, :]

    def f(a: np.ndarray) -> np.ndarray:
        return ndimage.convolve(a.astype(np.float64), k, mode="constant", cval=0.0)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = f(x), f(y)
    sxx, syy, sxy = f(x * x) - mx ** 2, f(y * y) - my ** 2, f(x * y) - mx * my
    return ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (sxx + syy + c2))


def test_bootstrap_ci_brackets_the_mean() -> None:
    values = np.random.default_rng(0).normal(5.0, 1.0, 200)
    lo, hi = bootstrap_ci(values, n_boot=1000, seed=1)
    assert lo < values.mean() < hi and hi - lo < 0.5
    assert bootstrap_ci(values, seed=1) == bootstrap_ci(values, seed=1)


def test_summarise_long_table() -> None:
    per_scan = pd.DataFrame({"method": ["vae", "vae", "pca", "pca"], "scan": list("abab"),
                             "mse_mask": [1.0, 3.0, 2.0, 2.0]})
    s = summarise(per_scan, n_boot=100)
    row = s[(s.method == "vae") & (s.metric == "mse")].iloc[0]
    assert row["mean"] == 2.0 and row["sd"] == pytest.approx(np.sqrt(2)) and row["n"] == 2


def test_pca_baseline_with_all_components_is_exact_on_training_data() -> None:
    vols, masks = synthetic_brains(6, (16, 16, 16), seed=2)
    pca = PCABaseline(n_components=64).fit(vols, masks)
    assert pca.n_components == 6  # capped at the number of training scans
    np.testing.assert_allclose(pca.reconstruct(vols[3]), vols[3], atol=1e-4)


def test_evaluate_vae_writes_tables_and_figures(tmp_path: Path) -> None:
    paths = write_synthetic_cohort(tmp_path, 14, shape=(16, 16, 16), seed=4)
    index = read_index(paths["index"])
    splits = make_splits(select_training(index), seed=0)
    train_vae({"model": {"latent_dim": 4, "widths": [4, 8]}, "epochs": 1}, paths["array"],
              paths["mask"], index, splits, tmp_path / "model", checkpoint_dir=tmp_path / "ck",
              device="cpu", threads=1, progress=False)
    result = evaluate_vae(tmp_path / "model", paths["array"], paths["mask"], index, splits,
                          tmp_path / "eval", device="cpu", n_boot=200, n_figure=2, n_prior=2)
    n_test = int((splits["split"] == "test").sum())
    per_scan = pd.read_csv(tmp_path / "eval" / "per_scan_metrics.tsv", sep="\t")
    assert len(per_scan) == 3 * n_test and set(per_scan["method"]) == {"vae", "pca", "mean_image"}
    assert {"ssim_mask", "psnr_whole", "mae_mask", "mse_whole"} <= set(per_scan.columns)
    summary = pd.read_csv(tmp_path / "eval" / "summary.tsv", sep="\t")
    assert len(summary) == 3 * 4 * 2  # methods x metrics x regions
    assert (summary["ci_low"] <= summary["mean"] + 1e-12).all()
    assert result["summary"].shape == summary.shape
    diagnostics = json.loads((tmp_path / "eval" / "diagnostics.json").read_text())
    assert diagnostics["latent_dim"] == 4 and set(diagnostics) >= {"active_units", "kl_per_dim_mean", "posterior_collapse"}
    for name in ("reconstructions.png", "prior_samples.png"):
        assert (tmp_path / "eval" / name).read_bytes()[:4] == b"\x89PNG"


def _cohort_memmaps(tmp_path: Path, n: int, shape: tuple[int, int, int], seed: int):
    """A small cohort written as float32 / uint8 ``.npy`` files and opened read-only memory-mapped."""
    vols, masks = synthetic_brains(n, shape, seed=seed)
    np.save(tmp_path / "cohort.npy", vols)
    np.save(tmp_path / "cohort_mask.npy", masks)
    return (vols, masks, np.load(tmp_path / "cohort.npy", mmap_mode="r"),
            np.load(tmp_path / "cohort_mask.npy", mmap_mode="r"))


def test_streamed_pca_baseline_matches_sklearn_pca_on_stacked_data(tmp_path: Path) -> None:
    from sklearn.decomposition import PCA

    vols, masks, mm, mm_masks = _cohort_memmaps(tmp_path, 30, (16, 20, 16), seed=5)
    train, test = list(range(0, 30, 2)) + [1, 3, 5], [7, 9, 11, 13, 29]
    data_range = float(vols.max() - vols.min())
    for k in (4, len(train) - 1):
        pca = PCABaseline(n_components=k).fit(mm, mm_masks, train, block_rows=3)
        support = masks[train].any(axis=0)
        np.testing.assert_array_equal(pca.support, support)
        ref = PCA(n_components=k, svd_solver="full").fit(np.stack([vols[r][support] for r in train]))
        np.testing.assert_allclose(pca.explained_variance_, ref.explained_variance_, rtol=1e-4)
        for r in test:
            expected = np.zeros(support.shape, dtype=np.float32)
            expected[support] = ref.inverse_transform(ref.transform(vols[r][support][None]))[0]
            np.testing.assert_allclose(pca.reconstruct(mm[r]), expected, atol=1e-4 * data_range)
    # k = n_train: the n-th axis of centred data carries no variance and is left out of the projection.
    full = PCABaseline(n_components=64).fit(mm, mm_masks, train)
    assert full.n_components == len(train) and full.rank == len(train) - 1
    np.testing.assert_allclose(full.reconstruct(mm[train[2]]), vols[train[2]], atol=1e-4 * data_range)


def test_pca_baseline_fits_a_memmap_in_blocks(tmp_path: Path) -> None:
    import tracemalloc

    n, shape = 80, (24, 24, 24)
    vols, masks, mm, mm_masks = _cohort_memmaps(tmp_path, n, shape, seed=6)
    rows = [r for r in range(n) if r % 5]  # a row list, not a copy of the rows
    tracemalloc.start()
    blocked = PCABaseline(n_components=3).fit(mm, mm_masks, rows, block_rows=2)
    _, peak_blocked = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    whole = PCABaseline(n_components=3).fit(mm, mm_masks, rows, block_rows=len(rows))
    _, peak_whole = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    stacked = len(rows) * int(blocked.support.sum()) * 8  # the in-support training data, float64
    # One block of 2 rows holds a small part of the data; one block of every row holds all of it, once.
    assert peak_blocked < 0.25 * stacked and stacked < peak_whole < 1.5 * stacked
    np.testing.assert_allclose(blocked.explained_variance_, whole.explained_variance_, rtol=1e-6)
    np.testing.assert_allclose(np.abs(blocked.components_), np.abs(whole.components_), atol=1e-5)
    for r in (0, 5, 17):
        np.testing.assert_allclose(blocked.reconstruct(mm[r]), whole.reconstruct(mm[r]), atol=1e-5)
    # In-memory arrays (the original API) give the same fit as the memory maps.
    in_memory = PCABaseline(n_components=3).fit(vols[rows], masks[rows])
    np.testing.assert_allclose(in_memory.reconstruct(vols[5]), whole.reconstruct(mm[5]), atol=1e-5)


def test_mean_image_streamed_equals_numpy_mean(tmp_path: Path) -> None:
    from brainvae.vae.evaluate import _mean_of

    vols, masks, mm, mm_masks = _cohort_memmaps(tmp_path, 20, (12, 14, 12), seed=7)
    rows = [0, 3, 4, 8, 9, 15, 19]
    expected = vols[rows].astype(np.float64).mean(axis=0)
    np.testing.assert_allclose(_mean_of(mm, rows), expected, atol=1e-6)
    pca = PCABaseline(n_components=2).fit(mm, mm_masks, rows, block_rows=2)
    np.testing.assert_allclose(pca.mean_volume_, expected, atol=1e-6)
    np.testing.assert_allclose(pca.mean_, expected[masks[rows].any(axis=0)], atol=1e-6)
