"""Skull stripping: a brain mask on the grid of a (bias-corrected, roughly MNI-aligned) head image.

Two methods:

* ``"deepbet"`` (default): the deepbet CNN (Fisch et al. 2024, MIT). Its two TorchScript models
  ship inside the installed wheel (``site-packages/data/models/{bbox_model,model}.pt``), so nothing
  is downloaded; we call its :class:`deepbet.bet.BrainExtraction` in-process on the in-memory
  volume (no temporary files). deepbet reorients to RAS itself, finds the brain bounding box with
  a small model at 128^3 and segments that box at 256^3, so it works on any grid and in native
  space as well as in MNI space.
* ``"template"``: no network weights. The Colin27 brain mask (MNI space) is carried into the image
  by a quick affine registration of the Colin27 head (SimpleITK, identity or moments start), then
  refined on the image's own intensities (3-class Otsu inside a band around the prior, opening to
  cut dura/scalp bridges, largest component, closing and hole filling). Decent, not perfect: meant
  as a fallback when deepbet cannot be installed or fails.

:func:`detect_skull_stripped` tells whether an input is already skull stripped, so that the
workflow can skip stripping (or flag the scan).
"""

from __future__ import annotations

import threading
import warnings
from functools import lru_cache
from typing import Literal

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from brainvae.bias import largest_component
from brainvae.errors import BrainvaeError

__all__ = ["SkullstripError", "detect_skull_stripped", "dice", "skullstrip"]

Method = Literal["deepbet", "template"]


class SkullstripError(BrainvaeError):
    """Skull stripping produced no usable mask (e.g. an empty or blank image)."""


# ----------------------------------------------------------------------------- public API


def skullstrip(
    img: nib.Nifti1Image,
    method: Method = "deepbet",
    threads: int = 1,
    *,
    threshold: float = 0.5,
    device: str | None = None,
    init: Literal["identity", "moments"] = "identity",
    refine_affine: bool = True,
) -> nib.Nifti1Image:
    """Brain mask (uint8, 0/1) of a head image, on the image's own grid and affine.

    ``img``: 3D T1w head (4D images use their first volume). ``threads``: CPU threads for torch /
    SimpleITK. ``threshold``: deepbet probability cut-off. ``device``: torch device for deepbet
    (default: CUDA if available, else CPU). ``init`` / ``refine_affine`` (template method only):
    start from the image as is (``"identity"``: the input is level-1 aligned to MNI) or from the
    centres of mass (``"moments"``: native-space input), and whether to refine with an affine
    registration (without it the template mask is used exactly where the header puts it).
    """
    threads = max(1, int(threads))
    data = _volume(img)
    if not np.any(np.isfinite(data) & (data != 0)):
        raise SkullstripError("image is empty (all zero or non-finite); cannot skull strip")
    if method == "deepbet":
        mask = _deepbet_mask(img, data, threads, threshold, device)
    elif method == "template":
        mask = _template_mask(img, data, threads, init=init, refine_affine=refine_affine)
    else:
        raise ValueError(f"unknown skull-strip method {method!r} (expected 'deepbet' or 'template')")
    if not mask.any():
        raise SkullstripError(f"{method}: empty brain mask")
    return _mask_image(mask, img)


def detect_skull_stripped(img: nib.Nifti1Image) -> bool:
    """True if ``img`` looks already skull stripped (brain only, no scalp/skull/neck).

    Why these two criteria: in a stripped image the non-background voxels form one compact
    brain-sized blob (a head including scalp is >= ~2.4 L even when the field of view is cut at
    the skull base, a brain 0.8-2.2 L), and the background right outside that blob is exactly the
    fill value, whereas around a head there is noise/ghosting and the blob reaches the skin.
    """
    data = np.nan_to_num(_volume(img), nan=0.0, posinf=0.0, neginf=0.0)
    zooms = np.asarray(img.header.get_zooms()[:3], dtype=float)
    voxel_ml = float(np.prod(zooms)) / 1000.0
    bg_value = float(np.min(data))
    fg = np.abs(data - bg_value) > 1e-6 * max(float(np.ptp(data)), 1e-12)
    if fg.sum() * voxel_ml < 300:  # too little signal to be either a brain or a head
        return False
    # Low threshold on the non-background voxels: captures all tissue of either kind.
    hi = float(np.percentile(data[fg], 99))
    blob = largest_component(data > bg_value + 0.05 * (hi - bg_value))
    blob = ndi.binary_fill_holes(blob)
    volume_ml = float(blob.sum()) * voxel_ml
    if not 700.0 <= volume_ml <= 2300.0:
        return False
    # Background hugging the blob: voxels 2-8 mm outside it must be (nearly all) the fill value.
    dist_out = ndi.distance_transform_edt(~blob, sampling=zooms)
    shell = (dist_out > 2.0) & (dist_out <= 8.0)
    if not shell.any():
        return False
    exact_bg = float(np.mean(~fg[shell]))
    return exact_bg >= 0.9


