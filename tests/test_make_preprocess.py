"""`make preprocess`: its Snakemake command plans preprocessing and QC only, never the cohort, the VAE or the analysis."""

import shlex
import subprocess
import sys

import pytest
import yaml

from test_workflow import REPO, demo_config, planned_jobs

#: Rules that must not run before the user has read the QC table.
LATER_RULES = ("cohort_", "train_vae", "evaluate_vae", "encode_latents", "analysis_", "all")


def make_preprocess_command() -> list[str]:
    """The snakemake command line `make preprocess` runs (from `make -n`), with this Python's snakemake."""
    printed = subprocess.run(["make", "--no-print-directory", "-n", "preprocess", "CORES=2"], cwd=REPO,
                             capture_output=True, text=True, check=True, timeout=60).stdout
    lines = [line for line in printed.splitlines() if "/snakemake " in line]
    assert len(lines) == 1, printed
    words = shlex.split(lines[0])
    assert words[0].endswith("/snakemake")
    return [sys.executable, "-m", "snakemake", *words[1:]]


@pytest.mark.parametrize("one_job_per_scan", [False, True])
def test_make_preprocess_plans_preprocessing_and_qc_only(tmp_path, one_job_per_scan):
    config = yaml.safe_load(demo_config(tmp_path, sites={"IXI": 2, "HCP": 2, "SantPau": 2, "ABCDS": 2}).read_text())
    config["preprocess"]["one_job_per_scan"] = one_job_per_scan
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    command = [*make_preprocess_command(), "--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp_path),
               "--configfile", str(tmp_path / "config.yaml"), "--dry-run"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    jobs = planned_jobs(result.stdout)
    assert jobs["qc_table"] == 1 and jobs["derivatives_description"] == 1
    per_scan = {"preprocess_scan", "preprocess_template_scan"} if one_job_per_scan else {"conform", "qc_scan"}
    assert per_scan & set(jobs), jobs
    assert not [rule for rule in jobs if rule.startswith(LATER_RULES)], jobs
