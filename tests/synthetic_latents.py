"""A small synthetic latents-and-voxels cohort with known ground truth, for the analysis library's tests.

Participants (some with two sessions) from two sites, DS or euploid. Latent means differ between
groups along ``effect_dims`` by ``effect`` (in noise-sd units) and between sites along other
dimensions; a participant's sessions share a person-specific component (so leaking one session
into training would inflate scores, as with real repeat scans). ICV is smaller in DS by
``size_effect`` sd, and the affine scale follows ICV. Voxels are a random linear image of the
latents plus noise, so they carry the same signal in many more columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

__all__ = ["SyntheticCohort", "synthetic_cohort"]


@dataclass(frozen=True)
class SyntheticCohort:
    meta: pd.DataFrame  # dataset, participant, session, run, scan, group, split, icv_ml, affine_scale
    latents: np.ndarray  # scans × n_latent
    voxels: np.ndarray  # scans × n_voxels


def synthetic_cohort(
    *,
    n_subjects: int = 40,
    n_latent: int = 16,
    n_voxels: int = 500,
    ds_fraction: float = 0.4,
    second_session_fraction: float = 0.25,
    effect: float = 3.0,
    effect_dims: tuple[int, ...] = (0, 1),
    site_effect: float = 2.0,
    size_effect: float = 0.0,
    sites: tuple[str, ...] = ("IXI", "HCP"),
    seed: int = 0,
) -> SyntheticCohort:
    """Generate the cohort (deterministic given ``seed``); see the module docstring."""
    rng = np.random.default_rng(seed)
    n_ds = int(round(ds_fraction * n_subjects))
    groups = np.array(["DS"] * n_ds + ["euploid"] * (n_subjects - n_ds))
    rng.shuffle(groups)
    site_of = np.array([sites[i % len(sites)] for i in range(n_subjects)])
    person = rng.normal(size=(n_subjects, n_latent))
    is_ds = groups == "DS"
    person[np.ix_(is_ds, list(effect_dims))] += effect
    site_dims = [d for d in range(n_latent) if d not in effect_dims][: len(sites)]
    for s, site in enumerate(sites):
        if s < len(site_dims):
            person[site_of == site, site_dims[s]] += site_effect
    icv = rng.normal(1450.0, 120.0, size=n_subjects) - size_effect * 120.0 * is_ds
    projection = rng.normal(size=(n_latent, n_voxels)) / np.sqrt(n_latent)

    rows, latents, voxels = [], [], []
    n_two = int(round(second_session_fraction * n_subjects))
    two_sessions = set(rng.choice(n_subjects, size=n_two, replace=False).tolist())
    for i in range(n_subjects):
        for ses in (1, 2) if i in two_sessions else (1,):
            mu = person[i] + 0.3 * rng.normal(size=n_latent)  # within-person scan-to-scan variation
            latents.append(mu)
            voxels.append(mu @ projection + 0.5 * rng.normal(size=n_voxels))
            scan_icv = icv[i] + rng.normal(0, 5.0)
            participant = f"sub-{site_of[i]}{i:03d}"
            rows.append({
                "dataset": site_of[i], "participant": participant, "session": f"ses-{ses}", "run": "",
                "scan": f"{participant}_ses-{ses}", "group": groups[i], "split": "analyse",
                "icv_ml": scan_icv, "affine_scale": float((1450.0 / scan_icv) ** (1 / 3) * np.exp(rng.normal(0, 0.01))),
            })
    meta = pd.DataFrame(rows)
    return SyntheticCohort(meta=meta, latents=np.asarray(latents), voxels=np.asarray(voxels, dtype=np.float32))
