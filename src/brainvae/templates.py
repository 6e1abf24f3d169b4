"""Reference templates, all available offline.

* MNI152 2009a nonlinear symmetric T1 (brain only) and its brain mask: shipped by nilearn.
* Colin27 whole head and brain (MNI space): bundled in ``brainvae/data/templates`` (BSD-3, see README there).
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from pathlib import Path

import nibabel as nib
import numpy as np

#: BIDS-Derivatives name of the space every output is resampled into.
MNI_SPACE = "MNI152NLin2009aSym"


def _bundled(name: str) -> Path:
    return Path(str(resources.files("brainvae") / "data" / "templates" / name))


@lru_cache(maxsize=None)
def mni152_brain(resolution: int = 1) -> nib.Nifti1Image:
    """MNI152 2009a symmetric T1, skull-stripped, intensities in [0, 1]."""
    from nilearn.datasets import load_mni152_template

    img = load_mni152_template(resolution=resolution)
    return nib.Nifti1Image(np.asarray(img.dataobj, dtype=np.float32), img.affine)


@lru_cache(maxsize=None)
def mni152_brain_mask(resolution: int = 1) -> nib.Nifti1Image:
    """Binary brain mask of the MNI152 2009a template (uint8)."""
    from nilearn.datasets import load_mni152_brain_mask

    img = load_mni152_brain_mask(resolution=resolution)
    return nib.Nifti1Image((np.asarray(img.dataobj) > 0).astype(np.uint8), img.affine)


@lru_cache(maxsize=None)
def colin27_head() -> nib.Nifti1Image:
    """Colin27 whole-head T1 in MNI space (1 mm), float32."""
    img = nib.load(_bundled("colin27_head.nii.gz"))
    return nib.Nifti1Image(np.asarray(img.dataobj, dtype=np.float32), img.affine)


@lru_cache(maxsize=None)
def colin27_brain() -> nib.Nifti1Image:
    """Colin27 skull-stripped T1 in MNI space (1 mm), float32."""
    img = nib.load(_bundled("colin27_brain.nii.gz"))
    return nib.Nifti1Image(np.asarray(img.dataobj, dtype=np.float32), img.affine)
