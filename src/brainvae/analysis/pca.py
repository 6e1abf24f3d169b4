"""Descriptive PCA of latent means (the paper's Figure 4) and of voxels (baseline), with tables and figures.

This PCA is for *looking* at the data (all scans, no labels used). It is never the input of a
classifier: classification fits its own PCA inside each training fold (see classify.py).

Voxel matrices have far more columns than rows, so for p > n the PCA is computed from the n × n
Gram matrix accumulated over column chunks: exact, and a memory-mapped matrix is never loaded whole.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from brainvae.analysis.errors import AnalysisError
from brainvae.analysis.features import ID_COLUMNS
from brainvae.memmaps import release_pages

__all__ = ["PCAResult", "explained_variance_table", "fit_pca", "pca_report", "pca_scores_table"]


@dataclass(frozen=True)
class PCAResult:
    """Scores (n × k), the variance of each component and the total variance of the data."""

    scores: np.ndarray
    explained_variance: np.ndarray
    total_variance: float

    @property
    def explained_variance_ratio(self) -> np.ndarray:
        return self.explained_variance / self.total_variance if self.total_variance > 0 else np.zeros_like(self.explained_variance)

    @property
    def n_components(self) -> int:
        return int(self.scores.shape[1])


def _column_block(X: np.ndarray, start: int, stop: int, rows: int = 32) -> np.ndarray:
    """``X[:, start:stop]`` as float64, read ``rows`` rows at a time (a memmap's read pages released)."""
    block = np.empty((X.shape[0], stop - start))
    for i in range(0, X.shape[0], rows):
        block[i:i + rows] = X[i:i + rows, start:stop]
        release_pages(X)
    return block


def _chunk_width(n: int, chunk_columns: int | None, max_block_bytes: int) -> int:
    return int(chunk_columns) if chunk_columns else max(1, max_block_bytes // (8 * max(n, 1)))


def _column_moments(X: np.ndarray, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    n, p = X.shape
    mean = np.empty(p)
    sd = np.empty(p)
    for start in range(0, p, chunk):
        block = _column_block(X, start, min(start + chunk, p))
        mean[start:start + chunk] = block.mean(axis=0)
        sd[start:start + chunk] = block.std(axis=0, ddof=1) if n > 1 else 0.0
    return mean, sd


def fit_pca(
    X: np.ndarray, n_components: int | None = None, *, standardize: bool = False, chunk_columns: int | None = None,
    max_block_bytes: int = 256 << 20,
) -> PCAResult:
    """PCA scores of the rows of ``X`` (centred; scaled to unit variance if ``standardize``).

    ``n_components``: default min(n - 1, p). Sign convention (deterministic, solver-independent):
    each component is flipped so that its largest-magnitude score is positive. Zero-variance
    columns (e.g. background voxels) are left unscaled when standardising.
    """
    X = X if isinstance(X, np.ndarray) else np.asarray(X)
    if X.ndim != 2 or X.shape[0] < 2:
        raise AnalysisError("PCA", f"needs a 2-D matrix with at least 2 rows, got shape {X.shape}")
    n, p = X.shape
    k_max = min(n - 1, p)
    k = k_max if n_components is None else int(min(n_components, k_max))
    chunk_columns = _chunk_width(n, chunk_columns, max_block_bytes)
    mean, sd = _column_moments(X, chunk_columns)
    scale = np.where(sd > 0, sd, 1.0) if standardize else np.ones(p)
    if p <= n:
        # Few columns (latents): eigen-decomposition of the p × p scatter matrix, scores = Xc·V.
        Xc = (np.asarray(X, dtype=np.float64) - mean) / scale
        eigval, eigvec = np.linalg.eigh(Xc.T @ Xc)
        order = np.argsort(eigval)[::-1][:k]
        eigval = np.clip(eigval[order], 0.0, None)
        scores = Xc @ eigvec[:, order]
        total = float(np.sum(Xc**2)) / (n - 1)
    else:
        # Many columns (voxels): the n × n Gram matrix XcXcᵀ = U S² Uᵀ, accumulated over column
        # chunks, gives the scores U·S directly without holding X in memory.
        gram = np.zeros((n, n))
        for start in range(0, p, chunk_columns):
            block = _column_block(X, start, min(start + chunk_columns, p))
            block -= mean[start:start + chunk_columns]
            block /= scale[start:start + chunk_columns]
            gram += block @ block.T
        total = float(np.trace(gram)) / (n - 1)
        eigval, eigvec = np.linalg.eigh(gram)
        order = np.argsort(eigval)[::-1][:k]
        eigval = np.clip(eigval[order], 0.0, None)
        scores = eigvec[:, order] * np.sqrt(eigval)
    flip = np.sign(scores[np.argmax(np.abs(scores), axis=0), np.arange(k)])
    scores *= np.where(flip == 0, 1.0, flip)
    return PCAResult(scores=scores, explained_variance=eigval / (n - 1), total_variance=total)


def pca_scores_table(
    meta: pd.DataFrame,
    result: PCAResult,
    *,
    n_keep: int | None = 10,
    extra_columns: Sequence[str] = ("scan", "label", "split", "age", "sex"),
) -> pd.DataFrame:
    """One row per scan: identifying columns, label etc. (those present), then ``PC1..PCk``."""
    if len(meta) != result.scores.shape[0]:
        raise AnalysisError("PCA scores", f"{len(meta)} table rows but {result.scores.shape[0]} score rows")
    keep = result.n_components if n_keep is None else min(n_keep, result.n_components)
    cols = [c for c in dict.fromkeys((*ID_COLUMNS, *extra_columns)) if c in meta.columns]
    table = meta[cols].reset_index(drop=True).copy()
    for j in range(keep):
        table[f"PC{j + 1}"] = result.scores[:, j]
    return table


def explained_variance_table(result: PCAResult) -> pd.DataFrame:
    """component, explained_variance, explained_variance_ratio, cumulative_ratio."""
    ratio = result.explained_variance_ratio
    return pd.DataFrame({
        "component": [f"PC{j + 1}" for j in range(result.n_components)],
        "explained_variance": result.explained_variance,
        "explained_variance_ratio": ratio,
        "cumulative_ratio": np.cumsum(ratio),
    })


def pca_report(
    meta: pd.DataFrame,
    X: np.ndarray,
    out_dir: str | os.PathLike[str],
    *,
    name: str,
    title: str | None = None,
    color_by: Sequence[str] = ("dataset", "label"),
    n_components: int | None = 20,
    n_keep: int = 10,
    standardize: bool = False,
) -> dict[str, Path]:
    """PCA of ``X`` with its figures and tables, written to ``out_dir`` with file stem ``name``.

    Writes ``<name>_scores.tsv`` (PC1..PC<n_keep> per scan), ``<name>_explained_variance.tsv``,
    ``<name>_scatter.png`` (PC1 vs PC2, one panel per ``color_by`` column, KDE contours per group)
    and ``<name>_explained_variance.png``. Returns {"scores", "explained_variance", "scatter",
    "variance_plot"} → paths.
    """
    from brainvae.analysis.plots import plot_explained_variance, plot_pca_scatter
    from brainvae.analysis.tables import write_tsv

    out = Path(out_dir)
    result = fit_pca(X, n_components, standardize=standardize)
    scores = pca_scores_table(meta, result, n_keep=n_keep, extra_columns=("scan", "split", "age", "sex", *color_by))
    ev = explained_variance_table(result)
    title = title or name
    paths = {
        "scores": write_tsv(scores, out / f"{name}_scores.tsv"),
        "explained_variance": write_tsv(ev, out / f"{name}_explained_variance.tsv"),
        "scatter": plot_pca_scatter(
            scores, out / f"{name}_scatter.png", color_by=[c for c in color_by if c in scores.columns],
            explained_ratio=result.explained_variance_ratio, title=title,
        ),
        "variance_plot": plot_explained_variance(result.explained_variance_ratio, out / f"{name}_explained_variance.png",
                                                 title=title),
    }
    return paths
