"""Accuracy of the whole preprocessing chain against ground truth (demo cohort) and on real scans.

The chain is the one the workflow runs, in memory: conform -> N4 (head mask) -> level-1 affine
(head -> Colin27 head) -> head resampled with level 1 onto the mni1mm grid -> deepbet there ->
level 2 (brain -> MNI152 brain, mask in level-1 space) -> the level-1-space mask carried back to
native -> one resampling of the N4-corrected native head through the composed affine -> normalise
-> QC metrics and flags.

Targets (issue "Preprocessing"):

* registration: mean |A_ours x - A_true x| <= 0.75 mm (sub-voxel) over the true native brain mask, where
  ``A_true`` is the demo's ``native_to_mni_affine`` (the least-squares affine of the exact map over
  the brain, i.e. what a perfect affine registration finds);
* skull strip: Dice >= 0.95 vs the true native mask (demo), >= 0.93 vs DLMUSE labels > 0 (IXI);
* N4: r >= 0.8 between the estimated and the true log bias inside the brain -- measured as the
  *recovered* field, see :func:`test_n4_recovers_applied_bias_field`;
The real scans' checks (brain volume, coverage, Dice against DLMUSE) read the workflow's own run of all
10 real scans: tests/test_bad_inputs.py, "Every real scan".
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from brainvae import qc
from brainvae import registration as reg
from brainvae.bias import n4_bias_correct
from brainvae.conform import conform_image
from brainvae.demo_cohort import generate_cohort, truth_paths
from brainvae.preprocess import preprocess_image
from brainvae.resample import Grid, resample_to_grid, resample_to_grids
from brainvae.skullstrip import dice, skullstrip

pytestmark = pytest.mark.slow

THREADS = 2  # torch (deepbet) threads; ITK stays at the test suite's setting


@dataclass
class ChainResult:
    img: nib.Nifti1Image  #: conformed native image
    bias: nib.Nifti1Image  #: N4 multiplicative field, native grid
    level1: np.ndarray
    level2: np.ndarray  #: composed native -> MNI
    mask_native: nib.Nifti1Image  #: deepbet mask carried back from level-1 space
    metrics: dict
    flags: list[str]


def run_chain(path: Path) -> ChainResult:
    img, _ = conform_image(nib.load(path), source=path)
    img = nib.Nifti1Image(np.asarray(img.dataobj, np.float32), img.affine)
    corrected, bias, head = n4_bias_correct(img)
    l1 = reg.level1_affine(corrected, head).affine
    (aligned,) = resample_to_grids(corrected, l1, ["mni1mm"], order=1)  # as level1_file
    mask_l1 = skullstrip(aligned, "deepbet", threads=THREADS)
    l2 = reg.level2_affine(corrected, mask_l1, l1, mask_space="level1").affine
    mask_native = nib.Nifti1Image(
        reg.mask_to_native(mask_l1, corrected, "level1", l1).astype(np.uint8), corrected.affine)
    norm, mask_mni, _ = preprocess_image(corrected, mask_native, l2, "2mm")
    metrics = qc.qc_metrics(norm, mask_mni, mask_native, img)
    return ChainResult(img, bias, l1, l2, mask_native, metrics, qc.qc_flags(metrics))


def mean_displacement(a: np.ndarray, b: np.ndarray, mask: nib.Nifti1Image, step: int = 2) -> float:
    """Mean |a x - b x| (mm) over the world positions of (every ``step``-th) mask voxel."""
    idx = np.argwhere(np.asarray(mask.dataobj)[::step, ::step, ::step] > 0) * step
    pts = np.c_[idx @ mask.affine[:3, :3].T + mask.affine[:3, 3], np.ones(len(idx))]
    return float(np.linalg.norm((pts @ a.T - pts @ b.T)[:, :3], axis=1).mean())


def on_grid(img: nib.Nifti1Image, ref: nib.Nifti1Image, order: int) -> np.ndarray:
    """``img`` on ``ref``'s grid (same world space; conform only permutes/flips axes)."""
    return resample_to_grid(img, np.eye(4), Grid.from_image(ref), order=order).get_fdata()


# ----------------------------------------------------------------------------- demo cohort
@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """3 raw (native-space) demo subjects: 2 IXI-like at 0.94x0.94x1.2 mm PSR, 1 ABCDS-like at 1x1x1.2 mm RAS;
    chain run once. (The HCP-like and SantPau-like sites ship template-space images: nothing to register.)"""
    out = tmp_path_factory.mktemp("demo")
    records = generate_cohort(out, None, seed=0, sites={"IXI": {"subjects": 2, "ds_fraction": 0.0},
                                                        "ABCDS": {"subjects": 1, "ds_fraction": 0.0}},
                              session_fraction=0.0)
    scans = []
    for r in records:
        tp = {k: out / v for k, v in truth_paths(r).items()}
        truth = json.loads(tp["truth"].read_text())
        scans.append({"record": r, "path": out / r["path"], "truth": truth,
                      "mask": nib.load(tp["brain_mask"]), "bias": nib.load(tp["biasfield"]),
                      "chain": run_chain(out / r["path"])})
    return scans


