"""Normative modelling with a VAE trained on euploid brains: per-scan residual and z-maps against the euploid
held-out residuals, regional summaries, DS-minus-euploid group maps with a family-wise permutation threshold,
latent deviation scores (Mahalanobis distance, reconstruction-error z), and latent traversals along the
direction that separates two groups.

Plain numpy (and scikit-learn's Ledoit-Wolf covariance): the caller reconstructs and decodes with its model,
so this module never imports a model or a trainer.

Conventions: volumes are float arrays of one grid; ``mask`` is boolean; z-maps are 0 outside the mask.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from brainvae.deviation import mahalanobis_scores, zscores  # noqa: F401  (part of this module's API)
from brainvae.memmaps import release_pages

__all__ = ["GROUP_MAP_BLOCK_MIB", "GroupMap", "ReferenceStats", "TraversalAgreement", "class_traversal",
           "field_agreement",
           "group_map", "mahalanobis_scores", "regional_summary", "residual", "traversal_agreement",
           "traversal_change", "traversal_codes", "traversal_direction", "zmap", "zscores"]

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


#: Memory (MiB) of one block of the group map's permutation test: the voxels per block follow from it (about a
#: dozen float64 arrays of permutations x block voxels, three of scans x block voxels), so the peak stays near
#: this whatever the grid, the number of scans and of permutations.
GROUP_MAP_BLOCK_MIB = 256


def _welch_t_from_sums(n_a: int, n_b: int, sum_a, sum_b, sq_a, sq_b):
    """Welch's t from group sums and sums of squares (arrays of one shape); 0 where both groups are constant."""
    mean_a, mean_b = sum_a / n_a, sum_b / n_b
    var_a = np.clip((sq_a - n_a * mean_a ** 2) / (n_a - 1), 0.0, None)
    var_b = np.clip((sq_b - n_b * mean_b ** 2) / (n_b - 1), 0.0, None)
    se = np.sqrt(var_a / n_a + var_b / n_b)
    return np.divide(mean_a - mean_b, se, out=np.zeros(np.shape(se)), where=se > 1e-12)


