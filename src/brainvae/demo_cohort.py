"""Synthetic multi-site BIDS cohort (euploid vs Down-syndrome-like brains) with ground truth.

Everything is built offline from the MNI152 2009a template (brain) and Colin27 (head), so the whole
pipeline can be tested against known answers: the true native->MNI affine, the true bias field, the
true brain mask and region volumes of every scan.

Model (all deformations are written as *pull-backs*: for every native voxel we compute the MNI point
whose template intensity it shows; a pull-back that contracts around a region enlarges that region).

1. **Reference head** on the MNI 1 mm grid: MNI152 intensities inside the MNI brain mask, a 2 mm
   CSF-dark rim around it, the Colin27 head (rescaled to MNI units) outside, CSF filling the places
   where Colin27 has brain but MNI152 does not. Background (air) is exactly 0.
2. **Regions** (MNI space, :func:`region_labels`): lateral ventricles = dark voxels of the template
   deep inside the brain near the centre; cerebellum = tissue below the tentorium, grown from seeds
   in both hemispheres and cut from the brainstem; frontal = brain in front of a tilted coronal plane
   approximating the central sulcus (temporal poles excluded); control = superior parietal brain, far
   from every group effect, used to check that groups differ nowhere else.
3. **Subject anatomy** (``MNI <- t <- s``): a global linear size (per-axis log-normal scales, small
   shears; DS adds a smaller, shorter-AP brain), then a smooth random displacement (cubic spline through
   a 30 mm lattice, 1.5 mm deep in the brain, 0.5 mm at the outline so the outline stays nearly
   affine), a random ventricle size, and for DS subjects the DS local deformation. Local region
   effects use velocity fields ``shift_r * grad(G_sigma * mask_r)``: such a field moves the boundary
   of region r along its normal, only near that region, so it enlarges (shift > 0) or shrinks
   (shift < 0) the region and leaves the Jacobian ~1 elsewhere. The DS field (larger ventricles,
   smaller cerebellum, smaller frontal lobe) is exponentiated (scaling and squaring), so it never
   folds at any ``ds_strength``. Subject random draws never depend on group or ``ds_strength``, so a
   DS subject at ``ds_strength=0`` is bit-identical to its euploid counterpart.
4. **Pose**: the head sits in the scanner rotated (up to +-15 deg per axis) and shifted (up to +-20 mm);
   the operator centres the field of view on the head (+-5 mm), as at a real console.
5. **Site**: native grid (voxel size, axis order, FOV), contrast (piecewise-linear map of template
   intensity, WM > GM > CSF, fat bright, bone dark), a smooth multiplicative bias field
   (``exp`` of a cubic spline through a 5^3 lattice over the FOV, geometric mean 1 over the brain)
   and Rician noise ``|S * bias + N(0, s) + i N(0, s)|``. The FOV always holds the whole brain; at
   the most extreme poses the tip of the nose or an ear may be cut, as in real scans.

Truth affine. The nonlinear parts mean no affine is exactly "true"; we record the least-squares affine
fit of the exact native->MNI mapping over the brain voxels (what a perfect affine registration would
find) as ``native_to_mni_affine``, and the plain composition of pose and global linear sizes as
``native_to_mni_affine_linear``. The nonlinear parts are kept small at the brain outline (subject
warp 0.5 mm there; the DS outline shifts are 1 mm for the cerebellum and 0.8 mm for the frontal
lobe, the 2 mm ventricle shift is internal), so the MNI brain mask pushed through the fitted affine
matches the true native brain mask with Dice >= 0.98 (~0.99 euploid, ~0.987 DS), while the true mask
written to the truth folder is the exact deformed brain.

Speed (< 3 s per scan on one core): the exact mapping is evaluated on a coarse native grid (~4 mm)
and upsampled with separable linear interpolation (exact for the affine part), slab by slab so that
every intermediate stays in cache; the image needs one trilinear lookup per voxel and the labels one
nearest-neighbour lookup within the brain's bounding box, both numpy gathers (2x and 6x faster than
``map_coordinates``, same values as its ``mode="grid-constant"``). Files are gzip level 1 with
mtime 0, so a seed always gives the same bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import multiprocessing
import shutil
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from . import __version__
from .errors import ConfigError
from .naming import scan_dir, scan_key
from .templates import MNI_SPACE, colin27_brain, colin27_head, mni152_brain, mni152_brain_mask

GROUPS = ("euploid", "DS")

#: Label values of :func:`region_labels` and of every ``*_desc-regions_dseg.nii.gz``.
REGION_LABELS = {0: "background", 1: "other_brain", 2: "ventricles", 3: "cerebellum", 4: "frontal", 5: "control"}
_LABEL = {name: value for value, name in REGION_LABELS.items()}

#: DS-like effect at ``ds_strength=1`` (scaled linearly in log-size and shift by ``ds_strength``).
#: Literature (adults with DS vs euploid): brain ~15-20 % smaller, brachycephalic (short AP), frontal
#: lobe and cerebellum disproportionately small, lateral ventricles enlarged.
DS_EFFECTS: dict[str, Any] = {
    "global_scale": (0.97, 0.93, 0.96),  # x (LR), y (AP), z (SI) size relative to euploid
    "boundary_shift_mm": {"ventricles": 2.0, "cerebellum": -1.0, "frontal": -0.8},
}
#: Smoothing (mm) of each region mask whose gradient drives the region displacement.
_REGION_SIGMA_MM = {"ventricles": 4.0, "cerebellum": 4.0, "frontal": 5.0}

# Subject variability (euploid and DS alike).
_SUBJECT_LOG_SCALE_SD = 0.035     # per-axis head/brain size, ~3.5 %
# The MNI152 brain (~1,970 mL in its mask) is larger than a typical adult brain; 0.9 per axis gives
# ~1,440 mL, a plausible adult intracranial brain-mask volume.
_SUBJECT_MEAN_LOG_SCALE = float(np.log(0.9))
_SUBJECT_SHEAR_SD = 0.01
_SUBJECT_WARP_SD_MM = 1.5         # random nonlinear displacement at each lattice node, deep in the brain
_SUBJECT_WARP_OUTLINE = 1 / 3     # ... times this at the brain outline and outside (keeps the outline affine)
_SUBJECT_WARP_SPACING_MM = 30.0
_SUBJECT_VENTRICLE_SD_MM = 0.5    # random ventricle boundary shift (clipped at 2 sd, so it never folds)
# Pose in the scanner and FOV placement.
_MAX_ROTATION_DEG = 15.0
_MAX_TRANSLATION_MM = 20.0
_MAX_FOV_OFFSET_MM = 5.0
_BIAS_LATTICE = 5
_COARSE_STEP_MM = 4.0
_REGION_GRID_MM = 2
_DS_AGE = (20, 60)


@dataclass(frozen=True)
class Site:
    """One scanner/dataset: native grid, contrast and noise."""

    name: str
    prefix: str                       # subject labels are prefix + number, unique across sites
    axcodes: tuple[str, str, str]     # direction each voxel axis increases towards (nibabel codes)
    zooms: tuple[float, float, float]
    shape: tuple[int, int, int]       # shape[0] is a multiple of the coarse step (fast upsampling)
    contrast: tuple[float, float, float, float]  # CSF, GM, WM, fat intensity relative to WM
    wm_counts: float                  # stored intensity of white matter
    noise: float                      # Rician sigma relative to WM
    bias_log_sd: float                # sd of the log bias field at the lattice nodes
    euploid_age: tuple[int, int]
    sidecar: tuple[tuple[str, Any], ...]


#: Sites named after the datasets of Malé et al. IXI: Philips 3T sagittal SPGR, 0.94x0.94x1.2 mm,
#: stored PSR like the real IXI NIfTIs. HCP: Siemens 3T MPRAGE, here at 1 mm (the real 0.7 mm is too
#: costly for a demo), stored LAS (radiological) so axis order and handedness both differ.
SITES: dict[str, Site] = {
    "IXI": Site(
        name="IXI", prefix="ixi", axcodes=("P", "S", "R"), zooms=(0.9375, 0.9375, 1.2), shape=(256, 256, 150),
        contrast=(0.28, 0.70, 1.0, 1.25), wm_counts=650.0, noise=0.035, bias_log_sd=0.10, euploid_age=(20, 86),
        sidecar=(("Manufacturer", "Philips"), ("ManufacturersModelName", "Intera"), ("MagneticFieldStrength", 3),
                 ("MRAcquisitionType", "3D"), ("ScanningSequence", "GR"), ("RepetitionTime", 0.0096),
                 ("EchoTime", 0.0046), ("FlipAngle", 8)),
    ),
    "HCP": Site(
        name="HCP", prefix="hcp", axcodes=("L", "A", "S"), zooms=(1.0, 1.0, 1.0), shape=(176, 240, 224),
        contrast=(0.16, 0.60, 1.0, 1.05), wm_counts=1200.0, noise=0.022, bias_log_sd=0.18, euploid_age=(22, 37),
        sidecar=(("Manufacturer", "Siemens"), ("ManufacturersModelName", "Skyra"), ("MagneticFieldStrength", 3),
                 ("MRAcquisitionType", "3D"), ("ScanningSequence", "GR\\IR"), ("RepetitionTime", 2.4),
                 ("EchoTime", 0.00214), ("InversionTime", 1.0), ("FlipAngle", 8)),
    ),
}


# --------------------------------------------------------------------------------------------------
# Reference head, regions and group deformation (MNI space, built once per process)
# --------------------------------------------------------------------------------------------------

@dataclass
class _Reference:
    affine: np.ndarray            # MNI 1 mm voxel -> mm
    head: np.ndarray              # float32 reference intensity, MNI units (WM ~ levels['wm'])
    labels: np.ndarray            # uint8, REGION_LABELS
    levels: dict[str, float]      # reference intensity of csf, gm, wm, fat
    grad_affine: np.ndarray       # 2 mm grid of the region gradient fields
    grads: dict[str, np.ndarray]  # (3, ...) float32 grad of smoothed region mask, max norm 1
    warp_weight: np.ndarray       # subject warp amplitude factor on the same 2 mm grid
    brain_box_mm: np.ndarray      # (2, 3) min/max MNI mm of the brain
    head_centre_mm: np.ndarray


def _mni_coordinates(shape: tuple[int, ...], affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Broadcastable x, y, z MNI mm of a diagonal-affine grid."""
    return tuple(
        (np.arange(n) * affine[a, a] + affine[a, 3]).reshape([-1 if b == a else 1 for b in range(3)])
        for a, n in enumerate(shape)
    )


