"""The MNI-space reference of the synthetic cohort: a head (MNI152 2009a brain in a Colin27 head), its
regions (ventricles, cerebellum, frontal lobe, a control region) and the smooth region gradient fields that
every subject's local deformation is built from. Built once per process (cached), offline from the templates
that nilearn and brainvae ship.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from ..templates import colin27_brain, colin27_head, mni152_brain, mni152_brain_mask

#: Label values of :func:`region_labels` and of every ``*_desc-regions_dseg.nii.gz``.
REGION_LABELS = {0: "background", 1: "other_brain", 2: "ventricles", 3: "cerebellum", 4: "frontal", 5: "control"}
_LABEL = {name: value for value, name in REGION_LABELS.items()}

#: Smoothing (mm) of each region mask whose gradient drives that region's boundary shift: ventricles,
#: cerebellum and frontal lobe (size of the region), brain (its outline: cortical atrophy widens the CSF
#: between brain and skull).
REGION_SIGMA_MM = {"ventricles": 4.0, "cerebellum": 4.0, "frontal": 5.0, "brain": 3.0}
#: Grid (mm) of the gradient fields and of every subject's local displacement.
REGION_GRID_MM = 2
#: Amplitude of the subject's random lattice warp at the brain outline and outside, relative to deep in the
#: brain (keeps the outline nearly affine, so the truth affine fits the true mask).
WARP_OUTLINE = 1 / 3


@dataclass
class Reference:
    affine: np.ndarray            # MNI 1 mm voxel -> mm
    head: np.ndarray              # float32 reference intensity, MNI units (WM ~ levels['wm'])
    labels: np.ndarray            # uint8, REGION_LABELS
    levels: dict[str, float]      # reference intensity of csf, gm, wm, fat
    grad_affine: np.ndarray       # 2 mm grid of the region gradient fields
    grads: dict[str, np.ndarray]  # (3, ...) float32 grad of smoothed region mask, max norm 1
    warp_weight: np.ndarray       # subject warp amplitude factor on the same 2 mm grid
    brain_box_mm: np.ndarray      # (2, 3) min/max MNI mm of the brain
    head_centre_mm: np.ndarray


def _mni_coordinates(shape: tuple[int, ...], affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Broadcastable x, y, z MNI mm of a diagonal-affine grid."""
    return tuple(
        (np.arange(n) * affine[a, a] + affine[a, 3]).reshape([-1 if b == a else 1 for b in range(3)])
        for a, n in enumerate(shape)
    )


def _largest_components(mask: np.ndarray, keep: int) -> np.ndarray:
    lab, n = ndi.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(lab.ravel())[1:]
    order = np.argsort(sizes)[::-1][:keep] + 1
    return np.isin(lab, order)


