"""Preprocessing: thin file-level steps the Snakemake scripts call, plus a one-call pipeline.

Numerical work lives in :mod:`brainvae.bias` (head mask, N4), :mod:`brainvae.registration`
(level-1/level-2 affine, transform files) and :mod:`brainvae.resample` (grids, the single
resampling, intensity normalisation). Every step reads and writes files so each can be its own
Snakemake rule; every output is written atomically.

File formats:
* images: NIfTI, float32 (masks uint8), on the native conformed grid or on a :class:`Grid`;
* transforms: ``.mat`` (ITK ``AffineTransform_double_3_3``, MNI -> native in LPS, i.e. what
  ``antsApplyTransforms -r mni.nii.gz -t xfm.mat`` needs to bring native into MNI) or ``.json``
  with key ``affine_native_to_mni_ras`` (4x4, x_mni = A @ x_native, RAS mm).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import nibabel as nib
import numpy as np

from brainvae.bias import N4_BIAS_FWHM, N4_ITERATIONS, N4_SHRINK_FACTOR, head_mask, n4_bias_correct, set_threads
from brainvae.errors import InputError
from brainvae.io import atomic_write_json, atomic_write_nifti
from brainvae.io import load_float_image as _load
from brainvae.registration import (
    brain_mask_from_template,
    level1_affine,
    level2_affine,
    mask_to_native,
    read_transform,
    write_transform,
)
from brainvae.resample import DEFAULT_GRID, Grid, get_grid, normalise_intensity, resample_mask, resample_to_grids

__all__ = [
    "bias_correct_file",
    "level1_file",
    "level2_file",
    "preprocess_image",
    "set_threads",
]

PathLike = str | os.PathLike[str]


def bias_correct_file(
    in_t1w: PathLike,
    out_corrected: PathLike,
    out_biasfield: PathLike,
    out_headmask: PathLike | None = None,
    *,
    shrink_factor: int = N4_SHRINK_FACTOR,
    iterations: Sequence[int] = N4_ITERATIONS,
    convergence: float = 1e-6,
    bias_fwhm: float = N4_BIAS_FWHM,
    threads: int | None = None,
) -> None:
    """Step 1: N4 inside a head mask; writes corrected image, bias field (, head mask)."""
    if threads:
        set_threads(threads)
    img = _load(in_t1w)
    try:
        corrected, biasfield, mask = n4_bias_correct(
            img, shrink_factor=shrink_factor, iterations=iterations, convergence=convergence,
            bias_fwhm=bias_fwhm)
    except ValueError as exc:
        raise InputError(in_t1w, f"bias correction failed: {exc}") from exc
    atomic_write_nifti(corrected, out_corrected)
    atomic_write_nifti(biasfield, out_biasfield)
    if out_headmask is not None:
        atomic_write_nifti(mask, out_headmask)


def level1_file(
    in_corrected: PathLike,
    out_transform: PathLike,
    out_aligned_head: PathLike | None = None,
    out_json: PathLike | None = None,
    *,
    aligned_grid: str | Grid = "mni1mm",
    threads: int | None = None,
) -> None:
    """Step 2: level-1 affine; writes the transform (``.mat``/``.json``), optionally the head
    resampled (linear) onto ``aligned_grid`` for skull stripping, and a QC JSON."""
    if threads:
        set_threads(threads)
    img = _load(in_corrected)
    res = level1_affine(img)
    write_transform(res.affine, out_transform)
    if out_aligned_head is not None:
        (aligned,) = resample_to_grids(img, res.affine, [aligned_grid], order=1)
        atomic_write_nifti(aligned, out_aligned_head)
    if out_json is not None:
        atomic_write_json({"affine_native_to_mni_ras": res.affine.tolist(),
                           "template_correlation": res.correlation}, out_json)


def level2_file(
    in_corrected: PathLike,
    in_brain_mask: PathLike | None,
    in_level1: PathLike,
    out_transform: PathLike,
    out_json: PathLike | None = None,
    *,
    mask_space: str = "level1",
    threads: int | None = None,
) -> None:
    """Step 3: level-2 affine from a brain mask (``mask_space``: "level1" if the mask was made on
    the level-1-aligned head, "native" if on the native grid; None = template fallback)."""
    if threads:
        set_threads(threads)
    img = _load(in_corrected)
    l1 = read_transform(in_level1)
    if in_brain_mask is None:
        mask, mask_space = brain_mask_from_template(img, l1, dilate_mm=4.0), "native"
    else:
        mask = _load(in_brain_mask)
    res = level2_affine(img, mask, l1, mask_space=mask_space)
    write_transform(res.affine, out_transform)
    if out_json is not None:
        atomic_write_json({"affine_native_to_mni_ras": res.affine.tolist(),
                           "level1_to_level2_correction": res.correction.tolist(),
                           "template_correlation": res.correlation}, out_json)


def preprocess_image(
    corrected: nib.Nifti1Image,
    brain_mask_native: nib.Nifti1Image,
    affine_ras: np.ndarray,
    grid: str | Grid = DEFAULT_GRID,
    *,
    order: int = 3,
    method: str = "zscore",
    percentiles: tuple[float, float] = (1.0, 99.0),
    background: float = 0.0,
    qc_grid: str | Grid | None = None,
) -> tuple[nib.Nifti1Image, nib.Nifti1Image, nib.Nifti1Image | None]:
    """Steps 5-7 in memory: one resampling to ``grid`` (and ``qc_grid``), mask, normalise.

    Returns ``(normalised, mask_on_grid, qc_image_or_None)``; the QC image is the same resampling
    of the corrected head onto ``qc_grid`` (not normalised, not masked).
    """
    grids = [get_grid(grid)] + ([get_grid(qc_grid)] if qc_grid is not None else [])
    outs = resample_to_grids(corrected, affine_ras, grids, order=order)
    mask = resample_mask(brain_mask_native, affine_ras, grids[0])
    norm = normalise_intensity(outs[0], mask, method=method, percentiles=percentiles,
                               background=background)
    return norm, mask, (outs[1] if qc_grid is not None else None)


def head_mask_file(in_t1w: PathLike, out_mask: PathLike) -> None:
    """Head mask only (for QC / debugging)."""
    atomic_write_nifti(head_mask(_load(in_t1w)), out_mask)
