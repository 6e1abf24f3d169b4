# Configuration, the samples table and helpers shared by every rule file.

import os
import re
import sys
from pathlib import Path

BRAINVAE_SRC = str(Path(workflow.basedir) / "src")
sys.path.insert(0, BRAINVAE_SRC)  # run from a checkout without installing
# Job scripts import brainvae from here too: the conda envs do not install it (envs/*.yaml); the
# profiles set conda-not-block-search-path-envvars so PYTHONPATH reaches them. (Set, not required from
# the user: hence no `envvars:` directive.)
PYTHONPATH = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
if BRAINVAE_SRC not in PYTHONPATH:
    os.environ.update(PYTHONPATH=os.pathsep.join([BRAINVAE_SRC, *PYTHONPATH]))

from brainvae.config import validate_config
from brainvae.failures import read_failed_inputs, records_dir, split_failed_inputs, write_failed_inputs
from brainvae.inputs import read_samples, write_samples
from brainvae.steps import NATIVE_SPACE
from brainvae.workflow import (SCAN_WILDCARD, bids_uri, build_samples, job_layout_hint, resolve_one_job_per_scan,
                               template_space_notes)

validate_config(config, Path(workflow.basedir) / "workflow" / "schemas" / "config.schema.yaml")
if workflow.is_main_process:
    # Snakemake lists the --configfile files first, then the Snakefile's base configuration.
    CONFIG_FILES = [os.path.abspath(path) for path in workflow.configfiles]
    print(f"brainvae: configuration read from {', then '.join(CONFIG_FILES[::-1]) or 'no file (schema defaults)'}",
          file=sys.stderr)

OUT = config["output_dir"]
DERIV = f"{OUT}/derivatives/brainvae"
LOGS = f"{OUT}/logs"
# Wall time, CPU time and peak memory of every per-scan and training job (Snakemake `benchmark:` TSVs):
# what to size `resources:` and cluster requests from.
BENCHMARKS = f"{OUT}/benchmarks"
SAMPLES_TSV = f"{OUT}/samples.tsv"

MNI = "MNI152NLin2009aSym"
GRID = config["preprocess"]["grid"]
PREP_THREADS = config["preprocess"]["threads"]
# The kept files of one scan (BIDS-Derivatives names), written by the per-step rules or by preprocess_scan.
SCAN_FILES = {
    "conformed": f"{DERIV}/{{scan}}_desc-conform_T1w.nii.gz",
    "conform_sidecar": f"{DERIV}/{{scan}}_desc-conform_T1w.json",
    "biasfield": f"{DERIV}/{{scan}}_desc-biasfield_T1w.nii.gz",
    "headmask": f"{DERIV}/{{scan}}_desc-head_mask.nii.gz",
    "level1_xfm": f"{DERIV}/{{scan}}_from-T1w_to-{MNI}_mode-image_desc-level1_xfm.mat",
    "level1_info": f"{DERIV}/{{scan}}_from-T1w_to-{MNI}_mode-image_desc-level1_xfm.json",
    "brain_mask": f"{DERIV}/{{scan}}_desc-brain_mask.nii.gz",
    "brain_mask_info": f"{DERIV}/{{scan}}_desc-brain_mask.json",
    "xfm": f"{DERIV}/{{scan}}_from-T1w_to-{MNI}_mode-image_xfm.mat",
    "xfm_info": f"{DERIV}/{{scan}}_from-T1w_to-{MNI}_mode-image_xfm.json",
    "preproc": f"{DERIV}/{{scan}}_space-{MNI}_res-{GRID}_desc-preproc_T1w.nii.gz",
    "preproc_mask": f"{DERIV}/{{scan}}_space-{MNI}_res-{GRID}_desc-brain_mask.nii.gz",
    "qc_png": f"{DERIV}/{{scan}}_desc-qc_T1w.png",
    "qc_metrics": f"{DERIV}/{{scan}}_desc-qc_metrics.json",
}
# The QC picture's entry in the report, for qc_scan and preprocess_scan. Snakemake reads the caption's path
# relative to the file that calls report(), and both files are in workflow/rules/.
QC_PICTURE_REPORT = {
    "caption": "../report/qc_scan.rst",
    "category": "Quality control",
    "subcategory": "Per scan",
    "labels": {"scan": "{scan}"},
}
# Scans whose input file failed validation in an earlier run (brainvae.failures): left out of SAMPLES
# until the file or the conform settings change; listed here and in qc/qc.tsv.
FAILED_INPUTS_TSV = f"{OUT}/failed_inputs.tsv"
FAILED_INPUT_RECORDS = records_dir(OUT)

