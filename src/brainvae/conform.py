"""First pipeline step: validate one input T1w scan and conform it to a canonical layout.

"Conform" here is deliberately lossless: the voxel values are kept (only scale factors are
applied and the type becomes float32) and the voxel grid is only flipped/permuted so that the
array axes run in one canonical orientation (RAS+ by default). Nothing is resampled, so oblique
acquisitions stay oblique; the obliquity is recorded for later steps (registration resamples
once, at the end, instead of interpolating twice).

Every unusable input raises :class:`~brainvae.errors.InputError` naming the file and the reason,
before any output is written.

* :func:`conform_image` works in memory (what tests mostly call);
* :func:`load_nifti` loads a file robustly (truncation, corruption, wrong format);
* :func:`conform_scan` = load + conform + atomic write of ``.nii.gz`` and JSON sidecar.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.affines import obliquity, voxel_sizes
from nibabel.filebasedimages import ImageFileError
from nibabel.orientations import (
    apply_orientation,
    axcodes2ornt,
    inv_ornt_aff,
    io_orientation,
    ornt_transform,
)
from nibabel.spatialimages import HeaderDataError

from brainvae import __version__
from brainvae.errors import ConfigError, InputError
from brainvae.io import atomic_write_json, atomic_write_nifti, nifti_suffix, sha256_file

__all__ = [
    "DEFAULT_MAX_ANISOTROPY",
    "DEFAULT_MAX_VOXEL_MM",
    "DEFAULT_MIN_VOXEL_MM",
    "DEFAULT_ORIENTATION",
    "conform_image",
    "conform_scan",
    "load_nifti",
]

DEFAULT_ORIENTATION = "RAS"
DEFAULT_MIN_VOXEL_MM = 0.2
DEFAULT_MAX_VOXEL_MM = 8.0
#: Hard limit on max/min voxel size. Thick-slice clinical scans (1 x 1 x 6 mm = 6) pass and are
#: only recorded (QC flags them later); beyond 20 the image is a stack of 2D slices (localizer,
#: thick slab) from which no 3D anatomy can be recovered.
DEFAULT_MAX_ANISOTROPY = 20.0

# |det(RZS)| / product of column norms: 1 for orthogonal axes, 0 for collinear ones. Below
# this the voxel axes (nearly) coincide and the affine cannot be inverted meaningfully.
_MIN_ORTHOGONALITY = 1e-3
# Largest |cosine| between two voxel axes accepted (~0.006 degrees from perpendicular). ITK/ANTs
# direction matrices cannot represent shear, so later steps (registration.to_ants uses the same
# tolerance) would fail on a sheared affine; scanner affines are orthogonal to ~1e-8.
_MAX_SHEAR_COS = 1e-4
# sform/qform disagreement (mm, at the image corners) worth a warning in the sidecar.
_FORM_DISAGREEMENT_WARN_MM = 1.0
_GZIP_MAGIC = b"\x1f\x8b"
_NIFTI_MAGICS = (b"n+1", b"ni1", b"n+2", b"ni2")
_PERCENTILES = (0.5, 99.5)
# Exceptions nibabel, gzip and numpy raise on damaged or foreign files (not programming errors).
_READ_ERRORS = (ImageFileError, HeaderDataError, OSError, EOFError, ValueError, zlib.error)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

def _gzip_payload_size(path: Path) -> int:
    """Decompress the whole gzip stream once; return its size. Truncation/CRC errors -> InputError.

    nibabel reads only as many bytes as the header asks for and never reaches the gzip trailer,
    so a corrupted (CRC mismatch) file could otherwise load with silently wrong data.
    """
    size = 0
    try:
        with gzip.open(path, "rb") as fh:
            while chunk := fh.read(1 << 22):
                size += len(chunk)
    except EOFError:
        raise InputError(path, "truncated gzip file (ends before the end of the compressed data; "
                               "incomplete download or copy?)") from None
    except (gzip.BadGzipFile, zlib.error, OSError) as exc:
        raise InputError(path, f"corrupt gzip data ({exc})") from None
    return size


# First bytes of formats a file named .nii/.nii.gz sometimes really is: prefix -> what it is and what to do.
_FOREIGN_MAGICS = (
    (b"\x1f\x8b", "gzip-compressed twice (gunzip it once)"),
    (b"\x89HDF\r\n\x1a\n", "an HDF5 file (MINC-2?): convert it with mnc2nii"),
    (b"CDF\x01", "a netCDF file (MINC-1?): convert it with mnc2nii"),
    (b"CDF\x02", "a netCDF file (MINC-1?): convert it with mnc2nii"),
    (b"NRRD", "an NRRD image: convert it to NIfTI (e.g. 3D Slicer or c3d)"),
    (b"PK\x03\x04", "a ZIP archive: unpack it first"),
    (b"version https://git-lfs", "a Git LFS pointer, not the image: run `git lfs pull`"),
)


def _sniff(path: Path) -> str | None:
    """What a file that does not load as the NIfTI its name promises really is, from its first bytes
    (after one gzip layer), with what to do about it; None when nothing is recognised."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(1024)
        if head[:2] == _GZIP_MAGIC:
            with gzip.open(path, "rb") as fh:
                head = fh.read(1024)
    except (OSError, EOFError, zlib.error):
        return None
    if len(head) >= 348:
        for order in "<>":
            size = struct.unpack(f"{order}i", head[:4])[0]
            if size == 348 and head[344:348] in (b"n+1\x00", b"ni1\x00"):
                return "a NIfTI-1 file"
            if size == 348:
                return "an Analyze 7.5 image (no orientation): convert it to NIfTI"
            if size == 540 and head[4:7] in (b"n+2", b"ni2"):
                return "a NIfTI-2 file"
    # FreeSurfer MGH: big-endian int32 version 1, then width, height, depth, frames and a data type.
    if len(head) >= 28:
        version, *dims, dtype = struct.unpack(">7i", head[:28])[:6]
        if version == 1 and all(d > 0 for d in dims) and dtype in (0, 1, 3, 4):
            return "a FreeSurfer MGH image (.mgz/.mgh): convert it with `mri_convert in.mgz out.nii.gz`"
    if head[128:132] == b"DICM":
        return "a DICOM file: convert the series with dcm2niix"
    for magic, what in _FOREIGN_MAGICS:
        if head.startswith(magic):
            return what
    start = head.lstrip()[:15].lower()
    if start.startswith((b"<!doctype html", b"<html")):
        return "an HTML page (a failed download: a login or error page?)"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if text and all(c.isprintable() or c.isspace() for c in text):
        return f"plain text starting {text.strip().splitlines()[0][:60]!r}" if text.strip() else "blank text"
    return None


