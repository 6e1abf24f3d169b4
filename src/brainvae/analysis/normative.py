"""Normative modelling with a VAE trained on euploid brains: per-scan residual and z-maps against the euploid
held-out residuals, regional summaries, DS-minus-euploid group maps with a family-wise permutation threshold,
latent deviation scores (Mahalanobis distance, reconstruction-error z), and latent traversals along the
direction that separates two groups.

Plain numpy (and scikit-learn's Ledoit-Wolf covariance): the caller reconstructs and decodes with its model,
so this module never imports a model or a trainer.

Conventions: volumes are float arrays of one grid; ``mask`` is boolean; z-maps are 0 outside the mask.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from brainvae.deviation import mahalanobis_scores, zscores  # noqa: F401  (part of this module's API)

__all__ = ["GroupMap", "ReferenceStats", "field_agreement", "group_map", "mahalanobis_scores", "regional_summary",
           "residual", "traversal_direction", "traversal_codes", "zmap", "zscores"]

#: Floor on the per-voxel sd of the reference residuals (in the intensity units of the inputs): where the
#: euploid reconstructions are all but perfect (a tiny sd), a minute residual must not become a huge z.
MIN_SD = 1e-3


def residual(image: np.ndarray, reconstruction: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Input minus reconstruction inside the mask (0 outside), float32."""
    out = np.zeros(image.shape, np.float32)
    out[mask] = np.asarray(image, np.float32)[mask] - np.asarray(reconstruction, np.float32)[mask]
    return out


@dataclass(frozen=True)
class ReferenceStats:
    """Voxel-wise mean and sd of the reference (euploid, held-out) residuals, and where they are defined."""

    mean: np.ndarray
    sd: np.ndarray
    mask: np.ndarray  # voxels inside every reference scan's mask
    n: int

    @classmethod
    def fit(cls, residuals: Sequence[np.ndarray], masks: Sequence[np.ndarray], min_sd: float = MIN_SD
            ) -> ReferenceStats:
        """Welford's running mean and variance over the reference scans (one volume in memory at a time)."""
        if len(residuals) < 2 or len(residuals) != len(masks):
            raise ValueError(f"the reference needs two or more residual maps with their masks (got {len(residuals)})")
        mean = np.zeros(np.shape(residuals[0]), np.float64)
        m2 = np.zeros_like(mean)
        common = np.ones(mean.shape, bool)
        for count, (r, m) in enumerate(zip(residuals, masks), start=1):
            delta = np.asarray(r, np.float64) - mean
            mean += delta / count
            m2 += delta * (np.asarray(r, np.float64) - mean)
            common &= np.asarray(m, bool)
        n = len(residuals)
        sd = np.sqrt(m2 / (n - 1))
        return cls(mean=mean.astype(np.float32), sd=np.maximum(sd, min_sd).astype(np.float32), mask=common, n=n)


def zmap(resid: np.ndarray, reference: ReferenceStats, mask: np.ndarray) -> np.ndarray:
    """(residual - reference mean) / reference sd inside the scan's mask and the reference's; 0 elsewhere."""
    inside = np.asarray(mask, bool) & reference.mask
    out = np.zeros(resid.shape, np.float32)
    out[inside] = (np.asarray(resid, np.float32)[inside] - reference.mean[inside]) / reference.sd[inside]
    return out


def regional_summary(z: np.ndarray, labels: np.ndarray, names: Mapping[int, str]) -> pd.DataFrame:
    """Per region (label value > 0 in ``names``): voxels, mean z, mean |z| and the share of |z| > 2 (0 voxels of a
    z-map outside its mask are left out)."""
    rows = []
    for value, name in names.items():
        if value <= 0:
            continue
        region = (labels == value) & (z != 0)
        values = z[region]
        rows.append({"region": name, "voxels": int(region.sum()),
                     "mean_z": float(values.mean()) if values.size else float("nan"),
                     "mean_abs_z": float(np.abs(values).mean()) if values.size else float("nan"),
                     "fraction_abs_z_over_2": float((np.abs(values) > 2).mean()) if values.size else float("nan")})
    return pd.DataFrame(rows, columns=["region", "voxels", "mean_z", "mean_abs_z", "fraction_abs_z_over_2"])


