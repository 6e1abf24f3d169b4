"""Quality control of preprocessed scans: a figure, metrics, automatic flags and a cohort table.

* :func:`qc_figure`: one PNG per scan (sagittal, coronal, axial planes of the MNI-space image) with
  the brain-mask contour and the edges of the template, so a reviewer sees at a glance whether
  registration and skull stripping worked.
* :func:`qc_metrics`: numbers that catch the usual failures (bad registration, bad mask, partial
  field of view, wrong contrast, thick slices).
* :func:`qc_flags`: per-scan flags from configurable thresholds; :func:`outlier_flags`: cohort-level
  outliers (robust z-score) once all scans are done.
* :func:`qc_table` / :func:`write_qc_table`: one row per scan, written as TSV.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from brainvae.io import atomic_path

__all__ = [
    "DEFAULT_THRESHOLDS",
    "QC_GRID",
    "METRIC_COLUMNS",
    "MIN_OUTLIER_SPREAD",
    "OUTLIER_SIDE",
    "outlier_flags",
    "qc_figure",
    "qc_flags",
    "qc_metrics",
    "qc_table",
    "write_qc_table",
]

ImageLike = nib.Nifti1Image | str | os.PathLike

_CORR_SMOOTH_MM = 2.0  # Gaussian sigma applied before the template correlation

#: Default flag thresholds (override any subset via ``qc_flags(metrics, thresholds)``).
#: Grid of the QC metrics and picture (a resampling of its own, for display and checks; not the training grid).
QC_GRID = "2mm"

DEFAULT_THRESHOLDS: dict[str, float] = {
    # Pearson r (2 mm smoothing, inside both brain masks) of the preprocessed image with the
    # template: affine-registered real IXI T1w without N4 0.46-0.58 (N4 raises it); the same
    # scan shifted by 6 / 10 / 20 mm: 0.42 / 0.33 / 0.19.
    "min_template_correlation": 0.4,
    # Plausible adult brain (intracranial mask) volume in mL.
    "min_brain_volume_ml": 1000.0,
    "max_brain_volume_ml": 1900.0,
    # Dice of the MNI-space brain mask with the template brain mask.
    "min_mask_dice": 0.85,
    # Fraction of the template brain inside the scan's field of view.
    "min_fov_coverage": 0.9,
    # Fraction of the MNI-space mask lying > 5 mm outside the template brain (skull/neck left in).
    "max_mask_excess": 0.05,
    # (WM - CSF) / robust intensity range: clearly positive in T1w, negative in T2w/FLAIR-like.
    "min_wm_csf_contrast": 0.15,
    # Largest / smallest native voxel size. Why 4: clinical 3D T1w protocols reach 1x1x3.3 mm (3.3) and
    # 0.9x0.9x3.5 mm (3.9), and every slice thicker than max_voxel_size_mm is flagged thick_voxels anyway, so
    # this check only has to catch voxel sizes no scanner writes: a broken header (1x1x20 mm, or a
    # cm-for-mm unit slip giving a factor of 10). The old 3.0 flagged the 3.3:1 clinical scans and left them
    # out of training. 2D protocols with a fine in-plane grid (0.45x0.45x3 mm, 6.7) stay flagged: their
    # through-plane resolution is too coarse for the training grid; raise it in qc.thresholds to admit them.
    "max_anisotropy": 4.0,
    # Largest native voxel size in mm.
    "max_voxel_size_mm": 3.5,
}

#: Metrics that :func:`outlier_flags` examines by default (all "bigger/smaller than the cohort"
#: deviations are suspicious for these).
METRIC_COLUMNS: tuple[str, ...] = (
    "template_correlation",
    "brain_volume_ml",
    "mask_dice",
    "fov_coverage",
    "mask_excess",
    "wm_csf_contrast",
    "wm_gm_contrast",
)

#: Smallest robust spread (MAD, in the metric's own units) that :func:`outlier_flags` uses. Why: on a
#: small or very uniform cohort the MAD can be near zero (12 scans from one scanner have mask_excess
#: 0.001-0.003), and then any deviation, however harmless, has a huge robust z. With the floor a scan must
#: differ from the median by at least 3.5 / 0.6745 = 5.2 floors to be an outlier: 0.10 in template
#: correlation, 0.05 in Dice, coverage or mask excess, 130 mL of brain volume, 0.10 in contrast, all
#: differences a reviewer would also see. A column without a floor here keeps the plain MAD (0 flags nothing).
MIN_OUTLIER_SPREAD: dict[str, float] = {
    "template_correlation": 0.02,
    "brain_volume_ml": 25.0,
    "mask_dice": 0.01,
    "fov_coverage": 0.01,
    "mask_excess": 0.01,
    "wm_csf_contrast": 0.02,
    "wm_gm_contrast": 0.02,
}

#: Metrics for which only one side of the cohort is suspicious: less mask outside the template brain, or
#: more of the template brain in the field of view, is never a failure (a scan better than its cohort must
#: not be flagged). +1: only high values are outliers; -1: only low values. Unlisted metrics: both sides.
OUTLIER_SIDE: dict[str, int] = {"mask_excess": +1, "fov_coverage": -1}


# ----------------------------------------------------------------------------- helpers


def _as_image(img: ImageLike) -> nib.Nifti1Image:
    return img if isinstance(img, nib.spatialimages.SpatialImage) else nib.load(os.fspath(img))


def _data(img: nib.Nifti1Image) -> np.ndarray:
    data = np.asarray(img.dataobj, dtype=np.float32)
    return data[..., 0] if data.ndim == 4 else data


def _on_grid(src: nib.Nifti1Image, ref: nib.Nifti1Image, order: int) -> np.ndarray:
    """``src`` resampled onto ``ref``'s voxel grid through world (scanner/MNI) coordinates."""
    data = np.nan_to_num(_data(src))
    if src.shape[:3] == ref.shape[:3] and np.allclose(src.affine, ref.affine, atol=1e-4):
        return data
    vox = np.linalg.inv(src.affine) @ ref.affine  # ref voxel -> src voxel
    return ndi.affine_transform(
        data, vox[:3, :3], offset=vox[:3, 3], output_shape=ref.shape[:3], order=order, mode="constant", cval=0.0
    )


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    denom = int(a.sum()) + int(b.sum())
    return float("nan") if denom == 0 else 2.0 * float(np.logical_and(a, b).sum()) / denom