def _it_is(path: Path) -> str:
    """'; it is <what>' for an error message, or '' when the content is not recognised."""
    what = _sniff(path)
    return f"; it is {what}" if what else ""


def load_nifti(path: str | os.PathLike[str]) -> nib.Nifti1Image:
    """Load a ``.nii``/``.nii.gz`` file, checking that it is complete.

    Raises InputError for a missing/unreadable file, a wrong extension or compression, a
    truncated or corrupt gzip stream, a file that is not NIfTI-1/2 (saying what it is when its first
    bytes tell: MGH, DICOM, HDF5/MINC, NRRD, HTML, text, ...), or a file shorter than its header says. The voxel data itself is read (once) by :func:`conform_image`, which turns any
    remaining read error into an InputError too.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "file not found")
    if path.is_dir():
        raise InputError(path, "is a directory, not a NIfTI file")
    try:
        suffix = nifti_suffix(path)
    except ValueError:
        raise InputError(path, "not a NIfTI file name (expected .nii or .nii.gz)") from None
    try:
        with open(path, "rb") as fh:
            head = fh.read(2)
    except OSError as exc:
        raise InputError(path, f"cannot read file ({exc.strerror or exc})") from None
    if not head:
        raise InputError(path, "empty file (0 bytes)")
    # nibabel picks the decompressor from the extension; a mismatch gives a cryptic error.
    is_gzip = head == _GZIP_MAGIC
    if suffix == ".nii.gz" and not is_gzip:
        what = _sniff(path)
        if what in ("a NIfTI-1 file", "a NIfTI-2 file"):
            what = f"an uncompressed {what[2:]}: rename it to .nii"
        raise InputError(path, "named .nii.gz but not gzip-compressed " + (
            f"(it is {what})" if what else
            "(not a NIfTI file, or an uncompressed NIfTI that should be named .nii)"))
    if suffix == ".nii" and is_gzip:
        raise InputError(path, "named .nii but gzip-compressed (rename it to .nii.gz)")
    payload_size = _gzip_payload_size(path) if is_gzip else path.stat().st_size

    try:
        img = nib.load(path, mmap=False)
    except ImageFileError as exc:
        what = _sniff(path)
        raise InputError(path, f"not a NIfTI file: it is {what}" if what else
                         f"not a NIfTI file ({exc})") from None
    except _READ_ERRORS as exc:
        raise InputError(path, f"cannot read NIfTI header ({type(exc).__name__}: {exc})"
                               f"{_it_is(path)}") from None
    # Nifti2Image subclasses Nifti1Image; plain Analyze 7.5 (AnalyzeImage) has no orientation
    # information and is rejected, as is anything else nibabel can open (MGH, MINC, ...).
    if not isinstance(img, nib.Nifti1Image):
        raise InputError(path, f"not a NIfTI-1/NIfTI-2 file (nibabel reads it as {type(img).__name__})"
                               f"{_it_is(path)}")
    magic = bytes(img.header["magic"]).rstrip(b"\x00")
    if magic not in _NIFTI_MAGICS:
        raise InputError(path, f"not a NIfTI file (bad magic bytes {magic!r}){_it_is(path)}")

    # Catch truncation now, from sizes alone, instead of as an obscure error in a later step.
    # (The data offset is on the array proxy: nibabel resets it in the image's header copy.)
    header = img.header
    offset = int(getattr(img.dataobj, "offset", header.get_data_offset()))
    needed = offset + int(np.prod(img.shape)) * header.get_data_dtype().itemsize
    if payload_size < needed:
        what = "decompressed data" if is_gzip else "file"
        raise InputError(path, f"truncated NIfTI: {what} is {payload_size} bytes but the header "
                               f"(shape {list(img.shape)}, {header.get_data_dtype()}) needs {needed}")
    return img


def _read_data(img: nib.Nifti1Image, source: str | os.PathLike[str]) -> np.ndarray:
    """The image's voxel array with scale factors applied; damaged data becomes an InputError."""
    try:
        return np.asanyarray(img.dataobj)
    except _READ_ERRORS as exc:
        raise InputError(source, f"cannot read image data ({type(exc).__name__}: {exc})") from None


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------

