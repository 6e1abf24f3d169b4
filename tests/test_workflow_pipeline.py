"""The whole workflow on a tiny demo cohort, up to the latents (and whatever else `rule all` asks for).

One run of `rule all` (`pipeline`: conftest's session-scoped `tiny_run`, shared with tests/test_bad_inputs.py,
whose messy dataset of bad and real scans runs next to the demo) feeds every test here: preprocessed files and
QC, splits, the model folder, the evaluation tables, the Parquet latents, the analysis, the report and the rerun
policy. The preprocessing runs once for the whole test session.
"""

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from brainvae.vae.cohort import check_splits, read_index, read_splits
from brainvae.vae.latents import export_latents, latent_schema, read_latents
from brainvae.vae.train import config_sha256
from test_workflow import REPO, planned_jobs, snakemake

MODEL = "vae_tiny"
# Small enough for CI on 2 cores: 6 subjects (about 4 euploid: one each in validation and test),
# one epoch of a tiny network on the demo grid.
TINY_TRAINING = {"epochs": 1, "threads": 1, "model": {"latent_dim": 4, "widths": [4, 8, 8], "blocks": 0}}
# Training sites: 3 raw IXI-like scans (+1 second session) and 4 template-space HCP-like scans (train, val and
# test splits); analysis: 8 SantPau-like subjects, 4 DS (3 is the fewest the nested-CV classification accepts)
# and 3 raw ABCDS-like subjects as the external site (3 per site: the site check runs).
TINY_SITES = {"IXI": {"subjects": 3, "ds_fraction": 0.0}, "HCP": {"subjects": 4, "ds_fraction": 0.0},
              "SantPau": {"subjects": 8, "ds_fraction": 0.5}, "ABCDS": {"subjects": 3, "ds_fraction": 0.5}}
TINY_SUBJECTS = sum(site["subjects"] for site in TINY_SITES.values())
NATIVE_DATASETS = ["IXI", "ABCDS"]
TEMPLATE_DATASETS = ["HCP", "SantPau"]
# One thread per preprocessing job: with --cores 2, two scans at a time keep both cores busy.
TINY_PREPROCESS = {"threads": 1}
# Normative maps with few permutations (the stage's numbers: tests/test_normative_steps.py).
TINY_ANALYSIS = {"outer_repeats": 1, "permutations": 3, "random_forest_trees": 10,
                 "normative": {"n_permutations": 20, "traversal_permutations": 10}}
# Half of the 7 training subjects held out (the default 15 % + 15 % would leave fewer than the 3 val/test scans the
# normative reference needs, brainvae.analysis.normative_steps.MIN_REFERENCE).
TINY_COHORT = {"split_fractions": [0.5, 0.25, 0.25]}




@pytest.fixture(scope="module")
def pipeline(tiny_run):
    """The session's tiny run (conftest.py): `rule all` on the 7-subject demo next to the messy dataset of
    tests/test_bad_inputs.py, after its second, completing run."""
    return {**tiny_run, "cohort": tiny_run["results"] / "cohort", "model": tiny_run["results"] / "models" / MODEL}


def test_cohort_array_and_splits(pipeline):
    samples = pd.read_csv(pipeline["results"] / "samples.tsv", sep="\t", dtype=str, keep_default_na=False)
    index = read_index(pipeline["cohort"] / "cohort_index.tsv")
    assert index["scan"].tolist() == samples["scan"].tolist()  # every scan of every role, in order
    assert index["row"].tolist() == list(range(len(samples)))
    splits = read_splits(pipeline["cohort"] / "splits.tsv")
    check_splits(index, splits)  # raises if a subject is in two splits
    merged = index.merge(splits, on="scan")
    assert (merged.groupby(["dataset", "subject"])["split"].nunique() == 1).all()
    assert set(merged["split"]) == {"train", "val", "test"}
    assert set(merged["label"]) == {"euploid"}  # the default: the VAE never sees DS scans
    assert set(samples.loc[samples["label"] == "DS", "scan"]).isdisjoint(splits["scan"])
    # The model folder holds the scans its VAE learnt from: with one variant on the default labels, all of them.
    assert read_splits(pipeline["model"] / "splits.tsv").equals(splits)


