"""Skull stripping on real scans (IXI with DLMUSE reference masks) and on the demo cohort."""

from __future__ import annotations

import socket
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from brainvae import skullstrip as ss
from brainvae.skullstrip import SkullstripError, detect_skull_stripped, dice, skullstrip
from brainvae.templates import colin27_brain, colin27_head, mni152_brain

IXI = Path(__file__).parent / "data" / "real_t1w" / "ixi"
SCANS = sorted(IXI.glob("*_ds.nii.gz"))
REAL = Path(__file__).parent / "data" / "real_t1w"


def _reference(scan: Path) -> np.ndarray:
    ref = nib.load(IXI / "dlmuse" / scan.name.replace(".nii.gz", "_DLMUSE.nii.gz"))
    return np.asarray(ref.dataobj) > 0


def _to_mni(img: nib.Nifti1Image, *extra: np.ndarray) -> list[nib.Nifti1Image]:
    """Affinely align a native head to MNI (2 mm grid), like the workflow's level-1 step.

    Uses the template method's own registration so these tests need no other module.
    """
    import SimpleITK as sitk

    data = ss._volume(img)
    to_template = ss._register_template(img, data, 1, "moments", True).GetInverse()
    grid = mni152_brain(2)
    ref = ss._to_sitk(np.zeros(grid.shape, np.float32), grid.affine)
    out = []
    for vol, order in [(data, sitk.sitkLinear)] + [(e.astype(np.float32), sitk.sitkNearestNeighbor) for e in extra]:
        res = ss._from_sitk(sitk.Resample(ss._to_sitk(vol, img.affine), ref, to_template, order, 0.0))
        out.append(nib.Nifti1Image(res.astype(np.float32), grid.affine))
    return out


@pytest.fixture(scope="module")
def ixi_mni() -> tuple[nib.Nifti1Image, np.ndarray]:
    scan = SCANS[2]
    head, ref = _to_mni(nib.load(scan), _reference(scan))
    return head, np.asarray(ref.dataobj) > 0.5


# ----------------------------------------------------------------------------- deepbet


def test_deepbet_native_real_scan() -> None:
    scan = SCANS[1]  # SCANS[0] is covered by the offline test
    img = nib.load(scan)
    mask = skullstrip(img, "deepbet", threads=2)
    # Same grid, binary uint8.
    assert mask.shape == img.shape and np.allclose(mask.affine, img.affine)
    assert mask.get_data_dtype() == np.uint8
    assert set(np.unique(np.asarray(mask.dataobj))) == {0, 1}
    assert dice(mask, _reference(scan)) >= 0.95  # measured 0.978-0.983 on all five


@pytest.mark.slow
def test_deepbet_all_real_scans() -> None:
    scores = [dice(skullstrip(nib.load(s), "deepbet", threads=2), _reference(s)) for s in SCANS]
    assert min(scores) >= 0.95, scores


def test_deepbet_mni_aligned(ixi_mni: tuple[nib.Nifti1Image, np.ndarray]) -> None:
    head, ref = ixi_mni
    assert dice(skullstrip(head, "deepbet", threads=2), ref) >= 0.93


def test_deepbet_runs_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Weights come from the installed wheel: any network access would fail this test."""

    def no_network(*args, **kwargs):
        raise AssertionError("skullstrip tried to open a network connection")

    ss._deepbet_model.cache_clear()  # force a fresh load of the weights under the guard
    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    scan = SCANS[0]
    assert dice(skullstrip(nib.load(scan), "deepbet"), _reference(scan)) >= 0.95


# ----------------------------------------------------------------------------- template


def test_template_native_real_scan() -> None:
    """Native space (not aligned): the moments start + affine brings the template in."""
    scan = SCANS[2]
    mask = skullstrip(nib.load(scan), "template", threads=2, init="moments")
    assert dice(mask, _reference(scan)) >= 0.92  # measured 0.93-0.95 on all five


def test_template_mni_aligned(ixi_mni: tuple[nib.Nifti1Image, np.ndarray]) -> None:
    head, ref = ixi_mni
    assert dice(skullstrip(head, "template", threads=2), ref) >= 0.92


def test_template_without_refinement_uses_header_alignment(ixi_mni: tuple[nib.Nifti1Image, np.ndarray]) -> None:
    head, ref = ixi_mni
    assert dice(skullstrip(head, "template", refine_affine=False), ref) >= 0.88


# ----------------------------------------------------------------------------- detection


def test_detect_skull_stripped_real_heads_and_brains() -> None:
    heads = [*SCANS[:2], REAL / "niivue" / "chris_t1.nii.gz", REAL / "open_ms" / "longitudinal_raw_patient01_study1_T1W.nii.gz"]
    for path in heads:
        assert not detect_skull_stripped(nib.load(path)), path.name
    for scan in SCANS[:2]:
        img = nib.load(scan)
        brain = np.asarray(img.dataobj, dtype=np.float32) * _reference(scan)
        assert detect_skull_stripped(nib.Nifti1Image(brain, img.affine)), scan.name
    assert detect_skull_stripped(mni152_brain(2))
    assert detect_skull_stripped(colin27_brain())
    assert not detect_skull_stripped(colin27_head())


def test_detect_skull_stripped_blank_image() -> None:
    assert not detect_skull_stripped(nib.Nifti1Image(np.zeros((20, 20, 20), np.float32), np.eye(4)))


# ----------------------------------------------------------------------------- errors & helpers


def test_errors() -> None:
    blank = nib.Nifti1Image(np.zeros((16, 16, 16), np.float32), np.eye(4))
    with pytest.raises(SkullstripError, match="empty"):
        skullstrip(blank)
    with pytest.raises(ValueError, match="unknown skull-strip method"):
        skullstrip(nib.load(SCANS[0]), "bet")  # type: ignore[arg-type]


def test_dice() -> None:
    a = np.zeros((4, 4, 4), bool)
    b = a.copy()
    assert dice(a, b) == 1.0
    a[:2] = True
    b[1:3] = True
    assert dice(a, b) == pytest.approx(0.5)


# ----------------------------------------------------------------------------- demo cohort


@pytest.mark.slow
def test_demo_cohort_truth(tmp_path: Path) -> None:
    demo = pytest.importorskip("brainvae.demo_cohort")
    demo.generate_cohort(tmp_path, None, 7, sites={"IXI": {"subjects": 1}, "ABCDS": {"subjects": 1}})  # raw heads
    truths = sorted((tmp_path / "truth").glob("*/sub-*/**/anat/*_desc-brain_mask.nii.gz"))
    assert truths
    for truth in truths:
        rel = truth.relative_to(tmp_path / "truth")
        t1w = tmp_path / rel.parent / truth.name.replace("_desc-brain_mask", "_T1w")
        img = nib.load(t1w)
        assert not detect_skull_stripped(img)
        score = dice(skullstrip(img, "deepbet", threads=2), nib.load(truth))
        assert score >= 0.95, (t1w.name, score)  # measured 0.96-0.97
