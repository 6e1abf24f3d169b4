"""Real-world inputs and failures: the bad-input catalogue, every real scan, interruptions, reproducibility.

One workflow run (`messy_run`, conftest's session-scoped `tiny_run`, which tests/test_workflow_pipeline.py shares)
feeds most tests: a tiny demo cohort (the training data) next to an ``analyse`` dataset holding one scan per bad-input case and every real
scan of tests/data/real_t1w. It runs twice with ``--keep-going``, as a user would:

1. the unusable scans fail their conform job with ``<file>: <reason>`` and leave a failure record; every other
   scan is preprocessed; the cohort-level steps wait;
2. the same command again leaves the failed scans out (``failed_inputs.tsv``, ``qc/qc.tsv`` rows with flag
   ``input_error``) and completes the cohort, the VAE and the analysis.

Cases decided by the conform step alone (orientations, storage types, a singleton 4th axis, NIfTI-2) run in a
second, conform-only run: a conformed image identical to its twin's is processed identically afterwards (the later
steps read only the conformed image; `test_preprocessing_is_bitwise_reproducible` shows they are deterministic).
Dataset-level problems stop the workflow at its start and are checked with dry runs.
"""

import gzip
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform

from test_workflow import REPO, planned_jobs
from test_workflow_pipeline import MODEL, TINY_ANALYSIS, TINY_COHORT, TINY_PREPROCESS, TINY_SITES, TINY_TRAINING

PROFILE = REPO / "workflow" / "profiles" / "default"
MNI = "space-MNI152NLin2009aSym_res-demo"
IXI = {"ixi012": "IXI012-HH-1211-T1_ds", "ixi013": "IXI013-HH-1212-T1_ds", "ixi014": "IXI014-HH-1236-T1_ds",
       "ixi015": "IXI015-HH-1258-T1_ds", "ixi033": "IXI033-HH-1259-T1_ds"}
#: Every real scan of tests/data/real_t1w (MANIFEST.tsv), by the subject label it gets in the messy dataset.
REAL_SCANS = {**{s: f"ixi/{name}.nii.gz" for s, name in IXI.items()},
              "chris": "niivue/chris_t1.nii.gz", "brainchop": "brainchop/t1_crop.nii.gz",
              "ms01": "open_ms/longitudinal_raw_patient01_study1_T1W.nii.gz",
              "ms03": "open_ms/longitudinal_raw_patient03_study2_T1W.nii.gz",
              "ms04": "open_ms/longitudinal_raw_patient04_study1_T1W.nii.gz"}
#: Unusable inputs: subject label -> words the error message must contain (besides the file's path).
FAILING_CASES = {
    "truncgz": "truncated gzip",
    "notnifti": "not a NIfTI",
    "series4d": "set conform.volume_index",
    "slice2d": "single slice",
    "nanvoxels": "NaN or Inf",
    "allzeros": "all voxels are zero",
    "sheared": "sheared affine",
}
#: Usable but unusual inputs that run the whole pipeline: subject label -> what they are.
PROCESSED_CASES = {
    "aniso": "1 x 1 x 6 mm voxels (every 6th slice of a 1 mm scan)",
    "oblique": "affine rotated by 20 degrees (an oblique acquisition)",
    "largefov": "large field of view with the neck: 60 mm of background added around a whole-head scan",
    "partial": "partial head coverage: the upper 45% of a head",
    "stripped": "an already skull-stripped input",
    "t2like": "T2-like contrast (CSF bright, white matter dark) given as T1w",
}


def _run(workdir: Path, configfile: Path, *args: str, timeout: int = 3600) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory",
               str(workdir), "--configfile", str(configfile), "--cores", "2", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def _save(img: nib.Nifti1Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)
    return path


def _float_image(path: Path) -> nib.Nifti1Image:
    img = nib.load(path)
    return nib.Nifti1Image(np.asarray(img.dataobj, dtype=np.float32), img.affine)


def _reoriented(img: nib.Nifti1Image, codes: str) -> nib.Nifti1Image:
    """The same voxels stored in another axis order (no resampling): what another scanner would write."""
    data = np.asarray(img.dataobj)
    transform = ornt_transform(nib.io_orientation(img.affine), axcodes2ornt(tuple(codes)))
    return nib.Nifti1Image(apply_orientation(data, transform), img.affine @ inv_ornt_aff(transform, data.shape))


