"""Datasets already in template space (datasets[].space): their chain (brainvae.steps.template_scan_files)
and the workflow's choice of chain per scan."""

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from brainvae.qc import qc_flags
from brainvae.registration import read_transform
from brainvae.steps import SCAN_OUTPUTS, template_scan_files
from brainvae.templates import mni152_brain, mni152_brain_mask
from test_index_once import tiny_bids
from test_workflow import snakemake

CONFORM = {"orientation": "RAS", "volume_index": None, "min_voxel_mm": 0.2, "max_voxel_mm": 8.0, "max_anisotropy": 20.0}


def _template_space_scan(path: Path, shift_voxels: int = 0) -> Path:
    """The MNI152 brain at 2 mm, skull-stripped (zero outside the template mask), scanner-like intensities,
    stored LAS to check that conform's reorientation keeps template millimetres; optionally shifted."""
    brain = mni152_brain(2)
    mask = np.asarray(mni152_brain_mask(2).dataobj) > 0
    data = np.where(mask, np.asarray(brain.dataobj, np.float32) * 900.0 + 20.0, 0.0).astype(np.float32)
    data = np.roll(data, shift_voxels, axis=2)
    flipped = data[::-1]
    affine = brain.affine @ np.array([[-1, 0, 0, data.shape[0] - 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(flipped, affine), path)
    return path


def _outputs(folder: Path) -> dict[str, Path]:
    suffix = {"level1_xfm": ".mat", "xfm": ".mat", "qc_png": ".png"}
    json_keys = {"conform_sidecar", "level1_info", "brain_mask_info", "xfm_info", "qc_metrics"}
    return {name: folder / f"{name}{suffix.get(name, '.json' if name in json_keys else '.nii.gz')}"
            for name in SCAN_OUTPUTS}


def test_template_scan_chain_keeps_template_millimetres(tmp_path):
    scan = _template_space_scan(tmp_path / "in" / "sub-t01_T1w.nii.gz")
    out = _outputs(tmp_path / "out")
    metrics = template_scan_files(scan, out, scan_key="sub-t01", conform=CONFORM, grid="demo")
    for name, path in out.items():
        assert path.is_file(), name
    np.testing.assert_allclose(read_transform(out["xfm"]), np.eye(4), atol=1e-6)
    assert json.loads(out["xfm_info"].read_text())["affine_native_to_mni_ras"] == np.eye(4).tolist()
    # The mask is the image's non-zero support: the template brain itself.
    mask = nib.load(out["brain_mask"])
    template_ml = float((np.asarray(mni152_brain_mask(2).dataobj) > 0).sum()) * 8 / 1000
    assert json.loads(out["brain_mask_info"].read_text())["BrainVolumeMl"] == pytest.approx(template_ml, rel=1e-3)
    assert mask.shape == nib.load(scan).shape
    # Identity really is right: the template correlates as after a perfect registration, and QC passes. The
    # template-space volume is recorded but not judged against the native range.
    assert metrics["template_correlation"] > 0.9
    assert metrics["mask_dice"] > 0.95
    assert metrics["template_space"] == "MNI152NLin2009aSym"
    assert metrics["flags"] == []
    too_big = {**metrics, "brain_volume_ml": 2500.0}
    assert "brain_volume_out_of_range" not in qc_flags(too_big)
    assert "brain_volume_out_of_range" in qc_flags({**too_big, "template_space": None})
    preproc = nib.load(out["preproc"])
    assert preproc.shape == (40, 48, 40)
    assert np.asarray(nib.load(out["preproc_mask"]).dataobj).sum() > 0.5 * 40 * 48 * 40 * 0.25


def test_template_scan_that_is_not_aligned_is_flagged(tmp_path):
    """A dataset wrongly declared as template space (the brain 20 mm off) fails QC instead of passing silently."""
    scan = _template_space_scan(tmp_path / "in" / "sub-t02_T1w.nii.gz", shift_voxels=10)
    metrics = template_scan_files(scan, _outputs(tmp_path / "out"), scan_key="sub-t02", conform=CONFORM)
    assert "low_mask_dice" in metrics["flags"] or "low_template_correlation" in metrics["flags"], metrics


def test_empty_template_scan_is_refused_by_name(tmp_path):
    path = tmp_path / "sub-t03_T1w.nii.gz"
    # Content (conform refuses a constant image itself), but nothing above 0: no skull-stripped brain to mask.
    data = -np.arange(20 ** 3, dtype=np.float32).reshape(20, 20, 20)
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0])), path)
    with pytest.raises(Exception, match=re.escape(str(path)) + ".*no voxel above 0"):
        template_scan_files(path, _outputs(tmp_path / "out"), scan_key="sub-t03", conform=CONFORM)


def test_workflow_sends_each_scan_to_its_chain(tmp_path):
    """Template-space scans are planned with rule preprocess_template_scan only, native scans with the native
    chain only, in both job layouts."""
    native = tiny_bids(tmp_path / "native")
    template = tiny_bids(tmp_path / "template")
    for path in template.rglob("sub-a*"):
        path.rename(path.with_name(path.name.replace("sub-a", "sub-t")))
    for path in sorted(template.rglob("*sub-a*"), key=lambda p: -len(p.parts)):
        path.rename(path.with_name(path.name.replace("sub-a", "sub-t")))
    participants = template / "participants.tsv"
    participants.write_text(participants.read_text().replace("sub-a", "sub-t"))
    for one_job_per_scan in (False, True):
        config = {"output_dir": "results", "preprocess": {"one_job_per_scan": one_job_per_scan},
                  "datasets": [{"name": "nat", "bids_dir": str(native), "role": "both", "label_column": "group",
                                "covariates": ["age", "sex"]},
                               {"name": "tpl", "bids_dir": str(template), "role": "both", "label_column": "group",
                                "covariates": ["age", "sex"], "space": "MNI152NLin2009aSym"}]}
        configfile = tmp_path / f"config_{one_job_per_scan}.yaml"
        configfile.write_text(yaml.safe_dump(config))
        result = snakemake(tmp_path, configfile, "--dry-run", "--until", "qc_table")
        jobs = re.findall(r"rule (\w+):\n(?: +.*\n)*? +wildcards: scan=(\S+)", result.stdout)
        assert jobs, result.stdout[-3000:]
        for rule, scan in jobs:
            if "sub-t" in scan:
                assert rule == "preprocess_template_scan", (rule, scan)
            else:
                assert rule != "preprocess_template_scan", (rule, scan)
        template_jobs = {scan for rule, scan in jobs if rule == "preprocess_template_scan"}
        assert template_jobs == {"sub-t01/anat/sub-t01", "sub-t02/ses-1/anat/sub-t02_ses-1",
                                 "sub-t02/ses-2/anat/sub-t02_ses-2", "sub-t03/anat/sub-t03"}


def test_a_template_space_dataset_without_icv_is_noted():
    from brainvae.workflow import template_space_notes

    with_icv = {"name": "A", "space": "MNI152NLin2009aSym", "covariates": ["age", "icv_ml"]}
    without = {"name": "B", "space": "MNI152NLin2009aSym", "covariates": ["age"]}
    native = {"name": "C", "covariates": ["age"]}
    notes = template_space_notes([with_icv, without, native])
    assert len(notes) == 1 and "dataset B" in notes[0] and "icv_ml" in notes[0]
