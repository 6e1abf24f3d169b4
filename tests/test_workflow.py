"""The Snakemake workflow itself: planning, a small end-to-end run, reruns and per-scan failures."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]


def snakemake(workdir: Path, configfile: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory",
               str(workdir), "--configfile", str(configfile), "--cores", "2", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def demo_config(tmp_path: Path, subjects: int) -> Path:
    with open(REPO / "config" / "config.yaml") as handle:
        config = yaml.safe_load(handle)
    config["demo"]["subjects"] = subjects
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def planned_jobs(output: str) -> dict[str, int]:
    """Parse Snakemake's job-stats table ('job  count' lines) from a dry run."""
    counts, in_table = {}, False
    for line in output.splitlines():
        parts = line.split()
        if parts[:2] == ["job", "count"]:
            in_table = True
            continue
        if in_table and len(parts) == 2 and parts[1].isdigit():
            counts[parts[0]] = int(parts[1])
        elif in_table and parts and parts[0] == "total":
            break
    return counts


def test_dry_run_plans_the_demo_dag(tmp_path):
    config = demo_config(tmp_path, subjects=40)
    result = snakemake(tmp_path, config, "--dry-run")
    jobs = planned_jobs(result.stdout + result.stderr)
    samples = pd.read_csv(tmp_path / "results" / "samples.tsv", sep="\t", dtype=str, keep_default_na=False)
    assert jobs["demo_cohort"] == 1
    assert jobs["conform"] == len(samples) >= 40
    assert set(samples["dataset"]) == {"IXI", "HCP"}
    assert set(samples["label"]) == {"euploid", "DS"}
    # Nothing but the samples table was written by a dry run.
    assert not (tmp_path / "results" / "demo_cohort").exists()


def test_demo_end_to_end_and_noop_rerun(tmp_path):
    config = demo_config(tmp_path, subjects=4)
    snakemake(tmp_path, config)
    deriv = tmp_path / "results" / "derivatives" / "brainvae"
    samples = pd.read_csv(tmp_path / "results" / "samples.tsv", sep="\t", dtype=str, keep_default_na=False)
    assert len(samples) >= 4
    description = json.loads((deriv / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    mni = "space-MNI152NLin2009aSym_res-demo"
    for scan in samples["scan"]:
        image = nib.load(deriv / f"{scan}_desc-conform_T1w.nii.gz")
        assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
        sidecar = json.loads((deriv / f"{scan}_desc-conform_T1w.json").read_text())
        assert sidecar  # provenance written next to every image
        preproc = nib.load(deriv / f"{scan}_{mni}_desc-preproc_T1w.nii.gz")
        mask = nib.load(deriv / f"{scan}_{mni}_desc-brain_mask.nii.gz")
        assert preproc.shape == mask.shape == (40, 48, 40)
        data, inside = preproc.get_fdata(), mask.get_fdata() > 0
        assert 0.0 <= data.min() and data.max() <= 1.0 and data[~inside].max() == 0.0  # percentile-normalised
        assert (deriv / f"{scan}_desc-qc_T1w.png").stat().st_size > 10_000
        assert (deriv / f"{scan}_from-T1w_to-MNI152NLin2009aSym_mode-image_xfm.mat").exists()
        # Intermediates marked temp() are gone once every consumer has run.
        assert not (deriv / f"{scan}_desc-n4_T1w.nii").exists()
    qc = pd.read_csv(tmp_path / "results" / "qc" / "qc.tsv", sep="\t", keep_default_na=False)
    assert len(qc) == len(samples)
    assert (pd.to_numeric(qc["template_correlation"]) > 0.6).all()
    assert pd.to_numeric(qc["brain_volume_ml"]).between(1000, 1900).all()
    # A second run has nothing to do.
    again = snakemake(tmp_path, config, "--dry-run")
    assert "Nothing to be done" in again.stdout + again.stderr
    # The HTML report has a QC page with every scan's picture and the QC table.
    snakemake(tmp_path, config, "--report", str(tmp_path / "report.html"))
    html = (tmp_path / "report.html").read_text()
    assert "Quality control" in html and "qc.tsv" in html
    assert all(f"{Path(scan).name}_desc-qc_T1w.png" in html for scan in samples["scan"])


def real_bids_dataset(root: Path, real_t1w_dir: Path) -> Path:
    """A small BIDS dataset of real scans: IXI subjects, one with two sessions."""
    (root).mkdir(parents=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "real", "BIDSVersion": "1.9.0"}))
    scans = {"ixi012": ["IXI012-HH-1211-T1_ds.nii.gz"], "ixi013": ["IXI013-HH-1212-T1_ds.nii.gz"],
             "ixi014": ["IXI014-HH-1236-T1_ds.nii.gz", "IXI015-HH-1258-T1_ds.nii.gz"]}
    rows = []
    for subject, files in scans.items():
        rows.append(f"sub-{subject}\teuploid")
        for i, name in enumerate(files):
            session = f"ses-{i + 1}" if len(files) > 1 else None
            folder = root / f"sub-{subject}" / (session or "") / "anat"
            folder.mkdir(parents=True, exist_ok=True)
            stem = f"sub-{subject}" + (f"_{session}" if session else "")
            shutil.copy(real_t1w_dir / "ixi" / name, folder / f"{stem}_T1w.nii.gz")
    (root / "participants.tsv").write_text("participant_id\tgroup\n" + "\n".join(rows) + "\n")
    return root


def test_bad_scan_fails_alone_with_a_clear_error(tmp_path, real_t1w_dir):
    bids = real_bids_dataset(tmp_path / "bids", real_t1w_dir)
    broken = bids / "sub-ixi013" / "anat" / "sub-ixi013_T1w.nii.gz"
    broken.write_bytes(broken.read_bytes()[:5000])  # a truncated download
    config = {"output_dir": "results",
              "datasets": [{"name": "real", "bids_dir": str(bids), "role": "analyse", "label_column": "group"}]}
    configfile = tmp_path / "config.yaml"
    configfile.write_text(yaml.safe_dump(config))
    result = snakemake(tmp_path, configfile, "--keep-going", check=False)
    assert result.returncode != 0
    deriv = tmp_path / "results" / "derivatives" / "brainvae"
    preproc = "space-MNI152NLin2009aSym_res-demo_desc-preproc_T1w.nii.gz"
    assert (deriv / f"sub-ixi012/anat/sub-ixi012_{preproc}").exists()
    assert (deriv / f"sub-ixi014/ses-1/anat/sub-ixi014_ses-1_{preproc}").exists()
    assert (deriv / f"sub-ixi014/ses-2/anat/sub-ixi014_ses-2_{preproc}").exists()
    assert not (deriv / "sub-ixi013/anat/sub-ixi013_desc-conform_T1w.nii.gz").exists()
    log = (tmp_path / "results" / "logs" / "conform" / "sub-ixi013" / "anat" / "sub-ixi013.log").read_text()
    assert str(broken) in log
    assert str(broken) in result.stderr + result.stdout  # the reason reaches the terminal too