def _zooms(img: nib.Nifti1Image) -> np.ndarray:
    return np.asarray(img.header.get_zooms()[:3], dtype=float)


def _default_template() -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
    from brainvae.templates import mni152_brain, mni152_brain_mask

    return mni152_brain(1), mni152_brain_mask(1)


# ----------------------------------------------------------------------------- metrics


def qc_metrics(
    preproc_img: ImageLike,
    brain_mask_mni: ImageLike,
    native_mask: ImageLike,
    native_img: ImageLike,
    template: ImageLike | None = None,
    template_mask: ImageLike | None = None,
) -> dict[str, float]:
    """QC metrics of one scan.

    ``preproc_img`` / ``brain_mask_mni``: the preprocessed image and its brain mask in MNI space
    (same grid). ``native_mask`` / ``native_img``: the brain mask and the input image in native
    space (for the brain volume in mL and the voxel sizes). ``template`` / ``template_mask``: the
    MNI template and its brain mask (default MNI152 2009a 1 mm); resampled to the preprocessed grid
    if needed.

    Returns (floats; NaN when undefined):

    * ``template_correlation``: Pearson r with the template inside the template mask and the
      scan's mask, both smoothed with a 2 mm Gaussian (mask-normalised for the scan).
    * ``mask_dice``: Dice of ``brain_mask_mni`` with the template mask.
    * ``mask_excess``: fraction of ``brain_mask_mni`` more than 5 mm outside the template brain.
    * ``fov_coverage``: fraction of the template brain within 5 mm of image signal / mask (partial
      coverage: a cut-off top or cerebellum lowers it).
    * ``brain_volume_ml``: native mask volume; ``brain_volume_mni_ml``: after affine normalisation.
    * ``wm_csf_contrast``, ``wm_gm_contrast``: (median in template WM - median in template CSF or
      GM) / (p95 - p5 inside the mask). WM > GM > CSF in T1w; negative when the contrast is
      T2-like.
    * ``voxel_min_mm``, ``voxel_max_mm``, ``anisotropy``: native voxel sizes.
    """
    preproc = _as_image(preproc_img)
    if template is None or template_mask is None:
        default_t, default_m = _default_template()
        template = default_t if template is None else template
        template_mask = default_m if template_mask is None else template_mask
    tpl = _on_grid(_as_image(template), preproc, order=1)
    tpl_mask = _on_grid(_as_image(template_mask), preproc, order=0) > 0.5
    x = np.nan_to_num(_data(preproc))
    mask_mni = _on_grid(_as_image(brain_mask_mni), preproc, order=0) > 0.5
    zooms = _zooms(preproc)
    out: dict[str, float] = {}

    # Correlation with the template: the single best "did registration work" number. Both are
    # smoothed (sigma 2 mm) first: an affine cannot align individual gyri, and unsmoothed r is
    # dominated by that mismatch; smoothed r tracks the alignment of ventricles, WM bulk and
    # deep structures (values: see DEFAULT_THRESHOLDS).
    # Only voxels inside the scan's own brain mask count, and the smoothing is normalised by the
    # mask (smooth(x*m)/smooth(m)): the zeros outside a skull-stripped, z-scored image are "no
    # data", not "mid-grey", and must not bleed into the edge.
    sigma = _CORR_SMOOTH_MM / zooms
    weight = (mask_mni if mask_mni.any() else x != 0).astype(np.float32)
    wsm = ndi.gaussian_filter(weight, sigma)
    xsm = ndi.gaussian_filter(x * weight, sigma) / np.maximum(wsm, 1e-6)
    sel = tpl_mask & (weight > 0)
    xs, ts = xsm[sel], ndi.gaussian_filter(tpl, sigma)[sel]
    out["template_correlation"] = (
        float(np.corrcoef(xs, ts)[0, 1]) if xs.size > 2 and xs.std() > 0 and ts.std() > 0 else float("nan")
    )

    out["mask_dice"] = _dice(mask_mni, tpl_mask)
    dist_from_tpl = ndi.distance_transform_edt(~tpl_mask, sampling=zooms)
    out["mask_excess"] = float(np.mean(dist_from_tpl[mask_mni] > 5.0)) if mask_mni.any() else float("nan")

    # Field of view: where the scan has any signal (or mask) after resampling into MNI space.
    # A 5 mm tolerance forgives small mask/template boundary disagreements.
    support = (x != 0) | mask_mni
    dist_from_support = ndi.distance_transform_edt(~support, sampling=zooms) if support.any() else None
    out["fov_coverage"] = (
        float(np.mean(dist_from_support[tpl_mask] <= 5.0)) if dist_from_support is not None else 0.0
    )

    nmask_img = _as_image(native_mask)
    nmask = _data(nmask_img) > 0.5
    out["brain_volume_ml"] = float(nmask.sum()) * float(np.prod(_zooms(nmask_img))) / 1000.0
    out["brain_volume_mni_ml"] = float(mask_mni.sum()) * float(np.prod(zooms)) / 1000.0

    out.update(_contrast_metrics(x, tpl, tpl_mask, mask_mni, zooms))

    vox = _zooms(_as_image(native_img))
    out["voxel_min_mm"] = float(vox.min())
    out["voxel_max_mm"] = float(vox.max())
    out["anisotropy"] = float(vox.max() / vox.min()) if vox.min() > 0 else float("nan")
    return out


