"""Reconstruction fidelity of a trained VAE on the test split, against a PCA baseline.

Per scan: MSE, MAE, PSNR and SSIM inside the brain mask and on the whole volume. SSIM is 3D with a
Gaussian window (MONAI's ``compute_ssim_and_cs`` formula: kernel 7, sigma 1.5, k1 0.01, k2 0.03;
computed separably, see :func:`ssim_map_3d`) on the volume zero-padded by half a window, so the map covers every voxel and windows at the brain edge see
the true zero background; SSIM inside the mask is the mean of that map over mask voxels, whole-volume
SSIM its mean over all voxels. PSNR and SSIM use the input scan's own intensity range (max - min) as
``data_range`` (no fixed peak value after normalisation); every method is scored with the same
range.

The PCA baseline (n_components = latent_dim, capped at the number of training scans) is fitted on
the training split, on the voxels inside the union of the training masks, and scored the same way:
a VAE with a d-dimensional latent should reconstruct at least as well as the best linear
d-dimensional code. It is an exact PCA fitted from the memory-mapped cohort array a part at a time
(:class:`PCABaseline`): no copy of the training scans is ever made, so it works at 1 mm for
thousands of scans. The mean-image baseline (``mean_image``: every scan reconstructed as the mean of
the training scans) is the floor: a model that does not beat it has learnt nothing about the
individual scan.

Diagnostics of the latent space (:mod:`brainvae.vae.diagnostics`): KL per latent dimension, active
units and a posterior-collapse warning, in ``diagnostics.json`` and ``kl_per_dimension.tsv``.

Works for every architecture of :mod:`brainvae.vae.nn` and never imports the trainer.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from brainvae.io import atomic_path, atomic_write_text
from brainvae.memmaps import RELEASE_EVERY, mean_of_rows, paged, release_pages

from .cohort import read_index, read_splits
from .diagnostics import latent_diagnostics, write_diagnostics
from ..runtime import resolve_device
from .nn import load_model

__all__ = [
    "METRICS",
    "PCABaseline",
    "bootstrap_ci",
    "decode_latents",
    "evaluate_vae",
    "reconstruct",
    "scan_metrics",
    "summarise",
]

METRICS = ("mse", "mae", "psnr", "ssim")
REGIONS = ("mask", "whole")


def reconstruct(model: torch.nn.Module, array: np.ndarray, rows: Sequence[int], *, device: torch.device,
                batch_size: int = 4) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield ``(row, input, reconstruction)`` (float32 volumes) using ``mu`` (eval mode)."""
    model.eval()
    rows = list(rows)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start: start + batch_size]
        x = np.stack([np.asarray(array[r], dtype=np.float32) for r in chunk])
        with torch.no_grad():
            recon, _, _ = model(torch.from_numpy(x).unsqueeze(1).to(device))
        recon_np = recon.float().squeeze(1).cpu().numpy()
        release_pages(array)  # only this batch is held: read pages of a memmap leave the resident set
        for r, xi, yi in zip(chunk, x, recon_np, strict=True):
            yield r, xi, yi


SSIM_KERNEL, SSIM_SIGMA = 7, 1.5


def ssim_map_3d(x: np.ndarray, y: np.ndarray, data_range: float) -> np.ndarray:
    """Gaussian-window SSIM map of two volumes, the same shape as them (zero padding).

    MONAI's formula and window (``monai.metrics.regression.compute_ssim_and_cs``: sampled Gaussian,
    kernel 7, sigma 1.5, k1 0.01, k2 0.03; tests/test_vae_evaluate.py checks the two agree), computed
    as three 1D filters (the window is separable) in float64: MONAI's dense 7x7x7 single-channel
    3D convolution took ~9 s a volume on 2 CPU cores, this ~0.1 s.
    """
    from scipy import ndimage

    def f(a: np.ndarray) -> np.ndarray:
        return ndimage.gaussian_filter(a, SSIM_SIGMA, mode="constant", cval=0.0,
                                       truncate=(SSIM_KERNEL // 2) / SSIM_SIGMA)

    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = f(x), f(y)
    sxx, syy, sxy = f(x * x) - mx * mx, f(y * y) - my * my, f(x * y) - mx * my
    return ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))


