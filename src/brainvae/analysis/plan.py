"""What the analysis stage will do, decided when the workflow's DAG is built (no job has run yet).

:func:`plan_analysis` turns the ``analysis`` section of the configuration and the samples table into the
tasks to run (checked against the data: see :func:`brainvae.analysis.tasks.plan_tasks`, which raises
ConfigError for a mistake and notes a task left out), the feature sets per job kind, the keyword
arguments of the task and site-check steps, and the memory the voxel jobs need. The workflow's
``analysis.smk`` only reads this plan, so the decisions are unit-tested here, without Snakemake.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from math import prod
from typing import Any

import pandas as pd

from .names import MIN_PARTICIPANTS_PER_CLASS
from .tasks import BASELINE_FEATURE_SETS, MODEL_FEATURE_SETS, plan_tasks, task_to_dict

__all__ = ["AnalysisPlan", "plan_analysis"]


@dataclass(frozen=True)
class AnalysisPlan:
    tasks: list[dict[str, Any]]            # task_to_dict of each task that runs
    notes: list[str]                       # tasks left out and why, for the user
    model_feature_sets: list[str]          # computed from a model's latents (one job per model)
    baseline_feature_sets: list[str]       # model-free baselines (one job for all models)
    task_settings: dict[str, Any]          # keyword arguments of brainvae.analysis.task_steps.tasks_step
    sites: list[str]                       # datasets of the analysed scans
    site_check: bool                       # whether the site check runs (on, two sites or more, enough subjects)
    site_check_settings: dict[str, Any]    # keyword arguments of the site-check step
    voxel_job_mb: int                      # memory of the voxel jobs
    task_columns: list[str] = field(default_factory=list)  # samples columns the PCA figures are coloured by

    @property
    def task_names(self) -> list[str]:
        return [t["name"] for t in self.tasks]


def plan_analysis(analysis: Mapping[str, Any], samples: pd.DataFrame, datasets: Sequence[Mapping[str, Any]],
                  grid_shape: Sequence[int]) -> AnalysisPlan:
    """The plan for ``analysis`` (the validated config section) on ``samples`` (the cohort's scans)."""
    task_plan = plan_tasks(analysis["tasks"], samples, list(datasets), external_datasets=analysis["external_datasets"])
    tasks = [task_to_dict(t) for t in task_plan.tasks]
    participants = samples.groupby("dataset")["subject"].nunique()
    sites = sorted(participants.index.astype(str))
    # The scans x voxels float32 matrix, a training-set copy and the PCA's work.
    voxels = len(samples) * prod(int(s) for s in grid_shape) / analysis["voxel_downsample"] ** 3
    # Cross-validation settings the task and site-check steps share.
    cv = dict(n_splits=analysis["outer_folds"], n_repeats=analysis["outer_repeats"], n_inner=analysis["inner_folds"],
              seed=analysis["seed"], n_estimators=analysis["random_forest_trees"])
    return AnalysisPlan(
        tasks=tasks,
        notes=list(task_plan.notes),
        model_feature_sets=[f for f in analysis["feature_sets"] if f in MODEL_FEATURE_SETS],
        baseline_feature_sets=[f for f in analysis["feature_sets"] if f in BASELINE_FEATURE_SETS],
        task_settings=dict(
            cv, estimators=analysis["estimators"], alphas=analysis["ridge_alphas"],
            n_permutations=analysis["permutations"], n_bootstrap=analysis["bootstrap"],
            confidence=analysis["confidence"], external_datasets=analysis["external_datasets"],
            grids=analysis["grids"], voxel_pca_components=analysis["voxel_pca_components"]),
        sites=sites,
        site_check=bool(analysis["site_check"] and len(sites) >= 2
                        and participants.min() >= MIN_PARTICIPANTS_PER_CLASS),
        site_check_settings=dict(cv, classifiers=analysis["site_check_classifiers"], param_grids=analysis["grids"]),
        voxel_job_mb=1000 + int(3 * 4 * voxels / 1e6),
        task_columns=list(dict.fromkeys(t["source"] for t in tasks)),
    )