def _contrast_metrics(
    x: np.ndarray, tpl: np.ndarray, tpl_mask: np.ndarray, mask: np.ndarray, zooms: np.ndarray
) -> dict[str, float]:
    """T1w-ness from tissue classes defined on the (T1w) template, measured in the scan.

    Why template-defined classes: they need no segmentation of the scan and do not depend on its
    contrast, so an inverted (T2-like) contrast shows up as WM darker than CSF.
    """
    # Stay 3 mm inside the template brain so the outside zeros do not pose as "CSF".
    inner = ndi.distance_transform_edt(tpl_mask, sampling=zooms) > 3.0
    inner &= mask if mask.any() else inner
    inner &= x != 0
    nan = {"wm_csf_contrast": float("nan"), "wm_gm_contrast": float("nan")}
    if inner.sum() < 100:
        return nan
    t = tpl[inner]
    lo, gm_lo, gm_hi, hi = np.percentile(t, [10, 40, 55, 80])
    vals = x[inner]
    wm, gm, csf = (np.median(vals[t >= hi]), np.median(vals[(t >= gm_lo) & (t <= gm_hi)]), np.median(vals[t <= lo]))
    p5, p95 = np.percentile(vals, [5, 95])
    scale = float(p95 - p5)
    if scale <= 0:
        return nan
    return {"wm_csf_contrast": float((wm - csf) / scale), "wm_gm_contrast": float((wm - gm) / scale)}