def test_preprocessed_scans_and_qc(pipeline):
    """Every scan's derivatives under BIDS-Derivatives names, on the demo grid, with QC; temp() files gone."""
    results = pipeline["results"]
    deriv = results / "derivatives" / "brainvae"
    samples = pd.read_csv(results / "samples.tsv", sep="\t", dtype=str, keep_default_na=False)
    assert len(samples) >= TINY_SUBJECTS and any("/ses-" in scan for scan in samples["scan"])
    description = json.loads((deriv / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    mni = "space-MNI152NLin2009aSym_res-demo"
    dataset_of = dict(zip(samples["scan"], samples["dataset"]))
    for scan in samples["scan"]:
        image = nib.load(deriv / f"{scan}_desc-conform_T1w.nii.gz")
        assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
        assert json.loads((deriv / f"{scan}_desc-conform_T1w.json").read_text())  # provenance next to every image
        preproc = nib.load(deriv / f"{scan}_{mni}_desc-preproc_T1w.nii.gz")
        mask = nib.load(deriv / f"{scan}_{mni}_desc-brain_mask.nii.gz")
        assert preproc.shape == mask.shape == (40, 48, 40)
        data, inside = preproc.get_fdata(), mask.get_fdata() > 0
        assert 0.0 <= data.min() and data.max() <= 1.0 and data[~inside].max() == 0.0  # percentile-normalised
        assert (deriv / f"{scan}_desc-qc_T1w.png").stat().st_size > 10_000
        assert (deriv / f"{scan}_from-T1w_to-MNI152NLin2009aSym_mode-image_xfm.mat").exists()
        # Intermediates marked temp() are gone once every consumer has run.
        assert not (deriv / f"{scan}_desc-n4_T1w.nii").exists()
        # Every per-scan job wrote its benchmark (wall and CPU time, peak memory); template-space scans
        # have one job of their own.
        template = dataset_of[scan] in TEMPLATE_DATASETS
        for rule in (["preprocess_template_scan"] if template else PER_SCAN_RULES):
            bench = pd.read_csv(results / "benchmarks" / rule / f"{scan}.tsv", sep="\t")
            assert bench["s"].iloc[0] > 0 and bench["max_rss"].iloc[0] > 0, (rule, scan)
    qc = pd.read_csv(results / "qc" / "qc.tsv", sep="\t", keep_default_na=False).set_index("scan")
    assert set(samples["scan_key"]) <= set(qc.index)  # (and a row per failed input of the messy dataset)
    # The demo's scans are all sound (the messy dataset's odd scans are judged in test_bad_inputs.py).
    demo = qc.loc[samples.loc[samples["dataset"].isin(TINY_SITES), "scan_key"]]
    assert len(demo) >= TINY_SUBJECTS
    assert (pd.to_numeric(demo["template_correlation"]) > 0.6).all()
    native = qc.loc[samples.loc[samples["dataset"].isin(NATIVE_DATASETS), "scan_key"]]
    assert pd.to_numeric(native["brain_volume_ml"]).between(1000, 1900).all()


def test_model_folder(pipeline):
    model = pipeline["model"]
    for name in ("model.pt", "config.json", "environment.txt", "metrics.json", "training_log.tsv",
                 "training_curves.png"):
        assert (model / name).stat().st_size > 0, name
    config = json.loads((model / "config.json").read_text())
    assert config["model"]["latent_dim"] == 4 and config["model"]["in_shape"] == [40, 48, 40]
    assert "device" not in config  # run options are not part of the model's config
    metrics = json.loads((model / "metrics.json").read_text())
    assert metrics["model_name"] == MODEL and metrics["epochs_run"] == 1 and metrics["device"] == "cpu"
    assert metrics["config_sha256"] == config_sha256(config)
    log = pd.read_csv(model / "training_log.tsv", sep="\t")
    assert log["epoch"].tolist() == [1] and log["train_loss"].notna().all()
    assert "torch==" in (model / "environment.txt").read_text()
    # The checkpoint lives outside the outputs while training and is removed once it succeeded.
    assert not (pipeline["results"] / ".checkpoints" / MODEL / "checkpoint.pt").exists()


def test_evaluation_tables(pipeline):
    evaluation = pipeline["model"] / "evaluation"
    splits = read_splits(pipeline["cohort"] / "splits.tsv")
    test_scans = set(splits.loc[splits["split"] == "test", "scan"])
    per_scan = pd.read_csv(evaluation / "per_scan_metrics.tsv", sep="\t")
    # The VAE next to its two linear references: PCA of equal dimension and the training mean image.
    assert set(per_scan["method"]) == {"vae", "pca", "mean_image"}
    assert set(per_scan["scan"]) == test_scans and len(per_scan) == 3 * len(test_scans)
    summary = pd.read_csv(evaluation / "summary.tsv", sep="\t")
    assert list(summary.columns) == ["method", "metric", "region", "n", "mean", "sd", "ci_low", "ci_high"]
    assert set(summary["metric"]) == {"mse", "mae", "psnr", "ssim"}
    assert set(summary["region"]) == {"mask", "whole"} and len(summary) == 3 * 4 * 2
    ssim = summary[summary["metric"] == "ssim"]
    assert ssim["mean"].between(-1, 1).all()
    for name in ("reconstructions.png", "prior_samples.png"):
        assert (evaluation / name).read_bytes()[:4] == b"\x89PNG"


def test_latents_parquet(pipeline):
    path = pipeline["results"] / "latents" / f"{MODEL}.parquet"
    schema = pq.read_schema(path)
    assert schema.remove_metadata().equals(latent_schema(4, ["age", "sex"]).remove_metadata())
    table, meta = read_latents(path)
    index = read_index(pipeline["cohort"] / "cohort_index.tsv")
    assert table["scan"].tolist() == index["scan"].tolist()  # every scan, DS and analyse-only included
    splits = read_splits(pipeline["cohort"] / "splits.tsv").set_index("scan")["split"]
    assert table["split"].tolist() == [splits.get(s, "none") for s in table["scan"]]
    model = pipeline["model"]
    assert meta["brainvae.model_name"] == MODEL and meta["brainvae.latent_dim"] == "4"
    assert meta["brainvae.checkpoint_sha256"] == hashlib.sha256((model / "model.pt").read_bytes()).hexdigest()
    assert meta["brainvae.config_sha256"] == config_sha256(json.loads((model / "config.json").read_text()))


def test_encoding_twice_gives_identical_latents(pipeline, tmp_path):
    cohort = pipeline["cohort"]
    again = export_latents(pipeline["model"], cohort / "cohort.npy", cohort / "cohort_mask.npy",
                           cohort / "cohort_index.tsv", cohort / "splits.tsv", tmp_path / "again.parquet",
                           model_name=MODEL, device="cpu")
    assert again.equals(pq.read_table(pipeline["results"] / "latents" / f"{MODEL}.parquet"))


def test_rerun_is_a_noop(pipeline):
    result = snakemake(pipeline["workdir"], pipeline["configfile"], "--dry-run")
    assert "Nothing to be done" in result.stdout + result.stderr


# --- Rerun only what changed -----------------------------------------------------------------------------
# After the one real run above, each scenario is planned with a dry run under the workstation profile (its
# rerun triggers: mtime, params, input, code), and the job-stats table says which jobs would run.

PROFILE = REPO / "workflow" / "profiles" / "default"
PER_SCAN_RULES = {"conform", "n4", "register_level1", "skullstrip", "register_level2", "resample", "qc_scan"}


def rules_in(*rule_files: str) -> set[str]:
    """Names of the rules defined in workflow/rules/<rule_file>."""
    return {match for name in rule_files for match in
            re.findall(r"^\s*rule\s+(\w+)\s*:", (REPO / "workflow" / "rules" / name).read_text(), re.MULTILINE)}


PREPROCESSING_RULES = rules_in("demo.smk", "conform.smk", "preprocess.smk", "qc.smk")
VAE_RULES = rules_in("cohort.smk", "vae.smk")
ANALYSIS_RULES = rules_in("analysis.smk")
ALL_RULES = PREPROCESSING_RULES | VAE_RULES | ANALYSIS_RULES


def plan_rerun(workdir: Path, configfile: Path, snakefile: Path = REPO / "Snakefile") -> tuple[dict[str, int], str]:
    """Jobs a run would start now (rule -> count, without the target rule `all`) and the dry run's output."""
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(snakefile), "--directory", str(workdir),
               "--configfile", str(configfile), "--workflow-profile", str(PROFILE), "--cores", "2", "--dry-run"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # The job-stats table, without the target rule `all`.
    jobs = {rule: n for rule, n in planned_jobs(output).items() if rule in ALL_RULES and rule != "all"}
    assert jobs or "Nothing to be done" in output, output
    return jobs, output


def planned_scans(output: str, rule: str) -> list[str]:
    """The {scan} wildcard of every planned job of one rule, from a dry run's job listing."""
    scans, current = [], None
    for line in output.splitlines():
        header = re.match(r"^(?:local)?rule (\w+):$", line.strip())
        if header:
            current = header[1]
        elif current == rule and line.strip().startswith("wildcards:"):
            scans += re.findall(r"scan=([^,\s]+)", line)
    return scans


def changed_config(pipeline, tmp_path: Path, change) -> Path:
    config = yaml.safe_load(pipeline["configfile"].read_text())
    change(config)
    path = tmp_path / "changed.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_second_run_does_nothing(pipeline):
    """A real second run (not a dry run): starts no job and touches no output."""
    jobs, output = plan_rerun(pipeline["workdir"], pipeline["configfile"])
    assert not jobs, output  # fail here, with the reasons, rather than rerun the whole pipeline
    results = pipeline["results"]
    before = {p: p.stat().st_mtime_ns for p in results.rglob("*") if p.is_file()}
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory",
               str(pipeline["workdir"]), "--configfile", str(pipeline["configfile"]), "--workflow-profile",
               str(PROFILE), "--cores", "2"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "Nothing to be done" in result.stdout + result.stderr, result.stderr
    after = {p: p.stat().st_mtime_ns for p in results.rglob("*") if p.is_file()}
    assert after == before


def test_changed_classification_parameter_reruns_only_analysis_jobs(pipeline, tmp_path):
    config = changed_config(pipeline, tmp_path, lambda c: c["analysis"].update(inner_folds=2))
    jobs, output = plan_rerun(pipeline["workdir"], config)
    assert set(jobs) <= ANALYSIS_RULES, output
    assert jobs["analysis_tasks_latents"] == 1 and jobs["analysis_tasks_baselines"] == 1
    # Steps the prediction tasks do not feed stay as they are. (The voxel matrix is temp(): the voxel
    # baseline rebuilds it, and the voxel PCA that reads it reruns too.)
    assert not {"analysis_scans", "analysis_pca_latents", "analysis_reconstruction_table"} & set(jobs)


def test_changed_vae_hyperparameter_retrains_that_model_and_what_follows(pipeline, tmp_path):
    config = changed_config(pipeline, tmp_path, lambda c: c["models"][MODEL].update(beta=0.5))
    jobs, output = plan_rerun(pipeline["workdir"], config)
    assert jobs["train_vae"] == 1 and jobs["evaluate_vae"] == 1 and jobs["encode_latents"] == 1, output
    assert not PREPROCESSING_RULES & set(jobs)
    assert not {"cohort_array", "cohort_splits"} & set(jobs)  # the cohort is the same
    assert set(jobs) - VAE_RULES <= ANALYSIS_RULES and "analysis_tasks_latents" in jobs
    # Baselines do not depend on the model (they select scans by every model's splits, made from the cohort's).
    assert not {"analysis_tasks_baselines", "analysis_pca_voxels", "analysis_voxels"} & set(jobs)


def test_new_subject_is_preprocessed_alone(pipeline, tmp_path):
    """One more subject: its scan alone is preprocessed; the cohort-level steps after it rerun.

    The demo datasets are generated whole by one job, so the subject arrives in a BIDS dataset of its own
    (to Snakemake, as for a subject added to an existing dataset: one more row in samples.tsv). The planning
    happens in a copy of the run, so the samples table it rewrites is not the fixture's.
    """
    workdir = tmp_path / "run"
    shutil.copytree(pipeline["workdir"], workdir, symlinks=True)  # copy2: modification times are kept
    bids = tmp_path / "extra"
    (bids / "sub-new01" / "anat").mkdir(parents=True)
    (bids / "dataset_description.json").write_text(json.dumps({"Name": "extra", "BIDSVersion": "1.9.0"}))
    (bids / "participants.tsv").write_text("participant_id\tgroup\tage\tsex\nsub-new01\tDS\t30\tF\n")
    some_t1w = next((pipeline["results"] / "demo_cohort").rglob("*_T1w.nii.gz"))
    shutil.copy(some_t1w, bids / "sub-new01" / "anat" / "sub-new01_T1w.nii.gz")

    def add_dataset(config):
        config["datasets"].append({"name": "extra", "bids_dir": str(bids), "role": "analyse",
                                   "label_column": "group", "labels": ["euploid", "DS"],
                                   "covariates": ["age", "sex"]})

    jobs, output = plan_rerun(workdir, changed_config(pipeline, tmp_path, add_dataset))
    for rule in PER_SCAN_RULES:
        assert planned_scans(output, rule) == ["sub-new01/anat/sub-new01"], (rule, output)
    assert "demo_cohort" not in jobs
    assert jobs["qc_table"] == 1 and jobs["cohort_array"] == 1 and jobs["cohort_splits"] == 1
    assert jobs["train_vae"] == 1 and jobs["encode_latents"] == 1


def test_edited_script_reruns_its_rule_and_what_follows(pipeline, tmp_path):
    """Edit workflow/scripts/resample.py in a copy of the workflow (the checkout stays untouched)."""
    copy = tmp_path / "workflow_copy"
    copy.mkdir()
    shutil.copy2(REPO / "Snakefile", copy / "Snakefile")
    for folder in ("workflow", "config"):
        shutil.copytree(REPO / folder, copy / folder)  # copy2: modification times are kept
    for folder in ("src", "envs"):
        (copy / folder).symlink_to(REPO / folder)
    script = copy / "workflow" / "scripts" / "resample.py"
    script.write_text(script.read_text() + "# edited\n")

    jobs, output = plan_rerun(pipeline["workdir"], pipeline["configfile"], snakefile=copy / "Snakefile")
    samples = pd.read_csv(pipeline["results"] / "samples.tsv", sep="\t", dtype=str, keep_default_na=False)
    native = samples[~samples["dataset"].isin(TEMPLATE_DATASETS)]  # template-space scans have a rule of their own
    assert jobs["resample"] == len(native), output
    assert not {"conform", "n4", "register_level1", "skullstrip", "register_level2", "qc_scan", "qc_table",
                "demo_cohort"} & set(jobs)  # before resample, or beside it
    assert jobs["cohort_array"] == 1 and jobs["train_vae"] == 1 and "analysis_tasks_latents" in jobs


SCAN_FILE_SUFFIXES = {  # workflow/rules/common.smk, SCAN_FILES
    "conformed": "_desc-conform_T1w.nii.gz", "conform_sidecar": "_desc-conform_T1w.json",
    "biasfield": "_desc-biasfield_T1w.nii.gz", "headmask": "_desc-head_mask.nii.gz",
    "level1_xfm": "_from-T1w_to-MNI152NLin2009aSym_mode-image_desc-level1_xfm.mat",
    "level1_info": "_from-T1w_to-MNI152NLin2009aSym_mode-image_desc-level1_xfm.json",
    "brain_mask": "_desc-brain_mask.nii.gz", "brain_mask_info": "_desc-brain_mask.json",
    "xfm": "_from-T1w_to-MNI152NLin2009aSym_mode-image_xfm.mat",
    "xfm_info": "_from-T1w_to-MNI152NLin2009aSym_mode-image_xfm.json",
    "preproc": "_space-MNI152NLin2009aSym_res-demo_desc-preproc_T1w.nii.gz",
    "preproc_mask": "_space-MNI152NLin2009aSym_res-demo_desc-brain_mask.nii.gz",
    "qc_png": "_desc-qc_T1w.png", "qc_metrics": "_desc-qc_metrics.json",
}


def test_one_job_per_scan_writes_the_same_files_and_records_bad_inputs(pipeline, tmp_path):
    """preprocess.one_job_per_scan on two demo scans and one unusable file of the tiny run: the same files as the
    per-step rules wrote (images bitwise), and the unusable input fails its job alone, with its failure record."""
    from brainvae.steps import SCAN_OUTPUTS

    assert set(SCAN_OUTPUTS) == set(SCAN_FILE_SUFFIXES)
    config = yaml.safe_load(pipeline["configfile"].read_text())
    ixi = next(d for d in config["datasets"] if d["name"] == "IXI")
    source = pipeline["workdir"] / ixi["bids_dir"]
    participants = pd.read_csv(source / "participants.tsv", sep="\t", dtype=str, keep_default_na=False)
    subjects = sorted(p.name for p in source.glob("sub-*") if not any(p.glob("ses-*")))[:2]  # scan = sub/anat/sub
    bids = tmp_path / "IXI"
    bids.mkdir()
    shutil.copy(source / "dataset_description.json", bids)
    participants[participants["participant_id"].isin(subjects)].to_csv(bids / "participants.tsv", sep="\t",
                                                                         index=False)
    for subject in subjects:
        shutil.copytree(source / subject, bids / subject)
    messy = tmp_path / "messy"
    bad = next(pipeline["bids"].glob("sub-truncgz/anat/*_T1w.nii.gz"))
    (messy / "sub-truncgz" / "anat").mkdir(parents=True)
    shutil.copy(bad, messy / "sub-truncgz" / "anat" / bad.name)
    shutil.copy(pipeline["bids"] / "dataset_description.json", messy)
    (messy / "participants.tsv").write_text("participant_id\tgroup\tage\tsex\nsub-truncgz\tDS\t40\tF\n")
    messy_entry = next(d for d in config["datasets"] if d["name"] == "messy")
    config["datasets"] = [{**ixi, "bids_dir": str(bids)}, {**messy_entry, "bids_dir": str(messy)}]
    config["preprocess"]["one_job_per_scan"] = True
    configfile = tmp_path / "config.yaml"
    configfile.write_text(yaml.safe_dump(config))
    scans = [f"{subject}/anat/{subject}" for subject in subjects]
    bad_scan = "sub-truncgz/anat/sub-truncgz"
    targets = [f"results/derivatives/brainvae/{scan}_desc-qc_metrics.json" for scan in [*scans, bad_scan]]
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory",
               str(tmp_path), "--configfile", str(configfile), "--workflow-profile", str(PROFILE), "--cores", "2",
               "--keep-going", *targets]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1200)
    terminal = result.stdout + result.stderr
    assert result.returncode != 0, terminal
    assert set(re.findall(r"^\s*Error in rule (\w+):", terminal, re.MULTILINE)) == {"preprocess_scan"}, terminal
    log = (tmp_path / "results" / "logs" / "preprocess_scan" / f"{bad_scan}.log").read_text()
    assert "truncated gzip" in log, log
    record = json.loads((tmp_path / "results" / "qc" / "failed_inputs" / f"{bad_scan}.json").read_text())
    assert record["step"] == "conform" and "truncated gzip" in record["reason"]
    deriv = tmp_path / "results" / "derivatives" / "brainvae"
    for scan in scans:
        for name, suffix in SCAN_FILE_SUFFIXES.items():
            ours, theirs = deriv / f"{scan}{suffix}", pipeline["deriv"] / f"{scan}{suffix}"
            if suffix.endswith(".nii.gz"):
                a, b = nib.load(ours), nib.load(theirs)
                assert (a.affine == b.affine).all() and (a.get_fdata() == b.get_fdata()).all(), (scan, name)
            elif suffix.endswith(".json"):
                # Paths differ: the input is a copy of the scan (SourcePath), and Sources names the per-step
                # rules' temp() file, here a temporary file of the job.
                a, b = ({k: v for k, v in json.loads(path.read_text()).items() if k not in {"Sources", "SourcePath"}}
                        for path in (ours, theirs))
                assert a == b, (scan, name)
            elif suffix.endswith(".mat"):
                assert ours.read_bytes() == theirs.read_bytes(), (scan, name)
            else:
                assert ours.stat().st_size > 10_000, (scan, name)
        bench = pd.read_csv(tmp_path / "results" / "benchmarks" / "preprocess_scan" / f"{scan}.tsv", sep="\t")
        assert bench["s"].iloc[0] > 0


