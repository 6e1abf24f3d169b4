"""Individual anatomy of a synthetic subject: who they are (sex, age, group, AD stage) and random draws ->
how the reference brain is deformed to make theirs.

Two parts, both pull-backs (for a point of the subject's brain, the reference point it shows):

1. **Global size** ``t = centre + S @ (x - centre)``: per-axis log-normal scales with a common factor (so
   intracranial volume varies with CV ~10 %, as in adult cohorts), males ~10 % larger in volume, small
   shears, and for DS a smaller, shorter-AP (brachycephalic) head. Affine registration removes it, so it
   reaches the analysis through the intracranial volume (``icv_ml``), not the registered image.
2. **Local shape** ``m = v + u(v)`` after the random lattice warp ``v = t + w(t)``: ``u`` is the exponential
   (scaling and squaring, so it never folds) of the stationary velocity ``sum_r c_r * grad(G * mask_r)``; a
   coefficient ``c_r`` (mm) moves region r's boundary along its normal, enlarging (> 0) or shrinking (< 0)
   it. Regions: ventricles, cerebellum, frontal lobe and the brain outline (cortical atrophy). Each
   coefficient is a subject's random draw plus the literature's effects of age (after 40: ventricles
   enlarge, the brain shrinks by ~0.2-0.5 % a year), DS morphology (larger ventricles, smaller cerebellum
   and frontal lobe) and DS-AD stage (extra atrophy), see :data:`POPULATION`, :data:`DS_EFFECTS`,
   :data:`AD_EFFECTS`.

The random draws depend on (seed, dataset, subject) only, never on group or ``ds_strength``; every group
effect is deterministic on top and scales with ``ds_strength``, so a DS subject at ``ds_strength=0`` is
bit-identical to its euploid counterpart of the same age.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from ..templates import mni152_brain, mni152_brain_mask
from .reference import reference

__all__ = ["AD_EFFECTS", "AD_STAGES", "DS_EFFECTS", "LOCAL_REGIONS", "POPULATION", "SubjectAnatomy",
           "ds_displacement", "ds_jacobian", "local_field", "rng", "subject_anatomy"]

#: Regions whose boundary a subject's local deformation moves (keys of the reference's gradient fields).
LOCAL_REGIONS = ("ventricles", "cerebellum", "frontal", "brain")

#: Population model shared by every group (sizes in log units per axis, shifts in mm).
POPULATION: dict[str, Any] = {
    # The MNI152 brain (~1,970 mL in its mask) is larger than a typical adult brain; 0.9 per axis gives
    # ~1,440 mL, a plausible adult intracranial volume.
    "mean_log_scale": float(np.log(0.9)),
    # Common factor sd 0.028 and per-axis sd 0.015 on log size: volume sd = sqrt(9 * 0.028^2 + 3 * 0.015^2)
    # = 0.088 within sex; with the sex difference below, intracranial volume CV ~10 % (adult cohorts: 9-11 %).
    "common_log_scale_sd": 0.028,
    "axis_log_scale_sd": 0.015,
    # Males: +0.032 per axis = +10 % intracranial volume (Ritchie et al. 2018: 8-12 %).
    "male_log_scale": 0.032,
    "shear_sd": 0.01,
    # Random nonlinear displacement at each node of a 30 mm lattice, deep in the brain (lobar shape).
    "warp_sd_mm": 1.5,
    "warp_spacing_mm": 30.0,
    # Random boundary shifts (mm) of each region: ventricle size varies several-fold between adults.
    # A ventricle shift of 1 mm changes the lateral ventricles by ~4 mL (16 mL at 0 on the template grid), the
    # outline's 1 mm the brain by ~70 mL (3.6 %): benchmarks/calibrate_ds_strength.py measures the result.
    "shift_sd_mm": {"ventricles": 1.6, "cerebellum": 0.35, "frontal": 0.35, "brain": 0.25},
    "shift_range_mm": {"ventricles": (-2.5, 9.0), "cerebellum": (-2.0, 2.0), "frontal": (-2.0, 2.0),
                       "brain": (-5.0, 1.5)},
    # Ageing from 40 on (mm per year): the ventricles enlarge (about double by 85) and the outline moves in
    # (brain tissue about -0.3 %/year, within the 0.2-0.5 %/year of the literature).
    "ageing_onset_years": 40.0,
    "ageing_shift_mm_per_year": {"ventricles": 0.09, "brain": -0.083},
}

#: DS-like effect at ``ds_strength=1`` (scaled linearly in log-size and shift by ``ds_strength``).
#: Literature (adults with DS vs euploid): brain ~15-20 % smaller, brachycephalic (short AP), frontal
#: lobe and cerebellum disproportionately small, lateral ventricles enlarged.
DS_EFFECTS: dict[str, Any] = {
    "global_scale": (0.97, 0.93, 0.96),  # x (LR), y (AP), z (SI) size relative to euploid
    "boundary_shift_mm": {"ventricles": 2.0, "cerebellum": -1.0, "frontal": -0.8},
}

#: DS-AD stages in order, and the extra boundary shifts of each (mm at ``ds_strength=1``): atrophy of the
#: brain outline and enlarged ventricles with clinical stage (Fortea et al. 2020).
AD_STAGES = ("asymptomatic", "prodromal", "dementia")
AD_EFFECTS: dict[str, dict[str, float]] = {
    "asymptomatic": {},
    "prodromal": {"ventricles": 1.5, "brain": -0.6},
    "dementia": {"ventricles": 4.0, "brain": -1.6},
}


def rng(seed: int, *keys: object) -> np.random.Generator:
    """A generator that depends only on the seed and the keys (stable across processes, runs and n_jobs)."""
    words = [int.from_bytes(hashlib.sha256(repr(k).encode()).digest()[:8], "little") for k in keys]
    return np.random.default_rng([int(seed), *words])


@dataclass(frozen=True)
class SubjectAnatomy:
    """A subject's deformation of the reference (see the module docstring)."""

    size: np.ndarray                 # (3, 3) global size matrix S (reference -> subject about the centre)
    log_scale: np.ndarray            # per-axis random log scale (without sex and DS)
    shear: np.ndarray
    lattice: np.ndarray              # (3, ...) random lattice displacement (mm)
    local: tuple[tuple[str, float], ...]  # boundary shift (mm) per region in LOCAL_REGIONS
    icv_ml: float                    # intracranial volume: reference brain volume times det(S)

    def params(self) -> dict[str, Any]:
        """The truth record's entries for the anatomy."""
        return {"subject_log_scale": self.log_scale.tolist(), "subject_shear": self.shear.tolist(),
                "size_matrix": self.size.tolist(), "local_boundary_shift_mm": dict(self.local),
                "icv_ml": self.icv_ml}


