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
from .synth.anatomy import (AD_EFFECTS, AD_STAGES, DS_EFFECTS, POPULATION, SubjectAnatomy, ds_displacement,
                            ds_jacobian, pull_back, rng, subject_anatomy)
from .synth.template_space import resampled_head, simulate_template_scan, template_grid
from .synth.reference import (REGION_LABELS, Reference, control_mask, cerebellum_mask, frontal_mask,
                              lateral_ventricles_mask, reference, reference_head, region_labels)
from .templates import MNI_SPACE

GROUPS = ("euploid", "DS")
#: Intellectual-disability grade of DS subjects and its share (euploid subjects: n/a).
ID_GRADES = {"mild": 0.45, "moderate": 0.40, "severe": 0.15}
#: Space of a site's scans: native (raw scanner images) or the template space of preprocessed releases.
NATIVE = "native"
TEMPLATE_SPACE = "MNI152NLin2009aSym"
#: Cell value of a covariate that does not apply (AD stage and ID grade of euploid subjects).
NOT_APPLICABLE = "n/a"

# Pose in the scanner and FOV placement.
_MAX_ROTATION_DEG = 15.0
_MAX_TRANSLATION_MM = 20.0
_MAX_FOV_OFFSET_MM = 5.0
_BIAS_LATTICE = 5
_COARSE_STEP_MM = 4.0
#: DS-AD stage from age: stage score (age - 47) / 5 + N(0, 1); below the first cut asymptomatic, below the
#: second prodromal, else dementia (in DS, AD is rare before 40, prodromal from ~50, dementia median onset ~53:
#: Fortea et al. 2020).
_AD_AGE_CENTRE, _AD_AGE_SCALE, _AD_CUTS = 47.0, 5.0, (0.0, 2.2)


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
    ds_age: tuple[int, int] = (20, 60)
    #: native: raw scanner images; TEMPLATE_SPACE: skull-stripped, registered images on the 2 mm MNI grid
    #: (global size removed by the registration, local shape kept), as preprocessed releases ship them.
    space: str = NATIVE


def _scanner_sidecar(manufacturer: str, model: str, sequence: str, *, tr: float, te: float, flip: int,
                     ti: float | None = None) -> tuple[tuple[str, Any], ...]:
    """The BIDS sidecar fields of a 3T 3D T1w acquisition (times in seconds, flip angle in degrees)."""
    fields: list[tuple[str, Any]] = [("Manufacturer", manufacturer), ("ManufacturersModelName", model),
                                     ("MagneticFieldStrength", 3), ("MRAcquisitionType", "3D"),
                                     ("ScanningSequence", sequence), ("RepetitionTime", tr), ("EchoTime", te)]
    if ti is not None:
        fields.append(("InversionTime", ti))
    return (*fields, ("FlipAngle", flip))


