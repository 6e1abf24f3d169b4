"""Analysis of VAE latents: PCA of the latent space, and prediction tasks (DS vs euploid, AD stage, brain age) with baselines.

Pure functions (no Snakemake): the workflow's rules call them; the tests call them on synthetic data.

* :mod:`~brainvae.analysis.features`: latents / voxel / confound matrices, aligned to one table.
* :mod:`~brainvae.analysis.pca`: descriptive PCA (Figure 4), scores and explained-variance tables.
* :mod:`~brainvae.analysis.cv`: participant-grouped, stratified, repeated outer folds; permutation.
* :mod:`~brainvae.analysis.classify`: nested CV (inner grid search), permutation tests, site check.
* :mod:`~brainvae.analysis.stats`: confidence intervals for CV metrics, permutation p-values.
* :mod:`~brainvae.analysis.tables` / :mod:`~brainvae.analysis.plots`: TSV/Markdown tables, figures.
* :mod:`~brainvae.analysis.outputs`: all tables and figures of a classification run in one call.
* :mod:`~brainvae.analysis.tasks`: prediction tasks (binary, multiclass, ordinal, regression) and their
  start-up checks; :mod:`~brainvae.analysis.metrics`: column-wise metrics (AUC, balanced accuracy, macro F1,
  quadratic kappa, MAE, R²); :mod:`~brainvae.analysis.ridge`: ridge nested CV solved for every permutation at
  once; :mod:`~brainvae.analysis.evaluate`: one task on one feature set (CV, bootstrap, permutations, external).
* :mod:`~brainvae.analysis.steps` / :mod:`~brainvae.analysis.task_steps`: the file-level steps the workflow's
  analysis rules call.
* :mod:`~brainvae.analysis.names`: the file names they write (light: the workflow imports it at start).

Names are imported on first use (PEP 562), so ``import brainvae.analysis.names`` at workflow start does
not pull in scikit-learn and matplotlib.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> submodule that defines it
_SOURCES = {
    "AnalysisError": "errors",
    "CLASSIFIERS": "classify",
    "ClassificationResult": "classify",
    "FeatureSet": "features",
    "METRICS": "classify",
    "NestedCVResult": "classify",
    "OuterFold": "cv",
    "PCAResult": "pca",
    "Task": "tasks",
    "TaskKind": "tasks",
    "parse_tasks": "tasks",
    "plan_tasks": "tasks",
    "permutation_matrix": "cv",
    "confound_features": "features",
    "row_space": "features",
    "select_scans": "task_steps",
    "tasks_step": "task_steps",
    "tasks_tables": "task_steps",
    "affine_scale": "features",
    "align_rows": "features",
    "block_mean": "features",
    "build_pipeline": "classify",
    "check_labels": "cv",
    "classification_figure_names": "names",
    "classification_output_files": "names",
    "classification_table": "tables",
    "confidence_interval": "stats",
    "confound_matrix": "features",
    "encode_labels": "classify",
    "explained_variance_table": "pca",
    "fit_pca": "pca",
    "folds_from_table": "cv",
    "folds_to_table": "cv",
    "format_classification_table": "tables",
    "format_reconstruction_summary": "tables",
    "format_reconstruction_table": "tables",
    "icv_ml": "features",
    "latent_matrix": "features",
    "load_latents": "features",
    "load_voxel_matrix": "features",
    "make_outer_folds": "cv",
    "nested_cv": "classify",
    "participant_groups": "cv",
    "pca_output_files": "names",
    "pca_report": "pca",
    "pca_scores_table": "pca",
    "permutation_null": "classify",
    "permutation_p_value": "stats",
    "permute_labels_by_group": "cv",
    "reconstruction_summary_table": "tables",
    "reconstruction_table": "tables",
    "run_classification": "classify",
    "site_check": "classify",
    "summarise_folds": "tables",
    "to_html": "tables",
    "to_markdown": "tables",
    "voxel_matrix_from_cohort": "features",
    "voxel_matrix_from_images": "features",
    "write_classification_outputs": "outputs",
    "write_table": "tables",
    "write_tsv": "tables",
}

__all__ = sorted(_SOURCES)


def __getattr__(name: str) -> Any:
    if name not in _SOURCES:
        raise AttributeError(f"module 'brainvae.analysis' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"brainvae.analysis.{_SOURCES[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_SOURCES})