# ----------------------------------------------------------------------------- flags


def qc_flags(metrics: Mapping[str, Any], thresholds: Mapping[str, float] | None = None) -> list[str]:
    """Names of the checks a scan fails; metrics that are missing or NaN are not judged."""
    th = {**DEFAULT_THRESHOLDS, **(thresholds or {})}
    unknown = set(thresholds or {}) - set(DEFAULT_THRESHOLDS)
    if unknown:
        raise KeyError(f"unknown QC threshold(s): {sorted(unknown)}; known: {sorted(DEFAULT_THRESHOLDS)}")

    def value(key: str) -> float | None:
        v = metrics.get(key)
        if v is None:
            return None
        try:
            v = float(v)
        except (TypeError, ValueError):
            return None
        return None if math.isnan(v) else v

    flags: list[str] = []
    checks = [
        ("low_template_correlation", "template_correlation", lambda v: v < th["min_template_correlation"]),
        (
            "brain_volume_out_of_range",
            "brain_volume_ml",
            lambda v: not th["min_brain_volume_ml"] <= v <= th["max_brain_volume_ml"],
        ),
        ("low_mask_dice", "mask_dice", lambda v: v < th["min_mask_dice"]),
        ("partial_coverage", "fov_coverage", lambda v: v < th["min_fov_coverage"]),
        ("mask_leak", "mask_excess", lambda v: v > th["max_mask_excess"]),
        ("not_t1w_contrast", "wm_csf_contrast", lambda v: v < th["min_wm_csf_contrast"]),
        ("extreme_anisotropy", "anisotropy", lambda v: v > th["max_anisotropy"]),
        ("thick_voxels", "voxel_max_mm", lambda v: v > th["max_voxel_size_mm"]),
    ]
    if metrics.get("template_space"):
        # A scan delivered in template space has a template-space brain volume (its native size was removed by
        # the registration it came with): the adult native range does not apply.
        checks = [check for check in checks if check[0] != "brain_volume_out_of_range"]
    for flag, key, failed in checks:
        v = value(key)
        if v is not None and failed(v):
            flags.append(flag)
    # Set by the skull-strip step (skullstrip.detect_skull_stripped): the input had no scalp or skull, so
    # the level-1 registration to a whole-head template and the intensity statistics are suspect.
    if metrics.get("input_skull_stripped") is True:
        flags.append("input_skull_stripped")
    return flags