def scan_metrics(x: np.ndarray, recon: np.ndarray, mask: np.ndarray,
                 regions: Sequence[str] = REGIONS) -> dict[str, float]:
    """``{metric}_{region}`` for metric in MSE/MAE/PSNR/SSIM and region in mask/whole."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(recon, dtype=np.float64)
    m = np.asarray(mask) > 0
    data_range = float(x.max() - x.min()) or 1.0
    ssim_map = ssim_map_3d(x, y, data_range)
    out: dict[str, float] = {}
    for region in regions:
        if region == "mask":
            if not m.any():
                raise ValueError("empty brain mask")
            xs, ys, ssim = x[m], y[m], float(ssim_map[m].mean())
        else:
            xs, ys = x.ravel(), y.ravel()
            ssim = float(ssim_map.mean())
        err = ys - xs
        mse = float(np.mean(err ** 2))
        out[f"mse_{region}"] = mse
        out[f"mae_{region}"] = float(np.mean(np.abs(err)))
        out[f"psnr_{region}"] = float(10.0 * np.log10(data_range ** 2 / mse)) if mse > 0 else float("inf")
        out[f"ssim_{region}"] = ssim
    return out


def bootstrap_ci(values: Sequence[float], n_boot: int = 2000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(n_boot, len(v)))].mean(axis=1)
    alpha = (1 - level) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def summarise(per_scan: pd.DataFrame, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Long table (method, metric, region, n, mean, sd, ci_low, ci_high) from per-scan rows."""
    rows = []
    for method, df in per_scan.groupby("method", sort=False):
        for region in REGIONS:
            for metric in METRICS:
                col = f"{metric}_{region}"
                if col not in df.columns:
                    continue
                v = df[col].to_numpy(dtype=float)
                lo, hi = bootstrap_ci(v, n_boot, seed)
                rows.append({"method": method, "metric": metric, "region": region,
                             "n": int(np.isfinite(v).sum()), "mean": float(np.nanmean(v)),
                             "sd": float(np.nanstd(v, ddof=1)) if len(v) > 1 else float("nan"),
                             "ci_low": lo, "ci_high": hi})
    return pd.DataFrame(rows)


