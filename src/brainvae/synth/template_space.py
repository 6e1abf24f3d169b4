"""Synthetic scans as preprocessed releases ship them: skull-stripped and registered to the 2 mm MNI152 2009a
grid (HCP's MNINonLinear, the Sant Pau cohort's normalised images).

Registration removes the subject's global size and pose, so the image is the reference head in the site's
contrast pulled back through the subject's *local* shape only (lattice warp, ventricles, cerebellum, frontal
lobe, atrophy; :func:`brainvae.synth.anatomy.pull_back`), masked by the true brain, with Rician noise and no
bias field (releases are bias-corrected). The global size reaches the participants table as ``icv_ml``.
About 1 s a scan on one core (two order-1 lookups and the subject's field), so a 1,000-subject cohort
takes minutes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage as ndi

from ..templates import mni152_brain
from .anatomy import pull_back, rng, subject_anatomy
from .reference import REGION_LABELS, reference

__all__ = ["TEMPLATE_RESOLUTION_MM", "resampled_head", "simulate_template_scan", "template_grid"]

#: Voxel size of template-space scans (the 2 mm MNI152 grid that nilearn ships).
TEMPLATE_RESOLUTION_MM = 2
#: Partial-volume blur (sd, mm) of the 1 mm reference before it is sampled at 2 mm: a registered image
#: is an interpolated one, never sharper than its grid.
_RESAMPLING_BLUR_MM = 0.8


def template_grid() -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape and voxel -> MNI mm affine of template-space scans."""
    img = mni152_brain(TEMPLATE_RESOLUTION_MM)
    return tuple(int(n) for n in img.shape[:3]), img.affine.copy()


def resampled_head(site_head: np.ndarray) -> np.ndarray:
    """The 1 mm reference head blurred as resampling to 2 mm blurs it (compute once per site)."""
    return ndi.gaussian_filter(np.asarray(site_head, np.float32), _RESAMPLING_BLUR_MM, mode="constant")


def simulate_template_scan(record: dict[str, Any], seed: int, ds_strength: float, site_head: np.ndarray,
                           noise: float, wm_counts: float) -> dict[str, Any]:
    """One template-space scan: ``t1w`` (int16), ``labels`` (uint8) on :func:`template_grid`, and its truth.

    ``site_head``: the reference head in the site's contrast (WM = 1) on the 1 mm MNI grid, passed through
    :func:`resampled_head`; ``noise``:
    Rician sigma relative to WM; ``wm_counts``: stored intensity of white matter.
    """
    ref = reference()
    anatomy = subject_anatomy(record, seed, ds_strength)
    acq = rng(seed, "scan", record["dataset"], record["subject"], record.get("session") or "")
    gain = float(acq.uniform(0.9, 1.1))
    shape, affine = template_grid()
    index = np.indices(shape, dtype=np.float32).reshape(3, -1)
    points = (affine[:3, :3] @ index + affine[:3, 3:4]).reshape(3, *shape)
    axes_mm = [np.arange(n) * affine[a, a] + affine[a, 3] for a, n in enumerate(shape)]
    reference_mm = pull_back(anatomy, points, axes_mm=axes_mm)
    to_voxel = np.linalg.inv(ref.affine)
    voxel = np.einsum("rc,c...->r...", to_voxel[:3, :3], reference_mm) + to_voxel[:3, 3].reshape(3, 1, 1, 1)
    labels = ndi.map_coordinates(ref.labels, voxel, order=0, mode="constant").astype(np.uint8)
    signal = ndi.map_coordinates(site_head, voxel, order=1, mode="constant").astype(np.float32)
    brain = labels > 0
    sigma = np.float32(noise)
    real = signal[brain] + sigma * acq.standard_normal(int(brain.sum()), dtype=np.float32)
    imag = sigma * acq.standard_normal(int(brain.sum()), dtype=np.float32)
    scale = np.float32(wm_counts * gain)
    t1w = np.zeros(shape, np.int16)
    t1w[brain] = np.clip(np.rint(np.hypot(real, imag) * scale), 1, np.iinfo(np.int16).max)  # > 0 in the brain

    voxel_ml = float(abs(np.linalg.det(affine[:3, :3]))) / 1000.0
    counts = np.bincount(labels.ravel(), minlength=len(REGION_LABELS))
    volumes = {name: float(counts[value]) * voxel_ml for value, name in REGION_LABELS.items() if value > 0}
    volumes["brain"] = float(counts[1:].sum()) * voxel_ml
    native_scale = float(abs(np.linalg.det(anatomy.size)))
    truth = {
        "dataset": record["dataset"], "site": record["dataset"], "subject": record["subject"],
        "session": record.get("session"), "run": record.get("run"), "group": record["group"],
        "age": record.get("age"), "sex": record.get("sex"), "ad_stage": record.get("ad_stage"),
        "seed": int(seed), "ds_strength": float(ds_strength), "space": record["space"],
        **anatomy.params(),
        # Volumes on the template grid (size removed) and the native volumes they stand for.
        "template_region_volumes_ml": volumes,
        "region_volumes_ml": {name: value * native_scale for name, value in volumes.items()},
        "region_labels": {str(k): v for k, v in REGION_LABELS.items()},
        "gain": gain, "noise_sigma": float(sigma * scale), "intensity_scale": float(scale),
    }
    return {"truth": truth, "t1w": t1w, "labels": labels, "grid": affine}
