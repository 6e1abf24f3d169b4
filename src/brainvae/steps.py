"""File-level pipeline steps called by the Snakemake scripts (skull stripping, final resampling, QC).

Each function reads its inputs, calls the pure functions of the library and writes its outputs
atomically, so a killed job never leaves a valid-looking partial file. The N4 and registration
steps live in :mod:`brainvae.preprocess`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd

from .errors import InputError
from .io import atomic_write_json, atomic_write_nifti, read_json
from .io import load_float_image as _load
from .qc import QC_GRID
from .resample import DEFAULT_GRID

PathLike = str | os.PathLike


def bias_corrected(conformed: PathLike, biasfield: PathLike) -> nib.Nifti1Image:
    """The N4-corrected head, recomputed from the kept conformed image and bias field.

    Keeping these two (and not the corrected image) lets a changed resampling or normalisation
    rerun without rerunning N4.
    """
    img, bias = _load(conformed), _load(biasfield)
    if img.shape != bias.shape:
        raise InputError(biasfield, f"bias field shape {bias.shape} differs from the image {img.shape}")
    return nib.Nifti1Image(img.get_fdata(dtype=np.float32) / np.maximum(bias.get_fdata(dtype=np.float32), 1e-6),
                           img.affine)


def skullstrip_file(in_level1_head: PathLike, in_level1: PathLike, in_native: PathLike, out_native_mask: PathLike,
                    out_json: PathLike, *, method: str = "deepbet", threads: int = 1,
                    device: str = "auto") -> dict[str, Any]:
    """Skull-strip the level-1-aligned head; write the brain mask on the native grid and a JSON.

    ``device`` (deepbet only): ``auto`` uses a GPU when the node has one, ``cpu`` never, ``cuda`` requires one
    (:class:`brainvae.runtime.DeviceError` otherwise).

    The mask is made in level-1 (MNI-like) space, where deepbet and the template prior work best,
    then pulled back to the native grid through the inverse level-1 affine: the single resampling
    of the image later uses this native mask.
    """
    from .registration import mask_to_native, read_transform
    from .skullstrip import detect_skull_stripped, skullstrip

    head = _load(in_level1_head)
    native = _load(in_native)
    level1 = read_transform(in_level1)
    already_stripped = bool(detect_skull_stripped(native))
    torch_device = None
    if method == "deepbet" and device != "auto":
        from .runtime import resolve_device

        torch_device = str(resolve_device(device))
    mask_mni = skullstrip(head, method=method, threads=threads, init="identity", device=torch_device)
    mask_native = mask_to_native(mask_mni, native, "level1", level1)
    if mask_native.sum() == 0:
        raise InputError(in_native, f"skull stripping ({method}) found no brain")
    voxel_ml = float(np.prod(native.header.get_zooms()[:3])) / 1000.0
    atomic_write_nifti(nib.Nifti1Image(mask_native.astype(np.uint8), native.affine), out_native_mask)
    info = {"Method": method, "InputAlreadySkullStripped": already_stripped,
            "BrainVolumeMl": float(mask_native.sum()) * voxel_ml, "Sources": [os.fspath(in_level1_head)]}
    atomic_write_json(info, out_json)
    return info


def preprocess_file(in_conformed: PathLike, in_biasfield: PathLike, in_brain_mask: PathLike,
                    in_transform: PathLike, out_t1w: PathLike, out_mask: PathLike, *, grid: str = DEFAULT_GRID,
                    order: int = 3, method: str = "percentile", percentiles: Sequence[float] = (1.0, 99.0),
                    background: float = 0.0) -> None:
    """The one resampling: native bias-corrected head -> training grid through the composed affine."""
    from .preprocess import preprocess_image
    from .registration import read_transform

    corrected = bias_corrected(in_conformed, in_biasfield)
    norm, mask, _ = preprocess_image(corrected, _load(in_brain_mask), read_transform(in_transform), grid,
                                     order=order, method=method, percentiles=tuple(percentiles),
                                     background=background)
    atomic_write_nifti(norm, out_t1w)
    atomic_write_nifti(nib.Nifti1Image(np.asarray(mask.dataobj, dtype=np.uint8), mask.affine), out_mask)


def qc_file(in_conformed: PathLike, in_biasfield: PathLike, in_brain_mask: PathLike, in_transform: PathLike,
            level_jsons: Mapping[str, PathLike], out_png: PathLike, out_json: PathLike, *, scan: str,
            thresholds: Mapping[str, float] | None = None, qc_grid: str = QC_GRID,
            skullstrip_info: PathLike | None = None, template_space: str | None = None) -> dict[str, Any]:
    """QC of one scan: metrics, automatic flags and a three-plane picture on a 2 mm MNI grid.

    The picture and metrics use their own resampling of the corrected head (display only; the
    training volume comes from :func:`preprocess_file`). ``skullstrip_info`` (the skull-strip step's
    JSON) carries its verdict on whether the input was already skull stripped into the metrics.
    ``template_space``: the scan came already in this template space (:func:`template_scan_files`); its
    brain volume is then a template-space volume, recorded but not judged against the native range.
    """
    from .preprocess import preprocess_image
    from .qc import qc_figure, qc_flags, qc_metrics
    from .registration import read_transform
    from .templates import mni152_brain

    corrected = bias_corrected(in_conformed, in_biasfield)
    native_mask = _load(in_brain_mask)
    image, mask, _ = preprocess_image(corrected, native_mask, read_transform(in_transform), qc_grid,
                                      order=1, method="percentile")
    metrics: dict[str, Any] = {"scan": scan, **qc_metrics(image, mask, native_mask, corrected)}
    for level, path in level_jsons.items():
        # Registration-time correlations (level 1 against the head template, level 2 against the brain).
        metrics[f"{level}_correlation"] = read_json(path).get("template_correlation")
    if skullstrip_info is not None:
        metrics["input_skull_stripped"] = bool(read_json(skullstrip_info).get("InputAlreadySkullStripped"))
    if template_space is not None:
        metrics["template_space"] = template_space
    metrics["flags"] = qc_flags(metrics, thresholds)
    title = f"{scan}   r={metrics['template_correlation']:.2f}   brain {metrics['brain_volume_ml']:.0f} mL"
    # The flags go in the picture's red banner (wrapped), not the title line, where a long list ran off the edge.
    qc_figure(image, mask, mni152_brain(1), out_png, title, flags=metrics["flags"])
    atomic_write_json(metrics, out_json)
    return metrics


def qc_table_file(metric_jsons: Sequence[PathLike], out_tsv: PathLike, *, excluded: Sequence[str] = (),
                  failed_inputs: pd.DataFrame | None = None, datasets: Mapping[str, str] | None = None) -> pd.DataFrame:
    """Cohort QC table: one row per scan with metrics, automatic flags, cohort outliers and exclusions.

    ``failed_inputs`` (see :mod:`brainvae.failures`) adds a row per scan whose input file could not be
    used: no metrics, flag ``input_error``, ``excluded`` and not ``passed``, with the failed step and reason.
    ``datasets`` (scan key -> dataset) adds a ``dataset`` column, and outliers are then judged within each
    dataset: contrast and coverage differ between scanners, and a whole site must not be an "outlier".
    """
    from .qc import failed_input_rows, outlier_flags, qc_table, write_qc_table

    rows = [read_json(path) for path in metric_jsons]
    table = pd.DataFrame(rows)
    if datasets is not None and len(table):
        table.insert(1, "dataset", table["scan"].map(dict(datasets)).fillna(""))
    if not len(table):
        outliers = pd.Series(dtype=object)
    elif "dataset" in table.columns:
        outliers = pd.concat([outlier_flags(group) for _, group in table.groupby("dataset", sort=False)])
    else:
        outliers = outlier_flags(table)
    for index in table.index:
        table.at[index, "flags"] = list(table.at[index, "flags"]) + list(outliers.get(index, []))
    table["excluded"] = table["scan"].isin(set(excluded)) if len(table) else []
    table["passed"] = table["flags"].map(len).eq(0) & ~table["excluded"] if len(table) else []
    rows = table.to_dict("records") + failed_input_rows(failed_inputs)
    formatted = qc_table(rows)
    write_qc_table(formatted, out_tsv)
    return formatted


#: The kept files of one scan, in chain order: the outputs of :func:`preprocess_scan_files`.
SCAN_OUTPUTS = ("conformed", "conform_sidecar", "biasfield", "headmask", "level1_xfm", "level1_info", "brain_mask",
                "brain_mask_info", "xfm", "xfm_info", "preproc", "preproc_mask", "qc_png", "qc_metrics")


def _check_scan_outputs(out: Mapping[str, PathLike], caller: str) -> None:
    missing = set(SCAN_OUTPUTS) - set(out)
    if missing:
        raise ValueError(f"{caller}: no output path for {sorted(missing)}")


def _conform_errors_recorded(failure_records: PathLike | None, scan: str, in_t1w: PathLike,
                             conform_settings: Mapping[str, Any] | None) -> Any:
    """A context that records an unusable input under ``scan`` (as the conform rule does) when
    ``failure_records`` is given; otherwise errors propagate unchanged."""
    from contextlib import nullcontext

    from .failures import recording_input_errors

    if failure_records is None:
        return nullcontext()
    return recording_input_errors(failure_records, scan, in_t1w, step="conform", settings=conform_settings or {})


def preprocess_scan_files(in_t1w: PathLike, out: Mapping[str, PathLike], *, scan_key: str,
                          conform: Mapping[str, Any], n4: Mapping[str, Any], skullstrip_method: str = "deepbet",
                          skullstrip_device: str = "auto",
                          grid: str = DEFAULT_GRID, order: int = 3, normalisation: Mapping[str, Any] | None = None,
                          qc_thresholds: Mapping[str, float] | None = None, threads: int = 1,
                          failure_records: PathLike | None = None, scan: str | None = None,
                          conform_settings: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The whole per-scan chain in one process: conform -> N4 -> level-1 -> skull-strip -> level-2 ->
    the one resampling -> QC, writing the same files as the per-step rules (``out``: keys of
    :data:`SCAN_OUTPUTS`).

    Each step is the per-step rules' own file-level function, called in the same order on the same
    files, so both job layouts give the same outputs. The two intermediates the per-step rules keep as
    ``temp()`` files (the corrected head and the level-1-aligned head) go to a temporary folder, deleted
    at the end. ``failure_records`` (:func:`brainvae.failures.records_dir`) records an
    unusable input as the conform rule does, under the scan's key ``scan``. Returns the QC metrics.
    """
    import tempfile

    from .conform import conform_scan
    from .preprocess import bias_correct_file, level1_file, level2_file

    _check_scan_outputs(out, "preprocess_scan_files")
    with _conform_errors_recorded(failure_records, scan or scan_key, in_t1w, conform_settings):
        conform_scan(in_t1w, out["conformed"], out["conform_sidecar"], **conform)
    # The job's temporary folder ($TMPDIR, node-local on most clusters; Snakemake sets it from resources.tmpdir).
    with tempfile.TemporaryDirectory(prefix="brainvae_preprocess_scan_") as tmp:
        corrected = os.path.join(tmp, "desc-n4_T1w.nii")
        level1_head = os.path.join(tmp, "space-level1_T1w.nii")
        bias_correct_file(out["conformed"], corrected, out["biasfield"], out["headmask"], threads=threads, **n4)
        level1_file(corrected, out["level1_xfm"], level1_head, out["level1_info"], threads=threads)
        skullstrip_file(level1_head, out["level1_xfm"], corrected, out["brain_mask"], out["brain_mask_info"],
                        method=skullstrip_method, threads=threads, device=skullstrip_device)
        level2_file(corrected, out["brain_mask"], out["level1_xfm"], out["xfm"], out["xfm_info"],
                    mask_space="native", threads=threads)
    preprocess_file(out["conformed"], out["biasfield"], out["brain_mask"], out["xfm"], out["preproc"],
                    out["preproc_mask"], grid=grid, order=order, **(normalisation or {}))
    return qc_file(out["conformed"], out["biasfield"], out["brain_mask"], out["xfm"],
                   {"level1": out["level1_info"], "level2": out["xfm_info"]}, out["qc_png"], out["qc_metrics"],
                   scan=scan_key, thresholds=qc_thresholds, skullstrip_info=out["brain_mask_info"])