#: Sites named after the datasets of Malé et al. IXI: Philips 3T sagittal SPGR, 0.94x0.94x1.2 mm,
#: stored PSR like the real IXI NIfTIs. HCP: Siemens 3T MPRAGE as the HCP release ships it, already
#: registered and skull-stripped (template space). SantPau: the DS and euploid analysis cohort (Sant Pau
#: Initiative on Neurodegeneration), euploid controls age-matched to the DS adults, template space. ABCDS:
#: a small external site (ABC-DS-like), raw GE 3T scans, 1x1x1.2 mm stored RAS.
SITES: dict[str, Site] = {
    "IXI": Site(
        name="IXI", prefix="ixi", axcodes=("P", "S", "R"), zooms=(0.9375, 0.9375, 1.2), shape=(256, 256, 150),
        contrast=(0.28, 0.70, 1.0, 1.25), wm_counts=650.0, noise=0.035, bias_log_sd=0.10, euploid_age=(20, 86),
        sidecar=_scanner_sidecar("Philips", "Intera", "GR", tr=0.0096, te=0.0046, flip=8),
    ),
    "HCP": Site(
        name="HCP", prefix="hcp", axcodes=("L", "A", "S"), zooms=(1.0, 1.0, 1.0), shape=(176, 240, 224),
        contrast=(0.16, 0.60, 1.0, 1.05), wm_counts=1200.0, noise=0.022, bias_log_sd=0.18, euploid_age=(22, 37),
        sidecar=_scanner_sidecar("Siemens", "Skyra", "GR\\IR", tr=2.4, te=0.00214, flip=8, ti=1.0),
        space=TEMPLATE_SPACE,
    ),
    "SantPau": Site(
        name="SantPau", prefix="sp", axcodes=("R", "A", "S"), zooms=(1.0, 1.0, 1.0), shape=(176, 240, 256),
        contrast=(0.20, 0.66, 1.0, 1.15), wm_counts=900.0, noise=0.025, bias_log_sd=0.12, euploid_age=(25, 65),
        sidecar=_scanner_sidecar("Philips", "Achieva", "GR", tr=0.0081, te=0.0037, flip=8),
        ds_age=(25, 65), space=TEMPLATE_SPACE,
    ),
    "ABCDS": Site(
        name="ABCDS", prefix="abc", axcodes=("R", "A", "S"), zooms=(1.0, 1.0, 1.2), shape=(192, 256, 150),
        contrast=(0.22, 0.64, 1.0, 1.2), wm_counts=1000.0, noise=0.03, bias_log_sd=0.12, euploid_age=(25, 65),
        sidecar=_scanner_sidecar("GE", "Discovery MR750", "GR\\IR", tr=0.0073, te=0.003, flip=11, ti=0.4),
        ds_age=(25, 65),
    ),
}


@lru_cache(maxsize=None)
def _site_head(site: str) -> np.ndarray:
    """Reference head in the site's contrast (WM = 1); piecewise linear, so one lookup per voxel."""
    ref = reference()
    s = SITES[site]
    lv = ref.levels
    knots = [0.0, lv["csf"], lv["gm"], lv["wm"], lv["fat"], 2 * lv["fat"]]
    values = [0.0, s.contrast[0], s.contrast[1], s.contrast[2], s.contrast[3], s.contrast[3]]
    return np.interp(ref.head, knots, values).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# The plan: every scan, its group and covariates (cheap, no image work)
# --------------------------------------------------------------------------------------------------

def _check_fraction(name: str, value: object) -> float:
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
        raise ConfigError(f"{name}: must be a number in [0, 1] (got {value!r})")
    return float(value)