def group_map(values: np.ndarray, in_a: np.ndarray, mask: np.ndarray, *, in_b: np.ndarray | None = None,
              n_permutations: int = 1000, alpha: float = 0.05, seed: int = 0,
              block_voxels: int | None = None) -> GroupMap:
    """Group difference of z-maps with a permutation max-|t| threshold (FWE ``alpha``; Nichols & Holmes 2002).

    ``values``: (scans, voxels inside ``mask``): an array, or a :class:`brainvae.memmaps.MatrixFile` on disk. It
    is read one block of voxels at a time (``values[:, lo:hi]``), so the z-maps of thousands of scans never need to
    fit in memory. ``in_a`` / ``in_b``: boolean masks
    of the scans of each group (``in_b`` defaults to every scan not in ``in_a``; scans in neither are left
    out). The group labels are shuffled over the pooled scans, the same shuffles for every block, and the
    (1 - alpha) quantile of the largest |t| over the mask is the threshold.
    """
    inside = np.asarray(mask, bool)
    in_a = np.asarray(in_a, bool)
    in_b = ~in_a if in_b is None else np.asarray(in_b, bool)
    if values.shape != (len(in_a), int(inside.sum())):
        raise ValueError(f"values: expected shape {(len(in_a), int(inside.sum()))} (scans, voxels in the mask), "
                         f"got {values.shape}")
    if in_a.sum() < 2 or in_b.sum() < 2:
        raise ValueError("each group needs two or more scans")
    if (in_a & in_b).any():
        raise ValueError("a scan is in both groups")
    pooled = np.flatnonzero(in_a | in_b)
    n_a, n_b = int(in_a.sum()), int(in_b.sum())
    rng = np.random.default_rng(seed)
    # Row 0: the observed grouping; then one row per shuffle (1 = group a), over the pooled scans.
    membership = np.zeros((n_permutations + 1, len(pooled)))
    membership[0] = in_a[pooled]
    for i in range(n_permutations):
        membership[i + 1, rng.permutation(len(pooled))[:n_a]] = 1.0
    complement = 1.0 - membership
    if block_voxels is None:
        per_voxel = 8 * (12 * (n_permutations + 1) + 3 * len(pooled))
        block_voxels = max(64, GROUP_MAP_BLOCK_MIB * 2 ** 20 // per_voxel)
    t_observed = np.zeros(values.shape[1])
    difference = np.zeros(values.shape[1])
    maxima = np.zeros(n_permutations)
    for lo in range(0, values.shape[1], block_voxels):
        block = np.asarray(values[:, lo:lo + block_voxels], np.float64)[pooled]
        release_pages(values)  # a memory map's read pages leave the resident set (whole rows would stay)
        block = block - block.mean(axis=0)  # t is shift-invariant; centring keeps the sums of squares exact
        squares = block ** 2
        sum_a, sq_a = membership @ block, membership @ squares
        sum_b, sq_b = complement @ block, complement @ squares
        t = _welch_t_from_sums(n_a, n_b, sum_a, sum_b, sq_a, sq_b)
        t_observed[lo:lo + block.shape[1]] = t[0]
        difference[lo:lo + block.shape[1]] = sum_a[0] / n_a - sum_b[0] / n_b
        if n_permutations:
            maxima = np.maximum(maxima, np.abs(t[1:]).max(axis=1))
    threshold = float(np.quantile(maxima, 1 - alpha)) if n_permutations else float("inf")
    shape = np.shape(mask)
    t_map = np.zeros(shape, np.float32)
    t_map[inside] = t_observed
    difference_map = np.zeros(shape, np.float32)
    difference_map[inside] = difference
    return GroupMap(difference=difference_map, t=t_map, threshold=threshold, alpha=alpha,
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


@dataclass(frozen=True)
class TraversalAgreement:
    """How well a traversal's decoded change matches a known pattern, against label shuffles."""

    correlation: float             # Pearson r of the decoded change with the pattern, inside the mask
    p_value: float                 # one-sided: (1 + shuffles with r >= observed) / (1 + shuffles)
    null_quantiles: dict[str, float]  # of r under shuffled labels: 50, 95 and 99 %
    n_permutations: int

    def agrees(self, alpha: float) -> bool:
        """Positive correlation that label shuffles rarely reach (p < alpha)."""
        return bool(np.isfinite(self.correlation) and self.correlation > 0 and self.p_value < alpha)


def class_traversal(latents: np.ndarray, labels: Sequence[str], positive: str, negative: str,
                    steps: Sequence[float]) -> tuple[np.ndarray, float]:
    """Codes (one row per step) from the ``negative`` mean latent towards the ``positive`` one, at ``steps``
    multiples of the distance between the two means, and that distance."""
    labels = np.asarray(labels).astype(str)
    latents = np.asarray(latents, np.float64)
    direction = traversal_direction(latents, labels, positive, negative)
    start = latents[labels == negative].mean(axis=0)
    distance = float(np.linalg.norm(latents[labels == positive].mean(axis=0) - start))
    return traversal_codes(start, direction, np.asarray(steps, np.float64) * distance), distance


def traversal_change(latents: np.ndarray, labels: Sequence[str], positive: str, negative: str,
                     first: float, last: float, decode: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Decoded image at step ``last`` minus that at step ``first`` of :func:`class_traversal`."""
    decoded = decode(class_traversal(latents, labels, positive, negative, [first, last])[0])
    return decoded[1] - decoded[0]


def traversal_agreement(change: np.ndarray, latents: np.ndarray, labels: Sequence[str], positive: str,
                        negative: str, first: float, last: float, decode: Callable[[np.ndarray], np.ndarray],
                        pattern: np.ndarray, mask: np.ndarray, *, n_permutations: int = 200,
                        seed: int = 0) -> TraversalAgreement:
    """Correlation of the traversal's decoded ``change`` (:func:`traversal_change`) with ``pattern`` inside the
    mask, and its null: the same traversal with the labels shuffled over the scans of the two classes.

    The null is what the model's decoder does along a direction that carries no group information (a smooth
    decoder makes any change spatially coherent, so r far from 0 is not by itself agreement).
    """
    observed = field_agreement(change, pattern, mask)
    labels = np.asarray(labels).astype(str)
    pool = np.flatnonzero(np.isin(labels, [positive, negative]))
    rng = np.random.default_rng(seed)
    null = np.empty(n_permutations)
    for i in range(n_permutations):
        shuffled = labels.copy()
        shuffled[pool] = labels[pool][rng.permutation(len(pool))]
        null[i] = field_agreement(traversal_change(latents, shuffled, positive, negative, first, last, decode),
                                  pattern, mask)
    null = null[np.isfinite(null)]
    p_value = float((1 + np.sum(null >= observed)) / (1 + len(null))) if np.isfinite(observed) else float("nan")
    quantiles = ({f"q{q}": float(np.percentile(null, q)) for q in (50, 95, 99)} if len(null)
                 else {"q50": float("nan"), "q95": float("nan"), "q99": float("nan")})
    return TraversalAgreement(correlation=observed, p_value=p_value, null_quantiles=quantiles,
                              n_permutations=int(len(null)))