@lru_cache(maxsize=None)
def _region_masks() -> dict[str, np.ndarray]:
    """Boolean MNI-grid masks: brain, ventricles, cerebellum, frontal, control (overlaps allowed)."""
    t1 = np.asarray(mni152_brain().dataobj, dtype=np.float32)
    brain = np.asarray(mni152_brain_mask().dataobj) > 0
    x, y, z = _mni_coordinates(t1.shape, mni152_brain().affine)
    wm = float(np.percentile(t1[brain], 90))
    csf_threshold = 0.52 * wm  # midway between CSF (~0.25 wm) and GM (~0.8 wm)

    # Lateral ventricles: dark, >= 3 mm inside the brain, near the centre; the two big lateral
    # components (the third ventricle merges with the cisterns at this threshold and is left out).
    core = ndi.binary_erosion(brain, iterations=3)
    box = (np.abs(x) <= 30) & (y >= -55) & (y <= 32) & (z >= -8) & (z <= 35)
    dark = (t1 < csf_threshold) & core & box
    lab, n = ndi.label(dark)
    sizes = np.bincount(lab[dark], minlength=n + 1)
    mean_x = np.bincount(lab[dark], weights=np.broadcast_to(x, t1.shape)[dark], minlength=n + 1) / np.maximum(sizes, 1)
    lateral = [i for i in range(1, n + 1) if sizes[i] >= 1000 and abs(mean_x[i]) > 5]
    ventricles = np.isin(lab, lateral)

    # Cerebellum: below the tentorium and behind the brainstem; tissue eroded by 1 voxel breaks the
    # thin links through the tentorium, the components holding seeds in both hemispheres are grown back.
    below = brain & (y < -30) & (z < 5) & ~((np.abs(x) < 12) & (y > -46))
    tissue = ndi.binary_erosion(below & (t1 > 0.62 * wm), iterations=1)
    lab, _ = ndi.label(tissue)
    seeds = {int(lab[_mni_index(t1.shape, (sx, -70, -35))]) for sx in (-20, 20)} - {0}
    cerebellum = ndi.binary_dilation(np.isin(lab, list(seeds)), iterations=2, mask=below)
    cerebellum = ndi.binary_fill_holes(cerebellum)

    # Frontal lobe: in front of a plane through the central sulcus (y=-26 at the vertex, y=0 at the
    # Sylvian level), above the orbits, temporal poles excluded.
    frontal = brain & (y > -8 - 0.3 * (z - 10)) & (z > -30) & ~((np.abs(x) > 25) & (z < -5) & (y < 25))
    frontal &= ~ventricles & ~cerebellum

    # Control: superior parietal brain, >= 15 mm from every group effect.
    control = brain & (y > -85) & (y < -50) & (z > 25) & ~ventricles & ~cerebellum & ~frontal
    return {"brain": brain, "ventricles": ventricles, "cerebellum": cerebellum, "frontal": frontal,
            "control": control}


def _mni_index(shape: tuple[int, ...], mm: tuple[float, float, float]) -> tuple[int, int, int]:
    inv = np.linalg.inv(mni152_brain().affine)
    return tuple(int(round(v)) for v in (inv[:3, :3] @ np.asarray(mm, float) + inv[:3, 3]))


@lru_cache(maxsize=None)
def _label_image() -> np.ndarray:
    masks = _region_masks()
    labels = np.zeros(masks["brain"].shape, np.uint8)
    labels[masks["brain"]] = _LABEL["other_brain"]
    # Later wins: ventricles are carved out of every other region.
    for name in ("control", "frontal", "cerebellum", "ventricles"):
        labels[masks[name] & masks["brain"]] = _LABEL[name]
    return labels


def _mask_image(data: np.ndarray) -> nib.Nifti1Image:
    return nib.Nifti1Image(data.astype(np.uint8), mni152_brain().affine)


def lateral_ventricles_mask() -> nib.Nifti1Image:
    """Lateral ventricles of the MNI152 2009a template (uint8, MNI 1 mm grid)."""
    return _mask_image(_label_image() == _LABEL["ventricles"])


def cerebellum_mask() -> nib.Nifti1Image:
    """Cerebellum (below the tentorium, without brainstem) in MNI space (uint8)."""
    return _mask_image(_label_image() == _LABEL["cerebellum"])


def frontal_mask() -> nib.Nifti1Image:
    """Frontal lobe (anterior to an approximate central-sulcus plane) in MNI space (uint8)."""
    return _mask_image(_label_image() == _LABEL["frontal"])


def control_mask() -> nib.Nifti1Image:
    """Superior parietal control region, untouched by the DS deformation (uint8)."""
    return _mask_image(_label_image() == _LABEL["control"])


def region_labels() -> nib.Nifti1Image:
    """All regions as one label image (values: :data:`REGION_LABELS`) on the MNI 1 mm grid."""
    return _mask_image(reference().labels)