# --- Analysis (workflow/rules/analysis.smk) ---------------------------------------------------------

def _tsv(path):
    return pd.read_csv(path, sep="\t", keep_default_na=False, na_values=["n/a"])


def test_analysis_scans_and_the_models_own_splits(pipeline):
    """Only scans the model never saw are scored (analysis.splits: [none]), from analyse-role datasets, split
    as the model's own splits.tsv says."""
    analysis = pipeline["results"] / "analysis"
    scans = _tsv(analysis / "scans.tsv")
    index = read_index(pipeline["cohort"] / "cohort_index.tsv")
    assert scans["scan"].tolist() == index["scan"].tolist()
    assert (scans["tiv_ml"] > 500).all()
    model_splits = read_splits(pipeline["model"] / "splits.tsv")
    trained_on = set(model_splits["scan"])
    predictions = _tsv(analysis / "models" / MODEL / "tasks" / "predictions.tsv")
    scored = set(predictions["scan"])
    assert scored and scored.isdisjoint(trained_on)  # no scan the VAE learnt from (or validated, tested on)
    datasets = dict(zip(scans["scan"], scans["dataset"]))
    samples = pd.read_csv(pipeline["results"] / "samples.tsv", sep="\t", dtype=str, keep_default_na=False)
    analyse_only = set(samples.loc[samples["role"] == "analyse", "dataset"])  # SantPau, ABCDS and the messy one
    assert {"SantPau", "ABCDS"} <= {datasets[s] for s in scored} <= analyse_only
    baselines = _tsv(analysis / "baselines" / "tasks" / "predictions.tsv")
    for task in set(predictions["task"]):  # the baselines are scored on the same scans, task by task
        assert set(baselines.loc[baselines["task"] == task, "scan"]) == set(
            predictions.loc[predictions["task"] == task, "scan"]), task