def _years_past_onset(age: object) -> float:
    try:
        value = float(age)
    except (TypeError, ValueError):
        return 0.0
    return max(0.0, value - POPULATION["ageing_onset_years"]) if np.isfinite(value) else 0.0


def subject_anatomy(record: dict[str, Any], seed: int, ds_strength: float) -> SubjectAnatomy:
    """The anatomy of one planned subject (``record``: dataset, subject, group, age, sex, ad_stage).

    Cheap (no image work, the reference is not built), so the plan can carry each subject's ``icv_ml``.
    """
    draws = rng(seed, "anatomy", record["dataset"], record["subject"])
    common = draws.normal(0.0, POPULATION["common_log_scale_sd"])
    log_scale = POPULATION["mean_log_scale"] + common + draws.normal(0.0, POPULATION["axis_log_scale_sd"], 3)
    shear = draws.normal(0.0, POPULATION["shear_sd"], 3)
    lattice = draws.normal(0.0, POPULATION["warp_sd_mm"], (3, *lattice_shape()[1])).astype(np.float32)
    random_shift = {name: float(draws.normal(0.0, POPULATION["shift_sd_mm"][name])) for name in LOCAL_REGIONS}

    is_ds = record["group"] == "DS"
    strength = float(ds_strength) if is_ds else 0.0
    sex_scale = POPULATION["male_log_scale"] if record.get("sex") == "M" else 0.0
    ds_scale = np.asarray(DS_EFFECTS["global_scale"], float) ** strength
    shear_matrix = np.array([[1.0, shear[0], shear[1]], [0.0, 1.0, shear[2]], [0.0, 0.0, 1.0]])
    size = np.diag(ds_scale) @ np.diag(np.exp(log_scale + sex_scale)) @ shear_matrix

    years = _years_past_onset(record.get("age"))
    stage = AD_EFFECTS.get(str(record.get("ad_stage")), {}) if is_ds else {}
    local = []
    for name in LOCAL_REGIONS:
        shift = random_shift[name] + POPULATION["ageing_shift_mm_per_year"].get(name, 0.0) * years
        shift += strength * (DS_EFFECTS["boundary_shift_mm"].get(name, 0.0) + stage.get(name, 0.0))
        low, high = POPULATION["shift_range_mm"][name]
        local.append((name, float(np.clip(shift, low, high))))
    icv = _reference_brain_ml() * float(abs(np.linalg.det(size)))
    return SubjectAnatomy(size=size, log_scale=log_scale, shear=shear, lattice=lattice, local=tuple(local),
                          icv_ml=icv)