def _check_options(volume_index: int | None, orientation: str, min_voxel_mm: float,
                   max_voxel_mm: float, max_anisotropy: float) -> tuple[str, ...]:
    """Validate the configuration values; return the target axis codes."""
    valid_index = (volume_index is None or (isinstance(volume_index, (int, np.integer))
                                            and not isinstance(volume_index, bool) and volume_index >= 0))
    if not valid_index:
        raise ConfigError(f"conform.volume_index: must be empty or an integer >= 0, got {volume_index!r}")
    codes = tuple(str(orientation).upper())
    axis_of = {"L": 0, "R": 0, "A": 1, "P": 1, "S": 2, "I": 2}
    if len(codes) != 3 or any(c not in axis_of for c in codes) or sorted(axis_of[c] for c in codes) != [0, 1, 2]:
        raise ConfigError(f"conform.orientation: {orientation!r} is not an orientation code "
                          "(three letters, one each of L/R, A/P, S/I, e.g. 'RAS' or 'LPS')")
    if not (0 < min_voxel_mm <= max_voxel_mm):
        raise ConfigError(f"conform.min_voxel_mm/max_voxel_mm: need 0 < min <= max, got "
                          f"{min_voxel_mm!r} and {max_voxel_mm!r}")
    if not max_anisotropy >= 1:
        raise ConfigError(f"conform.max_anisotropy: must be >= 1, got {max_anisotropy!r}")
    return codes