def dice(a: np.ndarray | nib.Nifti1Image, b: np.ndarray | nib.Nifti1Image) -> float:
    """Dice overlap of two binary masks on the same grid (1.0 when both are empty)."""
    a = np.asarray(a.dataobj if isinstance(a, nib.Nifti1Image) else a) > 0
    b = np.asarray(b.dataobj if isinstance(b, nib.Nifti1Image) else b) > 0
    denom = int(a.sum()) + int(b.sum())
    return 1.0 if denom == 0 else 2.0 * float(np.logical_and(a, b).sum()) / denom


# ----------------------------------------------------------------------------- helpers


def _volume(img: nib.Nifti1Image) -> np.ndarray:
    data = np.asarray(img.dataobj, dtype=np.float32)
    if data.ndim == 4:
        data = data[..., 0]
    if data.ndim != 3:
        raise SkullstripError(f"expected a 3D image, got shape {img.shape}")
    return data


def _mask_image(mask: np.ndarray, ref: nib.Nifti1Image) -> nib.Nifti1Image:
    header = nib.Nifti1Header()
    header.set_qform(ref.affine, code=1)
    header.set_sform(ref.affine, code=1)
    header.set_xyzt_units("mm")
    out = nib.Nifti1Image(mask.astype(np.uint8), ref.affine, header)
    out.set_data_dtype(np.uint8)
    return out


# ----------------------------------------------------------------------------- deepbet

# torch.set_num_threads is process-global; serialise so concurrent calls cannot interleave.
_DEEPBET_LOCK = threading.Lock()


@lru_cache(maxsize=2)
def _deepbet_model(device: str):
    """Load deepbet's two TorchScript models once per process (from the wheel, offline)."""
    import torch
    from deepbet.bet import BrainExtraction

    with warnings.catch_warnings():  # torch >= 2.10 deprecates torch.jit.load; deepbet uses it
        warnings.simplefilter("ignore", DeprecationWarning)
        bet = BrainExtraction(no_gpu=True)  # loads on CPU; move explicitly to the chosen device
    bet.model = bet.model.to(torch.device(device))
    bet.bbox_model = bet.bbox_model.to(torch.device(device))
    return bet


def _deepbet_mask(
    img: nib.Nifti1Image, data: np.ndarray, threads: int, threshold: float, device: str | None
) -> np.ndarray:
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    # deepbet.run takes the image object, reorients to RAS itself, and maps the mask back to the
    # input orientation. Pass a clean float32 3D image (no scale factors / 4th dim surprises).
    clean = nib.Nifti1Image(np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0), img.affine)
    with _DEEPBET_LOCK:
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            bet = _deepbet_model(device)
            _, mask_img, _ = bet.run(clean, threshold=threshold)
        except AssertionError as exc:  # deepbet signals "no foreground" with assert
            raise SkullstripError(f"deepbet failed: {exc}") from exc
        finally:
            torch.set_num_threads(previous)
    return np.asarray(mask_img.dataobj) > 0


# ----------------------------------------------------------------------------- template


def _to_sitk(data: np.ndarray, affine: np.ndarray):
    """nibabel (RAS world, i,j,k array) -> SimpleITK image (LPS world, z,y,x array)."""
    import SimpleITK as sitk

    lps = np.diag([-1.0, -1.0, 1.0]) @ affine[:3, :4]
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    out = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0)).astype(np.float32))
    out.SetSpacing(spacing.tolist())
    out.SetOrigin(lps[:3, 3].tolist())
    out.SetDirection((lps[:3, :3] / spacing).ravel().tolist())
    return out


def _from_sitk(image) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(image).transpose(2, 1, 0)


_REG_SPACING_MM = 3.0  # registration grid: fine enough for an affine fit, a few seconds on 2 cores


def _resample_iso(image, spacing: float):
    """Blur-then-resample a SimpleITK image onto an isotropic grid covering the same box."""
    import SimpleITK as sitk

    old_spacing = np.asarray(image.GetSpacing())
    size = np.asarray(image.GetSize())
    new_size = np.maximum(1, np.round(size * old_spacing / spacing)).astype(int)
    sigma = [max(0.0, (spacing**2 - s**2)) ** 0.5 / 2.355 for s in old_spacing]  # anti-alias
    blurred = sitk.SmoothingRecursiveGaussian(image, sigma) if max(sigma) > 0 else image
    return sitk.Resample(
        blurred, [int(v) for v in new_size], sitk.Transform(), sitk.sitkLinear, image.GetOrigin(),
        [spacing] * 3, image.GetDirection(), 0.0, sitk.sitkFloat32,
    )


@lru_cache(maxsize=1)
def _colin_head_coarse():
    from brainvae.templates import colin27_head

    head = colin27_head()
    return _resample_iso(_to_sitk(np.asarray(head.dataobj), head.affine), _REG_SPACING_MM)


def _mi_stage(fixed, moving, initial, shrinks: list[int], sigmas: list[float], iterations: int):
    import SimpleITK as sitk

    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.15, seed=1)  # fixed seed: reproducible masks
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=2.0, minStep=1e-3, numberOfIterations=iterations, relaxationFactor=0.5
    )
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel(shrinks)
    reg.SetSmoothingSigmasPerLevel(sigmas)
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    reg.SetInitialTransform(initial, inPlace=False)
    return reg.Execute(fixed, moving)