@lru_cache(maxsize=1)
def _reference_brain_ml() -> float:
    """Volume of the reference brain (the MNI152 brain mask, which every region label lies in)."""
    mask = mni152_brain_mask()
    return float(np.count_nonzero(np.asarray(mask.dataobj))) * float(abs(np.linalg.det(mask.affine[:3, :3]))) / 1000


@lru_cache(maxsize=1)
def lattice_shape() -> tuple[np.ndarray, tuple[int, int, int]]:
    """Origin (mm) and shape of the random-warp lattice: it covers the 1 mm MNI grid (the reference head's)
    with one node of margin."""
    grid = mni152_brain()
    spacing = POPULATION["warp_spacing_mm"]
    lo = grid.affine[:3, 3] - spacing
    hi = grid.affine[:3, 3] + (np.asarray(grid.shape) - 1) * np.diag(grid.affine)[:3] + spacing
    return lo, tuple(int(v) for v in np.ceil((hi - lo) / spacing) + 1)


#: The subject's velocity is exponentiated on a grid this many times coarser than the 2 mm gradient grid and
#: interpolated back: the fields are smooth (sigma >= 3 mm), and it makes a template-space scan 3x faster.
_EXP_COARSENING = 2
_EXP_STEPS = 6


def _coarse_affine() -> np.ndarray:
    coarse = reference().grad_affine.copy()
    coarse[:3, :3] *= _EXP_COARSENING
    return coarse


@lru_cache(maxsize=8)
def _coarse_local_field(local: tuple[tuple[str, float], ...]) -> np.ndarray | None:
    """exp of the stationary velocity ``sum_r c_r * grad(G_sigma * mask_r)`` by scaling and squaring, on the
    4 mm grid of :func:`_coarse_affine` (None when every shift is 0)."""
    ref = reference()
    f = _EXP_COARSENING
    velocity = np.zeros_like(ref.grads["ventricles"][:, ::f, ::f, ::f])
    for name, shift in local:
        if shift:
            velocity += np.float32(shift) * ref.grads[name][:, ::f, ::f, ::f]
    if not velocity.any():
        return None
    u = velocity / np.float32(2.0 ** _EXP_STEPS)
    index = np.indices(u.shape[1:], dtype=np.float32)
    spacing = float(_coarse_affine()[0, 0])
    for _ in range(_EXP_STEPS):
        coords = index + u / spacing
        u = u + np.stack([ndi.map_coordinates(u[c], coords, order=1, mode="nearest") for c in range(3)])
    return u


def local_field(local: tuple[tuple[str, float], ...]) -> np.ndarray:
    """Pull-back displacement (mm, (3, ...) on the reference's 2 mm grid): the subject's local shape."""
    ref = reference()
    grid = ref.grads["ventricles"].shape[1:]
    u = _coarse_local_field(tuple(local))
    if u is None:
        return np.zeros((3, *grid), np.float32)
    fine = np.indices(grid, dtype=np.float32) / np.float32(_EXP_COARSENING)
    return np.stack([ndi.map_coordinates(u[c], fine, order=1, mode="nearest") for c in range(3)])