def _affine_problem(affine: np.ndarray) -> str | None:
    """Why an affine cannot describe a voxel grid, or None if it can."""
    if not np.all(np.isfinite(affine)):
        return "contains NaN or Inf"
    if not np.allclose(affine[3], [0, 0, 0, 1]):
        return f"bottom row is {affine[3].tolist()}, not [0, 0, 0, 1]"
    sizes = voxel_sizes(affine)
    if np.any(sizes == 0):
        return f"zero-length voxel axis (voxel sizes {_fmt_sizes(sizes)} mm)"
    if abs(np.linalg.det(affine[:3, :3])) / np.prod(sizes) < _MIN_ORTHOGONALITY:
        return "singular (voxel axes are parallel)"
    return None


def _choose_affine(header: nib.Nifti1Header, source: str | os.PathLike[str]
                   ) -> tuple[np.ndarray, str, int, list[str]]:
    """Pick the voxel-to-world affine: ``(affine, 'sform'|'qform'|'none', code, warnings)``.

    Same precedence as nibabel's ``get_best_affine`` (sform if coded, else qform if coded, else
    pixdim only), except that a coded but degenerate form is skipped in favour of the other.
    """
    sform, scode = header.get_sform(coded=True)
    qform, qcode = header.get_qform(coded=True)
    candidates = [(name, aff, int(code)) for name, aff, code in
                  (("sform", sform, scode), ("qform", qform, qcode)) if aff is not None and code > 0]
    warnings: list[str] = []
    problems = []
    for name, aff, code in candidates:
        problem = _affine_problem(aff)
        if problem is None:
            warnings += [f"the {n} is degenerate ({p}); the {name} was used" for n, p in problems]
            return aff, name, code, warnings
        problems.append((name, problem))
    if problems:
        raise InputError(source, "degenerate affine: " + "; ".join(f"{n} {p}" for n, p in problems))
    # Neither form is coded: only pixdim is left (Analyze-style). Usable for shape and voxel
    # size, but left-right is a guess, so it is recorded for QC rather than silently trusted.
    aff = header.get_base_affine()
    problem = _affine_problem(aff)
    if problem is not None:
        raise InputError(source, f"degenerate affine: no sform/qform and pixdim-based affine {problem}")
    warnings.append("neither sform nor qform is set (codes 0): orientation taken from pixdim only, "
                    "left-right may be wrong")
    return aff, "none", 0, warnings


def _form_disagreement_mm(header: nib.Nifti1Header, shape: tuple[int, ...]) -> float | None:
    """Largest distance (mm) between sform and qform world positions of the volume's corners."""
    sform, scode = header.get_sform(coded=True)
    qform, qcode = header.get_qform(coded=True)
    if not (scode and qcode) or _affine_problem(sform) or _affine_problem(qform):
        return None
    corners = np.array(np.meshgrid(*[[-0.5, n - 0.5] for n in shape[:3]], indexing="ij")).reshape(3, -1)
    corners = np.vstack([corners, np.ones(corners.shape[1])])
    return float(np.linalg.norm(((sform - qform) @ corners)[:3], axis=0).max())


def _fmt_sizes(sizes: Any) -> str:
    return " x ".join(f"{s:.4g}" for s in sizes)