def outlier_flags(
    table: pd.DataFrame | Sequence[Mapping[str, Any]],
    columns: Iterable[str] | None = None,
    z_threshold: float = 3.5,
    min_scans: int = 5,
    min_spread: Mapping[str, float] | None = None,
) -> pd.Series:
    """Cohort-level outliers: ``outlier_<metric>`` where the robust z-score exceeds ``z_threshold``.

    Robust z = 0.6745 (x - median) / max(MAD, floor) (Iglewicz & Hoaglin), so a few failed scans cannot
    hide themselves by inflating the spread, and the floor (``min_spread``, default
    :data:`MIN_OUTLIER_SPREAD`, in the metric's units) keeps a cohort of near-identical scans from flagging
    harmless differences. Metrics in :data:`OUTLIER_SIDE` are judged on their suspicious side only. Needs
    ``min_scans`` valid values per metric; a metric with no spread and no floor flags nothing. Returns a
    Series of lists aligned with ``table``'s index.
    """
    df = table if isinstance(table, pd.DataFrame) else pd.DataFrame(list(table))
    cols = [c for c in (columns if columns is not None else METRIC_COLUMNS) if c in df.columns]
    floors = {**MIN_OUTLIER_SPREAD, **(min_spread or {})}
    result = pd.Series([[] for _ in range(len(df))], index=df.index, dtype=object)
    for col in cols:
        values = pd.to_numeric(df[col], errors="coerce")
        valid = values.dropna()
        if len(valid) < min_scans:
            continue
        med = float(valid.median())
        spread = max(float((valid - med).abs().median()), floors.get(col, 0.0))
        if spread <= 0:
            continue
        z = 0.6745 * (values - med) / spread
        side = OUTLIER_SIDE.get(col, 0)
        suspicious = z * side if side else z.abs()
        for idx in z.index[suspicious > z_threshold]:
            result.at[idx] = [*result.at[idx], f"outlier_{col}"]
    return result


# ----------------------------------------------------------------------------- table


def failed_input_rows(failed_inputs: pd.DataFrame | None) -> list[dict[str, Any]]:
    """QC-table rows of scans whose input file could not be used (``failed_inputs.tsv``, see
    :mod:`brainvae.failures`): keyed like the other rows by scan key, with no metrics."""
    if failed_inputs is None or failed_inputs.empty:
        return []
    return [{"scan": row["scan_key"], "dataset": row["dataset"], "flags": ["input_error"], "excluded": True, "passed": False,
             "failed_step": row["step"], "failure_reason": row["reason"], "input_path": row["path"]}
            for _, row in failed_inputs.iterrows()]