def _check_count(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{name}: must be an integer >= {minimum} (got {value!r})")
    return int(value)


def site_counts(n_subjects: int | None, ds_fraction: float, sites: Any) -> dict[str, tuple[int, float]]:
    """Subjects and DS fraction per site: ``sites`` is a list of names (``n_subjects`` dealt to them in turn,
    one ``ds_fraction``) or a mapping name -> ``{subjects, ds_fraction}`` (``n_subjects`` None or the sum)."""
    if isinstance(sites, str):
        sites = (sites,)
    if isinstance(sites, dict):
        counts = {}
        for name, entry in sites.items():
            entry = entry or {}
            unknown = set(entry) - {"subjects", "ds_fraction"}
            if unknown:
                raise ConfigError(f"sites.{name}: unknown key(s) {sorted(unknown)}; allowed: subjects, ds_fraction")
            counts[name] = (_check_count(f"sites.{name}.subjects", entry.get("subjects"), 1),
                            _check_fraction(f"sites.{name}.ds_fraction", entry.get("ds_fraction", ds_fraction)))
        total = sum(n for n, _ in counts.values())
        if n_subjects is not None and _check_count("subjects", n_subjects, 1) != total:
            raise ConfigError(f"subjects: {n_subjects} differs from the sites' subjects ({total})")
    else:
        names = tuple(sites)
        n = _check_count("subjects", n_subjects, 1)
        if not names or len(set(names)) != len(names):
            raise ConfigError(f"sites: must be a non-empty list of distinct site names (got {names!r})")
        counts = {name: (len(range(i, n, len(names))), _check_fraction("ds_fraction", ds_fraction))
                  for i, name in enumerate(names)}
    if not counts:
        raise ConfigError("sites: must name at least one site")
    unknown = [s for s in counts if s not in SITES]
    if unknown:
        raise ConfigError(f"sites: unknown demo site(s) {unknown}; available: {sorted(SITES)}")
    return counts


def _check_strength(ds_strength: object) -> float:
    if isinstance(ds_strength, bool) or not (isinstance(ds_strength, (int, float)) and math.isfinite(ds_strength)
                                             and 0.0 <= ds_strength <= 3.0):
        raise ConfigError(f"ds_strength: must be a number in [0, 3] (got {ds_strength!r})")
    return float(ds_strength)


def _ad_stage(age: float, noise: float) -> str:
    score = (age - _AD_AGE_CENTRE) / _AD_AGE_SCALE + noise
    return AD_STAGES[int(np.searchsorted(_AD_CUTS, score))]


def plan_cohort(n_subjects: int | None, seed: int, ds_fraction: float = 0.4, sites: Any = ("IXI", "HCP"),
                session_fraction: float = 0.1, ds_strength: float = 1.0) -> list[dict[str, Any]]:
    """Every scan of the cohort, without any image work; deterministic in its arguments.

    ``sites``: see :func:`site_counts`. Within each site a ``ds_fraction`` share (at least one and at least one
    euploid, when the site has two subjects or more and 0 < ds_fraction < 1) is DS, so group and site are not
    confounded. Ages are uniform in the site's range for each group (SantPau and ABCDS: the same range, so
    age does not predict group); DS subjects get a DS-AD stage that rises with age and an intellectual
    disability grade. ``round(session_fraction * n_subjects)`` subjects (at least one when
    ``session_fraction > 0`` and there are two subjects or more) have ``ses-1`` and ``ses-2``; the
    others have no session level. One dict per scan with keys ``dataset, subject, session, run, group,
    age, sex, ad_stage, id_grade, icv_ml, space, path`` (path relative to the output folder); ``icv_ml``,
    the true intracranial volume, depends on ``ds_strength`` (DS heads are smaller).
    """
    counts = site_counts(n_subjects, ds_fraction, sites)
    ds_strength = _check_strength(ds_strength)
    _check_count("seed", seed, 0)
    session_fraction = _check_fraction("session_fraction", session_fraction)
    n = sum(k for k, _ in counts.values())
    n_two = 0 if session_fraction <= 0 or n < 2 else max(1, int(round(session_fraction * n)))
    two_sessions = set(rng(seed, "sessions").permutation(n)[:n_two].tolist())
    width = max(3, len(str(max(k for k, _ in counts.values()))))
    records, first_index = [], 0
    grades, shares = list(ID_GRADES), np.asarray(list(ID_GRADES.values()))
    for site, (k, fraction) in counts.items():
        draws = rng(seed, "plan", site)
        n_ds = int(round(fraction * k))
        if 0 < fraction < 1 and k >= 2:
            n_ds = min(max(n_ds, 1), k - 1)
        ds_members = set(draws.permutation(k)[:n_ds].tolist())
        info = SITES[site]
        # Ages are stratified within each group (the i-th of n members of a group falls in the i-th n-quantile
        # of its age range, in random order): with the same range for both groups, as at SantPau and ABCDS,
        # the groups are age-matched by design, not by luck.
        stratum = {}
        for group in GROUPS:
            members = [i for i in range(k) if (i in ds_members) == (group == "DS")]
            stratum.update(zip(members, draws.permutation(len(members)).tolist()))
        group_size = {"DS": len(ds_members), "euploid": k - len(ds_members)}
        for number in range(1, k + 1):
            # Every draw is made for every subject, whatever the group, so streams never shift.
            position, sex_draw, stage_noise, grade_draw = draws.random(), draws.random(), draws.normal(), draws.random()
            group = "DS" if number - 1 in ds_members else "euploid"
            low, high = info.ds_age if group == "DS" else info.euploid_age
            age = round(low + (stratum[number - 1] + position) / group_size[group] * (high - low), 1)
            is_ds = group == "DS"
            subject = f"{info.prefix}{number:0{width}d}"
            row = {"group": group, "age": age, "sex": "F" if sex_draw < 0.5 else "M",
                   "ad_stage": _ad_stage(age, stage_noise) if is_ds else NOT_APPLICABLE,
                   "id_grade": grades[int(np.searchsorted(np.cumsum(shares), grade_draw * shares.sum()))]
                   if is_ds else NOT_APPLICABLE}
            anatomy = subject_anatomy({"dataset": site, "subject": subject, **row}, seed, ds_strength)
            row["icv_ml"] = round(anatomy.icv_ml, 1)
            for session in (("1", "2") if first_index + number - 1 in two_sessions else (None,)):
                path = f"{site}/{scan_dir(subject, session)}/{scan_key(subject, session)}_T1w.nii.gz"
                records.append({"dataset": site, "subject": subject, "session": session, "run": None, **row,
                                "space": info.space, "path": path})
        first_index += k
    return records


def truth_paths(record: dict[str, Any]) -> dict[str, str]:
    """Ground-truth files of one planned scan, relative to the output folder (outside every BIDS root)."""
    sub, ses = record["subject"], record.get("session")
    stem = f"truth/{record['dataset']}/{scan_dir(sub, ses)}/{scan_key(sub, ses)}"
    files = {"truth": f"{stem}_truth.json"}
    if record.get("space", NATIVE) == NATIVE:  # template-space scans are bias-corrected: no bias field
        files["biasfield"] = f"{stem}_desc-biasfield_truth.nii.gz"
    files["brain_mask"] = f"{stem}_desc-brain_mask.nii.gz"
    files["regions"] = f"{stem}_desc-regions_dseg.nii.gz"
    return files


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
    anatomy: SubjectAnatomy          # the subject's global size and local shape
    bias_lattice: np.ndarray
    gain: float
    rng: np.random.Generator         # continues into the noise
    params: dict[str, Any]


def _make_scan(record: dict[str, Any], seed: int, ds_strength: float) -> _Scan:
    ref = reference()
    site = SITES[record["dataset"]]
    # Anatomy: drawn from (seed, subject) only; group, age and ds_strength act deterministically on top.
    anatomy = subject_anatomy(record, seed, ds_strength)

    # Acquisition: drawn from (seed, subject, session), so a second session is a new scan of the same head.
    acq = rng(seed, "scan", record["dataset"], record["subject"], record.get("session") or "")
    angles = acq.uniform(-_MAX_ROTATION_DEG, _MAX_ROTATION_DEG, 3)
    translation = acq.uniform(-_MAX_TRANSLATION_MM, _MAX_TRANSLATION_MM, 3)
    fov_offset = acq.uniform(-_MAX_FOV_OFFSET_MM, _MAX_FOV_OFFSET_MM, 3)
    gain = float(acq.uniform(0.9, 1.1))
    bias_lattice = acq.normal(0.0, site.bias_log_sd, (_BIAS_LATTICE,) * 3)

    centre = ref.brain_box_mm.mean(axis=0)
    t_to_s = _homogeneous(np.eye(3), centre) @ _homogeneous(anatomy.size) @ _homogeneous(np.eye(3), -centre)
    rotation = _rotation(angles)
    s_to_x = _homogeneous(rotation, translation)
    t_to_x = s_to_x @ t_to_s
    fov_centre = (t_to_x @ np.append(ref.head_centre_mm, 1.0))[:3] + fov_offset
    grid = _site_grid(site, fov_centre)
    is_ds = record["group"] == "DS"
    params = {
        "pose": {"rotation_deg": angles.tolist(), "translation_mm": translation.tolist(),
                 "rotation_matrix": rotation.tolist(), "fov_offset_mm": fov_offset.tolist(),
                 "convention": "scanner_mm = R @ head_mm + t; rotation R = Rz @ Ry @ Rx"},
        **anatomy.params(),
        "ds_global_scale": (np.asarray(DS_EFFECTS["global_scale"], float) ** (ds_strength if is_ds else 0.0)).tolist(),
        "ds_local_strength": ds_strength if is_ds else 0.0,
        "ds_boundary_shift_mm": {name: (ds_strength * shift if is_ds else 0.0)
                                 for name, shift in DS_EFFECTS["boundary_shift_mm"].items()},
        "gain": gain,
    }
    return _Scan(record=record, site=site, grid=grid, scanner_to_t=np.linalg.inv(t_to_x), anatomy=anatomy,
                 bias_lattice=bias_lattice, gain=gain, rng=acq, params=params)


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


def _map_coarse(scan: _Scan, ref: Reference) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact MNI mm of the coarse native nodes: returns (MNI mm (3, *rev), scanner mm (3, *rev), axes)."""
    steps = _steps(scan.site)
    axes = [_coarse_nodes(n, f) for n, f in zip(scan.site.shape, steps)]
    # reversed layout (k, j, i): native axis 0 is the last, contiguous axis
    grids = [axes[a].reshape([-1 if b == 2 - a else 1 for b in range(3)]) for a in range(3)]
    scanner = np.stack([scan.grid[r, 0] * grids[0] + scan.grid[r, 1] * grids[1] + scan.grid[r, 2] * grids[2]
                        + scan.grid[r, 3] for r in range(3)])
    a = scan.scanner_to_t
    t = np.einsum("rc,c...->r...", a[:3, :3], scanner) + a[:3, 3].reshape(3, 1, 1, 1)
    return pull_back(scan.anatomy, t), scanner, axes


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
    data = reference().labels if name == "labels" else _site_head(name)
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

    ref = reference()
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
        "age": record.get("age"), "sex": record.get("sex"), "ad_stage": record.get("ad_stage"),
        "seed": int(seed), "ds_strength": float(ds_strength), "space": NATIVE,
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
    site = SITES[record["dataset"]]
    template = record.get("space", NATIVE) != NATIVE
    if template:
        clock = time.perf_counter()
        result = simulate_template_scan(record, seed, ds_strength, _resampled_site_head(site.name), site.noise,
                                        site.wm_counts)
        if timings is not None:
            timings["images"] = timings.get("images", 0.0) + time.perf_counter() - clock
    else:
        result = _simulate(record, seed, ds_strength, timings=timings)
    clock = time.perf_counter()
    truth, grid = result["truth"], result["grid"]
    t1w_path = out / record["path"]
    _save_nifti(result["t1w"], grid, t1w_path, description=f"{_GENERATOR} synthetic T1w",
                strategy=zlib.Z_HUFFMAN_ONLY)
    sidecar = dict(site.sidecar)
    if template:
        sidecar["SkullStripped"] = True
        sidecar["SpatialReference"] = f"MNI space {record['space']}, 2 mm (nilearn's MNI152 2009 grid)"
    _write_json(t1w_path.with_name(t1w_path.name.replace(".nii.gz", ".json")), sidecar)
    files = truth_paths(record)
    if "biasfield" in files:
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


@lru_cache(maxsize=None)
def _resampled_site_head(site: str) -> np.ndarray:
    return resampled_head(_site_head(site))


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


#: participants.tsv columns after participant_id, and their participants.json descriptions.
PARTICIPANT_COLUMNS: dict[str, dict[str, Any]] = {
    "group": {"Description": "simulated group", "Levels": {"euploid": "typical brain morphology",
                                                           "DS": "Down-syndrome-like morphology"}},
    "age": {"Description": "age at first scan", "Units": "year"},
    "sex": {"Description": "sex", "Levels": {"F": "female", "M": "male"}},
    "ad_stage": {"Description": "DS-AD clinical stage (DS only; n/a for euploid)",
                 "Levels": {stage: stage for stage in AD_STAGES}},
    "id_grade": {"Description": "intellectual disability grade (DS only; n/a for euploid)",
                 "Levels": {grade: grade for grade in ID_GRADES}},
    "icv_ml": {"Description": "true intracranial volume (native space)", "Units": "mL"},
}


def _write_site_metadata(out: Path, site: str, records: list[dict[str, Any]], seed: int, ds_strength: float,
                         ds_fraction: float) -> None:
    root = out / site
    rows = {}
    for r in records:
        rows.setdefault(r["subject"], r)
    _write_json(root / "dataset_description.json", {
        "Name": f"brainvae synthetic demo cohort, site {site}",
        "BIDSVersion": "1.10.0",
        "DatasetType": "raw",
        "License": "Derived from the MNI152 2009a and Colin27 templates; see their licences",
        "GeneratedBy": [{"Name": _GENERATOR, "Version": __version__,
                         "Description": f"subjects={len(rows)} seed={seed} ds_strength={ds_strength} "
                                        f"ds_fraction={ds_fraction} space={SITES[site].space}; "
                                        "ground truth in ../truth"}],
    })
    lines = ["\t".join(["participant_id", *PARTICIPANT_COLUMNS])]
    lines += ["\t".join([f"sub-{s}", *(str(r[c]) for c in PARTICIPANT_COLUMNS)]) for s, r in sorted(rows.items())]
    (root / "participants.tsv").write_text("\n".join(lines) + "\n")
    _write_json(root / "participants.json", PARTICIPANT_COLUMNS)
    kind = ("skull-stripped and registered to the 2 mm MNI152 2009a grid (template space)"
            if SITES[site].space != NATIVE else "raw, in scanner space")
    (root / "README").write_text(
        f"Synthetic T1w scans (site {site}, {kind}) generated by brainvae.demo_cohort from the MNI152 2009a\n"
        "brain in a Colin27 head. Not real data. Ground truth (affines, bias fields, brain masks, region\n"
        "volumes) lies in ../truth, outside this BIDS root.\n")


def generate_cohort(out_dir: str | Path, n_subjects: int | None, seed: int, ds_strength: float = 1.0,
                    ds_fraction: float = 0.4, sites: Any = ("IXI", "HCP"), n_jobs: int = 1,
                    session_fraction: float = 0.1) -> list[dict[str, Any]]:
    """Write the whole cohort under ``out_dir`` and return the plan (see :func:`plan_cohort`).

    ``out_dir/<site>/`` is one BIDS root per site; ``out_dir/truth/`` holds the ground truth. The bytes
    depend only on the arguments (not on ``n_jobs``).
    """
    ds_strength = _check_strength(ds_strength)
    plan = plan_cohort(n_subjects, seed, ds_fraction=ds_fraction, sites=sites, session_fraction=session_fraction,
                       ds_strength=ds_strength)
    if isinstance(n_jobs, bool) or not isinstance(n_jobs, int) or n_jobs < 1:
        raise ConfigError(f"n_jobs: must be an integer >= 1 (got {n_jobs!r})")
    counts = site_counts(n_subjects, ds_fraction, sites)
    out = Path(out_dir)
    for site, (_, fraction) in counts.items():
        _prepare_site_root(out / site)
        truth_root = out / "truth" / site
        if truth_root.exists():
            shutil.rmtree(truth_root)
        _write_site_metadata(out, site, [r for r in plan if r["dataset"] == site], seed, ds_strength, fraction)
    ref = reference()
    _save_nifti(ref.labels, ref.affine, out / "truth" / f"space-{MNI_SPACE}_desc-regions_dseg.nii.gz",
                description="demo regions in MNI space", strategy=zlib.Z_RLE)
    (out / "truth" / "desc-regions_dseg.tsv").write_text(
        "index\tname\n" + "".join(f"{k}\t{v}\n" for k, v in REGION_LABELS.items()))
    _write_json(out / "truth" / "cohort.json", {
        "generator": _GENERATOR, "version": __version__, "subjects": sum(k for k, _ in counts.values()),
        "seed": int(seed), "ds_strength": ds_strength,
        "sites": {site: {"subjects": k, "ds_fraction": f, "space": SITES[site].space}
                  for site, (k, f) in counts.items()},
        "session_fraction": float(session_fraction), "population": POPULATION, "ds_effects": DS_EFFECTS,
        "ad_effects": AD_EFFECTS, "mni_space": MNI_SPACE,
        "scans": [{**r, "truth": truth_paths(r)["truth"]} for r in plan],
    })

    jobs = [(r, str(out), int(seed), ds_strength) for r in plan]
    if n_jobs > 1 and len(jobs) > 1:
        for site in counts:  # built once here and inherited by the forked workers
            _resampled_site_head(site) if SITES[site].space != NATIVE else _site_head(site)
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else None)
        with ProcessPoolExecutor(max_workers=min(n_jobs, len(jobs)), mp_context=context) as pool:
            list(pool.map(_generate_job, jobs))
    else:
        for job in jobs:
            _generate_job(job)
    return [dict(r) for r in plan]