def _pick_volume(data: np.ndarray, shape: tuple[int, ...], volume_index: int | None,
                 source: str | os.PathLike[str]) -> tuple[np.ndarray, int, int | None]:
    """Reduce the array to 3D: ``(data3d, number_of_volumes, picked_index_or_None)``."""
    if len(shape) < 3:
        raise InputError(source, f"{len(shape)}D image (shape {list(shape)}); a 3D volume is needed")
    if 0 in shape:
        raise InputError(source, f"empty image (shape {list(shape)})")
    spatial, extra = shape[:3], shape[3:]
    if 1 in spatial:
        raise InputError(source, f"single slice (shape {list(shape)}): a 3D volume with at least 2 "
                                 "voxels along each spatial axis is needed")
    series = [n for n in extra if n != 1]
    if len(series) > 1:
        raise InputError(source, f"{len(shape)}D image (shape {list(shape)}) with more than one "
                                 "non-singleton axis beyond the 3rd; only 3D volumes and 4D series are supported")
    # Dropping singleton trailing axes is a plain reshape (no copy, order kept).
    n_volumes = series[0] if series else 1
    data = data.reshape(spatial + (n_volumes,))
    if n_volumes == 1:
        # A dataset-wide volume_index is harmless for the 3D scans in the same dataset.
        return data[..., 0], 1, None
    if volume_index is None:
        raise InputError(source, f"{len(shape)}D image with {n_volumes} volumes; "
                                 "set conform.volume_index to pick one")
    if volume_index >= n_volumes:
        raise InputError(source, f"conform.volume_index={volume_index} is out of range for a "
                                 f"{len(shape)}D image with {n_volumes} volumes (valid: 0-{n_volumes - 1})")
    return data[..., volume_index], n_volumes, int(volume_index)


def _check_finite(data: np.ndarray, source: str | os.PathLike[str]) -> None:
    if np.issubdtype(data.dtype, np.floating):
        n_bad = int(np.count_nonzero(~np.isfinite(data)))
        if n_bad:
            # Not zero-filled on purpose: NaNs usually mean a broken conversion or masking step
            # upstream, and silently zeroing them would hide that and bias intensity statistics.
            raise InputError(source, f"{n_bad} of {data.size} voxels are NaN or Inf; fix the input "
                                     "(brainvae does not zero-fill them)")


def _check_content(data: np.ndarray, source: str | os.PathLike[str]) -> tuple[float, float]:
    """Check the float32 output volume is finite (no overflow) and not constant; return min, max."""
    vmin, vmax = float(data.min()), float(data.max())
    if not (np.isfinite(vmin) and np.isfinite(vmax)):
        raise InputError(source, "voxel values exceed the float32 range")
    if vmin == vmax:
        raise InputError(source, "all voxels are zero" if vmax == 0 else
                         f"all voxels have the same value ({vmax:g}); no image content")
    return vmin, vmax


# --------------------------------------------------------------------------------------------
# Conform
# --------------------------------------------------------------------------------------------

