"""Feature matrices for the analysis: latent means, voxels, and confounds, aligned row by row.

Every matrix handed to :mod:`brainvae.analysis.classify` must have its rows in the order of one
metadata table (``meta``: dataset, participant, session, run, scan, label, ...). The helpers here
load each source, check it, and put its rows in that order, so a row index means the same scan in
every feature set (needed for paired comparisons on the same folds).

Memory: voxel matrices (scans × brain voxels) are memory-mapped and read a block of rows or of
columns at a time; the pages a block has read are dropped from the resident set after it
(:func:`brainvae.memmaps.release_pages`), so no function here holds the matrix in memory twice:
:func:`voxel_matrix_from_cohort` holds one volume, :func:`row_space` one column block (at most
``max_block_bytes``) plus the scans × scans Gram matrix, and :func:`align_rows`, when it must reorder,
the reordered copy it returns.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from brainvae.analysis.errors import AnalysisError
from brainvae.latents_table import read_latents
from brainvae.memmaps import RELEASE_EVERY, paged, release_pages

__all__ = [
    "ID_COLUMNS",
    "FeatureSet",
    "affine_scale",
    "align_rows",
    "check_finite",
    "confound_matrix",
    "icv_ml",
    "latent_columns",
    "latent_matrix",
    "load_latents",
    "load_voxel_matrix",
    "scan_keys",
    "block_mean",
    "voxel_matrix_from_cohort",
    "voxel_matrix_from_images",
]

# Columns that identify a scan; "scan" (a unique scan id) is used when present.
ID_COLUMNS = ("dataset", "participant", "session", "run")


@dataclass(frozen=True)
class FeatureSet:
    """A named feature matrix (rows aligned with the analysed metadata table).

    ``pca_components``: if set, a PCA with this many components is fitted inside every training
    fold (outer and inner) before the scaler and classifier, e.g. for voxels; never on all data,
    which would leak the test scans into the representation.
    """

    name: str
    X: np.ndarray
    pca_components: int | None = None
    columns: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.X.ndim != 2:
            raise AnalysisError(f"feature set '{self.name}'", f"expected a 2-D matrix, got shape {self.X.shape}")
        if self.columns and len(self.columns) != self.X.shape[1]:
            raise AnalysisError(
                f"feature set '{self.name}'", f"{len(self.columns)} column names for {self.X.shape[1]} columns"
            )
        if self.pca_components is not None and self.pca_components < 1:
            raise AnalysisError(f"feature set '{self.name}'", f"pca_components={self.pca_components} must be >= 1")


def _natural_index(name: str, prefix: str) -> int:
    return int(name[len(prefix):])


def latent_columns(table: pd.DataFrame, prefix: str = "mu_") -> list[str]:
    """The ``<prefix><i>`` columns in numeric order (``mu_2`` before ``mu_10``)."""
    pattern = re.compile(rf"^{re.escape(prefix)}\d+$")
    cols = sorted((c for c in table.columns if pattern.match(str(c))), key=lambda c: _natural_index(c, prefix))
    if not cols:
        raise AnalysisError("latents table", f"no '{prefix}<i>' columns found")
    return cols


def load_latents(path: str | os.PathLike[str], *, required: Sequence[str] = ("dataset", "participant")) -> pd.DataFrame:
    """Read a latents Parquet (one row per scan) and check the identifying columns and ``mu_*``."""
    path = Path(path)
    if not path.exists():
        raise AnalysisError(str(path), "latents file does not exist")
    table, _ = read_latents(path)
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise AnalysisError(str(path), f"missing column(s): {', '.join(missing)}")
    latent_columns(table)  # raises if there are none
    return table.reset_index(drop=True)


def latent_matrix(table: pd.DataFrame, prefix: str = "mu_") -> np.ndarray:
    """The latent means as a float64 matrix (scans × d); error naming the scans with NaN/inf."""
    X = table[latent_columns(table, prefix)].to_numpy(dtype=np.float64)
    check_finite(X, scan_keys(table), what=f"latents ({prefix}*)")
    return X


def scan_keys(meta: pd.DataFrame) -> np.ndarray:
    """One string key per row: the ``scan`` column if present, else dataset/participant/session/run."""
    if "scan" in meta.columns:
        return meta["scan"].astype(str).to_numpy()
    cols = [c for c in ID_COLUMNS if c in meta.columns]
    if not cols:
        raise AnalysisError("table", f"no identifying columns (scan or {', '.join(ID_COLUMNS)})")
    return meta[cols].astype(str).fillna("").agg("/".join, axis=1).to_numpy()


def check_finite(X: np.ndarray, keys: Sequence[str] | np.ndarray, *, what: str, chunk_rows: int = 64) -> None:
    """Raise naming the first rows that contain NaN/inf (chunked, so memmaps are not loaded whole)."""
    bad: list[int] = []
    for start in range(0, X.shape[0], chunk_rows):
        block = np.asarray(X[start:start + chunk_rows])
        bad.extend((start + np.flatnonzero(~np.isfinite(block).all(axis=1))).tolist())
        release_pages(X)
    if bad:
        names = ", ".join(str(keys[i]) for i in bad[:10])
        raise AnalysisError(what, f"non-finite values in {len(bad)} scan(s): {names}")


def align_rows(
    meta: pd.DataFrame, index: pd.DataFrame, X: np.ndarray, *, what: str = "features"
) -> np.ndarray:
    """Rows of ``X`` (described by ``index``) reordered to the scans of ``meta``.

    Matching is by :func:`scan_keys` (both tables need the same identifying columns). Extra rows
    in ``index`` are dropped; a scan of ``meta`` missing from ``index`` is an error naming it. When
    the order already matches, ``X`` is returned as is (a memmap stays a memmap); otherwise the
    rows are copied into memory, from a memmap ``block_rows`` at a time, so only the copy is resident.
    """
    if len(index) != X.shape[0]:
        raise AnalysisError(what, f"index has {len(index)} rows but the matrix has {X.shape[0]}")
    wanted = scan_keys(meta)
    have = pd.Index(scan_keys(index))
    if have.has_duplicates:
        dup = have[have.duplicated()].unique().tolist()
        raise AnalysisError(what, f"duplicate scans in the index: {', '.join(map(str, dup[:10]))}")
    pos = have.get_indexer(wanted)
    if (pos < 0).any():
        missing = wanted[pos < 0]
        raise AnalysisError(what, f"{len(missing)} scan(s) have no features: {', '.join(map(str, missing[:10]))}")
    if len(pos) == X.shape[0] and np.array_equal(pos, np.arange(X.shape[0])):
        return X
    if not isinstance(X, np.memmap):
        return np.asarray(X[pos])
    out = np.empty((len(pos), *X.shape[1:]), dtype=X.dtype)
    block_rows = RELEASE_EVERY
    for start in range(0, len(pos), block_rows):
        out[start:start + block_rows] = X[pos[start:start + block_rows]]
        release_pages(X)
    return out


def load_voxel_matrix(
    npy_path: str | os.PathLike[str], index_tsv: str | os.PathLike[str], *, mmap: bool = True
) -> tuple[np.ndarray, pd.DataFrame]:
    """A scans × voxels ``.npy`` (memory-mapped read-only by default) and its row index table."""
    npy_path, index_tsv = Path(npy_path), Path(index_tsv)
    for p in (npy_path, index_tsv):
        if not p.exists():
            raise AnalysisError(str(p), "file does not exist")
    X = np.load(npy_path, mmap_mode="r" if mmap else None)
    if X.ndim != 2:
        raise AnalysisError(str(npy_path), f"expected a 2-D scans × voxels array, got shape {X.shape}")
    index = pd.read_csv(index_tsv, sep="\t", dtype=str, keep_default_na=False)
    if len(index) != X.shape[0]:
        raise AnalysisError(str(index_tsv), f"{len(index)} rows but {npy_path.name} has {X.shape[0]} scans")
    return X, index


def voxel_matrix_from_images(
    paths: Sequence[str | os.PathLike[str]],
    out_npy: str | os.PathLike[str],
    *,
    mask: str | os.PathLike[str] | np.ndarray | None = None,
    dtype: np.dtype | type = np.float32,
) -> np.ndarray:
    """Stack same-grid volumes into a scans × voxels ``.npy`` written row by row (memmap).

    ``mask``: boolean volume (or a NIfTI path) selecting the voxels kept, e.g. the template
    brain mask; default all voxels. Row i is ``paths[i]``; write the matching index TSV alongside.
    """
    import nibabel as nib  # only this helper needs it

    from brainvae.io import atomic_path

    if not paths:
        raise AnalysisError("voxel matrix", "no images given")
    first = nib.load(os.fspath(paths[0]))
    shape = first.shape[:3]
    if mask is None:
        keep = np.ones(shape, dtype=bool)
    elif isinstance(mask, np.ndarray):
        keep = mask.astype(bool)
    else:
        keep = np.asanyarray(nib.load(os.fspath(mask)).dataobj) > 0.5
    if keep.shape != shape:
        raise AnalysisError("voxel mask", f"mask shape {keep.shape} differs from image shape {shape}")
    with atomic_path(out_npy, suffix=".npy") as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(len(paths), int(keep.sum())))
        for i, p in enumerate(paths):
            img = nib.load(os.fspath(p))
            if img.shape[:3] != shape or not np.allclose(img.affine, first.affine, atol=1e-4):
                raise AnalysisError(str(p), f"grid differs from {paths[0]}; voxel features need one common grid")
            out[i] = np.asarray(img.dataobj, dtype=np.float32)[keep]
        out.flush()
        del out
    return np.load(out_npy, mmap_mode="r")


def block_mean(volume: np.ndarray, factor: int) -> np.ndarray:
    """Mean over non-overlapping ``factor``³ blocks (edges zero-padded to a whole block).

    Averaging (not striding) keeps every voxel's contribution, so a coarser voxel baseline is a
    smoothed image, not an aliased subsample.
    """
    v = np.asarray(volume, dtype=np.float32)
    if factor == 1:
        return v
    if factor < 1:
        raise AnalysisError("voxel downsampling", f"factor {factor} must be >= 1")
    pad = [(0, (-n) % factor) for n in v.shape]
    v = np.pad(v, pad)
    x, y, z = (n // factor for n in v.shape)
    return v.reshape(x, factor, y, factor, z, factor).mean(axis=(1, 3, 5))


def voxel_matrix_from_cohort(
    array_path: str | os.PathLike[str],
    mask_path: str | os.PathLike[str],
    out_npy: str | os.PathLike[str],
    *,
    downsample: int = 1,
) -> np.ndarray:
    """The cohort array (scans × X × Y × Z) as a scans × voxels float32 ``.npy`` (row i = volume i).

    Columns: the voxels inside the union of all scans' brain masks (after ``downsample``, a block
    mean), so background never enters the baseline. The union uses no labels, so building it on
    every scan leaks nothing into the classification. Read and written row by row (plain file writes,
    not a writable memmap whose dirty pages would stay resident), so one volume is in memory; returns
    a read-only memmap.
    """
    from brainvae.io import atomic_path

    array_path, mask_path = Path(array_path), Path(mask_path)
    for p in (array_path, mask_path):
        if not p.exists():
            raise AnalysisError(str(p), "file does not exist")
    volumes = np.load(array_path, mmap_mode="r")
    masks = np.load(mask_path, mmap_mode="r")
    if volumes.ndim != 4 or masks.shape != volumes.shape:
        raise AnalysisError(str(array_path), f"expected scans × X × Y × Z volumes and masks of one shape, got "
                                             f"{volumes.shape} and {masks.shape}")
    if volumes.shape[0] == 0:
        raise AnalysisError(str(array_path), "the cohort array holds no scans")
    union = np.zeros(volumes.shape[1:], dtype=bool)
    for i in paged(range(masks.shape[0]), masks):
        union |= np.asarray(masks[i]) > 0
    keep = block_mean(union, downsample) > 0
    if not keep.any():
        raise AnalysisError(str(mask_path), "every brain mask is empty")
    shape = (volumes.shape[0], int(keep.sum()))
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False, "shape": shape}
    with atomic_path(out_npy, suffix=".npy") as tmp, open(tmp, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        for i in paged(range(volumes.shape[0]), volumes):
            row = block_mean(np.asarray(volumes[i], dtype=np.float32), downsample)[keep]
            if not np.isfinite(row).all():
                raise AnalysisError(str(array_path), f"non-finite voxel values in volume {i}")
            f.write(np.ascontiguousarray(row, dtype=np.float32).tobytes())
    return np.load(out_npy, mmap_mode="r")


def affine_scale(affine: np.ndarray) -> float:
    """Isotropic scale of an affine: |det(A[:3, :3])|^(1/3) (native → MNI: > 1 means a small head)."""
    A = np.asarray(affine, dtype=np.float64)
    if A.shape not in ((3, 3), (4, 4), (3, 4)):
        raise AnalysisError("affine", f"expected a 3×3 or 4×4 matrix, got shape {A.shape}")
    return float(abs(np.linalg.det(A[:3, :3])) ** (1.0 / 3.0))


def icv_ml(mask: np.ndarray, voxel_volume_mm3: float) -> float:
    """Intracranial volume in mL from a binary brain mask and the volume of one voxel (mm³)."""
    return float(np.count_nonzero(np.asarray(mask) > 0.5) * voxel_volume_mm3 / 1000.0)


def confound_matrix(
    meta: pd.DataFrame,
    *,
    icv_col: str = "icv_ml",
    scale_col: str = "affine_scale",
    site_col: str | None = "dataset",
) -> FeatureSet:
    """Confounds-only features: ICV, affine scale, and a one-hot site indicator.

    One-hot columns use the fixed, sorted list of sites (no value is learnt from the data, so
    building them on all rows leaks nothing); with one site the indicator is omitted.
    """
    needed = [c for c in (icv_col, scale_col) if c]
    missing = [c for c in needed + ([site_col] if site_col else []) if c not in meta.columns]
    if missing:
        raise AnalysisError("confounds", f"missing column(s): {', '.join(missing)}")
    numeric = meta[needed].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    names = list(needed)
    blocks = [numeric]
    if site_col:
        sites = sorted(meta[site_col].astype(str).unique())
        if len(sites) > 1:
            onehot = (meta[site_col].astype(str).to_numpy()[:, None] == np.array(sites)[None, :]).astype(np.float64)
            blocks.append(onehot)
            names += [f"site_{s}" for s in sites]
    X = np.hstack(blocks)
    check_finite(X, scan_keys(meta), what="confounds")
    return FeatureSet("confounds", X, columns=tuple(names))


def confound_features(meta: pd.DataFrame, names: Sequence[str], *, exclude: Sequence[str] = (),
                      name: str | None = None) -> FeatureSet:
    """Confound features of the named sets (see brainvae.analysis.tasks.CONFOUNDS): numbers as they
    are, text (sex, dataset) one-hot over its sorted values. Columns in ``exclude`` (the task's own
    column, e.g. age for brain age) are left out. One-hot columns use no label, so building them on
    every row (external scans included) leaks nothing; a column constant in a training set is
    harmless (standardisation gives it zero weight)."""
    from brainvae.analysis.tasks import CONFOUNDS

    blocks, columns = [], []
    for set_name in names:
        if set_name not in CONFOUNDS:
            raise AnalysisError("confounds", f"unknown confound set '{set_name}' (known: {', '.join(CONFOUNDS)})")
        for column in CONFOUNDS[set_name]:
            if column in exclude:
                continue
            if column not in meta.columns:
                raise AnalysisError("confounds", f"column '{column}' of confound set '{set_name}' is not in the "
                                                 f"analysis table (add it to the datasets' covariates)")
            values = meta[column]
            if column in ("sex", "dataset") or not pd.api.types.is_numeric_dtype(values):
                text = values.astype(str).to_numpy()
                levels = sorted(set(text.tolist()))
                blocks.append((text[:, None] == np.array(levels)[None, :]).astype(np.float64))
                columns += [f"{column}_{v}" for v in levels]
            else:
                blocks.append(values.to_numpy(dtype=np.float64)[:, None])
                columns.append(column)
    if not blocks:
        raise AnalysisError("confounds", f"no confound columns left in {', '.join(names)} once "
                                         f"{', '.join(exclude) or 'none'} are excluded")
    X = np.hstack(blocks)
    label = name or "+".join(names)
    check_finite(X, scan_keys(meta), what=f"confounds ({label})")
    return FeatureSet(label, X, columns=tuple(columns))


def row_space(X: np.ndarray, *, chunk_columns: int | None = None, max_block_bytes: int = 256 << 20) -> np.ndarray:
    """Coordinates of the rows of ``X`` (n × p, p large) in an orthonormal basis of their span: n × r.

    Inner products and distances between rows, hence any PCA, standardisation-after-PCA or linear
    model fitted on a subset of rows and applied to others, are exactly those of ``X`` (every PCA
    axis of a subset lies in the span of all rows). The basis uses no label, so computing it once
    on every scan leaks nothing, and turns a scans × voxels matrix into a scans × scans one, which
    makes a PCA inside every training fold cheap. Built from the Gram matrix X Xᵀ, read in column
    chunks (a memmap is never loaded whole): each chunk is an n × chunk float64 copy of at most
    ``max_block_bytes`` (default 256 MiB; ``chunk_columns`` sets the width instead), so the memory is
    that block plus the 8·n² byte Gram matrix, whatever p is.
    """
    n, p = X.shape
    if chunk_columns is None:
        chunk_columns = max(1, int(max_block_bytes) // (8 * max(n, 1)))
    gram = np.zeros((n, n))
    block_rows = 4 * RELEASE_EVERY  # rows read between two releases of a memmap's pages (short pieces of rows)
    for start in range(0, p, chunk_columns):
        stop = min(start + chunk_columns, p)
        block = np.empty((n, stop - start))
        for i in range(0, n, block_rows):
            block[i:i + block_rows] = X[i:i + block_rows, start:stop]
            release_pages(X)
        gram += block @ block.T
        del block
    values, vectors = np.linalg.eigh(gram)
    keep = values > max(values.max(), 0.0) * n * np.finfo(np.float64).eps
    return vectors[:, keep] * np.sqrt(values[keep])[None, :]