def _register_template(img: nib.Nifti1Image, data: np.ndarray, threads: int, init: str, refine: bool):
    """Affine transform mapping image points to Colin27 head points (SimpleITK convention).

    Similarity first (robust: 7 parameters, coarse-to-fine), then a full affine, by Mattes mutual
    information on 3 mm copies of both heads.
    """
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    moving = _colin_head_coarse()
    fixed = _resample_iso(_to_sitk(data, img.affine), _REG_SPACING_MM)
    if init == "moments":
        # Native-space input: start by matching centres of mass (orientation comes from the header).
        similarity = sitk.CenteredTransformInitializer(
            fixed, moving, sitk.Similarity3DTransform(), sitk.CenteredTransformInitializerFilter.MOMENTS
        )
    else:
        similarity = sitk.Similarity3DTransform()
    if not refine:
        return similarity
    fitted = _mi_stage(fixed, moving, similarity, [2, 1], [4.0, 2.0], 100)
    if isinstance(fitted, sitk.CompositeTransform):
        fitted = fitted.GetNthTransform(0)
    fitted = sitk.Similarity3DTransform(fitted)
    affine = sitk.AffineTransform(3)
    affine.SetCenter(fitted.GetCenter())
    affine.SetMatrix(fitted.GetMatrix())
    affine.SetTranslation(fitted.GetTranslation())
    return _mi_stage(fixed, moving, affine, [1], [1.0], 60)


@lru_cache(maxsize=1)
def _colin_brain_prior():
    """Colin27 brain mask, slightly blurred so that its resampled version is a smooth prior."""
    import SimpleITK as sitk

    from brainvae.templates import colin27_brain

    brain = colin27_brain()
    prior = _to_sitk((np.asarray(brain.dataobj) > 0).astype(np.float32), brain.affine)
    return sitk.SmoothingRecursiveGaussian(prior, 1.5)


def _prior_probability(img: nib.Nifti1Image, data: np.ndarray, transform) -> np.ndarray:
    """Colin27 brain mask resampled onto the image grid (linear: a soft 0..1 prior)."""
    import SimpleITK as sitk

    ref = _to_sitk(np.zeros(data.shape, np.float32), img.affine)
    out = sitk.Resample(_colin_brain_prior(), ref, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return _from_sitk(out)


def _template_mask(
    img: nib.Nifti1Image, data: np.ndarray, threads: int, *, init: str, refine_affine: bool
) -> np.ndarray:
    from skimage.filters import threshold_multiotsu

    zooms = np.asarray(img.header.get_zooms()[:3], dtype=float)
    data = np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0)
    transform = _register_template(img, data, threads, init, refine_affine)
    prior = _prior_probability(img, data, transform) > 0.5
    if not prior.any():
        raise SkullstripError("template brain mask falls outside the image field of view")

    # Band in which the true brain edge may lie: +-8 mm around the registered template brain.
    dist_out = ndi.distance_transform_edt(~prior, sampling=zooms)
    dist_in = ndi.distance_transform_edt(prior, sampling=zooms)
    band = dist_out <= 8.0
    core = dist_in >= 10.0

    # 3 classes inside the band: dark (CSF, skull, air), GM, WM (T1w contrast). Brain tissue is
    # everything above the lower threshold; scalp fat is bright too but mostly outside the band,
    # and the opening below cuts the thin bridges to it.
    values = data[band]
    values = values[values > np.percentile(values, 0.5)]
    t_low = float(threshold_multiotsu(values, classes=3)[0])
    tissue = (data > t_low) & band
    tissue |= core  # the deep brain (ventricles included) is brain whatever its intensity

    mask = _open_mm(tissue, zooms, 3.0)
    mask = largest_component(mask)
    mask = _close_mm(mask, zooms, 4.0)  # re-include sulcal CSF between gyri
    mask = ndi.binary_fill_holes(mask)
    # Smooth the outline a little (median-like: majority vote in a ~2 mm neighbourhood).
    mask = ndi.gaussian_filter(mask.astype(np.float32), sigma=1.0 / zooms) > 0.5
    return largest_component(mask & band)


def _open_mm(mask: np.ndarray, zooms: np.ndarray, radius: float) -> np.ndarray:
    """Morphological opening with a ball of ``radius`` mm (distance-based: any voxel size)."""
    eroded = ndi.distance_transform_edt(mask, sampling=zooms) > radius
    return ndi.distance_transform_edt(~eroded, sampling=zooms) <= radius


def _close_mm(mask: np.ndarray, zooms: np.ndarray, radius: float) -> np.ndarray:
    """Morphological closing with a ball of ``radius`` mm."""
    # Pad so that the closing does not stick to the volume border.
    pad = int(np.ceil(radius / zooms.min())) + 1
    padded = np.pad(mask, pad)
    dilated = ndi.distance_transform_edt(~padded, sampling=zooms) <= radius
    closed = ndi.distance_transform_edt(dilated, sampling=zooms) > radius
    return closed[pad:-pad, pad:-pad, pad:-pad]