def test_tasks_table_with_baselines_permutations_and_external_rows(pipeline):
    results = pipeline["results"]
    table = _tsv(results / "tables" / "classification.tsv")
    scored = table[table["note"].astype(str) == ""] if "note" in table else table
    ds = scored[scored["task"] == "ds_vs_euploid"]
    assert {"latents", "latents_confounds", "voxels_pca", "age", "sex", "tiv", "site", "confounds"} <= set(
        ds["feature_set"]) - {""}
    cv = ds[ds["evaluated_on"] == "cv"]
    assert set(cv["metric"]) == {"auc"} and cv["score"].between(0, 1).all()
    assert (cv["ci_low"] <= cv["score"]).all() and (cv["score"] <= cv["ci_high"]).all()
    assert set(cv["second_metric"]) == {"balanced_accuracy"}
    assert cv["split_used"].eq("none").all()
    ridge = cv[cv["classifier"] == "ridge"]
    assert ridge["n_perm"].eq(TINY_ANALYSIS["permutations"]).all()
    assert ridge["p_perm"].between(1 / (TINY_ANALYSIS["permutations"] + 1), 1).all()
    # The external site: fitted on the analysis datasets, applied unchanged; its rows also in external.tsv.
    assert "ABCDS" in set(ds["evaluated_on"])
    external = _tsv(results / "tables" / "external.tsv")
    assert list(external.columns) == list(table.columns) and set(external["evaluated_on"]) == {"ABCDS"}
    assert len(external) == (table["evaluated_on"] == "ABCDS").sum()
    age = scored[scored["task"] == "brain_age"]
    if len(age):  # enough participants for a regression (else a note says why it is left out)
        assert set(age["metric"]) == {"mae"} and "age" not in set(age["feature_set"])
    assert (results / "tables" / "classification.md").read_text().count("|") > 10
    recon = _tsv(results / "tables" / "reconstruction.tsv")
    assert set(zip(recon["model"], recon["method"], recon["region"])) == {
        (MODEL, m, r) for m in ("vae", "pca", "mean_image") for r in ("mask", "whole")}
    figures = [results / "analysis" / "models" / MODEL / "pca" / "latents_scatter.png",
               results / "analysis" / "voxels" / "pca" / "voxels_scatter.png",
               results / "analysis" / "tasks" / "ds_vs_euploid.png"]
    for figure in figures:
        assert figure.read_bytes()[:4] == b"\x89PNG", figure