#: Value of a dataset's ``space`` for scans that need the whole chain (N4, both affines, skull stripping).
NATIVE_SPACE = "native"
#: Template spaces a dataset may declare it is already in (skull-stripped, affinely aligned): the chain then
#: validates, masks, resamples once onto the training grid and normalises, and records identity transforms.
TEMPLATE_SPACES = ("MNI152NLin2009aSym",)


def template_scan_files(in_t1w: PathLike, out: Mapping[str, PathLike], *, scan_key: str,
                        conform: Mapping[str, Any], space: str = TEMPLATE_SPACES[0], grid: str = DEFAULT_GRID,
                        order: int = 3, normalisation: Mapping[str, Any] | None = None,
                        qc_thresholds: Mapping[str, float] | None = None,
                        failure_records: PathLike | None = None, scan: str | None = None,
                        conform_settings: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The chain of a scan that is already skull-stripped and in ``space`` (e.g. a dataset released
    after affine registration to MNI152NLin2009aSym): the same files as :func:`preprocess_scan_files`.

    Conform validates the file as for every scan. There is no bias field to remove (a flat one is
    written) and no registration: both transforms are the identity, because the image's world
    coordinates already are template millimetres. The brain mask is the image's non-zero support (its
    largest component, holes filled): the input was skull-stripped with a zero background. Resampling,
    normalisation and QC are the native chain's own functions, so both kinds of scan reach the cohort
    array the same way. An image whose field of view misses the template brain is caught by QC
    (``fov_coverage``, ``template_correlation``).
    """
    from scipy import ndimage

    from .bias import largest_component
    from .conform import conform_scan
    from .registration import template_correlation, write_transform
    from .templates import mni152_brain

    if space not in TEMPLATE_SPACES:
        raise ValueError(f"template_scan_files: space {space!r} is not one of {TEMPLATE_SPACES}")
    _check_scan_outputs(out, "template_scan_files")
    with _conform_errors_recorded(failure_records, scan or scan_key, in_t1w, conform_settings):
        conform_scan(in_t1w, out["conformed"], out["conform_sidecar"], **conform)
        image = _load(out["conformed"])
        data = np.asarray(image.dataobj, dtype=np.float32)
        support = np.isfinite(data) & (data > 0)
        if not support.any():
            raise InputError(in_t1w, f"declared to be in {space} (skull-stripped), but it has no voxel above 0")
    brain = ndimage.binary_fill_holes(largest_component(support))
    identity = np.eye(4)
    atomic_write_nifti(nib.Nifti1Image(np.ones(data.shape, np.float32), image.affine), out["biasfield"])
    atomic_write_nifti(nib.Nifti1Image(support.astype(np.uint8), image.affine), out["headmask"])
    atomic_write_nifti(nib.Nifti1Image(brain.astype(np.uint8), image.affine), out["brain_mask"])
    correlation = template_correlation(image, identity, mni152_brain())
    method = f"none: the dataset is declared to be in {space}"
    for xfm, info in (("level1_xfm", "level1_info"), ("xfm", "xfm_info")):
        write_transform(identity, out[xfm])
        atomic_write_json({"affine_native_to_mni_ras": identity.tolist(), "template_correlation": correlation,
                           "Method": method}, out[info])
    voxel_ml = float(np.prod(image.header.get_zooms()[:3])) / 1000.0
    atomic_write_json({"Method": "non-zero support of an already skull-stripped image", "InputAlreadySkullStripped": True,
                       "BrainVolumeMl": float(brain.sum()) * voxel_ml, "Sources": [os.fspath(out["conformed"])]},
                      out["brain_mask_info"])
    preprocess_file(out["conformed"], out["biasfield"], out["brain_mask"], out["xfm"], out["preproc"],
                    out["preproc_mask"], grid=grid, order=order, **(normalisation or {}))
    return qc_file(out["conformed"], out["biasfield"], out["brain_mask"], out["xfm"],
                   {"level1": out["level1_info"], "level2": out["xfm_info"]}, out["qc_png"], out["qc_metrics"],
                   scan=scan_key, thresholds=qc_thresholds, template_space=space)