def _largest_components(mask: np.ndarray, keep: int) -> np.ndarray:
    lab, n = ndi.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(lab.ravel())[1:]
    order = np.argsort(sizes)[::-1][:keep] + 1
    return np.isin(lab, order)


@lru_cache(maxsize=None)
def _region_masks() -> dict[str, np.ndarray]:
    """Boolean MNI-grid masks: brain, ventricles, cerebellum, frontal, control (overlaps allowed)."""
    t1 = np.asarray(mni152_brain().dataobj, dtype=np.float32)
    brain = np.asarray(mni152_brain_mask().dataobj) > 0
    x, y, z = _mni_coordinates(t1.shape, mni152_brain().affine)
    wm = float(np.percentile(t1[brain], 90))
    csf_threshold = 0.52 * wm  # midway between CSF (~0.25 wm) and GM (~0.8 wm)

    # Lateral ventricles: dark, >= 3 mm inside the brain, near the centre; the two big lateral
    # components (the third ventricle merges with the cisterns at this threshold and is left out).
    core = ndi.binary_erosion(brain, iterations=3)
    box = (np.abs(x) <= 30) & (y >= -55) & (y <= 32) & (z >= -8) & (z <= 35)
    dark = (t1 < csf_threshold) & core & box
    lab, n = ndi.label(dark)
    sizes = np.bincount(lab[dark], minlength=n + 1)
    mean_x = np.bincount(lab[dark], weights=np.broadcast_to(x, t1.shape)[dark], minlength=n + 1) / np.maximum(sizes, 1)
    lateral = [i for i in range(1, n + 1) if sizes[i] >= 1000 and abs(mean_x[i]) > 5]
    ventricles = np.isin(lab, lateral)

    # Cerebellum: below the tentorium and behind the brainstem; tissue eroded by 1 voxel breaks the
    # thin links through the tentorium, the components holding seeds in both hemispheres are grown back.
    below = brain & (y < -30) & (z < 5) & ~((np.abs(x) < 12) & (y > -46))
    tissue = ndi.binary_erosion(below & (t1 > 0.62 * wm), iterations=1)
    lab, _ = ndi.label(tissue)
    seeds = {int(lab[_mni_index(t1.shape, (sx, -70, -35))]) for sx in (-20, 20)} - {0}
    cerebellum = ndi.binary_dilation(np.isin(lab, list(seeds)), iterations=2, mask=below)
    cerebellum = ndi.binary_fill_holes(cerebellum)

    # Frontal lobe: in front of a plane through the central sulcus (y=-26 at the vertex, y=0 at the
    # Sylvian level), above the orbits, temporal poles excluded.
    frontal = brain & (y > -8 - 0.3 * (z - 10)) & (z > -30) & ~((np.abs(x) > 25) & (z < -5) & (y < 25))
    frontal &= ~ventricles & ~cerebellum

    # Control: superior parietal brain, >= 15 mm from every group effect.
    control = brain & (y > -85) & (y < -50) & (z > 25) & ~ventricles & ~cerebellum & ~frontal
    return {"brain": brain, "ventricles": ventricles, "cerebellum": cerebellum, "frontal": frontal,
            "control": control}


def _mni_index(shape: tuple[int, ...], mm: tuple[float, float, float]) -> tuple[int, int, int]:
    inv = np.linalg.inv(mni152_brain().affine)
    return tuple(int(round(v)) for v in (inv[:3, :3] @ np.asarray(mm, float) + inv[:3, 3]))


@lru_cache(maxsize=None)
def _label_image() -> np.ndarray:
    masks = _region_masks()
    labels = np.zeros(masks["brain"].shape, np.uint8)
    labels[masks["brain"]] = _LABEL["other_brain"]
    # Later wins: ventricles are carved out of every other region.
    for name in ("control", "frontal", "cerebellum", "ventricles"):
        labels[masks[name] & masks["brain"]] = _LABEL[name]
    return labels