def test_normative_maps_of_the_model(pipeline):
    """The rule's wiring: the model's held-out scans as the reference, a map per analysed scan, and no truth to
    test the traversal against (the messy dataset is not synthetic)."""
    out = pipeline["results"] / "normative" / MODEL
    splits = read_splits(pipeline["model"] / "splits.tsv")
    reference = _tsv(out / "reference_scans.tsv")
    assert sorted(reference["scan"]) == sorted(splits.loc[splits["split"].isin(["val", "test"]), "scan"])
    deviation = _tsv(out / "deviation_scores.tsv")
    latents = pd.read_parquet(pipeline["results"] / "latents" / f"{MODEL}.parquet")
    unseen = set(latents.loc[latents["split"] == "none", "scan"])
    analysed = set(latents.loc[latents["dataset"] == "SantPau", "scan"])
    assert analysed <= set(deviation["scan"]) <= unseen and len(analysed) >= TINY_SITES["SantPau"]["subjects"]
    for scan in deviation["scan"]:
        assert (out / "maps" / f"{scan}_desc-zmap_T1w.nii.gz").exists(), scan
    group = json.loads((out / "group_map.json").read_text())
    assert group["negative"] == "euploid" and group["n_permutations"] == TINY_ANALYSIS["normative"]["n_permutations"]
    agreement = json.loads((out / "traversal_agreement.json").read_text())
    assert agreement["correlation"] is None and "not the synthetic demo" in agreement["reason"]


