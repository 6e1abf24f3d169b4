"""Planning the Snakemake workflow (dry runs) and the helpers the workflow tests share; the real runs are in
test_workflow_pipeline.py (the tiny demo end to end, reruns) and test_bad_inputs.py (per-scan failures)."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from brainvae.errors import ConfigError
from brainvae.workflow import LARGE_COHORT_SCANS, PER_STEP_JOBS_PER_SCAN, job_layout_hint, resolve_one_job_per_scan

REPO = Path(__file__).resolve().parents[1]


def snakemake(workdir: Path, configfile: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory",
               str(workdir), "--configfile", str(configfile), "--cores", "2", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def demo_config(tmp_path: Path, sites: dict[str, int] | None = None) -> Path:
    """The default configuration, with ``sites`` (site -> subjects) replacing demo.sites' subject counts."""
    with open(REPO / "config" / "config.yaml") as handle:
        config = yaml.safe_load(handle)
    for site, subjects in (sites or {}).items():
        config["demo"]["sites"][site]["subjects"] = subjects
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def planned_jobs(output: str) -> dict[str, int]:
    """Parse Snakemake's first job-stats table ('job  count' lines) from a dry run: rule -> planned jobs."""
    counts, in_table = {}, False
    for line in output.splitlines():
        parts = line.split()
        if parts[:2] == ["job", "count"]:
            in_table = True
            continue
        if not in_table:
            continue
        if not parts or parts[0] == "total":  # the table ends at its total (or a blank line)
            break
        if len(parts) == 2 and parts[1].isdigit():
            counts[parts[0]] = int(parts[1])
    return counts


def test_dry_run_plans_the_demo_dag(tmp_path):
    config = demo_config(tmp_path)
    result = snakemake(tmp_path, config, "--dry-run")
    jobs = planned_jobs(result.stdout + result.stderr)
    samples = pd.read_csv(tmp_path / "results" / "samples.tsv", sep="\t", dtype=str, keep_default_na=False)
    demo = yaml.safe_load(config.read_text())["demo"]
    assert jobs["demo_cohort"] == 1
    assert len(samples) >= sum(site["subjects"] for site in demo["sites"].values())
    template = samples["dataset"].isin(["HCP", "SantPau"])  # template-space sites skip the native chain
    assert jobs["conform"] == (~template).sum() and jobs["preprocess_template_scan"] == template.sum()
    assert set(samples["dataset"]) == {"IXI", "HCP", "SantPau", "ABCDS"}
    assert set(samples.loc[samples["train"] == "True", "label"]) == {"euploid"}  # training sites: euploid only
    assert set(samples.loc[samples["dataset"] == "SantPau", "label"]) == {"euploid", "DS"}
    assert samples["icv_ml"].astype(float).between(900, 2100).all()
    models = yaml.safe_load((REPO / "config" / "config.yaml").read_text())["models"]
    assert jobs["train_vae"] == jobs["encode_latents"] == len(models)
    # Nothing but the samples table was written by a dry run.
    assert not (tmp_path / "results" / "demo_cohort").exists()


def test_train_labels_belong_to_cohort_or_a_model_not_to_training(tmp_path):
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["training"]["train_labels"] = ["euploid"]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    result = snakemake(tmp_path, path, "--dry-run", check=False)
    assert result.returncode != 0
    assert "training.train_labels: set cohort.train_labels (every model) or models.<name>.train_labels" in (
        result.stdout + result.stderr)


PER_STEP_RULES = {"conform", "n4", "register_level1", "skullstrip", "register_level2", "resample", "qc_scan"}


def test_one_job_per_scan_plans_one_preprocessing_job_per_scan(tmp_path):
    """preprocess.one_job_per_scan: rule preprocess_scan replaces the seven per-scan rules; the rest is unchanged."""
    per_step = planned_jobs(snakemake(tmp_path, demo_config(tmp_path, {"IXI": 6, "ABCDS": 6}), "--dry-run").stdout)
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    config["preprocess"]["one_job_per_scan"] = True
    path = tmp_path / "one_job_per_scan.yaml"
    path.write_text(yaml.safe_dump(config))
    per_scan = planned_jobs(snakemake(tmp_path, path, "--dry-run").stdout)
    samples = pd.read_csv(tmp_path / "results" / "samples.tsv", sep="\t", dtype=str, keep_default_na=False)
    native = (~samples["dataset"].isin(["HCP", "SantPau"])).sum()
    assert per_scan["preprocess_scan"] == native == per_step["conform"]
    assert not PER_STEP_RULES & set(per_scan) and "preprocess_scan" not in per_step
    assert {rule: n for rule, n in per_step.items() if rule not in PER_STEP_RULES} == {
        rule: n for rule, n in per_scan.items() if rule != "preprocess_scan"}