def conform_image(
    img: nib.Nifti1Image,
    *,
    source: str | os.PathLike[str],
    volume_index: int | None = None,
    orientation: str = DEFAULT_ORIENTATION,
    min_voxel_mm: float = DEFAULT_MIN_VOXEL_MM,
    max_voxel_mm: float = DEFAULT_MAX_VOXEL_MM,
    max_anisotropy: float = DEFAULT_MAX_ANISOTROPY,
    source_uri: str | None = None,
) -> tuple[nib.Nifti1Image, dict[str, Any]]:
    """Validate ``img`` and return ``(conformed float32 image, sidecar dict)``.

    ``source`` names the input in error messages and the sidecar; ``source_uri`` (e.g. a BIDS
    URI ``bids:raw:sub-01/anat/sub-01_T1w.nii.gz``) fills ``Sources``/``SpatialReference`` and
    defaults to ``source``. The sidecar has no ``SourceSHA256`` (there is no file here);
    :func:`conform_scan` adds it.
    """
    target_codes = _check_options(volume_index, orientation, min_voxel_mm, max_voxel_mm, max_anisotropy)
    if not isinstance(img, nib.Nifti1Image):
        raise InputError(source, f"not a NIfTI image ({type(img).__name__})")
    header = img.header
    stored_dtype = header.get_data_dtype()
    # Complex, RGB (structured) and other non-real types cannot be a T1w intensity image.
    if stored_dtype.fields is not None or not (np.issubdtype(stored_dtype, np.integer)
                                               or np.issubdtype(stored_dtype, np.floating)):
        raise InputError(source, f"unsupported voxel data type {stored_dtype} (need real numbers)")
    in_shape = tuple(int(n) for n in img.shape)

    # Geometry first: cheap, and independent of the voxel data.
    affine, affine_source, form_code, warnings = _choose_affine(header, source)
    sizes = voxel_sizes(affine)
    if np.any(sizes < min_voxel_mm) or np.any(sizes > max_voxel_mm):
        raise InputError(source, f"voxel size {_fmt_sizes(sizes)} mm is outside the allowed range "
                                 f"[{min_voxel_mm:g}, {max_voxel_mm:g}] mm "
                                 "(conform.min_voxel_mm / conform.max_voxel_mm)")
    cosines = (affine[:3, :3] / sizes).T @ (affine[:3, :3] / sizes)
    max_cos = float(np.abs(cosines - np.eye(3)).max())
    if max_cos > _MAX_SHEAR_COS:
        raise InputError(source, f"sheared affine: voxel axes are {np.degrees(np.arcsin(min(max_cos, 1.0))):.3g} "
                                 "degrees from perpendicular, which ITK-based steps cannot represent")
    anisotropy = float(sizes.max() / sizes.min())
    if anisotropy > max_anisotropy:
        raise InputError(source, f"voxel size {_fmt_sizes(sizes)} mm is too anisotropic "
                                 f"(max/min = {anisotropy:.3g} > conform.max_anisotropy = {max_anisotropy:g})")
    disagreement = _form_disagreement_mm(header, in_shape)
    if affine_source == "sform" and disagreement is not None and disagreement > _FORM_DISAGREEMENT_WARN_MM:
        warnings.append(f"sform and qform disagree by up to {disagreement:.3g} mm; the sform was used")

    raw = _read_data(img, source)
    data3d, n_volumes, picked = _pick_volume(raw, in_shape, volume_index, source)
    _check_finite(data3d, source)

    # Lossless reorientation: io_orientation assigns each voxel axis to its closest world axis
    # (also for oblique affines), and the array is flipped/transposed to match the target codes.
    # inv_ornt_aff gives the matching affine update, so every voxel keeps its world position.
    src_ornt = io_orientation(affine)
    if np.isnan(src_ornt).any():
        raise InputError(source, "degenerate affine: cannot assign voxel axes to world axes")
    xform = ornt_transform(src_ornt, axcodes2ornt(target_codes))
    # One fresh float32 copy (never aliasing the caller's array) in Fortran order: NIfTI stores
    # voxels x-fastest and nibabel reads arrays Fortran-ordered, so this copy, the statistics
    # and the later write are sequential memory passes instead of slow strided transposes.
    with np.errstate(over="ignore"):  # float64 beyond float32 range -> inf, caught just below
        out_data = np.array(apply_orientation(data3d, xform), dtype=np.float32, order="F")
    vmin, vmax = _check_content(out_data, source)
    out_affine = affine @ inv_ornt_aff(xform, data3d.shape)

    out_img = nib.Nifti1Image(out_data, out_affine)
    out_header = out_img.header
    # Clean header: both forms hold the same affine, with the source code kept (1 = scanner,
    # 2 = aligned, ...); an uncoded source gets 1 so readers do not fall back to pixdim, which
    # would contradict the data layout we wrote.
    out_code = form_code or 1
    out_img.set_sform(out_affine, code=out_code)
    out_img.set_qform(out_affine, code=out_code)
    out_header.set_xyzt_units("mm", "sec")
    out_header.set_data_dtype(np.float32)
    out_header["descrip"] = f"brainvae {__version__} conform"

    slope, inter = _scale_factors(img)
    oblique_deg = np.degrees(obliquity(out_affine))
    p_lo, p_hi = np.percentile(out_data.ravel(order="K"), _PERCENTILES)  # "K": no transpose copy
    uri = source_uri if source_uri is not None else os.fspath(source)
    out_sizes = voxel_sizes(out_affine)

    sidecar: dict[str, Any] = {
        # BIDS-derivative fields
        "Sources": [uri],
        "SpatialReference": uri,  # same world space as the source scan (not resampled)
        "SkullStripped": False,
        # input
        "SourcePath": os.fspath(source),
        "SourceFormat": "NIfTI-2" if isinstance(img, nib.Nifti2Image) else "NIfTI-1",
        "SourceDataType": str(stored_dtype),
        "OriginalShape": list(in_shape),
        "OriginalAxisCodes": "".join(nib.aff2axcodes(affine)),
        "OriginalVoxelSizeMm": _round(sizes),
        "OriginalAffine": _round(affine),
        "AffineSource": affine_source,
        "OriginalSformCode": int(header["sform_code"]),
        "OriginalQformCode": int(header["qform_code"]),
        "SformQformMaxDiffMm": None if disagreement is None else _round(disagreement),
        "ScaleSlope": slope,
        "ScaleIntercept": inter,
        "ScaleFactorsApplied": bool(slope != 1.0 or inter != 0.0),
        "NumberOfVolumes": n_volumes,
        "VolumeIndex": picked,
        # output
        "Shape": list(out_data.shape),
        "VoxelSizeMm": _round(out_sizes),
        "Orientation": "".join(target_codes),
        "Affine": _round(out_affine),
        "DataType": "float32",
        "SformCode": out_code,
        "QformCode": out_code,
        # measurements for QC
        "ObliquityDeg": _round(oblique_deg.max()),
        "ObliquityPerAxisDeg": _round(oblique_deg),
        "Anisotropy": _round(anisotropy),
        "IntensityMin": vmin,
        "IntensityMax": vmax,
        "IntensityPercentiles": {f"{q:g}": float(v) for q, v in zip(_PERCENTILES, (p_lo, p_hi))},
        "Warnings": warnings,
        "BrainvaeVersion": __version__,
    }
    return out_img, sidecar