def test_report_holds_qc_and_the_analysis(pipeline, tmp_path):
    report = tmp_path / "report.html"
    snakemake(pipeline["workdir"], pipeline["configfile"], "--report", str(report))
    html = report.read_text(errors="replace")
    for section in ("Latent space (PCA)", "Prediction tasks", "Site check", "Tables", "Quality control",
                    "Normative maps"):
        assert section in html, section
    # The QC page: the QC table and every scan's picture.
    samples = pd.read_csv(pipeline["results"] / "samples.tsv", sep="\t", dtype=str, keep_default_na=False)
    assert "qc.tsv" in html
    assert all(f"{Path(scan).name}_desc-qc_T1w.png" in html for scan in samples["scan"])
    # Per model: reconstructions, the metrics with the PCA and mean-image rows, and the latent diagnostics.
    for figure in ("reconstructions", "reconstruction metrics", "latent diagnostics", "KL per latent dimension"):
        assert figure in html, figure


def test_report_renders_in_a_headless_browser(pipeline, tmp_path):
    """The report opens in a real browser (Debian's Chromium via Selenium): the app draws its sections, every
    embedded figure decodes, and the console shows no error."""
    from report_browser import install_browser, open_report

    problem = install_browser()
    if problem:
        pytest.skip(f"no headless browser: {problem}")
    report = tmp_path / "report.html"
    snakemake(pipeline["workdir"], pipeline["configfile"], "--report", str(report))
    page = open_report(report)
    assert page["title"] == "Snakemake Report"
    for section in ("Latent space (PCA)", "Prediction tasks", "Quality control", "VAE", "Normative maps"):
        assert section in page["text"], page["text"][:500]
    assert page["images"] >= 10 and page["loaded"] == page["images"] and not page["broken"], page
    assert page["console_errors"] == [], page["console_errors"]
