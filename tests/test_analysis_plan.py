"""The analysis plan the workflow reads when it builds the DAG (brainvae.analysis.plan), without Snakemake."""

import pandas as pd
import pytest
import yaml

from brainvae.analysis.plan import plan_analysis
from brainvae.config import validate_config
from brainvae.errors import ConfigError
from test_workflow import REPO


def _analysis() -> dict:
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    validate_config(config, REPO / "workflow" / "schemas" / "config.schema.yaml")
    return config["analysis"]


def _samples(sites: dict[str, int], ds_sites=("SantPau", "ABCDS")) -> pd.DataFrame:
    rows = []
    for site, n in sites.items():
        for i in range(n):
            ds = site in ds_sites and i % 2 == 0
            rows.append({"scan": f"{site}/sub-{i}", "dataset": site, "subject": f"{site}{i}", "label": "DS" if ds else
                         "euploid", "analyse": site in ds_sites, "age": str(30 + i), "sex": "FM"[i % 2],
                         "ad_stage": "asymptomatic" if ds else "n/a"})
    return pd.DataFrame(rows)


DATASETS = [{"name": n, "role": r, "label_column": "group", "labels": ["euploid", "DS"]}
            for n, r in (("HCP", "train"), ("SantPau", "analyse"), ("ABCDS", "analyse"))]


def test_plan_of_the_default_analysis():
    analysis = _analysis()
    plan = plan_analysis(analysis, _samples({"HCP": 10, "SantPau": 20, "ABCDS": 6}), DATASETS, (40, 48, 40))
    assert "ds_vs_euploid" in plan.task_names and "brain_age" in plan.task_names
    assert plan.model_feature_sets == ["latents", "latents_confounds", "deviation"]
    assert "voxels_pca" in plan.baseline_feature_sets and "confounds" in plan.baseline_feature_sets
    assert plan.task_settings["n_permutations"] == analysis["permutations"] >= 1000
    assert plan.sites == ["ABCDS", "HCP", "SantPau"] and plan.site_check
    # 36 scans of 40x48x40 float32, three copies: 1000 MB + 27 MB
    assert plan.voxel_job_mb == 1000 + int(3 * 4 * 36 * 40 * 48 * 40 / 1e6)
    assert plan.task_columns[0] == "label"


def test_site_check_needs_two_sites_with_enough_participants():
    analysis = _analysis()
    plan = plan_analysis(analysis, _samples({"HCP": 10, "SantPau": 20, "ABCDS": 2}), DATASETS, (40, 48, 40))
    assert not plan.site_check  # ABCDS has 2 participants
    assert not plan_analysis({**analysis, "site_check": False}, _samples({"HCP": 10, "SantPau": 20, "ABCDS": 6}),
                             DATASETS, (40, 48, 40)).site_check


def test_a_task_mistake_stops_the_plan_naming_the_key():
    analysis = _analysis()
    tasks = {**analysis["tasks"], "ds_vs_euploid": {**analysis["tasks"]["ds_vs_euploid"], "positive": "down"}}
    with pytest.raises(ConfigError, match="analysis.tasks.ds_vs_euploid.positive: 'down'"):
        plan_analysis({**analysis, "tasks": tasks}, _samples({"HCP": 10, "SantPau": 20, "ABCDS": 6}), DATASETS,
                      (40, 48, 40))