@lru_cache(maxsize=None)
def reference() -> Reference:
    mni = mni152_brain()
    affine = mni.affine
    t1 = np.asarray(mni.dataobj, dtype=np.float32)
    masks = _region_masks()
    brain = masks["brain"]
    levels = {
        "csf": float(np.median(t1[masks["ventricles"]])),
        "wm": float(np.percentile(t1[brain], 90)),
    }
    gm_band = t1[brain & (t1 > 0.55 * levels["wm"]) & (t1 < 0.9 * levels["wm"])]
    hist, edges = np.histogram(gm_band, bins=64)
    levels["gm"] = float(edges[np.argmax(hist)] + (edges[1] - edges[0]) / 2)

    # Colin27 onto the MNI grid (both 1 mm, axis-aligned; only the origin differs).
    head_img, colin_brain_img = colin27_head(), colin27_brain()
    offset = np.linalg.solve(affine, head_img.affine)[:3, 3]
    if not np.allclose(offset, np.round(offset)) or not np.allclose(head_img.affine[:3, :3], affine[:3, :3]):
        raise RuntimeError("Colin27 and MNI152 grids are not aligned 1 mm grids")
    o = np.round(offset).astype(int)
    colin = np.zeros(t1.shape, np.float32)
    colin_brain = np.zeros(t1.shape, bool)
    src = np.asarray(head_img.dataobj, dtype=np.float32)
    sl = tuple(slice(o[a], o[a] + src.shape[a]) for a in range(3))
    colin[sl] = src
    colin_brain[sl] = np.asarray(colin_brain_img.dataobj) > 0
    colin *= levels["wm"] / float(np.percentile(colin[colin_brain], 90))
    # Head = Colin27 above the background noise, enclosed dark parts (skull, sinuses) filled.
    head_mask = ndi.binary_fill_holes(ndi.binary_closing(colin > 0.2 * levels["wm"], iterations=2))
    head_mask = _largest_components(head_mask, 1)
    levels["fat"] = float(np.percentile(colin[head_mask & ~colin_brain], 99))

    head = np.where(head_mask, colin, 0).astype(np.float32)
    head[colin_brain & ~brain] = levels["csf"]            # Colin brain not covered by MNI brain
    rim = ndi.binary_dilation(brain, iterations=2) & ~brain
    head[rim] = np.minimum(head[rim], levels["csf"])      # CSF (or darker bone) around the brain
    head[brain] = t1[brain]

    # Region gradient fields on a 2 mm grid: grad(G_sigma * mask), scaled to max norm 1 so that a
    # coefficient is the largest boundary shift in mm.
    f = REGION_GRID_MM
    grad_affine = affine.copy()
    grad_affine[:3, :3] *= f

    def block_mean(mask: np.ndarray) -> np.ndarray:
        padded = [math.ceil(n / f) * f for n in mask.shape]
        m = np.zeros(padded, np.float32)
        m[tuple(slice(0, n) for n in mask.shape)] = mask
        return m.reshape(padded[0] // f, f, padded[1] // f, f, padded[2] // f, f).mean(axis=(1, 3, 5))

    # Subject warp amplitude: full deep inside the brain (>= ~10 mm), reduced at the outline.
    deep = ndi.gaussian_filter((ndi.distance_transform_edt(block_mean(brain) > 0.5) * f > 10).astype(np.float32),
                               4.0 / f)
    warp_weight = (WARP_OUTLINE + (1 - WARP_OUTLINE) * deep).astype(np.float32)
    grads = {}
    for name, sigma in REGION_SIGMA_MM.items():
        m = block_mean(masks[name])
        phi = ndi.gaussian_filter(m, sigma / f, mode="constant")
        g = np.stack(np.gradient(phi, float(f)))
        g /= float(np.sqrt((g ** 2).sum(axis=0)).max())
        grads[name] = g.astype(np.float32)
    grad_affine[:3, 3] += (f - 1) / 2 * np.diag(affine)[:3]  # a block's centre

    idx = np.argwhere(brain)
    box_vox = np.stack([idx.min(axis=0), idx.max(axis=0)])
    brain_box = box_vox * np.diag(affine)[:3] + affine[:3, 3]
    hidx = np.argwhere(head_mask[::2, ::2, ::2]) * 2
    head_centre = (hidx.min(axis=0) + hidx.max(axis=0)) / 2 * np.diag(affine)[:3] + affine[:3, 3]
    return Reference(affine=affine, head=head, labels=_label_image(), levels=levels, grad_affine=grad_affine,
                      grads=grads, warp_weight=warp_weight, brain_box_mm=brain_box, head_centre_mm=head_centre)


def reference_head() -> nib.Nifti1Image:
    """The composite reference head (MNI152 brain in a Colin27 head), MNI units, MNI 1 mm grid."""
    ref = reference()
    return nib.Nifti1Image(ref.head, ref.affine)