@dataclass(frozen=True)
class GroupMap:
    """Mean z of group a minus group b, Welch's t per voxel, and the family-wise (max-|t|) threshold."""

    difference: np.ndarray
    t: np.ndarray
    threshold: float  # |t| above it is significant at ``alpha``, family-wise over the mask
    alpha: float
    n_permutations: int
    significant: np.ndarray


def _welch_t(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Welch's t over axis 0 of (scans, voxels) groups."""
    va, vb = a.var(axis=0, ddof=1), b.var(axis=0, ddof=1)
    se = np.sqrt(va / len(a) + vb / len(b))
    return np.divide(a.mean(axis=0) - b.mean(axis=0), se, out=np.zeros(se.shape), where=se > 0)


def group_map(zmaps_a: np.ndarray, zmaps_b: np.ndarray, mask: np.ndarray, *, n_permutations: int = 1000,
              alpha: float = 0.05, seed: int = 0) -> GroupMap:
    """Group difference of z-maps ((scans, *grid) arrays) with a permutation max-|t| threshold (FWE ``alpha``):
    group labels are shuffled over the pooled scans, and the (1 - alpha) quantile of the largest |t| over the
    mask is the threshold (Nichols & Holmes 2002)."""
    if len(zmaps_a) < 2 or len(zmaps_b) < 2:
        raise ValueError("each group needs two or more scans")
    inside = np.asarray(mask, bool)
    a = np.asarray(zmaps_a, np.float64)[:, inside]
    b = np.asarray(zmaps_b, np.float64)[:, inside]
    pooled = np.concatenate([a, b])
    t_observed = _welch_t(a, b)
    rng = np.random.default_rng(seed)
    maxima = np.empty(n_permutations)
    for i in range(n_permutations):
        order = rng.permutation(len(pooled))
        maxima[i] = np.abs(_welch_t(pooled[order[: len(a)]], pooled[order[len(a):]])).max()
    threshold = float(np.quantile(maxima, 1 - alpha)) if n_permutations else float("inf")
    shape = np.shape(mask)
    t_map = np.zeros(shape, np.float32)
    t_map[inside] = t_observed
    difference = np.zeros(shape, np.float32)
    difference[inside] = a.mean(axis=0) - b.mean(axis=0)
    return GroupMap(difference=difference, t=t_map, threshold=threshold, alpha=alpha,
                    n_permutations=n_permutations, significant=np.abs(t_map) > threshold)


def traversal_direction(latents: np.ndarray, labels: Sequence[str], positive: str, negative: str) -> np.ndarray:
    """Unit vector from the mean latent of ``negative`` to that of ``positive`` (e.g. euploid -> DS)."""
    labels = np.asarray(labels).astype(str)
    latents = np.asarray(latents, np.float64)
    if not (labels == positive).any() or not (labels == negative).any():
        raise ValueError(f"both classes are needed for a traversal ({positive!r}, {negative!r})")
    direction = latents[labels == positive].mean(axis=0) - latents[labels == negative].mean(axis=0)
    norm = np.linalg.norm(direction)
    if norm == 0:
        raise ValueError("the class means coincide: no direction to traverse")
    return direction / norm


def traversal_codes(start: np.ndarray, direction: np.ndarray, steps: Sequence[float]) -> np.ndarray:
    """Latent codes ``start + s * direction`` for each step ``s`` (in latent units), one row per step."""
    return np.asarray(start, np.float64)[None, :] + np.asarray(steps, np.float64)[:, None] * direction[None, :]


def field_agreement(decoded_change: np.ndarray, true_field: np.ndarray, mask: np.ndarray) -> float:
    """Pearson correlation, inside the mask, of a decoded change (e.g. the intensity difference between the two
    ends of a traversal) with a known field (e.g. the true DS deformation's log-Jacobian on the same grid)."""
    inside = np.asarray(mask, bool)
    a = np.asarray(decoded_change, np.float64)[inside]
    b = np.asarray(true_field, np.float64)[inside]
    if a.size < 3 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])
