"""How far a scan lies from a reference group (the euploid scans a normative VAE learnt from): the Mahalanobis
distance of its latent vector, and z-scores of any per-scan value such as the reconstruction error.

Plain numpy and scikit-learn, shared by the latents export (:mod:`brainvae.vae.latents`, which writes both scores
into the latents table) and the normative analysis (:mod:`brainvae.analysis.normative`).
"""

from __future__ import annotations

import numpy as np

__all__ = ["mahalanobis_scores", "zscores"]


def mahalanobis_scores(latents: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Mahalanobis distance of each latent vector to the reference latents (the euploid training scans), with a
    Ledoit-Wolf shrunk covariance so that it is defined when latents outnumber scans."""
    from sklearn.covariance import LedoitWolf

    reference = np.asarray(reference, np.float64)
    if len(reference) < 2:
        raise ValueError("the reference needs two or more latent vectors")
    fit = LedoitWolf().fit(reference)
    centred = np.asarray(latents, np.float64) - fit.location_
    return np.sqrt(np.einsum("ij,jk,ik->i", centred, fit.precision_, centred))


def zscores(values: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """(value - reference mean) / reference sd, e.g. a scan's reconstruction error against the euploid ones."""
    reference = np.asarray(reference, np.float64)
    sd = reference.std(ddof=1)
    if not np.isfinite(sd) or sd <= 0:
        raise ValueError("the reference values need a spread (two or more distinct values)")
    return (np.asarray(values, np.float64) - reference.mean()) / sd