def lookup_field(field: np.ndarray, points_mm: np.ndarray, affine: np.ndarray | None = None) -> np.ndarray:
    """A (3, ...) field on a grid (default the reference's 2 mm grid) at MNI points (3, ...), trilinear,
    zero outside."""
    inv = np.linalg.inv(reference().grad_affine if affine is None else affine)
    grid = np.einsum("rc,c...->r...", inv[:3, :3], points_mm) + inv[:3, 3].reshape((3,) + (1,) * (points_mm.ndim - 1))
    return np.stack([ndi.map_coordinates(field[c], grid, order=1, mode="constant") for c in range(3)])


def warp_weight_at(points_mm: np.ndarray) -> np.ndarray:
    """The random warp's amplitude factor (full deep in the brain, reduced at the outline) at MNI points."""
    ref = reference()
    inv = np.linalg.inv(ref.grad_affine)
    grid = np.einsum("rc,c...->r...", inv[:3, :3], points_mm) + inv[:3, 3].reshape((3,) + (1,) * (points_mm.ndim - 1))
    return ndi.map_coordinates(ref.warp_weight, grid, order=1, mode="nearest")


def _cubic_bspline(d: np.ndarray) -> np.ndarray:
    d = np.abs(d)
    return np.where(d < 1, 2 / 3 - d ** 2 + d ** 3 / 2, np.where(d < 2, (2 - d) ** 3 / 6, 0.0))


def _lattice_warp_on_grid(lattice: np.ndarray, axes_mm: list[np.ndarray]) -> np.ndarray:
    """The lattice's interpolating cubic spline (``map_coordinates(order=3, mode="nearest")``) on an
    axis-aligned grid, evaluated separably: a tensor product of three small basis matrices, ~50x faster."""
    origin, shape = lattice_shape()
    spacing = POPULATION["warp_spacing_mm"]
    bases = []
    for axis, mm in enumerate(axes_mm):
        x = (np.asarray(mm, float) - origin[axis]) / spacing
        nodes = np.arange(shape[axis])
        bases.append(_cubic_bspline(x[:, None] - nodes[None, :]))  # (points, nodes)
    out = []
    for c in range(3):
        coefficients = ndi.spline_filter(lattice[c].astype(np.float64), order=3, mode="nearest")
        out.append(np.einsum("ia,jb,kc,abc->ijk", *bases, coefficients, optimize=True).astype(np.float32))
    return np.stack(out)


def pull_back(anatomy: SubjectAnatomy, t: np.ndarray, axes_mm: list[np.ndarray] | None = None) -> np.ndarray:
    """Reference MNI mm shown at size-normalised subject points ``t`` (3, ...): lattice warp, then local shape.

    ``axes_mm``: when ``t`` is the axis-aligned grid of these coordinates (template-space scans), the lattice
    warp is evaluated separably.
    """
    if axes_mm is not None:
        warp = _lattice_warp_on_grid(anatomy.lattice, axes_mm)
    else:
        origin, _ = lattice_shape()
        lattice_coords = (t - origin.reshape((3,) + (1,) * (t.ndim - 1))) / POPULATION["warp_spacing_mm"]
        warp = np.stack([ndi.map_coordinates(anatomy.lattice[c], lattice_coords, order=3, mode="nearest")
                         for c in range(3)])
    v = t + warp_weight_at(t) * warp
    field = _coarse_local_field(anatomy.local)
    return v if field is None else v + lookup_field(field, v, _coarse_affine())


def _ds_local(ds_strength: float) -> tuple[tuple[str, float], ...]:
    return tuple((name, float(ds_strength) * DS_EFFECTS["boundary_shift_mm"].get(name, 0.0)) for name in LOCAL_REGIONS)


def ds_displacement(ds_strength: float = 1.0) -> nib.Nifti1Image:
    """The DS local (nonlinear) pull-back displacement alone, in mm, (x, y, z, 3) on the 2 mm MNI grid.

    The global DS size change is linear and not included; a subject's field combines it with their own
    shifts (:func:`subject_anatomy`).
    """
    return nib.Nifti1Image(np.moveaxis(local_field(_ds_local(ds_strength)), 0, -1), reference().grad_affine)


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
