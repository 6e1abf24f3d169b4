"""BIDS datasets are indexed once, at workflow start: the Snakemake process of each cluster job (SLURM runs
one per job or group) reads the samples table that start wrote instead of indexing every dataset again.

Locally, Snakemake runs `script:` jobs without parsing the workflow again, so there is nothing to check there.
"""

import json
from pathlib import Path

import pandas as pd
import yaml

from brainvae.inputs import read_samples, write_samples
from brainvae.workflow import build_samples
from test_workflow import REPO, snakemake


def tiny_bids(root: Path) -> Path:
    """Three subjects with empty T1w files (planning never reads them), one with two sessions."""
    root.mkdir(parents=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "tiny", "BIDSVersion": "1.9.0"}))
    rows = ["participant_id\tgroup\tage\tsex", "sub-a01\teuploid\t31\tF", "sub-a02\tDS\t25.5\tM",
            "sub-a03\teuploid\tn/a\tF"]
    (root / "participants.tsv").write_text("\n".join(rows) + "\n")
    for folder, name in [("sub-a01/anat", "sub-a01_T1w.nii.gz"), ("sub-a02/ses-1/anat", "sub-a02_ses-1_T1w.nii.gz"),
                         ("sub-a02/ses-2/anat", "sub-a02_ses-2_T1w.nii.gz"), ("sub-a03/anat", "sub-a03_T1w.nii.gz")]:
        (root / folder).mkdir(parents=True)
        (root / folder / name).touch()
    return root


def tiny_config(tmp_path: Path, bids: Path) -> Path:
    config = {"output_dir": "results",
              "datasets": [{"name": "tiny", "bids_dir": str(bids), "role": "both", "label_column": "group",
                            "covariates": ["age", "sex"]}]}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_samples_table_round_trips_unchanged(tmp_path):
    """A job that reads samples.tsv sees exactly the table the workflow start built (demo and BIDS rows)."""
    with open(REPO / "config" / "config.yaml") as handle:
        config = yaml.safe_load(handle)
    config["demo"]["sites"] = {"IXI": {"subjects": 2}, "HCP": {"subjects": 2}, "SantPau": {"subjects": 2, "ds_fraction": 0.5},
                               "ABCDS": {"subjects": 2, "ds_fraction": 0.5}}
    bids = tiny_bids(tmp_path / "bids")
    config["datasets"].append({"name": "tiny", "bids_dir": str(bids), "role": "analyse", "label_column": "group",
                               "covariates": ["age", "sex"]})
    built = build_samples(config)
    write_samples(built, tmp_path / "samples.tsv")
    pd.testing.assert_frame_equal(read_samples(tmp_path / "samples.tsv"), built)
    assert set(built["dataset"]) == {"IXI", "HCP", "SantPau", "ABCDS", "tiny"}


def test_cluster_jobs_do_not_index_bids_again(tmp_path):
    bids = tiny_bids(tmp_path / "bids")
    configfile = tiny_config(tmp_path, bids)
    snakemake(tmp_path, configfile, "--dry-run")  # the workflow start: indexes, writes samples.tsv
    samples = tmp_path / "results" / "samples.tsv"
    written = samples.read_text()
    assert len(read_samples(samples)) == 4

    # From here on, indexing the dataset fails ...
    (bids / "participants.tsv").unlink()
    start = snakemake(tmp_path, configfile, "--dry-run", check=False)
    assert start.returncode != 0 and "participants.tsv is missing" in start.stdout + start.stderr

    # ... but a job's own Snakemake process, started as a cluster executor starts it, never indexes.
    job = snakemake(tmp_path, configfile, "--mode", "remote", "--target-jobs", "derivatives_description:",
                    "--allowed-rules", "derivatives_description", "--force-use-threads")
    description = json.loads((tmp_path / "results" / "derivatives" / "brainvae" / "dataset_description.json")
                             .read_text())
    assert description["DatasetType"] == "derivative", job.stderr
    assert samples.read_text() == written