def _mask_image(data: np.ndarray) -> nib.Nifti1Image:
    return nib.Nifti1Image(data.astype(np.uint8), mni152_brain().affine)


def lateral_ventricles_mask() -> nib.Nifti1Image:
    """Lateral ventricles of the MNI152 2009a template (uint8, MNI 1 mm grid)."""
    return _mask_image(_label_image() == _LABEL["ventricles"])


def cerebellum_mask() -> nib.Nifti1Image:
    """Cerebellum (below the tentorium, without brainstem) in MNI space (uint8)."""
    return _mask_image(_label_image() == _LABEL["cerebellum"])


def frontal_mask() -> nib.Nifti1Image:
    """Frontal lobe (anterior to an approximate central-sulcus plane) in MNI space (uint8)."""
    return _mask_image(_label_image() == _LABEL["frontal"])


def control_mask() -> nib.Nifti1Image:
    """Superior parietal control region, untouched by the DS deformation (uint8)."""
    return _mask_image(_label_image() == _LABEL["control"])


def region_labels() -> nib.Nifti1Image:
    """All regions as one label image (values: :data:`REGION_LABELS`) on the MNI 1 mm grid."""
    return _mask_image(_reference().labels)


@lru_cache(maxsize=None)
def _reference() -> _Reference:
    mni = mni152_brain()
    affine = mni.affine
    t1 = np.asarray(mni.dataobj, dtype=np.float32)
    masks = _region_masks()
    brain = masks["brain"]
    levels = {
        "csf": float(np.median(t1[masks["ventricles"]])),
        "wm": float(np.percentile(t1[brain], 90)),
    }
    gm_band = t1[brain & (t1 > 0.55 * levels["wm"]) & (t1 < 0.9 * levels["wm"])]
    hist, edges = np.histogram(gm_band, bins=64)
    levels["gm"] = float(edges[np.argmax(hist)] + (edges[1] - edges[0]) / 2)

    # Colin27 onto the MNI grid (both 1 mm, axis-aligned; only the origin differs).
    head_img, colin_brain_img = colin27_head(), colin27_brain()
    offset = np.linalg.solve(affine, head_img.affine)[:3, 3]
    if not np.allclose(offset, np.round(offset)) or not np.allclose(head_img.affine[:3, :3], affine[:3, :3]):
        raise RuntimeError("Colin27 and MNI152 grids are not aligned 1 mm grids")
    o = np.round(offset).astype(int)
    colin = np.zeros(t1.shape, np.float32)
    colin_brain = np.zeros(t1.shape, bool)
    src = np.asarray(head_img.dataobj, dtype=np.float32)
    sl = tuple(slice(o[a], o[a] + src.shape[a]) for a in range(3))
    colin[sl] = src
    colin_brain[sl] = np.asarray(colin_brain_img.dataobj) > 0
    colin *= levels["wm"] / float(np.percentile(colin[colin_brain], 90))
    # Head = Colin27 above the background noise, enclosed dark parts (skull, sinuses) filled.
    head_mask = ndi.binary_fill_holes(ndi.binary_closing(colin > 0.2 * levels["wm"], iterations=2))
    head_mask = _largest_components(head_mask, 1)
    levels["fat"] = float(np.percentile(colin[head_mask & ~colin_brain], 99))

    head = np.where(head_mask, colin, 0).astype(np.float32)
    head[colin_brain & ~brain] = levels["csf"]            # Colin brain not covered by MNI brain
    rim = ndi.binary_dilation(brain, iterations=2) & ~brain
    head[rim] = np.minimum(head[rim], levels["csf"])      # CSF (or darker bone) around the brain
    head[brain] = t1[brain]

    # Region gradient fields on a 2 mm grid: grad(G_sigma * mask), scaled to max norm 1 so that a
    # coefficient is the largest boundary shift in mm.
    f = _REGION_GRID_MM
    grad_affine = affine.copy()
    grad_affine[:3, :3] *= f

    def block_mean(mask: np.ndarray) -> np.ndarray:
        padded = [math.ceil(n / f) * f for n in mask.shape]
        m = np.zeros(padded, np.float32)
        m[tuple(slice(0, n) for n in mask.shape)] = mask
        return m.reshape(padded[0] // f, f, padded[1] // f, f, padded[2] // f, f).mean(axis=(1, 3, 5))

    # Subject warp amplitude: full deep inside the brain (>= ~10 mm), reduced at the outline.
    deep = ndi.gaussian_filter((ndi.distance_transform_edt(block_mean(brain) > 0.5) * f > 10).astype(np.float32),
                               4.0 / f)
    warp_weight = (_SUBJECT_WARP_OUTLINE + (1 - _SUBJECT_WARP_OUTLINE) * deep).astype(np.float32)
    grads = {}
    for name, sigma in _REGION_SIGMA_MM.items():
        m = block_mean(masks[name])
        phi = ndi.gaussian_filter(m, sigma / f, mode="constant")
        g = np.stack(np.gradient(phi, float(f)))
        g /= float(np.sqrt((g ** 2).sum(axis=0)).max())
        grads[name] = g.astype(np.float32)
    grad_affine[:3, 3] += (f - 1) / 2 * np.diag(affine)[:3]  # a block's centre

    idx = np.argwhere(brain)
    box_vox = np.stack([idx.min(axis=0), idx.max(axis=0)])
    brain_box = box_vox * np.diag(affine)[:3] + affine[:3, 3]
    hidx = np.argwhere(head_mask[::2, ::2, ::2]) * 2
    head_centre = (hidx.min(axis=0) + hidx.max(axis=0)) / 2 * np.diag(affine)[:3] + affine[:3, 3]
    return _Reference(affine=affine, head=head, labels=_label_image(), levels=levels, grad_affine=grad_affine,
                      grads=grads, warp_weight=warp_weight, brain_box_mm=brain_box, head_centre_mm=head_centre)


def reference_head() -> nib.Nifti1Image:
    """The composite reference head (MNI152 brain in a Colin27 head), MNI units, MNI 1 mm grid."""
    ref = _reference()
    return nib.Nifti1Image(ref.head, ref.affine)


@lru_cache(maxsize=None)
def _site_head(site: str) -> np.ndarray:
    """Reference head in the site's contrast (WM = 1); piecewise linear, so one lookup per voxel."""
    ref = _reference()
    s = SITES[site]
    lv = ref.levels
    knots = [0.0, lv["csf"], lv["gm"], lv["wm"], lv["fat"], 2 * lv["fat"]]
    values = [0.0, s.contrast[0], s.contrast[1], s.contrast[2], s.contrast[3], s.contrast[3]]
    return np.interp(ref.head, knots, values).astype(np.float32)


@lru_cache(maxsize=4)
def _ds_field(ds_strength: float) -> np.ndarray:
    """DS local pull-back displacement (mm, (3, ...) on the 2 mm grid) = exp of the stationary velocity
    ``ds_strength * sum_r shift_r * grad(G * mask_r)`` by scaling and squaring, so it never folds."""
    ref = _reference()
    velocity = sum(float(ds_strength) * shift * ref.grads[name]
                   for name, shift in DS_EFFECTS["boundary_shift_mm"].items())
    steps = 6
    u = (velocity / 2.0 ** steps).astype(np.float32)
    index = np.indices(u.shape[1:], dtype=np.float32)
    spacing = float(ref.grad_affine[0, 0])
    for _ in range(steps):
        coords = index + u / spacing
        u = u + np.stack([ndi.map_coordinates(u[c], coords, order=1, mode="nearest") for c in range(3)])
    return u


def ds_displacement(ds_strength: float = 1.0) -> nib.Nifti1Image:
    """The DS local (nonlinear) pull-back displacement in mm, (x, y, z, 3) on the 2 mm MNI grid.

    The global DS size change is linear and not included.
    """
    ref = _reference()
    return nib.Nifti1Image(np.moveaxis(_ds_field(float(ds_strength)), 0, -1), ref.grad_affine)


def ds_jacobian(ds_strength: float = 1.0) -> nib.Nifti1Image:
    """Jacobian determinant of the DS local pull-back ``m = v + u(v)`` on the 2 mm MNI grid.

    < 1 where DS regions are larger (ventricles), > 1 where they are smaller, 1 elsewhere.
    """
    img = ds_displacement(ds_strength)
    u = np.moveaxis(np.asarray(img.dataobj), -1, 0).astype(np.float64)
    step = float(img.affine[0, 0])
    jac = np.empty((3, 3) + u.shape[1:])
    for a in range(3):
        for b, d in enumerate(np.gradient(u[a], step)):
            jac[a, b] = d + (a == b)
    det = np.linalg.det(np.moveaxis(jac, (0, 1), (-2, -1)))
    return nib.Nifti1Image(det.astype(np.float32), img.affine)


# --------------------------------------------------------------------------------------------------
# The plan: every scan, its group and covariates (cheap, no image work)
# --------------------------------------------------------------------------------------------------

def _rng(seed: int, *keys: object) -> np.random.Generator:
    """A generator that depends only on the seed and the keys (stable across processes, runs and n_jobs)."""
    words = [int.from_bytes(hashlib.sha256(repr(k).encode()).digest()[:8], "little") for k in keys]
    return np.random.default_rng([int(seed), *words])


def _check_plan_args(n_subjects: int, seed: int, ds_fraction: float, sites: tuple[str, ...] | list[str],
                     session_fraction: float) -> tuple[str, ...]:
    if isinstance(n_subjects, bool) or not isinstance(n_subjects, (int, np.integer)) or n_subjects < 1:
        raise ConfigError(f"subjects: must be an integer >= 1 (got {n_subjects!r})")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed: must be an integer >= 0 (got {seed!r})")
    if not (isinstance(ds_fraction, (int, float)) and 0.0 <= ds_fraction <= 1.0):
        raise ConfigError(f"ds_fraction: must be a number in [0, 1] (got {ds_fraction!r})")
    if not (isinstance(session_fraction, (int, float)) and 0.0 <= session_fraction <= 1.0):
        raise ConfigError(f"session_fraction: must be a number in [0, 1] (got {session_fraction!r})")
    if isinstance(sites, str):
        sites = (sites,)
    sites = tuple(sites)
    if not sites or len(set(sites)) != len(sites):
        raise ConfigError(f"sites: must be a non-empty list of distinct site names (got {sites!r})")
    unknown = [s for s in sites if s not in SITES]
    if unknown:
        raise ConfigError(f"sites: unknown demo site(s) {unknown}; available: {sorted(SITES)}")
    return sites


def plan_cohort(n_subjects: int, seed: int, ds_fraction: float = 0.4, sites: tuple[str, ...] = ("IXI", "HCP"),
                session_fraction: float = 0.1) -> list[dict[str, Any]]:
    """Every scan of the cohort, without any image work; deterministic in its arguments.

    Subjects are dealt to the sites in turn; within each site a ``ds_fraction`` share (at least one and
    at least one euploid, when the site has two subjects or more) is DS, so group and site are not
    confounded. ``round(session_fraction * n_subjects)`` subjects (at least one when
    ``session_fraction > 0`` and there are two subjects or more) have ``ses-1`` and ``ses-2``; the
    others have no session level. One dict per scan with keys ``dataset, subject, session, run,
    group, age, sex, path`` (path relative to the output folder).
    """
    sites = _check_plan_args(n_subjects, seed, ds_fraction, sites, session_fraction)
    n = int(n_subjects)
    n_two = 0 if session_fraction <= 0 or n < 2 else max(1, int(round(session_fraction * n)))
    two_sessions = set(_rng(seed, "sessions").permutation(n)[:n_two].tolist())
    width = max(3, len(str(math.ceil(n / len(sites)))))
    records = []
    for site_index, site in enumerate(sites):
        members = list(range(site_index, n, len(sites)))  # global subject indices of this site
        k = len(members)
        rng = _rng(seed, "plan", site)
        n_ds = int(round(ds_fraction * k))
        if 0 < ds_fraction < 1 and k >= 2:
            n_ds = min(max(n_ds, 1), k - 1)
        ds_members = set(rng.permutation(k)[:n_ds].tolist())
        for number, global_index in enumerate(members, start=1):
            group = "DS" if number - 1 in ds_members else "euploid"
            low, high = _DS_AGE if group == "DS" else SITES[site].euploid_age
            age = int(rng.integers(low, high + 1))
            sex = "F" if rng.random() < 0.5 else "M"
            subject = f"{SITES[site].prefix}{number:0{width}d}"
            for session in (("1", "2") if global_index in two_sessions else (None,)):
                path = f"{site}/{scan_dir(subject, session)}/{scan_key(subject, session)}_T1w.nii.gz"
                records.append({"dataset": site, "subject": subject, "session": session, "run": None,
                                "group": group, "age": age, "sex": sex, "path": path})
    return records


def truth_paths(record: dict[str, Any]) -> dict[str, str]:
    """Ground-truth files of one planned scan, relative to the output folder (outside every BIDS root)."""
    sub, ses = record["subject"], record.get("session")
    stem = f"truth/{record['dataset']}/{scan_dir(sub, ses)}/{scan_key(sub, ses)}"
    return {
        "truth": f"{stem}_truth.json",
        "biasfield": f"{stem}_desc-biasfield_truth.nii.gz",
        "brain_mask": f"{stem}_desc-brain_mask.nii.gz",
        "regions": f"{stem}_desc-regions_dseg.nii.gz",
    }


# --------------------------------------------------------------------------------------------------
# One scan
# --------------------------------------------------------------------------------------------------

def _rotation(angles_deg: np.ndarray) -> np.ndarray:
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _homogeneous(linear: np.ndarray, translation: np.ndarray | None = None) -> np.ndarray:
    out = np.eye(4)
    out[:3, :3] = linear
    if translation is not None:
        out[:3, 3] = translation
    return out


def _site_grid(site: Site, fov_centre: np.ndarray) -> np.ndarray:
    """Voxel -> scanner mm of the site's grid, its centre voxel at ``fov_centre``."""
    ornt = nib.orientations.axcodes2ornt(site.axcodes)
    linear = np.zeros((3, 3))
    for axis, (world, flip) in enumerate(ornt):
        linear[int(world), axis] = flip * site.zooms[axis]
    centre_index = (np.asarray(site.shape, float) - 1) / 2
    return _homogeneous(linear, fov_centre - linear @ centre_index)


@dataclass
class _Scan:
    """The exact native -> MNI mapping of one scan and its acquisition parameters."""

    record: dict[str, Any]
    site: Site
    grid: np.ndarray                 # native voxel -> scanner mm
    scanner_to_t: np.ndarray         # scanner mm -> MNI mm, pose and global sizes only
    lattice: np.ndarray              # (3, ...) subject displacement at lattice nodes (mm)
    lattice_origin: np.ndarray
    ds_strength: float               # DS local deformation strength (0 for euploid subjects)
    ventricle_shift: float           # subject's own ventricle boundary shift (mm)
    bias_lattice: np.ndarray
    gain: float
    rng: np.random.Generator         # continues into the noise
    params: dict[str, Any]


def _lattice_shape(ref: _Reference) -> tuple[np.ndarray, tuple[int, int, int]]:
    # covers the head with one node of margin on each side
    lo = ref.affine[:3, 3] - _SUBJECT_WARP_SPACING_MM
    hi = ref.affine[:3, 3] + (np.asarray(ref.head.shape) - 1) + _SUBJECT_WARP_SPACING_MM
    shape = tuple(int(v) for v in np.ceil((hi - lo) / _SUBJECT_WARP_SPACING_MM) + 1)
    return lo, shape


def _make_scan(record: dict[str, Any], seed: int, ds_strength: float) -> _Scan:
    ref = _reference()
    site = SITES[record["dataset"]]
    is_ds = record["group"] == "DS"

    # Anatomy: drawn from (seed, subject) only; group and ds_strength act deterministically on top.
    anat = _rng(seed, "anatomy", record["dataset"], record["subject"])
    log_scale = anat.normal(_SUBJECT_MEAN_LOG_SCALE, _SUBJECT_LOG_SCALE_SD, 3)
    shear = anat.normal(0.0, _SUBJECT_SHEAR_SD, 3)
    lattice_origin, lattice_shape = _lattice_shape(ref)
    lattice = anat.normal(0.0, _SUBJECT_WARP_SD_MM, (3, *lattice_shape)).astype(np.float32)
    ventricle_shift = float(np.clip(anat.normal(0.0, _SUBJECT_VENTRICLE_SD_MM), -2 * _SUBJECT_VENTRICLE_SD_MM,
                                    2 * _SUBJECT_VENTRICLE_SD_MM))

    # Acquisition: drawn from (seed, subject, session), so a second session is a new scan of the same head.
    acq = _rng(seed, "scan", record["dataset"], record["subject"], record.get("session") or "")
    angles = acq.uniform(-_MAX_ROTATION_DEG, _MAX_ROTATION_DEG, 3)
    translation = acq.uniform(-_MAX_TRANSLATION_MM, _MAX_TRANSLATION_MM, 3)
    fov_offset = acq.uniform(-_MAX_FOV_OFFSET_MM, _MAX_FOV_OFFSET_MM, 3)
    gain = float(acq.uniform(0.9, 1.1))
    bias_lattice = acq.normal(0.0, site.bias_log_sd, (_BIAS_LATTICE,) * 3)

    ds_scale = np.asarray(DS_EFFECTS["global_scale"], float) ** (ds_strength if is_ds else 0.0)
    shear_matrix = np.array([[1.0, shear[0], shear[1]], [0.0, 1.0, shear[2]], [0.0, 0.0, 1.0]])
    size = np.diag(ds_scale) @ np.diag(np.exp(log_scale)) @ shear_matrix  # subject = centre + size @ (t - centre)
    centre = ref.brain_box_mm.mean(axis=0)
    t_to_s = _homogeneous(np.eye(3), centre) @ _homogeneous(size) @ _homogeneous(np.eye(3), -centre)
    rotation = _rotation(angles)
    s_to_x = _homogeneous(rotation, translation)
    t_to_x = s_to_x @ t_to_s
    fov_centre = (t_to_x @ np.append(ref.head_centre_mm, 1.0))[:3] + fov_offset
    grid = _site_grid(site, fov_centre)

    params = {
        "pose": {"rotation_deg": angles.tolist(), "translation_mm": translation.tolist(),
                 "rotation_matrix": rotation.tolist(), "fov_offset_mm": fov_offset.tolist(),
                 "convention": "scanner_mm = R @ head_mm + t; rotation R = Rz @ Ry @ Rx"},
        "subject_log_scale": log_scale.tolist(),
        "subject_shear": shear.tolist(),
        "ds_global_scale": ds_scale.tolist(),
        "size_matrix": size.tolist(),
        "ds_local_strength": ds_strength if is_ds else 0.0,
        "ds_boundary_shift_mm": {name: (ds_strength * shift if is_ds else 0.0)
                                 for name, shift in DS_EFFECTS["boundary_shift_mm"].items()},
        "subject_ventricle_shift_mm": ventricle_shift,
        "gain": gain,
    }
    return _Scan(record=record, site=site, grid=grid, scanner_to_t=np.linalg.inv(t_to_x), lattice=lattice,
                 lattice_origin=lattice_origin, ds_strength=ds_strength if is_ds else 0.0,
                 ventricle_shift=ventricle_shift, bias_lattice=bias_lattice, gain=gain,
                 rng=acq, params=params)


def _steps(site: Site) -> tuple[int, int, int]:
    """Coarse-grid step (voxels) per native axis; axis 0 (fastest on disk) must divide the matrix."""
    steps = [max(1, int(round(_COARSE_STEP_MM / z))) for z in site.zooms]
    while site.shape[0] % steps[0]:
        steps[0] -= 1
    return tuple(steps)


def _coarse_nodes(n: int, step: int) -> np.ndarray:
    # one node past the end so that every voxel has a right-hand node
    return np.arange((n - 1) // step + 2, dtype=np.float64) * step


class _Upsampler:
    """Separable linear upsampling of coarse-node values to full native slabs (reversed axis order).

    Exact for affine functions, so the affine part of the mapping is reproduced exactly. The volume
    is produced slab by slab along the slowest axis so that every intermediate stays in cache; the
    last (contiguous) axis is a single broadcast multiply-add straight into the output.
    """

    def __init__(self, steps_rev: tuple[int, int, int], shape_rev: tuple[int, int, int]):
        self.steps, self.shape = steps_rev, shape_rev
        i = np.arange(shape_rev[1])
        self.q1 = i // steps_rev[1]
        self.w1 = ((i % steps_rev[1]) / steps_rev[1]).astype(np.float32)[:, None]
        self.w2 = (np.arange(steps_rev[2]) / steps_rev[2]).astype(np.float32)
        if shape_rev[2] % steps_rev[2]:
            raise ValueError("the contiguous axis must be a multiple of its coarse step")

    def slabs(self) -> list[slice]:
        f0 = self.steps[0]
        return [slice(a, min(a + f0, self.shape[0])) for a in range(0, self.shape[0], f0)]

    def __call__(self, coarse: np.ndarray, slab: slice, out: np.ndarray) -> np.ndarray:
        """coarse: (..., nc0, nc1, nc2) nodes; out: (..., len(slab), n1, n2)."""
        f0 = self.steps[0]
        q = slab.start // f0
        w0 = ((np.arange(slab.start, slab.stop) - q * f0) / f0).astype(np.float32)[:, None, None]
        rows = coarse[..., q, None, :, :] * (1 - w0) + coarse[..., q + 1, None, :, :] * w0
        a0 = rows[..., self.q1, :]
        rows = a0 + (rows[..., self.q1 + 1, :] - a0) * self.w1
        f2 = self.steps[2]
        out4 = out.view()
        out4.shape = (*out.shape[:-1], self.shape[2] // f2, f2)  # a view, never a silent copy
        np.multiply((rows[..., 1:] - rows[..., :-1])[..., None], self.w2, out=out4)
        out4 += rows[..., :-1, None]
        return out


def _map_coarse(scan: _Scan, ref: _Reference) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact MNI mm of the coarse native nodes: returns (MNI mm (3, *rev), scanner mm (3, *rev), axes)."""
    steps = _steps(scan.site)
    axes = [_coarse_nodes(n, f) for n, f in zip(scan.site.shape, steps)]
    # reversed layout (k, j, i): native axis 0 is the last, contiguous axis
    grids = [axes[a].reshape([-1 if b == 2 - a else 1 for b in range(3)]) for a in range(3)]
    scanner = np.stack([scan.grid[r, 0] * grids[0] + scan.grid[r, 1] * grids[1] + scan.grid[r, 2] * grids[2]
                        + scan.grid[r, 3] for r in range(3)])
    a = scan.scanner_to_t
    t = np.einsum("rc,c...->r...", a[:3, :3], scanner) + a[:3, 3].reshape(3, 1, 1, 1)
    # subject random warp (interpolating cubic spline through the lattice values)
    lattice_coords = (t - scan.lattice_origin.reshape(3, 1, 1, 1)) / _SUBJECT_WARP_SPACING_MM
    inv = np.linalg.inv(ref.grad_affine)
    weight = ndi.map_coordinates(ref.warp_weight, np.einsum("rc,c...->r...", inv[:3, :3], t)
                                 + inv[:3, 3].reshape(3, 1, 1, 1), order=1, mode="nearest")
    v = t + weight * np.stack([ndi.map_coordinates(scan.lattice[c], lattice_coords, order=3, mode="nearest")
                               for c in range(3)])
    # the subject's own ventricle size (small, linear), then the DS local deformation (diffeomorphic)
    def lookup(field: np.ndarray, points: np.ndarray) -> np.ndarray:
        grid = np.einsum("rc,c...->r...", inv[:3, :3], points) + inv[:3, 3].reshape(3, 1, 1, 1)
        return np.stack([ndi.map_coordinates(field[c], grid, order=1, mode="constant") for c in range(3)])

    m = v + scan.ventricle_shift * lookup(ref.grads["ventricles"], v) if scan.ventricle_shift else v
    if scan.ds_strength:
        m = m + lookup(_ds_field(scan.ds_strength), m)
    return m, scanner, axes


class _Volume:
    """Trilinear / nearest lookups in a 3D volume, zero outside (scipy's ``mode="grid-constant"``).

    numpy gathers on cache-sized slabs are ~2x faster than ``ndimage.map_coordinates(order=1)`` and
    ~6x faster for nearest neighbour, and give the same values (tested).
    """

    def __init__(self, data: np.ndarray):
        self.shape = data.shape
        padded = np.zeros([n + 3 for n in data.shape], data.dtype)  # 1 voxel before, 2 after
        padded[1:-2, 1:-2, 1:-2] = data
        self.flat = padded.ravel()
        self.strides = [st // padded.itemsize for st in padded.strides]
        self.upper = [np.float32(n + 1) for n in data.shape]

    def _index(self, coords: np.ndarray, shift: float) -> tuple[np.ndarray, list[np.ndarray]]:
        index = np.zeros(coords.shape[1:], np.intp)
        fractions = []
        floor = np.empty(coords.shape[1:], np.float32)
        for a in range(3):
            x = coords[a] + np.float32(1 + shift)  # padded index
            np.clip(x, 0, self.upper[a], out=x)
            np.floor(x, out=floor)
            fractions.append(np.subtract(x, floor, out=x))
            if self.strides[a] != 1:
                floor *= self.strides[a]
            index += floor.astype(np.intp)
        return index, fractions

    def nearest(self, coords: np.ndarray) -> np.ndarray:
        index, _ = self._index(coords, 0.5)
        return self.flat.take(index)

    def linear(self, coords: np.ndarray) -> np.ndarray:
        index, (w0, w1, w2) = self._index(coords, 0.0)
        s0, s1 = self.strides[0], self.strides[1]
        rows = []
        for offset in (0, s1, s0, s0 + s1):
            a = self.flat.take(index + offset)
            b = self.flat.take(index + (offset + 1))
            b -= a
            b *= w2
            b += a
            rows.append(b)
        for lo, hi, w in ((0, 1, w1), (2, 3, w1)):
            rows[hi] -= rows[lo]
            rows[hi] *= w
            rows[lo] += rows[hi]
        rows[2] -= rows[0]
        rows[2] *= w0
        rows[0] += rows[2]
        return rows[0]


@lru_cache(maxsize=8)
def _permuted(name: str, perm: tuple[int, int, int]) -> _Volume:
    """A reference volume with axes permuted so that the native contiguous axis walks contiguous memory."""
    data = _reference().labels if name == "labels" else _site_head(name)
    return _Volume(np.ascontiguousarray(data.transpose(perm)))


def _simulate(record: dict[str, Any], seed: int, ds_strength: float, images: bool = True,
              timings: dict[str, float] | None = None) -> dict[str, Any]:
    """Simulate one scan. Returns arrays in NIfTI (i, j, k) order and the truth dictionary.

    With ``images=False`` only the geometry and the native label map are computed (for tests).
    """
    clock = time.perf_counter()

    def tick(name: str) -> None:
        nonlocal clock
        if timings is not None:
            now = time.perf_counter()
            timings[name] = timings.get(name, 0.0) + now - clock
            clock = now

    ref = _reference()
    scan = _make_scan(record, seed, ds_strength)
    site = scan.site
    m_coarse, scanner_coarse, axes = _map_coarse(scan, ref)
    to_vox = np.linalg.inv(ref.affine)
    vox_coarse = np.einsum("rc,c...->r...", to_vox[:3, :3], m_coarse) + to_vox[:3, 3].reshape(3, 1, 1, 1)

    # Truth affine: least squares over the brain nodes (what a perfect affine registration finds).
    in_brain = ndi.map_coordinates(ref.labels, vox_coarse, order=0, mode="constant") > 0
    x = np.concatenate([scanner_coarse[:, in_brain].T, np.ones((int(in_brain.sum()), 1))], axis=1)
    y = m_coarse[:, in_brain].T
    solution, *_ = np.linalg.lstsq(x, y, rcond=None)
    fitted = np.eye(4)
    fitted[:3, :] = solution.T
    residual = float(np.sqrt(np.mean(np.sum((x @ solution - y) ** 2, axis=1))))

    # Template axes in the order of the native (reversed) axes: template axis perm[b] is closest to
    # native reversed axis b, so the reference volumes are looked up in that layout.
    direction = scan.scanner_to_t[:3, :3] @ scan.grid[:3, :3]
    perm: list[int] = []
    for native_axis in (2, 1, 0):
        order = np.argsort(-np.abs(direction[:, native_axis]))
        perm.append(int(next(a for a in order if a not in perm)))
    perm_t = tuple(perm)
    vox_coarse = vox_coarse[list(perm_t)].astype(np.float32)

    # Labels only where the brain can be: the native box of the coarse nodes near the MNI brain box.
    box = np.stack([np.linalg.solve(ref.affine, np.append(p, 1.0))[:3] for p in ref.brain_box_mm])[:, list(perm_t)]
    near = np.all((vox_coarse >= (box[0] - 4).reshape(3, 1, 1, 1)) & (vox_coarse <= (box[1] + 4).reshape(3, 1, 1, 1)),
                  axis=0)
    shape_rev = site.shape[::-1]
    crop = [slice(0, 0)] * 3
    if near.any():
        for axis_rev in range(3):
            nodes = axes[2 - axis_rev]
            hit = np.nonzero(near.any(axis=tuple(b for b in range(3) if b != axis_rev)))[0]
            lo = int(nodes[max(hit[0] - 1, 0)])
            hi = int(min(nodes[min(hit[-1] + 1, len(nodes) - 1)], shape_rev[axis_rev] - 1))
            crop[axis_rev] = slice(lo, hi + 1)
    tick("geometry")

    labels = np.zeros(shape_rev, np.uint8)
    upsample = _Upsampler(_steps(site)[::-1], shape_rev)
    labels_ref = _permuted("labels", perm_t)
    if images:
        head_ref = _permuted(site.name, perm_t)
        bias_axes = [axes[2 - b] / (site.shape[2 - b] - 1) * (_BIAS_LATTICE - 1) for b in range(3)]
        bias_coords = np.stack(np.broadcast_arrays(
            *[bias_axes[b].reshape([-1 if c == b else 1 for c in range(3)]) for b in range(3)]))
        # bias: smooth in scanner space (a coil property), geometric mean 1 over the brain
        log_bias = ndi.map_coordinates(scan.bias_lattice.transpose(2, 1, 0), bias_coords, order=3, mode="nearest")
        log_bias -= log_bias[in_brain].mean() if in_brain.any() else log_bias.mean()
        bias_coarse = np.exp(log_bias).astype(np.float32)
        bias = np.empty(shape_rev, np.float32)
        t1w = np.empty(shape_rev, np.int16)
        scale = site.wm_counts * scan.gain
        sigma = np.float32(site.noise)  # relative to WM; the scale is applied last
    coords = np.empty((3, upsample.steps[0], *shape_rev[1:]), np.float32)
    for slab in upsample.slabs():
        c = upsample(vox_coarse, slab, coords[:, : slab.stop - slab.start])
        if crop[0].start < slab.stop and slab.start < crop[0].stop:
            a, b = max(slab.start, crop[0].start), min(slab.stop, crop[0].stop)
            labels[a:b, crop[1], crop[2]] = labels_ref.nearest(c[:, a - slab.start:b - slab.start, crop[1], crop[2]])
        if not images:
            continue
        # Rician noise: |S * bias + N(0, s) + i N(0, s)|
        signal = head_ref.linear(c)
        signal *= upsample(bias_coarse, slab, bias[slab])
        real = scan.rng.standard_normal(signal.shape, dtype=np.float32)
        real *= sigma
        real += signal
        imag = scan.rng.standard_normal(signal.shape, dtype=np.float32)
        imag *= sigma
        np.hypot(real, imag, out=real)
        real *= np.float32(scale)
        real += np.float32(0.5)  # non-negative, so truncation below rounds
        np.copyto(t1w[slab], real, casting="unsafe")
    tick("images" if images else "labels")

    counts = np.bincount(labels[tuple(crop)].ravel(), minlength=len(REGION_LABELS))
    voxel_ml = float(np.prod(site.zooms)) / 1000.0
    volumes = {name: float(counts[value]) * voxel_ml for value, name in REGION_LABELS.items() if value > 0}
    volumes["brain"] = float(counts[1:].sum()) * voxel_ml  # every labelled voxel is brain (the true mask)

    truth = {
        "dataset": record["dataset"], "site": record["dataset"], "subject": record["subject"],
        "session": record.get("session"), "run": record.get("run"), "group": record["group"],
        "seed": int(seed), "ds_strength": float(ds_strength),
        "native_to_mni_affine": fitted.tolist(),
        "native_to_mni_affine_linear": scan.scanner_to_t.tolist(),
        "affine_fit_residual_rms_mm": residual,
        "mni_space": MNI_SPACE,
        "native_voxel_to_scanner": scan.grid.tolist(),
        "native_shape": list(site.shape), "voxel_size_mm": list(site.zooms), "axcodes": "".join(site.axcodes),
        **scan.params,
        "region_volumes_ml": volumes,
        "region_labels": {str(k): v for k, v in REGION_LABELS.items()},
    }
    result: dict[str, Any] = {"truth": truth, "labels": labels.T, "grid": scan.grid}
    if images:
        truth["noise_sigma"] = float(sigma * scale)
        truth["intensity_scale"] = float(scale)
        result.update(t1w=t1w.T, bias=bias.T)
    return result


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------

_GENERATOR = "brainvae demo_cohort"
_BIAS_SLOPE = 2.0 ** -10  # bias stored as int16 * 2^-10: 0.001 resolution (compresses 3x better than 2^-12)


def _save_nifti(data: np.ndarray, affine: np.ndarray, path: Path, description: str = "",
                slope: float | None = None, strategy: int = zlib.Z_DEFAULT_STRATEGY) -> None:
    """NIfTI-1, gzip (level 1, zero timestamp, so a seed always gives the same bytes).

    ``slope``: store float data as rint(data / slope) in int16 with that scl_slope (nibabel would pick
    its own scaling, which changes with the data range). ``strategy``: zlib strategy; Huffman-only
    is as good as LZ77 on noisy images and ~1.5x faster, RLE is best for masks.
    """
    if slope is not None:
        data = np.rint(data / np.float32(slope)).astype(np.int16)
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    img.header["descrip"] = description.encode()[:79]
    raw = img.to_bytes()
    if slope is not None:
        header = nib.Nifti1Header.from_fileobj(io.BytesIO(raw[:348]))
        header["scl_slope"], header["scl_inter"] = slope, 0.0
        raw = header.binaryblock + raw[348:]
    compressor = zlib.compressobj(1, zlib.DEFLATED, 31, 9, strategy)  # wbits=31: gzip wrapper, mtime 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(compressor.compress(raw))
        handle.write(compressor.flush())


def _write_json(path: Path, content: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=2) + "\n")


def generate_scan(record: dict[str, Any], out_dir: str | Path, seed: int, ds_strength: float = 1.0,
                  timings: dict[str, float] | None = None) -> dict[str, Any]:
    """Write one planned scan (T1w, sidecar, truth files); returns its truth dictionary."""
    out = Path(out_dir)
    result = _simulate(record, seed, ds_strength, timings=timings)
    clock = time.perf_counter()
    truth, grid = result["truth"], result["grid"]
    site = SITES[record["dataset"]]
    t1w_path = out / record["path"]
    _save_nifti(result["t1w"], grid, t1w_path, description=f"{_GENERATOR} synthetic T1w",
                strategy=zlib.Z_HUFFMAN_ONLY)
    _write_json(t1w_path.with_name(t1w_path.name.replace(".nii.gz", ".json")), dict(site.sidecar))
    files = truth_paths(record)
    _save_nifti(result["bias"], grid, out / files["biasfield"], description="true multiplicative bias field",
                slope=_BIAS_SLOPE)
    labels = result["labels"]
    _save_nifti((labels > 0).astype(np.uint8), grid, out / files["brain_mask"], description="true brain mask",
                strategy=zlib.Z_RLE)
    _save_nifti(labels, grid, out / files["regions"], description="true regions, see truth json",
                strategy=zlib.Z_RLE)
    truth["files"] = {"t1w": record["path"], **files}
    _write_json(out / files["truth"], truth)
    if timings is not None:
        timings["write"] = timings.get("write", 0.0) + time.perf_counter() - clock
    return truth


def _generate_job(args: tuple[dict[str, Any], str, int, float]) -> str:
    record, out_dir, seed, ds_strength = args
    generate_scan(record, out_dir, seed, ds_strength)
    return record["path"]


def _prepare_site_root(root: Path) -> None:
    """Create a site root, or empty the subject folders of one this generator wrote before."""
    description = root / "dataset_description.json"
    # Folders without files are fine: Snakemake creates the output folders before the job runs.
    if root.exists() and any(path.is_file() or path.is_symlink() for path in root.rglob("*")):
        try:
            ours = json.loads(description.read_text())["GeneratedBy"][0]["Name"] == _GENERATOR
        except (OSError, ValueError, KeyError, IndexError, TypeError):
            ours = False
        if not ours:
            raise ConfigError(f"demo output: {root} exists and was not written by the demo generator; "
                              "refusing to overwrite it")
        for child in root.glob("sub-*"):
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    root.mkdir(parents=True, exist_ok=True)
    # Claim the folder before the first scan is written, so a run killed half-way leaves a folder
    # the next run recognises as its own (the full description is written at the end).
    _write_json(description, {"Name": "brainvae synthetic demo cohort (incomplete)", "BIDSVersion": "1.10.0",
                              "GeneratedBy": [{"Name": _GENERATOR, "Version": __version__}]})


def _write_site_metadata(out: Path, site: str, records: list[dict[str, Any]], n_subjects: int, seed: int,
                         ds_strength: float, ds_fraction: float) -> None:
    root = out / site
    _write_json(root / "dataset_description.json", {
        "Name": f"brainvae synthetic demo cohort, site {site}",
        "BIDSVersion": "1.10.0",
        "DatasetType": "raw",
        "License": "Derived from the MNI152 2009a and Colin27 templates; see their licences",
        "GeneratedBy": [{"Name": _GENERATOR, "Version": __version__,
                         "Description": f"subjects={n_subjects} seed={seed} ds_strength={ds_strength} "
                                        f"ds_fraction={ds_fraction}; ground truth in ../truth"}],
    })
    rows = {}
    for r in records:
        rows.setdefault(r["subject"], r)
    lines = ["participant_id\tgroup\tage\tsex"]
    lines += [f"sub-{s}\t{r['group']}\t{r['age']}\t{r['sex']}" for s, r in sorted(rows.items())]
    (root / "participants.tsv").write_text("\n".join(lines) + "\n")
    _write_json(root / "participants.json", {
        "group": {"Description": "simulated group", "Levels": {"euploid": "typical brain morphology",
                                                               "DS": "Down-syndrome-like morphology"}},
        "age": {"Description": "age at first scan", "Units": "year"},
        "sex": {"Description": "sex", "Levels": {"F": "female", "M": "male"}},
    })
    (root / "README").write_text(
        f"Synthetic T1w scans (site {site}) generated by brainvae.demo_cohort from the MNI152 2009a brain in a\n"
        "Colin27 head. Not real data. Ground truth (affines, bias fields, brain masks, region volumes) lies\n"
        "in ../truth, outside this BIDS root.\n")


def generate_cohort(out_dir: str | Path, n_subjects: int, seed: int, ds_strength: float = 1.0,
                    ds_fraction: float = 0.4, sites: tuple[str, ...] = ("IXI", "HCP"), n_jobs: int = 1,
                    session_fraction: float = 0.1) -> list[dict[str, Any]]:
    """Write the whole cohort under ``out_dir`` and return the plan (see :func:`plan_cohort`).

    ``out_dir/<site>/`` is one BIDS root per site; ``out_dir/truth/`` holds the ground truth. The bytes
    depend only on the arguments (not on ``n_jobs``).
    """
    plan = plan_cohort(n_subjects, seed, ds_fraction=ds_fraction, sites=sites, session_fraction=session_fraction)
    if not (isinstance(ds_strength, (int, float)) and math.isfinite(ds_strength) and 0.0 <= ds_strength <= 3.0):
        raise ConfigError(f"ds_strength: must be a number in [0, 3] (got {ds_strength!r})")
    if isinstance(n_jobs, bool) or not isinstance(n_jobs, int) or n_jobs < 1:
        raise ConfigError(f"n_jobs: must be an integer >= 1 (got {n_jobs!r})")
    sites = tuple([sites] if isinstance(sites, str) else sites)
    out = Path(out_dir)
    for site in sites:
        _prepare_site_root(out / site)
        truth_root = out / "truth" / site
        if truth_root.exists():
            shutil.rmtree(truth_root)
        _write_site_metadata(out, site, [r for r in plan if r["dataset"] == site], n_subjects, seed,
                             ds_strength, ds_fraction)
    ref = _reference()
    _save_nifti(ref.labels, ref.affine, out / "truth" / f"space-{MNI_SPACE}_desc-regions_dseg.nii.gz",
                description="demo regions in MNI space", strategy=zlib.Z_RLE)
    (out / "truth" / "desc-regions_dseg.tsv").write_text(
        "index\tname\n" + "".join(f"{k}\t{v}\n" for k, v in REGION_LABELS.items()))
    _write_json(out / "truth" / "cohort.json", {
        "generator": _GENERATOR, "version": __version__, "subjects": int(n_subjects), "seed": int(seed),
        "ds_strength": float(ds_strength), "ds_fraction": float(ds_fraction), "sites": list(sites),
        "session_fraction": float(session_fraction), "ds_effects": DS_EFFECTS, "mni_space": MNI_SPACE,
        "scans": [{**r, "truth": truth_paths(r)["truth"]} for r in plan],
    })

    jobs = [(r, str(out), int(seed), float(ds_strength)) for r in plan]
    if n_jobs > 1 and len(jobs) > 1:
        for site in sites:  # built once here and inherited by the forked workers
            _site_head(site)
        if ds_strength and any(r["group"] == "DS" for r in plan):
            _ds_field(float(ds_strength))
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else None)
        with ProcessPoolExecutor(max_workers=min(n_jobs, len(jobs)), mp_context=context) as pool:
            list(pool.map(_generate_job, jobs))
    else:
        for job in jobs:
            _generate_job(job)
    return [dict(r) for r in plan]