# Loads the workflow through Snakemake's API (in a process of its own: the API changes global state) and prints
# each rule's named inputs that are static lists, with their lengths.
STATIC_NAMED_INPUTS = """
import json, sys
from pathlib import Path
from snakemake.api import SnakemakeApi
from snakemake.iocontainers import Namedlist
from snakemake.settings.types import ConfigSettings, DAGSettings, OutputSettings, ResourceSettings, StorageSettings

with SnakemakeApi(OutputSettings()) as api:
    workflow_api = api.workflow(resource_settings=ResourceSettings(cores=1), storage_settings=StorageSettings(),
                                config_settings=ConfigSettings(configfiles=[Path(sys.argv[2])]),
                                snakefile=Path(sys.argv[1]), workdir=Path(sys.argv[3]))
    workflow_api.dag(DAGSettings())
    print(json.dumps([[rule.name, name, len(item)] for rule in workflow_api._workflow.rules
                      for name, item in rule.input._allitems() if isinstance(item, Namedlist)]))
"""


def test_no_rule_names_a_static_input_list_that_grows_with_the_cohort(tmp_path):
    """Cohort-level rules take their per-scan files through input functions (each_scan_file).

    When a rule's input also names another rule's output, Snakemake hashes a named static list once per file in
    it: planning grows with the square of the cohort (24 s of a 5,000-subject plan for one rule).
    """
    config = demo_config(tmp_path, {"IXI": 6, "ABCDS": 6})
    result = subprocess.run([sys.executable, "-c", STATIC_NAMED_INPUTS, str(REPO / "Snakefile"), str(config),
                             str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    static_lists = json.loads(result.stdout.strip().splitlines()[-1])
    n_scans = len(pd.read_csv(tmp_path / "results" / "samples.tsv", sep="\t"))
    assert n_scans >= 12
    assert [entry for entry in static_lists if entry[2] >= n_scans] == []


def test_large_cohorts_planned_per_step_get_a_hint_to_plan_one_job_per_scan():
    assert job_layout_hint(LARGE_COHORT_SCANS - 1, one_job_per_scan=False) is None
    assert job_layout_hint(5500, one_job_per_scan=True) is None
    assert PER_STEP_JOBS_PER_SCAN == len(PER_STEP_RULES)  # the rules a per-step plan has per scan (test above)
    hint = job_layout_hint(5500, one_job_per_scan=False)
    assert "5500 scans" in hint and "38500 jobs" in hint and "about 110 s" in hint
    assert "preprocess.one_job_per_scan: true or auto" in hint
    # auto (the default) chose one job per scan itself: the note says so, and says nothing below the threshold.
    assert job_layout_hint(LARGE_COHORT_SCANS - 1, one_job_per_scan="auto") is None
    auto = job_layout_hint(5500, one_job_per_scan="auto")
    assert "5500 scans: preprocessing runs as one job per scan" in auto and f"from {LARGE_COHORT_SCANS} scans" in auto


def test_auto_job_layout_is_one_job_per_scan_from_the_large_cohort_size_on():
    assert resolve_one_job_per_scan("auto", LARGE_COHORT_SCANS - 1) is False
    assert resolve_one_job_per_scan("auto", LARGE_COHORT_SCANS) is True
    assert resolve_one_job_per_scan(False, 10 * LARGE_COHORT_SCANS) is False  # an explicit choice is kept
    assert resolve_one_job_per_scan(True, 1) is True
    with pytest.raises(ConfigError, match="one_job_per_scan"):
        resolve_one_job_per_scan("yes", 10)


def test_run_from_another_directory_reads_the_workflows_config_and_says_so(tmp_path):
    """Without config/config.yaml in the working directory the workflow's own is read (not schema defaults,
    which name one model 'vae'), and the start-up note names the file; a local config/config.yaml wins."""
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--cores", "1",
               "--dry-run"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert f"configuration read from {REPO / 'config' / 'config.yaml'}" in result.stderr
    models = yaml.safe_load((REPO / "config" / "config.yaml").read_text())["models"]
    assert planned_jobs(result.stdout + result.stderr)["train_vae"] == len(models)

    local = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    local["models"] = {"only_one": next(iter(models.values()))}
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.yaml").write_text(yaml.safe_dump(local))
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert f"configuration read from {tmp_path / 'config' / 'config.yaml'}" in result.stderr
    assert planned_jobs(result.stdout + result.stderr)["train_vae"] == 1


def test_a_configfile_is_the_whole_configuration(tmp_path):
    """--configfile replaces the workflow's config/config.yaml (not merged under it): the demo's models do not
    leak into a run that names its own."""
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["models"] = {"mine": {}}
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(config))
    result = snakemake(tmp_path, path, "--dry-run")
    assert f"configuration read from {path}" in result.stderr
    assert str(REPO / "config" / "config.yaml") not in result.stderr.split("configuration read from")[1].splitlines()[0]
    assert planned_jobs(result.stdout + result.stderr)["train_vae"] == 1
