"""Synthetic smooth "brains" for the VAE library's tests (test-only: the demo and benchmarks use brainvae.synth).

Each volume is an ellipsoidal brain mask (random size and offset) filled with a smooth tissue
pattern: a bright "cortex" shell, dark "ventricles" whose size varies per subject (as in DS), a
few Gaussian blobs and low-frequency texture; normalised to mean 0 / sd 1 inside the mask and 0
outside, like the preprocessed inputs. Few generative factors, so a VAE and a PCA both have
something low-dimensional to learn.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

from brainvae.io import atomic_path, atomic_write_text

__all__ = ["synthetic_brains", "write_synthetic_cohort"]


def synthetic_brains(n: int, shape: tuple[int, int, int] = (40, 48, 40), seed: int = 0
                     ) -> tuple[np.ndarray, np.ndarray]:
    """``n`` volumes (float32, ``n x shape``) and their masks (uint8)."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s, dtype=np.float32) for s in shape],
                                indexing="ij"))
    vols = np.zeros((n, *shape), dtype=np.float32)
    masks = np.zeros((n, *shape), dtype=np.uint8)
    for i in range(n):
        radii = rng.uniform(0.72, 0.86, 3).astype(np.float32)
        centre = rng.uniform(-0.04, 0.04, 3).astype(np.float32)
        r = np.sqrt((((grid - centre[:, None, None, None]) / radii[:, None, None, None]) ** 2).sum(0))
        mask = r < 1.0
        vent = rng.uniform(0.12, 0.3)
        img = 1.0 + 0.8 * np.exp(-((r - 0.9) / 0.08) ** 2)            # cortex-like shell
        for side in (-1, 1):                                           # two ventricles
            c = np.array([side * 0.18, 0.05, 0.05], dtype=np.float32)
            d = np.sqrt((((grid - c[:, None, None, None]) / [[[[vent]]], [[[1.6 * vent]]], [[[vent]]]]) ** 2).sum(0))
            img -= 0.9 * np.exp(-(d ** 2) * 2.0)
        for _ in range(3):                                             # subject-specific blobs
            c = rng.uniform(-0.5, 0.5, 3).astype(np.float32)
            d2 = ((grid - c[:, None, None, None]) ** 2).sum(0)
            img += rng.normal(0, 0.4) * np.exp(-d2 / (2 * rng.uniform(0.1, 0.2) ** 2))
        img += 0.15 * ndimage.gaussian_filter(rng.standard_normal(shape), 3.0) * 3.0
        inside = img[mask]
        img = (img - inside.mean()) / inside.std()
        vols[i] = np.where(mask, img, 0.0)
        masks[i] = mask
    return vols, masks


def write_synthetic_cohort(out_dir: str | os.PathLike[str], n: int,
                           shape: tuple[int, int, int] = (40, 48, 40), seed: int = 0,
                           subjects_with_two_sessions: int = 0) -> dict[str, Path]:
    """Write ``cohort.npy``, ``cohort_mask.npy`` and ``cohort_index.tsv`` (the formats of
    :func:`~brainvae.vae.cohort.build_cohort_array`) for ``n`` synthetic scans in two datasets.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vols, masks = synthetic_brains(n, shape, seed)
    paths = {"array": out_dir / "cohort.npy", "mask": out_dir / "cohort_mask.npy",
             "index": out_dir / "cohort_index.tsv"}
    with atomic_path(paths["array"], suffix=".npy") as tmp:
        np.save(tmp, vols.astype(np.float16))
    with atomic_path(paths["mask"], suffix=".npy") as tmp:
        np.save(tmp, masks)
    rng = np.random.default_rng(seed + 1)
    rows = []
    n_subjects = n - subjects_with_two_sessions
    for i in range(n):
        s = i if i < n_subjects else i - n_subjects  # the last scans are 2nd sessions
        ses = "2" if i >= n_subjects else "1"
        dataset = "IXI" if s % 2 == 0 else "HCP"
        label = "DS" if s % 5 == 4 else "euploid"
        subject = f"s{s:03d}"
        scan = f"{dataset}_sub-{subject}_ses-{ses}"
        rows.append({"row": i, "scan": scan, "scan_key": scan, "dataset": dataset,
                     "subject": subject, "session": ses, "acquisition": "", "run": "",
                     "label": label, "role": "both", "train": True, "analyse": True,
                     "age": f"{rng.uniform(20, 60):.1f}", "sex": "F" if s % 3 else "M"})
    atomic_write_text(pd.DataFrame(rows).to_csv(sep="\t", index=False), paths["index"])
    return paths