def test_registration_error_vs_true_affine(demo):
    """Composed level-1 + level-2 affine vs the true best affine, over the true brain."""
    errors, level1 = {}, {}
    for s in demo:
        truth = np.asarray(s["truth"]["native_to_mni_affine"])
        errors[s["record"]["subject"]] = mean_displacement(s["chain"].level2, truth, s["mask"])
        level1[s["record"]["subject"]] = mean_displacement(s["chain"].level1, truth, s["mask"])
    # Measured (seed 0, subjects with their own anatomy): 0.28-0.58 mm (0.25-0.39 mm when every demo brain was
    # the template warped): the truth is the least-squares affine of the exact map over the brain, and with
    # individual nonlinear anatomy the image-similarity optimum sits further from it. Sub-voxel is the bar
    # (the voxels are 0.94-1.2 mm). Level 1 alone measures 0.47-0.59 mm against the same truth: on this cohort
    # the brain-level affine is not closer to the least-squares affine than the head-level one for 2 of the 3
    # subjects (docs/validation.md).
    assert max(errors.values()) <= 0.75, (errors, level1)


def test_true_affine_is_the_reference_for_registration(demo):
    """The truth affine explains the exact map up to its non-affine residual (~1.6 mm RMS): that
    residual is anatomy an affine cannot capture, so errors are measured against the truth
    *affine*, which is reachable (the previous test), not against the exact map."""
    for s in demo:
        t = s["truth"]
        assert 1.0 < t["affine_fit_residual_rms_mm"] < 2.5
        lin = np.asarray(t["native_to_mni_affine_linear"])
        # the fitted affine is close to the generating linear map, not identical (the warp has an
        # affine part over the brain): both are sane references, the fitted one is the best one
        assert mean_displacement(lin, np.asarray(t["native_to_mni_affine"]), s["mask"]) < 3.0


def test_skullstrip_dice_vs_true_mask(demo):
    scores = {}
    for s in demo:
        ours = on_grid(s["chain"].mask_native, s["mask"], order=0) > 0.5
        scores[s["record"]["subject"]] = dice(ours, s["mask"])
    # Measured (seed 0): 0.965-0.973.
    assert min(scores.values()) >= 0.95, scores


def _log_bias_in_brain(s) -> tuple[np.ndarray, np.ndarray, nib.Nifti1Image]:
    brain = np.asarray(s["mask"].dataobj) > 0
    est = np.log(on_grid(s["chain"].bias, s["mask"], order=1)[brain])
    true = np.log(np.asarray(s["bias"].dataobj, np.float32)[brain])
    return est, true, s["chain"].img


def test_n4_recovers_applied_bias_field(demo):
    """r >= 0.9 between the field N4 attributes to the applied bias and the true log bias.

    Why not r(estimate, truth) directly: the demo's anatomy is the MNI152 2009a template, whose
    white matter itself varies smoothly by ~7.6 % (sd of log intensity of a 60 mm B-spline fit to
    the template WM; brighter superior/anterior) -- as large as the IXI-like site's whole bias field
    (sd 0.07-0.08 in the brain). Any estimator that assumes tissue classes are homogeneous (N4, FAST,
    SPM) sees that anatomy as bias: run on the *bias-free* demo image (image / true bias), N4 finds a
    field of 0.5-0.9 x the true field's sd. So the correlation with the truth alone is capped near
    0.6-0.8 for IXI-like scans (the ABCDS-like one similar) by construction. What the estimator must
    get right is the part due to the applied field: estimate(biased) - estimate(bias-free), which
    has r 0.83-0.96 with the truth at the defaults (8 mm, 3 x 40, FWHM 0.25); 0.91-0.98 on the former
    template-warp demo, where the former 4 mm, 3 x 20, FWHM 0.15 gave 0.69-0.95.
    """
    scores, raw = {}, {}
    for s in demo:
        est, true, img = _log_bias_in_brain(s)
        bias_native = on_grid(s["bias"], img, order=1).astype(np.float32)
        free = nib.Nifti1Image(np.asarray(img.dataobj, np.float32) / bias_native, img.affine)
        _, bias_free, _ = n4_bias_correct(free)
        brain = np.asarray(s["mask"].dataobj) > 0
        est_free = np.log(on_grid(bias_free, s["mask"], order=1)[brain])
        sub = s["record"]["subject"]
        scores[sub] = float(np.corrcoef(est - est_free, true)[0, 1])
        raw[sub] = float(np.corrcoef(est, true)[0, 1])
    # Measured (seed 0): r 0.83-0.96 with subjects' own anatomy and per-site contrast (0.91-0.98 when every demo
    # brain was the template warped); the raw correlation 0.49-0.72.
    assert min(scores.values()) >= 0.8, (scores, raw)
    assert min(scores.values()) > max(raw.values()), (scores, raw)
    # The raw correlation is positive and substantial everywhere (the anatomical cap above).
    assert min(raw.values()) >= 0.45, raw