def _rotated_about_centre(img: nib.Nifti1Image, degrees: float) -> nib.Nifti1Image:
    """Same voxel data, affine rotated about the volume's centre around the world x axis (an oblique scan)."""
    angle = np.radians(degrees)
    rotation = np.eye(4)
    rotation[1:3, 1:3] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    centre = img.affine @ np.r_[(np.array(img.shape[:3]) - 1) / 2, 1]
    to_centre, back = np.eye(4), np.eye(4)
    to_centre[:3, 3], back[:3, 3] = -centre[:3], centre[:3]
    return nib.Nifti1Image(np.asarray(img.dataobj, dtype=np.float32), back @ rotation @ to_centre @ img.affine)


def _axis_of(img: nib.Nifti1Image, world_axis: str) -> int:
    """Voxel axis running along a world axis ('S' for superior-inferior)."""
    codes = nib.aff2axcodes(img.affine)
    pair = {"S": "SI", "A": "AP", "R": "RL"}[world_axis]
    return next(i for i, c in enumerate(codes) if c in pair)


def make_failing_scans(real: Path, folder: Path) -> dict[str, Path]:
    """One unusable file per FAILING_CASES entry, made from a real IXI scan."""
    source = real / "ixi" / f"{IXI['ixi012']}.nii.gz"
    base = _float_image(source)
    data = np.asarray(base.dataobj)
    paths = {s: folder / f"sub-{s}" / "anat" / f"sub-{s}_T1w.nii.gz" for s in FAILING_CASES}
    for path in paths.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    paths["truncgz"].write_bytes(source.read_bytes()[: source.stat().st_size // 2])  # an interrupted download
    paths["notnifti"].write_bytes(gzip.compress(b'{"a DICOM export log": "saved as .nii.gz by mistake"}\n' * 20))
    _save(nib.Nifti1Image(np.stack([data, data], axis=-1), base.affine), paths["series4d"])
    _save(nib.Nifti1Image(data[:, :, 45:46], base.affine), paths["slice2d"])
    nan = data.copy()
    nan[60:70, 60:70, 40:50] = np.nan
    _save(nib.Nifti1Image(nan, base.affine), paths["nanvoxels"])
    _save(nib.Nifti1Image(np.zeros_like(data), base.affine), paths["allzeros"])
    sheared = base.affine.copy()
    sheared[:3, 1] += 0.3 * sheared[:3, 0]  # the second axis leans 16.7 degrees towards the first
    _save(nib.Nifti1Image(data, sheared), paths["sheared"])
    return paths


def make_processed_scans(real: Path, folder: Path) -> dict[str, Path]:
    """One usable but unusual file per PROCESSED_CASES entry, made from real scans."""
    paths = {s: folder / f"sub-{s}" / "anat" / f"sub-{s}_T1w.nii.gz" for s in PROCESSED_CASES}
    # 1 x 1 x 6 mm: every 6th axial slice of the 1 mm brainchop head.
    head = _float_image(real / "brainchop" / "t1_crop.nii.gz")
    axis = _axis_of(head, "S")
    keep = [slice(None)] * 3
    keep[axis] = slice(None, None, 6)
    affine = head.affine.copy()
    affine[:3, axis] *= 6
    _save(nib.Nifti1Image(np.asarray(head.dataobj)[tuple(keep)], affine), paths["aniso"])
    _save(_rotated_about_centre(_float_image(real / "ixi" / f"{IXI['ixi013']}.nii.gz"), 20.0), paths["oblique"])
    # Large field of view: IXI015 (whole head with the neck) padded by 30 voxels (60 mm) of scanner noise.
    ixi015 = _float_image(real / "ixi" / f"{IXI['ixi015']}.nii.gz")
    rng = np.random.default_rng(7)
    padded = np.pad(np.asarray(ixi015.dataobj), 30)
    border = np.ones(padded.shape, bool)
    border[30:-30, 30:-30, 30:-30] = False
    padded[border] = np.abs(rng.normal(0, 3, int(border.sum())))
    shift = np.eye(4)
    shift[:3, 3] = -30
    _save(nib.Nifti1Image(padded.astype(np.float32), ixi015.affine @ shift), paths["largefov"])
    # Partial coverage: the upper 45% of IXI033 (the slab ends mid-brain).
    ixi033 = _float_image(real / "ixi" / f"{IXI['ixi033']}.nii.gz")
    axis = _axis_of(ixi033, "S")
    n = ixi033.shape[axis]
    keep = [slice(None)] * 3
    upper_first = nib.aff2axcodes(ixi033.affine)[axis] == "I"  # index 0 is the top of the head
    keep[axis] = slice(0, int(0.45 * n)) if upper_first else slice(n - int(0.45 * n), n)
    start = keep[axis].start
    shift = np.eye(4)
    shift[axis, 3] = start
    _save(nib.Nifti1Image(np.asarray(ixi033.dataobj)[tuple(keep)], ixi033.affine @ shift), paths["partial"])
    # Already skull stripped: IXI012 times its DLMUSE brain labels (a real brain mask on the same grid).
    ixi012 = _float_image(real / "ixi" / f"{IXI['ixi012']}.nii.gz")
    labels = np.asarray(nib.load(real / "ixi" / "dlmuse" / f"{IXI['ixi012']}_DLMUSE.nii.gz").dataobj)
    _save(nib.Nifti1Image(np.asarray(ixi012.dataobj) * (labels > 0), ixi012.affine), paths["stripped"])
    # T2-like: IXI014's intensities inverted inside the head (CSF bright, WM dark), background kept dark.
    ixi014 = _float_image(real / "ixi" / f"{IXI['ixi014']}.nii.gz")
    data = np.asarray(ixi014.dataobj)
    high = np.percentile(data, 99.5)
    inside = data > 0.1 * high
    _save(nib.Nifti1Image(np.where(inside, high - np.minimum(data, high) + 0.1 * high, data).astype(np.float32),
                          ixi014.affine), paths["t2like"])
    return paths


def write_bids(root: Path, subjects: list[str], label: str = "euploid") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": root.name, "BIDSVersion": "1.9.0"}))
    rows = "".join(f"sub-{s}\t{label}\t40\tF\n" for s in subjects)
    (root / "participants.tsv").write_text("participant_id\tgroup\tage\tsex\n" + rows)
    return root


def tiny_config(workdir: Path, extra_datasets: list[dict]) -> dict:
    """The tiny pipeline of tests/test_workflow_pipeline.py plus extra datasets."""
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["demo"]["sites"] = TINY_SITES
    config["demo"]["session_fraction"] = 0.1
    config["preprocess"] = {**config["preprocess"], **TINY_PREPROCESS}
    config["analysis"] = {**config.get("analysis", {}), **TINY_ANALYSIS}
    config["cohort"] = {**config["cohort"], **TINY_COHORT}
    config["training"] = {**config.get("training", {}), **TINY_TRAINING}
    config["models"] = {MODEL: {}}
    config["datasets"] += extra_datasets
    return config


def messy_dataset(bids: Path) -> dict:
    return {"name": "messy", "bids_dir": str(bids), "role": "analyse", "label_column": "group",
            "labels": ["euploid", "DS"], "covariates": ["age", "sex"]}


def build_tiny_run(workdir: Path, real_t1w_dir: Path) -> dict:
    """The tiny demo next to the messy dataset, run twice with --keep-going (conftest's `tiny_run`)."""
    bids = workdir / "messy_bids"
    failing = make_failing_scans(real_t1w_dir, bids)
    processed = make_processed_scans(real_t1w_dir, bids)
    real = {}
    for subject, relative in REAL_SCANS.items():
        real[subject] = bids / f"sub-{subject}" / "anat" / f"sub-{subject}_T1w.nii.gz"
        real[subject].parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(real_t1w_dir / relative, real[subject])
    write_bids(bids, sorted([*failing, *processed, *real]))
    configfile = workdir / "config.yaml"
    configfile.write_text(yaml.safe_dump(tiny_config(workdir, [messy_dataset(bids)])))
    first = _run(workdir, configfile, "--keep-going")
    second = _run(workdir, configfile, "--keep-going")
    assert second.returncode == 0, f"second run failed:\n{second.stdout}\n{second.stderr}"
    results = workdir / "results"
    return {"workdir": workdir, "configfile": configfile, "results": results, "bids": bids, "first": first,
            "second": second, "failing": failing, "processed": processed, "real": real,
            "deriv": results / "derivatives" / "brainvae"}


@pytest.fixture(scope="module")
def messy_run(tiny_run):
    return tiny_run


def _scan(subject: str) -> str:
    return f"sub-{subject}/anat/sub-{subject}"


def _qc(run) -> pd.DataFrame:
    return pd.read_csv(run["results"] / "qc" / "qc.tsv", sep="\t", dtype=str, keep_default_na=False).set_index("scan")


def _preproc(run, subject: str) -> Path:
    return run["deriv"] / f"{_scan(subject)}_{MNI}_desc-preproc_T1w.nii.gz"


# --- Unusable inputs: a clear error in their own log, then left out --------------------------------------------


def test_first_run_fails_only_the_unusable_scans(messy_run):
    first = messy_run["first"]
    assert first.returncode != 0
    terminal = first.stdout + first.stderr
    for subject, path in messy_run["failing"].items():
        assert str(path) in terminal, subject  # the reason reaches the terminal
    failed_rules = set(re.findall(r"^\s*Error in rule (\w+):", terminal, re.MULTILINE))
    assert failed_rules == {"conform"}, terminal[-3000:]


@pytest.mark.parametrize("subject", sorted(FAILING_CASES))
def test_unusable_scan_has_a_clear_error_and_a_failure_record(messy_run, subject):
    path = messy_run["failing"][subject]
    log = (messy_run["results"] / "logs" / "conform" / f"{_scan(subject)}.log").read_text()
    assert f"{path}: " in log and FAILING_CASES[subject] in log, log
    record = json.loads((messy_run["results"] / "qc" / "failed_inputs" / f"{_scan(subject)}.json").read_text())
    assert record["path"] == str(path) and FAILING_CASES[subject] in record["reason"]
    assert not (messy_run["deriv"] / f"{_scan(subject)}_desc-conform_T1w.nii.gz").exists()
    # Second run: listed with the reason, in failed_inputs.tsv and in the QC table (the report's QC page).
    failed = pd.read_csv(messy_run["results"] / "failed_inputs.tsv", sep="\t", dtype=str).set_index("subject")
    assert FAILING_CASES[subject] in failed.at[subject, "reason"] and failed.at[subject, "step"] == "conform"
    row = _qc(messy_run).loc[f"sub-{subject}"]
    assert row["flags"] == "input_error" and row["passed"] == "False" and row["excluded"] == "True"
    assert FAILING_CASES[subject] in row["failure_reason"] and row["input_path"] == str(path)


def test_second_run_completes_everything_else(messy_run):
    results = messy_run["results"]
    assert "left out because their input file failed validation" in messy_run["second"].stderr
    samples = pd.read_csv(results / "samples.tsv", sep="\t", dtype=str, keep_default_na=False)
    assert not set(samples["subject"]) & set(FAILING_CASES)
    expected = set(PROCESSED_CASES) | set(REAL_SCANS)
    assert set(samples.loc[samples["dataset"] == "messy", "subject"]) == expected
    for scan in samples["scan"]:
        assert (messy_run["deriv"] / f"{scan}_{MNI}_desc-preproc_T1w.nii.gz").is_file(), scan
    table = pq.read_table(results / "latents" / f"{MODEL}.parquet").to_pandas()
    assert sorted(table["scan"]) == sorted(samples["scan"])
    assert (results / "tables" / "classification.tsv").is_file()


def test_a_repaired_file_is_processed_again(messy_run, real_t1w_dir):
    """A failure record holds only while the file is unchanged: a repaired download is planned again."""
    truncated = messy_run["failing"]["truncgz"]
    original = truncated.read_bytes()
    # The dry run rewrites the tables written at workflow start; the shared run gets them back exactly
    # (contents and modification times: jobs downstream of samples.tsv must stay up to date).
    start_tables = [messy_run["results"] / name for name in ("samples.tsv", "failed_inputs.tsv")]
    saved = {path: (path.read_bytes(), path.stat().st_mtime_ns) for path in start_tables if path.is_file()}
    shutil.copy(real_t1w_dir / "ixi" / f"{IXI['ixi012']}.nii.gz", truncated)
    try:
        result = _run(messy_run["workdir"], messy_run["configfile"], "--dry-run")
    finally:
        truncated.write_bytes(original)
        for path, (content, mtime) in saved.items():
            path.write_bytes(content)
            os.utime(path, ns=(mtime, mtime))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert planned_jobs(output)["conform"] == 1 and "scan=sub-truncgz/anat/sub-truncgz" in output


# --- Unusual but usable inputs ------------------------------------------------------------------------------------


def _inside_correlation(a: Path, b: Path, mask: Path) -> float:
    x, y = nib.load(a).get_fdata(), nib.load(b).get_fdata()
    inside = nib.load(mask).get_fdata() > 0
    return float(np.corrcoef(x[inside], y[inside])[0, 1])


def test_oblique_scan_is_processed_like_the_straight_one(messy_run):
    mask = messy_run["deriv"] / f"{_scan('ixi013')}_{MNI}_desc-brain_mask.nii.gz"
    assert _inside_correlation(_preproc(messy_run, "oblique"), _preproc(messy_run, "ixi013"), mask) > 0.9
    sidecar = json.loads((messy_run["deriv"] / f"{_scan('oblique')}_desc-conform_T1w.json").read_text())
    assert sidecar["ObliquityDeg"] > 15  # kept, not resampled, at conform


def test_large_field_of_view_with_neck_is_processed_like_the_plain_scan(messy_run):
    mask = messy_run["deriv"] / f"{_scan('ixi015')}_{MNI}_desc-brain_mask.nii.gz"
    assert _inside_correlation(_preproc(messy_run, "largefov"), _preproc(messy_run, "ixi015"), mask) > 0.9


@pytest.mark.parametrize(("subject", "flag"), [("aniso", "extreme_anisotropy"), ("aniso", "thick_voxels"),
                                               ("partial", "partial_coverage"), ("stripped", "input_skull_stripped"),
                                               ("t2like", "not_t1w_contrast")])
def test_unusual_scan_is_processed_and_flagged(messy_run, subject, flag):
    assert _preproc(messy_run, subject).is_file()
    row = _qc(messy_run).loc[f"sub-{subject}"]
    assert flag in row["flags"].split(";") and row["passed"] == "False", row.to_dict()


# --- Every real scan --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("subject", sorted(REAL_SCANS))
def test_real_scan_runs_the_whole_pipeline(messy_run, subject):
    assert _preproc(messy_run, subject).is_file()
    row = _qc(messy_run).loc[f"sub-{subject}"]
    volume = float(row["brain_volume_ml"])
    # Processed with a plausible brain, or flagged with the reason.
    assert (row["passed"] == "True" and 1000 <= volume <= 1900) or row["flags"], row.to_dict()
    table = pq.read_table(messy_run["results"] / "latents" / f"{MODEL}.parquet").to_pandas()
    assert _scan(subject) in set(table["scan"])  # encoded by the VAE


def test_every_real_scan_of_the_bundle_is_in_the_run(real_t1w_dir):
    bundled = sorted(p.relative_to(real_t1w_dir).as_posix() for p in real_t1w_dir.glob("*/*.nii.gz"))
    assert sorted(REAL_SCANS.values()) == bundled and len(bundled) == 10


@pytest.mark.parametrize("subject", sorted(REAL_SCANS))
def test_real_scan_volume_is_plausible_unless_cut(messy_run, subject):
    """Only a cut field of view excuses an implausible volume ("or any flag" could not fail: a volume out of
    range raises its own flag). Measured: 1337-1645 mL, no scan flagged partial_coverage."""
    row = _qc(messy_run).loc[f"sub-{subject}"]
    flags = set(filter(None, row["flags"].split(";")))
    if "partial_coverage" not in flags:
        assert 1000.0 <= float(row["brain_volume_ml"]) <= 1900.0, row.to_dict()
    if not flags:  # a plausible volume must come with a working registration, not a lucky mask
        assert float(row["template_correlation"]) >= 0.4, row.to_dict()


def test_partial_coverage_scan_is_measured_as_cut(messy_run):
    """The clinical scan whose slab misses the top of the brain (open_ms patient01): QC must see the missing part.

    Measured (coverage of the template brain): this scan 0.984; the full-head IXI, niivue and brainchop scans
    0.999-0.99995 (the other 3 mm-slice clinical scans, 0.98-0.99, are not compared). It misses too little brain
    to reach the partial_coverage flag (< 0.9), so its volume must still be plausible.
    """
    from brainvae import qc

    table = _qc(messy_run)
    coverage = {s: float(table.at[f"sub-{s}", "fov_coverage"]) for s in REAL_SCANS}
    full_head = [c for s, c in coverage.items() if not s.startswith("ms")]
    assert coverage["ms01"] < 0.99 and min(full_head) >= 0.995, coverage
    flagged = "partial_coverage" in table.at["sub-ms01", "flags"].split(";")
    assert flagged == (coverage["ms01"] < qc.DEFAULT_THRESHOLDS["min_fov_coverage"])


@pytest.mark.parametrize("subject", sorted(IXI))
def test_ixi_skullstrip_dice_vs_dlmuse(messy_run, real_t1w_dir, subject):
    """The workflow's native brain mask against DLMUSE labels > 0 (measured 0.978-0.983)."""
    from brainvae.resample import Grid, resample_to_grid
    from brainvae.skullstrip import dice

    labels = nib.load(real_t1w_dir / "ixi" / "dlmuse" / f"{IXI[subject]}_DLMUSE.nii.gz")
    mask = nib.load(messy_run["deriv"] / f"{_scan(subject)}_desc-brain_mask.nii.gz")
    ours = resample_to_grid(mask, np.eye(4), Grid.from_image(labels), order=0).get_fdata() > 0.5
    score = dice(ours, np.asarray(labels.dataobj) > 0)
    assert score >= 0.93, score


# --- Decided at conform: orientations, storage types, a singleton 4th axis ---------------------------------------

TWIN_CASES = {
    "ras": "float32, RAS",
    "lps": "float32, LPS",
    "las": "float32, LAS",
    "psr": "uint8 with a scale factor, PSR (the real IXI file)",
    "int16": "int16 with the same scale factor, PSR",
    "single4d": "float32 with a singleton 4th axis (X, Y, Z, 1)",
    "nifti2": "NIfTI-2",
}


def _save_scaled_int16(raw: np.ndarray, affine: np.ndarray, slope: float, inter: float, path: Path) -> None:
    """int16 voxels with scl_slope/scl_inter in the header (nibabel would pick its own scaling on save)."""
    plain = path.with_name(path.name.removesuffix(".gz"))
    _save(nib.Nifti1Image(raw.astype(np.int16), affine), plain)
    with open(plain, "r+b") as handle:
        handle.seek(112)  # scl_slope, scl_inter: two float32 at bytes 112-119 of a NIfTI-1 header
        handle.write(np.array([slope, inter], dtype="<f4").tobytes())
    path.write_bytes(gzip.compress(plain.read_bytes()))
    plain.unlink()


@pytest.fixture(scope="module")
def orientation_run(tmp_path_factory, real_t1w_dir):
    """The conform step of one IXI scan stored seven ways (TWIN_CASES), in a conform-only run."""
    workdir = tmp_path_factory.mktemp("twins")
    bids = workdir / "bids"
    source = real_t1w_dir / "ixi" / f"{IXI['ixi012']}.nii.gz"
    psr = nib.load(source)
    ras = _reoriented(_float_image(source), "RAS")
    raw = np.asarray(psr.dataobj.get_unscaled())
    images = {"ras": ras, "lps": _reoriented(ras, "LPS"), "las": _reoriented(ras, "LAS"),
              "single4d": nib.Nifti1Image(np.asarray(ras.dataobj)[..., None], ras.affine),
              "nifti2": nib.Nifti2Image(np.asarray(ras.dataobj), ras.affine)}
    for subject, img in images.items():
        _save(img, bids / f"sub-{subject}" / "anat" / f"sub-{subject}_T1w.nii.gz")
    (bids / "sub-psr" / "anat").mkdir(parents=True)
    shutil.copy(source, bids / "sub-psr" / "anat" / "sub-psr_T1w.nii.gz")
    _save_scaled_int16(raw, psr.affine, float(psr.dataobj.slope), float(psr.dataobj.inter),
                       bids / "sub-int16" / "anat" / "sub-int16_T1w.nii.gz")
    write_bids(bids, sorted(TWIN_CASES))
    config = {"output_dir": "results", "datasets": [{**messy_dataset(bids), "name": "twins"}]}
    configfile = workdir / "config.yaml"
    configfile.write_text(yaml.safe_dump(config))
    result = _run(workdir, configfile, "--until", "conform")
    assert result.returncode == 0, result.stdout + result.stderr
    return workdir / "results" / "derivatives" / "brainvae"


@pytest.mark.parametrize("subject", sorted(set(TWIN_CASES) - {"ras"}))
def test_storage_variant_conforms_to_its_ras_twin(orientation_run, subject):
    twin = nib.load(orientation_run / f"{_scan('ras')}_desc-conform_T1w.nii.gz")
    other = nib.load(orientation_run / f"{_scan(subject)}_desc-conform_T1w.nii.gz")
    assert other.shape == twin.shape and nib.aff2axcodes(other.affine) == ("R", "A", "S")
    np.testing.assert_allclose(other.affine, twin.affine, atol=1e-5)
    assert np.array_equal(np.asarray(other.dataobj), np.asarray(twin.dataobj))  # bitwise: nothing resampled


# --- Dataset-level problems stop the workflow at its start ---------------------------------------------------------


def _copy_scan(real: Path, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(real / "ixi" / f"{IXI['ixi012']}.nii.gz", path)


def test_dataset_problems_are_reported_together_before_anything_runs(tmp_path, real_t1w_dir):
    """Duplicate subject IDs (within and across datasets), IDs with path characters, an empty label cell."""
    a, b = tmp_path / "a", tmp_path / "b"
    for root, subjects in ((a, ["s1", "s2", "s3"]), (b, ["s1"])):
        for subject in subjects:
            _copy_scan(real_t1w_dir, root / f"sub-{subject}" / "anat" / f"sub-{subject}_T1w.nii.gz")
        (root / "dataset_description.json").write_text('{"Name": "x", "BIDSVersion": "1.9.0"}')
    _copy_scan(real_t1w_dir, a / "sub-a b" / "anat" / "sub-a b_T1w.nii.gz")  # a space: not a BIDS label
    (a / "participants.tsv").write_text("participant_id\tgroup\nsub-s1\teuploid\nsub-s2\t\nsub-s3\tDS\n"
                                        "sub-s3\tDS\nsub-../../etc\tDS\n")
    (b / "participants.tsv").write_text("participant_id\tgroup\nsub-s1\tDS\n")
    config = {"output_dir": "results", "datasets": [
        {"name": "A", "bids_dir": str(a), "role": "analyse", "label_column": "group"},
        {"name": "B", "bids_dir": str(b), "role": "analyse", "label_column": "group"}]}
    configfile = tmp_path / "config.yaml"
    configfile.write_text(yaml.safe_dump(config))
    result = _run(tmp_path, configfile, "--dry-run", timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert f"{a / 'sub-a b'}: subject folder label 'a b' is not a BIDS label" in output
    assert f"{a / 'participants.tsv'}: participant_id values must be 'sub-<label>'" in output and "'sub-../../etc'" in output
    assert "participant_id listed more than once: sub-s3" in output
    assert "sub-s2 (empty)" in output
    assert "sub-s1: participant ID used by datasets 'A' and 'B'" in output
    assert not (tmp_path / "results" / "derivatives").exists()


def test_a_dataset_with_one_class_only(tmp_path, real_t1w_dir):
    """One class in a dataset is normal (e.g. a control dataset); one class in the whole cohort skips classification."""
    bids = tmp_path / "controls"
    for subject in ("c1", "c2", "c3"):
        _copy_scan(real_t1w_dir, bids / f"sub-{subject}" / "anat" / f"sub-{subject}_T1w.nii.gz")
    write_bids(bids, ["c1", "c2", "c3"])
    configfile = tmp_path / "config.yaml"
    configfile.write_text(yaml.safe_dump(tiny_config(tmp_path, [messy_dataset(bids)])))
    result = _run(tmp_path, configfile, "--dry-run", timeout=600)
    assert result.returncode == 0, result.stderr
    assert planned_jobs(result.stdout + result.stderr).get("analysis_tasks_latents") == 1
    # The controls alone (train and analyse): nothing to classify, said at the start; the rest runs.
    only = {"output_dir": "results", "training": TINY_TRAINING, "models": {MODEL: {}},
            "datasets": [{**messy_dataset(bids), "role": "both"}]}
    configfile.write_text(yaml.safe_dump(only))
    result = _run(tmp_path, configfile, "--dry-run", timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "task ds_vs_euploid is left out" in output
    jobs = planned_jobs(output)
    assert jobs["train_vae"] == 1


# --- Interruptions and reproducibility --------------------------------------------------------------------------


def _wait_for(path: Path, process: subprocess.Popen, timeout: float) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, "the run ended before the job to kill started"
        assert time.monotonic() < end, f"{path} did not appear"
        time.sleep(0.2)


def test_sigkill_during_preprocessing_then_rerun(messy_run, tmp_path):
    """Kill Snakemake and its jobs while a scan is skull-stripped; the rerun completes and matches a clean run.

    The same scan (real IXI014, same settings) was preprocessed by the messy run in another folder, so this is
    also the preprocessing half of the reproducibility check. Tolerance: conform, N4 and the head mask are
    bitwise identical; the ANTs affine registrations are not with ``preprocess.threads`` > 1 (ITK sums the
    metric over threads in a scheduling-dependent order; with one thread, repeated registrations were bitwise
    equal). Measured here: 0.03 mm mean displacement, mask Dice 0.998, preprocessed-image correlation 0.998;
    the bounds below leave room for other CPUs, far inside the 0.5 mm registration accuracy target.
    """
    bids = write_bids(tmp_path / "bids", ["ixi014"])
    (bids / "sub-ixi014" / "anat").mkdir(parents=True)
    shutil.copy(messy_run["real"]["ixi014"], bids / "sub-ixi014" / "anat" / "sub-ixi014_T1w.nii.gz")
    config = yaml.safe_load(messy_run["configfile"].read_text())
    config["datasets"] = [messy_dataset(bids)]
    configfile = tmp_path / "config.yaml"
    configfile.write_text(yaml.safe_dump(config))
    target = f"results/derivatives/brainvae/{_scan('ixi014')}_{MNI}_desc-preproc_T1w.nii.gz"
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp_path),
               "--configfile", str(configfile), "--workflow-profile", str(PROFILE), "--cores", "2", target]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_for(tmp_path / "results" / "logs" / "skullstrip" / f"{_scan('ixi014')}.log", process, timeout=1200)
        time.sleep(0.5)  # inside the skull-strip job
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    deriv = tmp_path / "results" / "derivatives" / "brainvae"
    # Every image left behind under its final name is whole (atomic writes): it loads to the last voxel.
    left = list(deriv.rglob("*.nii.gz"))
    assert left  # the kill came after the conform and N4 jobs
    for path in left:
        np.asarray(nib.load(path).dataobj)
    # A killed Snakemake cannot remove its lock: the user (sure that no other run is active) unlocks, then reruns;
    # rerun-incomplete (default profile) redoes the killed job.
    unlock = subprocess.run([*command, "--unlock"], capture_output=True, text=True, timeout=600)
    assert unlock.returncode == 0, unlock.stderr
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    def pair(suffix):
        return (nib.load(deriv / f"{_scan('ixi014')}_{suffix}"),
                nib.load(messy_run["deriv"] / f"{_scan('ixi014')}_{suffix}"))

    for suffix in ("desc-conform_T1w.nii.gz", "desc-biasfield_T1w.nii.gz", "desc-head_mask.nii.gz"):
        again, first = pair(suffix)
        assert np.array_equal(again.affine, first.affine), suffix
        assert np.array_equal(np.asarray(again.dataobj), np.asarray(first.dataobj)), suffix
    xfm = "from-T1w_to-MNI152NLin2009aSym_mode-image_xfm.json"
    matrices = [np.array(json.loads((d / f"{_scan('ixi014')}_{xfm}").read_text())["affine_native_to_mni_ras"])
                for d in (deriv, messy_run["deriv"])]
    mask_again, mask_first = (np.asarray(img.dataobj) > 0 for img in pair("desc-brain_mask.nii.gz"))
    brain = np.c_[np.argwhere(mask_first), np.ones(int(mask_first.sum()))] @ pair("desc-brain_mask.nii.gz")[1].affine.T
    displacement = np.linalg.norm((brain @ (matrices[0] - matrices[1]).T)[:, :3], axis=1)
    assert displacement.mean() < 0.2
    for suffix in ("desc-brain_mask.nii.gz", f"{MNI}_desc-brain_mask.nii.gz"):
        a, b = (np.asarray(img.dataobj) > 0 for img in pair(suffix))
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.99, suffix
    x, y = (img.get_fdata() for img in pair(f"{MNI}_desc-preproc_T1w.nii.gz"))
    inside = (x > 0) | (y > 0)
    assert np.corrcoef(x[inside], y[inside])[0, 1] > 0.99


def test_vae_latents_and_classification_are_bitwise_reproducible(messy_run, tmp_path):
    """Rerun every cohort-level step (array, splits, training, encoding, analysis) in a copy of the run, on CPU:
    from the same preprocessed images, every array, weight, latent and table is bitwise identical."""
    work = tmp_path / "again"
    shutil.copytree(messy_run["workdir"], work, symlinks=True, ignore=shutil.ignore_patterns("messy_bids"))
    config = yaml.safe_load(messy_run["configfile"].read_text())
    configfile = tmp_path / "config.yaml"
    configfile.write_text(yaml.safe_dump(config))  # same messy_bids (absolute path)
    results = work / "results"
    before = {p.relative_to(results): p.read_bytes() for p in [
        results / "cohort" / "cohort.npy", results / "cohort" / "splits.tsv",
        *(results / "tables").glob("*.tsv"), *(results / "analysis").rglob("*.tsv")]}
    weights_before = torch.load(results / "models" / MODEL / "model.pt", weights_only=True)
    latents_before = pq.read_table(results / "latents" / f"{MODEL}.parquet")
    result = _run(work, configfile, "--forcerun", "cohort_array", "cohort_splits")
    assert result.returncode == 0, result.stdout + result.stderr
    assert planned_jobs(result.stdout + result.stderr).get("train_vae") == 1
    assert pq.read_table(results / "latents" / f"{MODEL}.parquet").equals(latents_before)
    changed = [str(name) for name, content in before.items() if (results / name).read_bytes() != content]
    assert not changed
    weights = torch.load(results / "models" / MODEL / "model.pt", weights_only=True)
    assert weights.keys() == weights_before.keys()
    assert all(torch.equal(weights[k], weights_before[k]) for k in weights)