def qc_table(rows: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per scan. Identifier columns first (``scan_id``, ...), then known metrics, then the
    rest; list values (flags) become ``;``-joined strings so the table is flat."""
    df = pd.DataFrame([dict(r) for r in rows])
    if df.empty:
        return df
    for col in df.columns:
        if df[col].map(lambda v: isinstance(v, (list, tuple))).any():
            df[col] = df[col].map(lambda v: ";".join(map(str, v)) if isinstance(v, (list, tuple)) else v)
    ids = [c for c in ("scan", "scan_id", "subject", "session", "site", "dataset") if c in df.columns]
    known = [c for c in METRIC_COLUMNS if c in df.columns]
    rest = [c for c in df.columns if c not in ids and c not in known]
    return df[ids + known + rest]


def write_qc_table(table: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write ``table`` as TSV (BIDS style: ``n/a`` for missing values), atomically."""
    with atomic_path(path) as tmp:
        table.to_csv(tmp, sep="\t", index=False, na_rep="n/a", float_format="%.6g")
    return Path(path)


# ----------------------------------------------------------------------------- figure


_BANNER_RED = (0.85, 0.05, 0.05)
_BANNER_FONT_PT = 8
_BANNER_CHAR_PX = 7.0  # a bold monospace character at 8 pt and 100 dpi is ~6.7 px wide
_BANNER_LINE_PX = 13  # 8 pt * 1.15 line spacing at 100 dpi
_BANNER_PAD_PX = 3
_BANNER_MAX_LINES = 4  # beyond this the banner would hide the brain; the rest is in qc.tsv


def flag_banner_lines(flags: Sequence[str], max_chars: int, max_lines: int = _BANNER_MAX_LINES) -> list[str]:
    """The QC flags as banner lines of at most ``max_chars`` characters, breaking only between flags
    (a flag name is never split, and one longer than a line gets a line of its own); past ``max_lines`` the
    last line says how many more are in qc.tsv."""
    if not flags:
        return []
    lines: list[str] = []
    flags_per_line: list[int] = []
    current, count = "QC FLAGS:", 0
    for position, flag in enumerate(flags):
        item = flag + ("," if position < len(flags) - 1 else "")
        if count and len(current) + 1 + len(item) > max_chars:
            lines.append(current)
            flags_per_line.append(count)
            current, count = item, 1
        else:
            current, count = f"{current} {item}", count + 1
    lines.append(current)
    flags_per_line.append(count)
    if len(lines) > max_lines:
        hidden = len(flags) - sum(flags_per_line[:max_lines - 1])
        lines = [*lines[:max_lines - 1], f"... and {hidden} more (see qc.tsv)"]
    return lines


@lru_cache(maxsize=4)
def _template_volume(key: str) -> nib.Nifti1Image:
    img = nib.load(key)
    return nib.Nifti1Image(np.asarray(img.dataobj, dtype=np.float32), img.affine)


def _template_image(src: ImageLike | None) -> nib.Nifti1Image:
    if src is None:
        return _default_template()[0]
    if isinstance(src, nib.spatialimages.SpatialImage):
        return src
    return _template_volume(os.fspath(Path(src).resolve()))  # cache: one load per worker process


def _sample_plane(img: nib.Nifti1Image, world: np.ndarray, order: int) -> np.ndarray:
    """Values of ``img`` at world points ``world`` (..., 3)."""
    inv = np.linalg.inv(img.affine)
    vox = world @ inv[:3, :3].T + inv[:3, 3]
    coords = np.moveaxis(vox, -1, 0)
    return ndi.map_coordinates(np.asarray(img.dataobj, dtype=np.float32), coords, order=order, cval=0.0)


def qc_figure(
    image: ImageLike,
    mask: ImageLike | None,
    template_edges_from: ImageLike | None,
    out_png: str | os.PathLike,
    title: str,
    *,
    flags: Sequence[str] = (),
    size_px: tuple[int, int] = (900, 320),
) -> Path:
    """Write a QC PNG: sagittal, coronal and axial planes through the mask's centre of mass.

    Red: brain-mask contour. Cyan: Canny edges of ``template_edges_from`` (default MNI152 T1) on
    the same planes, so misregistration shows as edges that do not follow the anatomy.
    ``title``: first line of the heading (e.g. scan id and key metrics). ``flags``: the scan's QC flags,
    drawn in a red banner along the bottom (wrapped over several lines when long) so a reviewer paging
    through pictures sees them without opening ``qc.tsv``; no banner when there are none.
    """
    # Figure + Agg canvas directly (no pyplot): no global backend state, safe in worker threads.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from skimage.feature import canny

    img = nib.as_closest_canonical(_as_image(image))  # RAS: rows/cols map to fixed anatomical axes
    data = np.nan_to_num(_data(img))
    msk = None
    if mask is not None:
        msk = _on_grid(_as_image(mask), img, order=0) > 0.5
    tpl = _template_image(template_edges_from)

    centre = ndi.center_of_mass(msk) if msk is not None and msk.any() else np.array(data.shape) / 2
    ci = [int(round(c)) for c in centre]
    zooms = _zooms(img)
    sel = msk if msk is not None and msk.any() else data != 0
    vals = data[sel] if sel.any() else data.ravel()
    vmin, vmax = (np.percentile(vals, [1, 99.5]) if vals.size else (0.0, 1.0))
    if vmax <= vmin:
        vmax = vmin + 1.0

    w, h = size_px
    fig = Figure(figsize=(w / 100, h / 100), dpi=100, facecolor="black")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    banner_lines = flag_banner_lines(flags, max_chars=max(20, int(w / _BANNER_CHAR_PX)))
    banner_height = (len(banner_lines) * _BANNER_LINE_PX + 2 * _BANNER_PAD_PX) / h if banner_lines else 0.0
    fig.subplots_adjust(left=0.005, right=0.995, bottom=0.01 + banner_height, top=0.84, wspace=0.02)
    edge_cmap = ListedColormap([(0, 0, 0, 0), (0.0, 1.0, 1.0, 0.9)])
    planes = [("sagittal", 0), ("coronal", 1), ("axial", 2)]
    for ax, (name, axis) in zip(axes, planes):
        index = [slice(None)] * 3
        index[axis] = int(np.clip(ci[axis], 0, data.shape[axis] - 1))
        slab = data[tuple(index)].T  # rows: 2nd remaining axis (up), cols: 1st (right/anterior)
        others = [a for a in range(3) if a != axis]
        extent = (0, data.shape[others[0]] * zooms[others[0]], 0, data.shape[others[1]] * zooms[others[1]])
        ax.imshow(slab, cmap="gray", vmin=vmin, vmax=vmax, origin="lower", extent=extent, interpolation="nearest")
        # Template edges sampled on exactly this plane's voxel centres.
        grid = np.indices(slab.T.shape, dtype=float)
        vox = np.zeros((3, *slab.T.shape))
        vox[others[0]], vox[others[1]], vox[axis] = grid[0], grid[1], index[axis]
        world = np.moveaxis(vox, 0, -1) @ img.affine[:3, :3].T + img.affine[:3, 3]
        tpl_plane = _sample_plane(tpl, world, order=1)
        if np.ptp(tpl_plane) > 0:
            edges = canny(tpl_plane / np.ptp(tpl_plane), sigma=1.5 / float(np.mean(zooms[others])))
            ax.imshow(edges.T.astype(np.uint8), cmap=edge_cmap, vmin=0, vmax=1, origin="lower", extent=extent,
                      interpolation="nearest")
        if msk is not None and msk[tuple(index)].any():
            xs = (np.arange(data.shape[others[0]]) + 0.5) * zooms[others[0]]
            ys = (np.arange(data.shape[others[1]]) + 0.5) * zooms[others[1]]
            ax.contour(xs, ys, msk[tuple(index)].T.astype(np.float32), levels=[0.5], colors="red", linewidths=0.8)
        ax.set_axis_off()
        ax.set_aspect("equal")
        ax.text(0.02, 0.02, name, color="yellow", fontsize=7, transform=ax.transAxes)
    fig.suptitle(title, color="white", fontsize=9, y=0.985, va="top", wrap=True)
    if banner_lines:
        from matplotlib.patches import Rectangle

        fig.add_artist(Rectangle((0, 0), 1, banner_height, transform=fig.transFigure, facecolor=_BANNER_RED,
                                 edgecolor="none", zorder=10))
        fig.text(0.01, banner_height / 2, "\n".join(banner_lines), color="white", fontsize=_BANNER_FONT_PT,
                 fontweight="bold", family="monospace", va="center", ha="left", linespacing=1.15, zorder=11)
    out = Path(out_png)
    with atomic_path(out, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100, facecolor=fig.get_facecolor(), format="png")
    return out
