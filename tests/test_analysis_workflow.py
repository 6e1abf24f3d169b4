"""The prediction tasks in the workflow (workflow/rules/analysis.smk): the jobs a dry run plans, and configuration
mistakes found when the DAG is built (ConfigError naming the key), before anything runs."""

import pytest
import yaml

from test_workflow import REPO, planned_jobs, snakemake


def _config(tmp_path, change=None):
    path = tmp_path / "config.yaml"
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    if change is not None:
        change(config["analysis"])
    path.write_text(yaml.safe_dump(config))
    return path


def test_dry_run_plans_one_tasks_job_per_model_one_for_the_baselines_and_the_table(tmp_path):
    result = snakemake(tmp_path, _config(tmp_path), "--dry-run")
    jobs = planned_jobs(result.stdout + result.stderr)
    assert jobs["analysis_tasks_latents"] == jobs["train_vae"]
    assert jobs["analysis_tasks_baselines"] == 1 and jobs["analysis_tasks_table"] == 1
    assert not {"analysis_folds", "analysis_classify_latents", "analysis_classify_baseline"} & set(jobs)
    # The demo cohort supports DS vs euploid and brain age (AD stage needs 3 DS participants per stage).
    assert "task ds_vs_euploid is left out" not in result.stderr
    assert "task brain_age is left out" not in result.stderr


@pytest.mark.parametrize("change, message", [
    (lambda a: a["tasks"]["ds_vs_euploid"].update(positive="Ds"), "analysis.tasks.ds_vs_euploid.positive: 'Ds'"),
    (lambda a: a["tasks"].update(grade={"column": "mmse", "kind": "regression", "required": True}),
     "analysis.tasks.grade.column: column(s) mmse not in the samples table"),
    (lambda a: a["tasks"]["ad_stage"].update(levels=["asymptomatic", "dementia"]), "analysis.tasks.ad_stage.levels"),
    (lambda a: a.update(external_datasets=["HCP"]), "analysis.external_datasets: 'HCP' is not a dataset with role"),
])
def test_configuration_mistakes_stop_the_dry_run_naming_the_key(tmp_path, change, message):
    result = snakemake(tmp_path, _config(tmp_path, change), "--dry-run", check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "ConfigError" in output and message in output