# Indexed once per workflow start; written only when its content changes, so a no-op run stays one.
# A job's own Snakemake process (every cluster job, e.g. SLURM) parses this file again: it reads the
# table its workflow start wrote instead of indexing every BIDS dataset once per job.
if workflow.is_main_process or not Path(SAMPLES_TSV).is_file():
    SAMPLES, FAILED_INPUTS = split_failed_inputs(build_samples(config), FAILED_INPUT_RECORDS, config["conform"])
    write_samples(SAMPLES, SAMPLES_TSV)
    write_failed_inputs(FAILED_INPUTS, FAILED_INPUTS_TSV)
    if workflow.is_main_process and (hint := job_layout_hint(len(SAMPLES), config["preprocess"]["one_job_per_scan"])):
        print(hint, file=sys.stderr)
    if workflow.is_main_process:
        for note in template_space_notes(config["datasets"]):
            print(note, file=sys.stderr)
    if len(FAILED_INPUTS):
        print(f"brainvae: {len(FAILED_INPUTS)} scan(s) left out because their input file failed validation in an "
              f"earlier run (listed in {FAILED_INPUTS_TSV}; fix the file or the conform settings to process them):\n"
              + "\n".join(f"  {row.path}: {row.reason}" for row in FAILED_INPUTS.itertuples()), file=sys.stderr)
else:
    SAMPLES = read_samples(SAMPLES_TSV)
    FAILED_INPUTS = read_failed_inputs(FAILED_INPUTS_TSV)
SAMPLES = SAMPLES.set_index("scan", drop=False)
# One Snakemake job per scan (preprocess_scan in preprocess.smk) instead of one per step: a DAG 7x smaller for
# cohorts of thousands (docs/performance.md, "Scale"), at the price of rerunning a scan's whole chain when any step's setting
# changes. "auto" decides by the cohort's size (brainvae.workflow.resolve_one_job_per_scan); a cluster job's own
# process reads the same samples table, so it decides the same.
ONE_JOB_PER_SCAN = resolve_one_job_per_scan(config["preprocess"]["one_job_per_scan"], len(SAMPLES))

# The row of each scan as a dict: a lookup per job (input functions, params) costs ~1 us, SAMPLES.loc ~100 us,
# which adds up when planning thousands of scans.
SAMPLE_ROWS = SAMPLES.to_dict("index")
# Datasets declared to be in a template space already (skull-stripped, affinely aligned): their scans skip N4,
# registration and skull stripping (rule preprocess_template_scan). Every other scan takes the native chain.
TEMPLATE_SPACE_OF = {d["name"]: d["space"] for d in config["datasets"] if d["space"] != NATIVE_SPACE}
TEMPLATE_SCANS = [scan for scan, row in SAMPLE_ROWS.items() if row["dataset"] in TEMPLATE_SPACE_OF]
# Which chain produces a scan's files is decided by the scan wildcard: the template rule matches the template
# scans only, and every other rule (global constraint) anything but them. Every per-scan file is
# "<scan>_<suffix>", so a lookahead on "<scan>_" tells them apart.
TEMPLATE_SCAN_WILDCARD = "(?:" + "|".join(re.escape(scan) for scan in TEMPLATE_SCANS) + ")" if TEMPLATE_SCANS else None
NATIVE_SCAN_WILDCARD = f"(?!{TEMPLATE_SCAN_WILDCARD}_)(?:{SCAN_WILDCARD})" if TEMPLATE_SCANS else SCAN_WILDCARD


wildcard_constraints:
    scan=NATIVE_SCAN_WILDCARD,


def scan_input(wildcards):
    """The raw T1w file of one scan."""
    return SAMPLE_ROWS[wildcards.scan]["path"]


def scan_key(wildcards):
    """The scan's key (``sub-01_ses-2``): its name in QC tables and lists such as ``qc.exclude``."""
    return SAMPLE_ROWS[wildcards.scan]["scan_key"]


def scan_source_uri(wildcards):
    """BIDS URI of the raw scan (``bids:<dataset>:<path in dataset>``), recorded in every sidecar."""
    return bids_uri(SAMPLE_ROWS[wildcards.scan], config)


def each_scan_file(name, scans):
    """Input function: the SCAN_FILES[name] file of every scan in scans (for the cohort-level rules).

    A function, not a static list, for planning speed: when a rule's input also names another rule's output,
    Snakemake hashes a named static list once per file in it, which is quadratic in the number of scans
    (24 s of a 5,000-subject plan for rule analysis_scans alone).
    """
    files = expand(SCAN_FILES[name], scan=scans)
    return lambda wildcards: files