def _scale_factors(img: nib.Nifti1Image) -> tuple[float, float]:
    """The slope/intercept nibabel applied when reading (1, 0 for in-memory arrays)."""
    # nibabel moves scl_slope/scl_inter from the header to the array proxy on load and
    # normalises "no scaling" (0 or NaN in the file) to 1/0; in-memory arrays are unscaled.
    slope = float(getattr(img.dataobj, "slope", 1.0))
    inter = float(getattr(img.dataobj, "inter", 0.0))
    return slope, inter


def _round(value: Any, ndigits: int = 6) -> Any:
    """Round floats (or nested arrays of them) for a readable sidecar; -0.0 becomes 0.0."""
    arr = np.round(np.asarray(value, dtype=float), ndigits) + 0.0
    return arr.tolist()


def conform_scan(
    in_path: str | os.PathLike[str],
    out_image: str | os.PathLike[str],
    out_json: str | os.PathLike[str],
    **options: Any,
) -> dict[str, Any]:
    """Load, validate and conform ``in_path``; write ``out_image`` and ``out_json``; return the sidecar.

    ``options``: the keyword arguments of :func:`conform_image` (``volume_index``, ``orientation``,
    the voxel-size limits, ``source_uri``), with its defaults.

    All checks run before anything is written and both outputs are written atomically (image
    first, sidecar last), so an error never leaves a partial or unpaired output behind.
    """
    img = load_nifti(in_path)
    out_img, sidecar = conform_image(img, source=in_path, **options)
    sidecar["SourceSHA256"] = sha256_file(in_path)
    atomic_write_nifti(out_img, out_image)
    try:
        # The sidecar goes last: its presence means the image next to it is complete.
        atomic_write_json(sidecar, out_json)
    except BaseException:
        Path(out_image).unlink(missing_ok=True)
        raise
    return sidecar
