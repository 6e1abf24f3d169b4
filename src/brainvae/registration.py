"""Affine registration of a native head to MNI space, and transform bookkeeping.

Conventions (read this before touching any matrix):

* Every affine this module returns is a **4x4 world-to-world map in RAS millimetres**,
  ``x_mni = A @ x_native`` (homogeneous column vectors), i.e. *native -> MNI* in the same world
  coordinates nibabel uses for ``img.affine``. It is independent of any voxel grid.
* ITK/ANTs work in **LPS** world coordinates and a registration with ``fixed=template,
  moving=native`` returns the transform that maps *fixed (template) points to moving (native)
  points* -- the direction needed to pull native intensities onto the template grid. So the ITK
  matrix is ``T_lps = F @ inv(A) @ F`` with ``F = diag(-1, -1, 1, 1)``, and conversely
  ``A = F @ inv(T_lps) @ F``. :func:`ras_to_itk` / :func:`itk_to_ras` are the only places that
  encode this; everything else goes through them.
* On disk a transform is either an ITK/ANTs ``.mat`` (``AffineTransform_double_3_3``, usable
  directly with ``antsApplyTransforms -t file.mat`` to resample native into MNI) or a ``.json``
  ``{"affine_native_to_mni_ras": 4x4, ...}``; :func:`write_transform` / :func:`read_transform`
  pick the format from the suffix.

Level 1 (head -> Colin27 whole head, MNI space) is rigid then affine at ~3-4 mm and is initialised
from the centre of mass of the top of the head, so necks and partial fields of view do not drag the
initialisation down. Level 2 (brain -> MNI152 2009a brain) refines it at ~2 mm on skull-stripped
images, starting from level 1; it returns the full composed native -> MNI affine.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from brainvae import templates
from brainvae.errors import InputError

#: RAS <-> LPS flip (its own inverse).
_FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])


# --------------------------------------------------------------------------------------------
# Matrix conventions
# --------------------------------------------------------------------------------------------
def ras_to_itk(affine_ras: np.ndarray) -> np.ndarray:
    """Native->MNI RAS affine -> ITK/ANTs fixed(MNI)->moving(native) LPS 4x4 matrix."""
    return _FLIP @ np.linalg.inv(np.asarray(affine_ras, dtype=float)) @ _FLIP


def itk_to_ras(itk_lps: np.ndarray) -> np.ndarray:
    """Inverse of :func:`ras_to_itk`."""
    return _FLIP @ np.linalg.inv(np.asarray(itk_lps, dtype=float)) @ _FLIP


def ants_transform_to_matrix(tx) -> np.ndarray:
    """4x4 LPS matrix of an ANTs affine-family transform (centre folded into the offset).

    ITK: ``y = M (x - c) + t + c`` with parameters ``[M row-major (9), t (3)]`` and fixed
    parameters ``c``.
    """
    p = np.asarray(tx.parameters, dtype=float)
    c = np.asarray(tx.fixed_parameters, dtype=float)
    if p.size != 12 or c.size != 3:
        raise ValueError(f"not a 3D affine transform ({tx.transform_type}, {p.size} parameters)")
    m = p[:9].reshape(3, 3)
    out = np.eye(4)
    out[:3, :3] = m
    out[:3, 3] = p[9:] + c - m @ c
    return out


def matrix_to_ants_transform(itk_lps: np.ndarray):
    """ANTs ``AffineTransform`` (double, centre 0) from a 4x4 LPS matrix."""
    import ants

    m = np.asarray(itk_lps, dtype=float)
    return ants.create_ants_transform(
        transform_type="AffineTransform",
        precision="double",
        dimension=3,
        parameters=list(m[:3, :3].ravel()) + list(m[:3, 3]),
        fixed_parameters=[0.0, 0.0, 0.0],
    )


def write_transform(affine_ras: np.ndarray, path: str | os.PathLike[str]) -> Path:
    """Write a native->MNI RAS affine as ITK ``.mat`` or ``.json`` (by suffix), atomically."""
    from brainvae.io import atomic_path, atomic_write_json

    path = Path(path)
    a = np.asarray(affine_ras, dtype=float)
    if path.suffix == ".json":
        return atomic_write_json(
            {
                "affine_native_to_mni_ras": a.tolist(),
                "convention": "x_mni = A @ x_native, world RAS millimetres (nibabel)",
                "space": templates.MNI_SPACE,
            },
            path,
        )
    if path.suffix != ".mat":
        raise ValueError(f"{path}: transform files must end in .mat or .json")
    import ants

    with atomic_path(path, suffix=".mat") as tmp:
        ants.write_transform(matrix_to_ants_transform(ras_to_itk(a)), str(tmp))
    return path


def read_transform(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a native->MNI RAS affine written by :func:`write_transform` (or by ANTs)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "transform file not found")
    if path.suffix == ".json":
        from brainvae.io import read_json

        a = np.asarray(read_json(path)["affine_native_to_mni_ras"], dtype=float)
        if a.shape != (4, 4):
            raise InputError(path, f"affine must be 4x4, got {a.shape}")
        return a
    import ants

    try:
        tx = ants.read_transform(str(path), precision="double")
    except Exception as exc:  # ITK raises a bare RuntimeError for unreadable files
        raise InputError(path, f"not a readable ITK transform ({exc})") from exc
    return itk_to_ras(ants_transform_to_matrix(tx))


# --------------------------------------------------------------------------------------------
# nibabel <-> ANTs images
# --------------------------------------------------------------------------------------------
def to_ants(img: nib.Nifti1Image, data: np.ndarray | None = None):
    """ANTs image with the same voxels and world position as ``img`` (RAS affine -> LPS)."""
    import ants

    a = img.affine
    zooms = np.linalg.norm(a[:3, :3], axis=0)
    direction = a[:3, :3] / zooms
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
        raise InputError(getattr(img, "get_filename", lambda: None)() or "image",
                         "voxel axes are sheared; conform the image first")
    arr = np.asarray(img.dataobj if data is None else data, dtype=np.float32)
    return ants.from_numpy(
        np.ascontiguousarray(arr),
        origin=tuple(float(v) for v in _FLIP[:3, :3] @ a[:3, 3]),
        spacing=tuple(float(z) for z in zooms),
        direction=_FLIP[:3, :3] @ direction,
    )


def to_ants_downsampled(img: nib.Nifti1Image, resolution_mm: float,
                        data: np.ndarray | None = None):
    """ANTs image of ``img`` at (about) isotropic ``resolution_mm``, anti-aliased.

    Block-averages by the largest integer factor per axis that stays at or below the target
    (cheap, and a box filter is an adequate anti-alias for a registration metric), then resamples
    linearly to exactly ``resolution_mm``. The world position of the field of view is preserved.
    """
    import ants

    from brainvae.bias import block_mean

    arr = np.asarray(img.dataobj if data is None else data, dtype=np.float32)
    zooms = np.linalg.norm(img.affine[:3, :3], axis=0)
    f = tuple(max(1, int(np.floor(resolution_mm / z + 1e-6))) for z in zooms)
    small = block_mean(arr, f)
    # A block's centre sits (f - 1) / 2 voxels from its first voxel.
    aff = img.affine @ np.diag(list(f) + [1.0])
    aff[:3, 3] = img.affine[:3, :3] @ ((np.asarray(f) - 1) / 2.0) + img.affine[:3, 3]
    out = to_ants(nib.Nifti1Image(small, aff))
    if np.allclose(out.spacing, resolution_mm, atol=1e-3):
        return out
    return ants.resample_image(out, (resolution_mm,) * 3, use_voxels=False, interp_type=0)


# --------------------------------------------------------------------------------------------
# Initialisation
# --------------------------------------------------------------------------------------------
def _top_of_head_centroid(mask: np.ndarray, affine: np.ndarray, depth_mm: float) -> np.ndarray:
    """RAS centroid of the part of a head mask within ``depth_mm`` below its highest voxel.

    Why: the centre of mass of the whole head moves with the field of view (neck, shoulders,
    cut-off cerebellum); the vertex is always imaged, so "top ``depth_mm`` of the head" is a
    stable landmark in scans and template alike.
    """
    # Every 2nd voxel per axis is plenty for a centroid and 8x cheaper.
    idx = np.argwhere(mask[::2, ::2, ::2]) * 2
    if idx.size == 0:
        raise ValueError("empty head mask")
    world = idx @ affine[:3, :3].T + affine[:3, 3]
    top = world[:, 2].max()
    keep = world[:, 2] >= top - depth_mm
    return world[keep].mean(axis=0)



@lru_cache(maxsize=1)
def _template_top_centroid(depth_mm: float) -> np.ndarray:
    from brainvae.bias import head_mask

    tpl = templates.colin27_head()
    return _top_of_head_centroid(np.asarray(head_mask(tpl).dataobj) > 0, tpl.affine, depth_mm)


def _translation_init(head: nib.Nifti1Image, head_mask_img: nib.Nifti1Image,
                      depth_mm: float = 170.0) -> np.ndarray:
    """Native->MNI RAS translation aligning top-of-head centroids of scan and Colin27."""
    nat_c = _top_of_head_centroid(np.asarray(head_mask_img.dataobj) > 0, head.affine, depth_mm)
    a = np.eye(4)
    a[:3, 3] = _template_top_centroid(depth_mm) - nat_c
    return a


# --------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------
@dataclass
class RegistrationParams:
    """Knobs of one ANTs linear stage (see ``ants.registration``)."""

    resolution_mm: float
    shrink_factors: tuple[int, ...]
    smoothing_sigmas: tuple[float, ...]
    iterations: tuple[int, ...]
    metric: str = "mattes"
    sampling_rate: float = 0.25


#: Seed of ANTs' random metric sampling.
REGISTRATION_SEED = 2026

#: Level 1: coarse and robust (rigid, then affine).
LEVEL1_RIGID = RegistrationParams(4.0, (4, 2, 1), (2.0, 1.0, 0.0), (100, 50, 25))
LEVEL1_AFFINE = RegistrationParams(4.0, (2, 1), (1.0, 0.0), (50, 25))
#: Level 2: fine affine on brains at 2 mm, metric restricted to the (dilated) template brain.
LEVEL2_AFFINE = RegistrationParams(2.0, (4, 2, 1), (2.0, 1.0, 0.0), (60, 40, 20),
                                   sampling_rate=0.3)


def _ants_linear(fixed, moving, transform: str, init_ras: np.ndarray, p: RegistrationParams,
                 fixed_mask=None) -> np.ndarray:
    """One ANTs linear stage; returns the resulting native->MNI RAS affine (init included)."""
    import ants

    # A fixed seed: the metric samples random points, so without one every run differs (bitwise
    # reruns need it and the same thread count). ANTsPy 0.6 passes `--random-seed` to
    # antsRegistration only from this module-level setting; restored afterwards.
    previous_seed = ants.config._random_seed
    ants.config._random_seed = REGISTRATION_SEED
    try:
        with tempfile.TemporaryDirectory(prefix="brainvae_reg_") as tmp:
            init_path = os.path.join(tmp, "init.mat")
            ants.write_transform(matrix_to_ants_transform(ras_to_itk(init_ras)), init_path)
            out = ants.registration(
                fixed=fixed,
                moving=moving,
                type_of_transform=transform,
                initial_transform=[init_path],
                outprefix=os.path.join(tmp, "reg_"),
                mask=fixed_mask,
                aff_metric=p.metric,
                aff_sampling=32,
                aff_random_sampling_rate=p.sampling_rate,
                aff_iterations=p.iterations,
                aff_shrink_factors=p.shrink_factors,
                aff_smoothing_sigmas=p.smoothing_sigmas,
            )
            # With collapsed output (-z 1) the single GenericAffine already contains the initial
            # transform, so it is the full fixed->moving map.
            (mat,) = out["fwdtransforms"]
            tx = ants.read_transform(mat, precision="double")
            return itk_to_ras(ants_transform_to_matrix(tx))
    finally:
        ants.config._random_seed = previous_seed


@dataclass
class Level1Result:
    affine: np.ndarray  #: native -> MNI (Colin27 head space), RAS
    rigid: np.ndarray  #: the rigid stage alone, RAS
    init: np.ndarray  #: the centroid initialisation, RAS
    correlation: float  #: Pearson r of scan vs Colin27 head after level 1 (inside the template head)


def level1_affine(
    head: nib.Nifti1Image,
    head_mask_img: nib.Nifti1Image | None = None,
    *,
    rigid: RegistrationParams = LEVEL1_RIGID,
    affine: RegistrationParams = LEVEL1_AFFINE,
    init: np.ndarray | None = None,
) -> Level1Result:
    """Whole head (ideally N4-corrected) -> Colin27 head in MNI space: rigid, then affine.

    Both images are smoothed and resampled to the stage resolution first: a 1 mm head has ~17 M
    voxels, at 3-4 mm a few hundred thousand, and a 12-parameter fit needs no more.
    """
    from brainvae.bias import head_mask

    if head_mask_img is None:
        head_mask_img = head_mask(head)
    if init is None:
        init = _translation_init(head, head_mask_img)
    tpl = templates.colin27_head()
    a_rigid = _ants_linear(to_ants_downsampled(tpl, rigid.resolution_mm),
                           to_ants_downsampled(head, rigid.resolution_mm), "Rigid", init, rigid)
    a_aff = _ants_linear(to_ants_downsampled(tpl, affine.resolution_mm),
                         to_ants_downsampled(head, affine.resolution_mm), "Affine", a_rigid, affine)
    return Level1Result(a_aff, a_rigid, init, template_correlation(head, a_aff, tpl))


def template_correlation(img: nib.Nifti1Image, affine_ras: np.ndarray,
                         template: nib.Nifti1Image, mask: np.ndarray | None = None,
                         resolution_mm: float = 3.0) -> float:
    """Pearson r between the template and ``img`` mapped through ``affine_ras`` (QC number).

    Computed on a ``resolution_mm`` subsample of the template grid, inside ``mask`` (template
    grid) or else inside the template's non-zero voxels.
    """
    from brainvae.resample import Grid, resample_to_grid

    step = max(1, int(round(resolution_mm / float(np.linalg.norm(template.affine[:3, 0])))))
    g = Grid.from_image(template).subsample(step)
    moved = resample_to_grid(img, affine_ras, g, order=1).get_fdata()
    t = np.asarray(template.dataobj, dtype=np.float32)[::step, ::step, ::step]
    m = (t > 0) if mask is None else np.asarray(mask, bool)[::step, ::step, ::step]
    m = m[: moved.shape[0], : moved.shape[1], : moved.shape[2]]
    t = t[: moved.shape[0], : moved.shape[1], : moved.shape[2]]
    x, y = moved[m], t[m]
    if x.std() == 0 or y.std() == 0:
        return 0.0
    return float(np.corrcoef(x, y)[0, 1])


def brain_mask_from_template(img: nib.Nifti1Image, affine_ras: np.ndarray,
                             dilate_mm: float = 0.0) -> nib.Nifti1Image:
    """MNI152 brain mask pulled back onto ``img``'s grid through ``affine_ras`` (uint8).

    A stand-in for skull stripping (tests, benchmarks, fallback); accurate only to the
    registration and to anatomical variability.
    """
    from brainvae.resample import Grid, resample_to_grid

    tpl_mask = templates.mni152_brain_mask(1)
    # Resample the template mask into native space = the inverse map (MNI -> native).
    m = resample_to_grid(tpl_mask, np.linalg.inv(affine_ras), Grid.from_image(img), order=1)
    out = m.get_fdata() >= 0.5
    if dilate_mm > 0:
        zoom = float(np.min(img.header.get_zooms()[:3]))
        out = ndimage.binary_dilation(out, iterations=max(1, int(round(dilate_mm / zoom))))
    return nib.Nifti1Image(out.astype(np.uint8), img.affine)


def mask_to_native(mask: nib.Nifti1Image, native: nib.Nifti1Image, mask_space: str,
                    level1: np.ndarray) -> np.ndarray:
    from brainvae.resample import Grid, resample_to_grid

    if mask_space == "native":
        if mask.shape[:3] != native.shape[:3] or not np.allclose(mask.affine, native.affine,
                                                                 atol=1e-3):
            # Same world space, different grid: resample (identity world map).
            mask = resample_to_grid(mask, np.eye(4), Grid.from_image(native), order=1)
        return np.asarray(mask.dataobj, dtype=np.float32) >= 0.5
    if mask_space == "level1":
        # The mask's world coordinates are level-1 (MNI-like) coordinates: pull it back.
        m = resample_to_grid(mask, np.linalg.inv(level1), Grid.from_image(native), order=1)
        return m.get_fdata() >= 0.5
    raise ValueError(f"mask_space must be 'native' or 'level1', not {mask_space!r}")


@dataclass
class Level2Result:
    affine: np.ndarray  #: composed native -> MNI152NLin2009aSym, RAS
    correction: np.ndarray  #: level-1 space -> MNI (affine = correction @ level1)
    correlation: float  #: Pearson r of the brain vs the MNI152 brain inside its mask
    extra: dict = field(default_factory=dict)


def level2_affine(
    head: nib.Nifti1Image,
    brain_mask: nib.Nifti1Image,
    level1: np.ndarray,
    *,
    mask_space: str = "native",
    params: RegistrationParams = LEVEL2_AFFINE,
) -> Level2Result:
    """Skull-stripped brain -> MNI152 2009a brain, affine, initialised from level 1.

    ``brain_mask`` is in native space (``mask_space="native"``, any grid) or on a grid in
    level-1 space (``"level1"``, e.g. computed by skull stripping on the level-1-aligned head).
    The moving image is the native head times the mask (never resampled before the fit: ANTs
    maps it through the transform itself); the fixed one is the template at ``params``'
    resolution.
    """
    m = mask_to_native(brain_mask, head, mask_space, level1)
    if m.sum() < 1000:
        raise ValueError("brain mask is (nearly) empty")
    data = np.asarray(head.dataobj, dtype=np.float32) * m
    res = int(round(params.resolution_mm))
    tpl = templates.mni152_brain(res if res in (1, 2) else 2)
    fixed = to_ants_downsampled(tpl, params.resolution_mm)
    moving = to_ants_downsampled(head, params.resolution_mm, data)
    # Fixed mask = template brain dilated ~4 mm: the metric then ignores the empty template
    # background (faster, and less pull from the brain outline alone).
    tm = templates.mni152_brain_mask(res if res in (1, 2) else 2)
    tm_d = ndimage.binary_dilation(np.asarray(tm.dataobj) > 0,
                                   iterations=max(1, int(round(4.0 / tm.affine[0, 0]))))
    fixed_mask = to_ants_downsampled(nib.Nifti1Image(tm_d.astype(np.float32), tm.affine),
                                     params.resolution_mm)
    fixed_mask = fixed_mask.new_image_like((fixed_mask.numpy() > 0.5).astype(np.float32))
    a = _ants_linear(fixed, moving, "Affine", np.asarray(level1, float), params,
                     fixed_mask=fixed_mask)
    tpl_mask = np.asarray(templates.mni152_brain_mask(1).dataobj) > 0
    r = template_correlation(nib.Nifti1Image(data, head.affine), a, templates.mni152_brain(1),
                             mask=tpl_mask)
    return Level2Result(a, a @ np.linalg.inv(level1), r)


def affine_native_to_mni_ras(
    head: nib.Nifti1Image,
    brain_mask: nib.Nifti1Image | None = None,
    *,
    head_mask_img: nib.Nifti1Image | None = None,
    mask_space: str = "native",
) -> np.ndarray:
    """Full level 1 + level 2 native -> MNI152NLin2009aSym RAS affine of an N4-corrected head.

    Without ``brain_mask`` the MNI152 mask pulled back through level 1 (dilated 4 mm) is used.
    """
    l1 = level1_affine(head, head_mask_img).affine
    if brain_mask is None:
        brain_mask, mask_space = brain_mask_from_template(head, l1, dilate_mm=4.0), "native"
    return level2_affine(head, brain_mask, l1, mask_space=mask_space).affine