class PCABaseline:
    """Exact PCA reconstruction on the voxels inside the union of the training masks, fitted streaming.

    ``PCABaseline(n_components).fit(volumes, masks, rows)``: ``volumes`` and ``masks`` are N x X x Y x Z
    (in-memory arrays, or the cohort's read-only memory maps ``np.load(path, mmap_mode="r")``), ``rows``
    the training rows (default: all N). The arrays are read in place, a part at a time, never as
    ``volumes[rows]`` (which would copy every training scan):

    1. row by row: the support (union of the training masks) and the mean of the training volumes
       (float64 sums; :attr:`mean_volume_` is the mean image over every voxel, :attr:`mean_` its
       support part);
    2. the n x n Gram matrix ``G = Xc Xcᵀ`` of the centred in-support training data (n = len(rows),
       float64), accumulated over slabs of support voxels read from every training row; a slab holds
       as many values as ``block_rows`` training rows do, so one block of memory whatever n is;
    3. ``G = U Λ Uᵀ`` (eigh); the top k = min(n_components, n, support voxels) principal axes are
       ``V = Λ^-1/2 Uᵀ Xc`` (the right singular vectors of Xc: the components an SVD of the stacked
       data gives, as sklearn's exact ``PCA(svd_solver="full")``), again slab by slab, stored float32
       in :attr:`components_`.

    Reconstruction (:meth:`reconstruct`) is ``mean + Vᵀ V (x - mean)`` on the support and 0 outside:
    the projection onto the top-k principal subspace, as ``PCA.inverse_transform(PCA.transform(x))``.
    Axes whose training variance is below 1e-10 of the first (the n-th when k = n: centred data have
    rank n - 1) carry no training variance and are numerically undetermined (sklearn returns an
    arbitrary direction there), so they are left out of the projection; :attr:`n_components` still
    reports k, :attr:`rank` the axes used.

    Memory: O(k x p + n² + one block), p = support voxels: ``components_`` 4·k·p bytes, the Gram
    matrix 8·n² bytes, a slab 8·block_rows·p bytes, and a few volumes (the float64 sum, the support).
    With a memory map, the pages read are dropped from the resident set every few rows
    (:func:`brainvae.memmaps.release_pages`), so the file's pages do not accumulate in it either.
    Time: ~n²·p/2 multiply-adds for the Gram matrix, and three reads of the training rows (two of
    them by slabs) and one of their masks. ``seed`` is kept for the API and not used: the solver is
    deterministic.
    """

    def __init__(self, n_components: int, seed: int = 0, *, block_rows: int = 16) -> None:
        self.n_components = int(n_components)
        self.seed = seed
        self.block_rows = int(block_rows)
        self.support: np.ndarray | None = None
        self.mean_: np.ndarray | None = None
        self.mean_volume_: np.ndarray | None = None
        self.components_: np.ndarray | None = None
        self.explained_variance_: np.ndarray | None = None
        self.rows: list[int] = []

    @property
    def rank(self) -> int:
        """The principal axes :meth:`reconstruct` uses (<= :attr:`n_components`)."""
        return 0 if self.components_ is None else int(self.components_.shape[0])

    def fit(self, volumes: Any, masks: Any, rows: Sequence[int] | None = None, *,
            block_rows: int | None = None) -> PCABaseline:
        """Fit on ``volumes[rows]`` and ``masks[rows]`` (default every row), read a block at a time."""
        block = max(1, int(block_rows or self.block_rows))
        rows = list(range(len(volumes))) if rows is None else [int(r) for r in rows]
        if not rows:
            raise ValueError("PCABaseline.fit needs at least one training row")
        n = len(rows)
        support, total = _support_and_sum(volumes, masks, rows)
        index = np.flatnonzero(support.ravel())
        p = int(index.size)
        if p == 0:
            raise ValueError("the training masks are all empty")
        self.rows, self.support = rows, support
        self.mean_volume_ = (total / n).astype(np.float32)
        self.mean_ = mean = total.ravel()[index] / n
        del total
        k = min(self.n_components, n, p)
        self.n_components = k
        slab = max(1, -(-block * p // n))  # support voxels per slab: n x slab values = block rows' worth

        gram = np.zeros((n, n))
        for part, _ in _slabs(volumes, rows, index, mean, slab):
            gram += part @ part.T  # a @ a.T: BLAS syrk
        del part  # the slab buffer, before the next pass allocates its own
        values, vectors = np.linalg.eigh(gram)
        del gram
        order = np.argsort(values)[::-1][:k]
        values, vectors = values[order], vectors[:, order]
        keep = values > max(float(values[0]), 0.0) * 1e-10
        values, vectors = values[keep], vectors[:, keep]
        self.explained_variance_ = values / max(n - 1, 1)
        components = np.zeros((len(values), p), dtype=np.float32)
        if len(values):
            weights = np.ascontiguousarray((vectors / np.sqrt(values)[None, :]).T)  # r x n: V = Λ^-1/2 Uᵀ Xc
            for part, s in _slabs(volumes, rows, index, mean, slab):
                components[:, s] = weights @ part
            del part
        self.components_ = components
        return self

    def reconstruct(self, volume: np.ndarray) -> np.ndarray:
        """``mean + Vᵀ V (x - mean)`` inside the support, 0 outside (a float32 volume)."""
        assert self.components_ is not None and self.support is not None and self.mean_ is not None, \
            "call fit() first"
        y = np.asarray(volume)[self.support].astype(np.float64) - self.mean_
        out_support = self.mean_.copy()
        if self.rank:
            # float32 components, float64 products, a bounded column chunk at a time.
            code = np.zeros(self.rank)
            for s in _chunks(y.size, self.rank):
                code += self.components_[:, s].astype(np.float64) @ y[s]
            for s in _chunks(y.size, self.rank):
                out_support[s] += code @ self.components_[:, s].astype(np.float64)
        out = np.zeros(self.support.shape, dtype=np.float32)
        out[self.support] = out_support
        return out


def _chunks(p: int, k: int, budget: int = 1 << 22) -> Iterator[slice]:
    """Column slices of a k x p matrix with at most ~``budget`` values each."""
    step = max(1, budget // max(k, 1))
    for start in range(0, p, step):
        yield slice(start, min(start + step, p))


def _support_and_sum(volumes: Any, masks: Any, rows: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Union of ``masks[rows] > 0`` and the float64 sum of ``volumes[rows]``, one row at a time."""
    shape = tuple(np.shape(volumes[rows[0]]))
    support = np.zeros(shape, dtype=bool)
    total = np.zeros(shape, dtype=np.float64)
    for r in paged(rows, volumes, masks):
        support |= np.asarray(masks[r]) > 0
        total += np.asarray(volumes[r])
    return support, total


def _slabs(volumes: Any, rows: Sequence[int], index: np.ndarray, mean: np.ndarray, slab: int
           ) -> Iterator[tuple[np.ndarray, slice]]:
    """``(Xc[:, s], s)`` for consecutive slices ``s`` of the support voxels: n x len(s), float64, centred.

    ``index``: the flat indices of the support voxels; each training row is read only at the slab's
    voxels (a contiguous stretch of the row). The buffer is reused: use each slab before the next.
    """
    buffer = np.empty((len(rows), min(slab, index.size)))
    for start in range(0, index.size, slab):
        s = slice(start, min(start + slab, index.size))
        idx = index[s]
        lo, hi = int(idx[0]), int(idx[-1]) + 1
        local = idx - lo
        part = buffer[:, :s.stop - s.start]
        for i, r in enumerate(paged(rows, volumes)):
            part[i] = np.asarray(volumes[r]).reshape(-1)[lo:hi][local]
        part -= mean[s]
        yield part, s


def mid_slices(vol: np.ndarray) -> list[np.ndarray]:
    """Sagittal, coronal and axial slices through the centre, transposed so superior/anterior is up."""
    cx, cy, cz = (s // 2 for s in vol.shape)
    return [vol[cx].T, vol[:, cy].T, vol[:, :, cz].T]


def save_png(fig: Any, path: Path, dpi: int = 100) -> Path:
    """Write a matplotlib figure as a PNG atomically and close it."""
    import matplotlib.pyplot as plt

    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)
    return path


def plot_reconstructions(items: Sequence[tuple[str, np.ndarray, np.ndarray]], path: Path) -> None:
    """Three orthogonal slices of input, reconstruction and |error| per scan (paper Figure 3)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(items), 9, figsize=(18, 2.3 * len(items)), squeeze=False)
    for i, (scan, x, y) in enumerate(items):
        lo, hi = np.percentile(x, [1, 99.5])
        err = np.abs(y - x)
        emax = float(np.percentile(err, 99.5)) or 1.0
        for j, (name, vol, kw) in enumerate([("input", x, {"vmin": lo, "vmax": hi, "cmap": "gray"}),
                                             ("reconstruction", y, {"vmin": lo, "vmax": hi, "cmap": "gray"}),
                                             ("|error|", err, {"vmin": 0, "vmax": emax, "cmap": "magma"})]):
            for k, sl in enumerate(mid_slices(vol)):
                ax = axes[i, 3 * j + k]
                ax.imshow(sl, origin="lower", **kw)
                ax.set_axis_off()
                if k == 1:
                    ax.set_title(name, fontsize=9)
        axes[i, 0].text(-0.1, 0.5, scan, transform=axes[i, 0].transAxes, rotation=90,
                        va="center", ha="right", fontsize=7)
    fig.tight_layout()
    save_png(fig, path)


def decode_latents(model: torch.nn.Module, codes: np.ndarray | torch.Tensor,
                   device: torch.device | str = "cpu") -> np.ndarray:
    """Volumes (float32, one per code) decoded from latent codes (eval mode): flat rows of the latents table or
    codes already of the model's ``latent_shape``."""
    z = torch.as_tensor(codes, dtype=torch.float32).reshape(len(codes), *model.latent_shape)
    model.eval()
    with torch.no_grad():
        return model.decode(z.to(device)).float().squeeze(1).cpu().numpy()


def plot_prior_samples(model: torch.nn.Module, path: Path, *, n: int = 4, seed: int = 0,
                       device: torch.device | str = "cpu") -> None:
    """Volumes decoded from z ~ N(0, I): three orthogonal slices each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gen = torch.Generator().manual_seed(seed)
    vols = decode_latents(model, torch.randn(n, *model.latent_shape, generator=gen), device)
    fig, axes = plt.subplots(n, 3, figsize=(6, 2.2 * n), squeeze=False)
    for i, v in enumerate(vols):
        lo, hi = np.percentile(v, [1, 99.5])
        for k, sl in enumerate(mid_slices(v)):
            axes[i, k].imshow(sl, origin="lower", cmap="gray", vmin=lo, vmax=hi)
            axes[i, k].set_axis_off()
    fig.suptitle("samples from the prior", fontsize=10)
    fig.tight_layout()
    save_png(fig, path)


def evaluate_vae(
    model_dir: str | os.PathLike[str],
    array_path: str | os.PathLike[str],
    mask_path: str | os.PathLike[str],
    index: str | os.PathLike[str] | pd.DataFrame,
    splits: str | os.PathLike[str] | pd.DataFrame,
    out_dir: str | os.PathLike[str],
    *,
    split: str = "test",
    device: str = "auto",
    batch_size: int = 4,
    pca: bool = True,
    pca_max_train: int = 2000,
    n_boot: int = 2000,
    n_figure: int = 3,
    n_prior: int = 4,
    seed: int = 0,
) -> dict[str, pd.DataFrame]:
    """Score the VAE in ``model_dir`` (and a PCA baseline) on ``split``; write tables and figures.

    Methods: ``vae`` (the model), ``pca`` (as many components as the latent dimension, capped at the
    training scans) and ``mean_image``. Writes ``out_dir/per_scan_metrics.tsv`` (method, scan,
    ``{metric}_{region}``), ``diagnostics.json`` and ``kl_per_dimension.tsv`` (see
    :func:`brainvae.vae.diagnostics.latent_diagnostics`; on every scan of the model's splits),
    ``summary.tsv`` (method, metric, region, n, mean, sd, ci_low, ci_high; bootstrap 95 % CI of the
    mean), ``reconstructions.png`` (``n_figure`` random test scans) and ``prior_samples.png``.
    Returns ``{"per_scan": ..., "summary": ...}``.

    Memory: the arrays are memory-mapped and read a scan (or a batch, or a slab) at a time; the
    figure keeps ``n_figure`` input/reconstruction pairs. The PCA baseline (:class:`PCABaseline`)
    holds 4·k·p bytes of components (k its components, p the voxels in the union of the training
    masks), an 8·n² byte Gram matrix and one block of rows; ``pca_max_train`` caps its n at a random
    subset of the training scans (2,000: a 32 MB Gram matrix; fitting time grows as n²·p).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    model = load_model(model_dir, dev)
    index_df = index.copy() if isinstance(index, pd.DataFrame) else read_index(index)
    splits_df = read_splits(splits)
    scans = index_df.set_index("row")["scan"]
    rows_of = {s: index_df.loc[index_df["scan"].isin(splits_df.loc[splits_df["split"] == s, "scan"]),
                               "row"].astype(int).tolist() for s in ("train", split)}
    test_rows = rows_of[split]
    if not test_rows:
        raise ValueError(f"no scans in the {split!r} split")
    array = np.load(array_path, mmap_mode="r")
    masks = np.load(mask_path, mmap_mode="r")

    baseline: PCABaseline | None = None
    train_rows = rows_of["train"]
    if len(train_rows) > pca_max_train:  # bounds the n x n Gram matrix and the n² x voxels time
        rng = np.random.default_rng(seed)
        train_rows = sorted(rng.choice(train_rows, pca_max_train, replace=False).tolist())
    if pca and train_rows:
        # Read from the memory maps in place (no array[train_rows] copy of the training scans).
        baseline = PCABaseline(model.latent_dim, seed).fit(array, masks, train_rows)
    mean_image = None
    if rows_of["train"]:
        # The PCA's first pass summed the same rows in the same order: reuse its mean image.
        same = baseline is not None and baseline.rows == list(rows_of["train"])
        mean_image = baseline.mean_volume_ if same else _mean_of(array, rows_of["train"])

    fig_rows = set(np.random.default_rng(seed).choice(test_rows, min(n_figure, len(test_rows)),
                                                      replace=False).tolist())
    records: list[dict[str, Any]] = []
    figure_items: list[tuple[str, np.ndarray, np.ndarray]] = []
    for row, x, y in reconstruct(model, array, test_rows, device=dev, batch_size=batch_size):
        m = np.array(masks[row])
        release_pages(masks)
        records.append({"method": "vae", "scan": scans[row], "row": row, **scan_metrics(x, y, m)})
        if baseline is not None:
            records.append({"method": "pca", "scan": scans[row], "row": row,
                            "n_components": baseline.n_components,
                            **scan_metrics(x, baseline.reconstruct(x), m)})
        if mean_image is not None:
            records.append({"method": "mean_image", "scan": scans[row], "row": row, "n_components": 0,
                            **scan_metrics(x, mean_image, m)})
        if row in fig_rows:
            figure_items.append((scans[row], x, y))
    per_scan = pd.DataFrame(records)
    per_scan["n_components"] = per_scan.get("n_components", pd.Series(dtype=float)).fillna(
        model.latent_dim).astype(int)
    cols = ["method", "scan", "row", "n_components"] + [f"{m}_{r}" for r in REGIONS for m in METRICS]
    per_scan = per_scan[cols]
    summary = summarise(per_scan, n_boot=n_boot, seed=seed)
    atomic_write_text(per_scan.to_csv(sep="\t", index=False, float_format="%.6g"),
                      out_dir / "per_scan_metrics.tsv")
    atomic_write_text(summary.to_csv(sep="\t", index=False, float_format="%.6g"),
                      out_dir / "summary.tsv")
    plot_reconstructions(figure_items, out_dir / "reconstructions.png")
    plot_prior_samples(model, out_dir / "prior_samples.png", n=n_prior, seed=seed, device=dev)
    model_rows = sorted(set(index_df.loc[index_df["scan"].isin(splits_df["scan"]), "row"].astype(int)))
    diagnostics = latent_diagnostics(model, _ReleasingRows(array), model_rows, device=dev, batch_size=batch_size)
    write_diagnostics(diagnostics, out_dir)
    return {"per_scan": per_scan, "summary": summary, "diagnostics": diagnostics}


def _mean_of(array: np.ndarray, rows: Sequence[int]) -> np.ndarray:
    """Mean image of ``array[rows]`` (float32), summed row by row in float64: one volume in memory."""
    return mean_of_rows(array, rows)


def mean_metric(summary: pd.DataFrame, method: str, metric: str, region: str = "mask") -> float:
    """Convenience: the mean of one metric from a :func:`summarise` table."""
    sel = summary[(summary.method == method) & (summary.metric == metric) & (summary.region == region)]
    return float(sel["mean"].iloc[0])


def metrics_for_rows(model: torch.nn.Module, array: np.ndarray, masks: np.ndarray, rows: Sequence[int], *,
                     device: torch.device, batch_size: int = 4,
                     regions: Sequence[str] = ("mask",)) -> dict[int, Mapping[str, float]]:
    """``row -> scan_metrics`` of the VAE reconstruction for every row (used by latents); one batch in memory."""
    out: dict[int, Mapping[str, float]] = {}
    for row, x, y in reconstruct(model, array, rows, device=device, batch_size=batch_size):
        out[row] = scan_metrics(x, y, np.array(masks[row]), regions)
        release_pages(masks)
    return out


class _ReleasingRows:
    """``array[r]`` as an in-memory copy, the memory map's read pages dropped every few rows.

    For readers that take rows one at a time (:func:`brainvae.vae.diagnostics.latent_diagnostics`
    encodes every scan of the splits): without it, the pages of the whole cohort array would stay in
    the resident set until the map is closed.
    """

    def __init__(self, array: np.ndarray) -> None:
        self.array, self._reads = array, 0

    def __len__(self) -> int:
        return len(self.array)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    def __getitem__(self, key: Any) -> np.ndarray:
        out = np.array(self.array[key])
        self._reads += 1
        if self._reads % RELEASE_EVERY == 0:
            release_pages(self.array)
        return out
