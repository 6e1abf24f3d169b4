"""Analysis of VAE latents: PCA of the latent space, and DS-vs-euploid classification with baselines.

Pure functions (no Snakemake): the workflow's rules call them; the tests call them on synthetic data.

* :mod:`~brainvae.analysis.features`: latents / voxel / confound matrices, aligned to one table.
* :mod:`~brainvae.analysis.pca`: descriptive PCA (Figure 4), scores and explained-variance tables.
* :mod:`~brainvae.analysis.cv`: participant-grouped, stratified, repeated outer folds; permutation.
* :mod:`~brainvae.analysis.classify`: nested CV (inner grid search), permutation tests, site check.
* :mod:`~brainvae.analysis.stats`: confidence intervals for CV metrics, permutation p-values.
* :mod:`~brainvae.analysis.tables` / :mod:`~brainvae.analysis.plots`: TSV/Markdown tables, figures.
* :mod:`~brainvae.analysis.outputs`: all tables and figures of a classification run in one call.
"""

from brainvae.analysis.classify import (
    CLASSIFIERS,
    METRICS,
    ClassificationResult,
    NestedCVResult,
    build_pipeline,
    encode_labels,
    nested_cv,
    permutation_null,
    run_classification,
    site_check,
)
from brainvae.analysis.cv import (
    OuterFold,
    check_labels,
    folds_from_table,
    folds_to_table,
    make_outer_folds,
    participant_groups,
    permute_labels_by_group,
)
from brainvae.analysis.errors import AnalysisError
from brainvae.analysis.features import (
    FeatureSet,
    affine_scale,
    align_rows,
    confound_matrix,
    icv_ml,
    latent_matrix,
    load_latents,
    load_voxel_matrix,
    voxel_matrix_from_images,
)
from brainvae.analysis.outputs import write_classification_outputs
from brainvae.analysis.pca import PCAResult, explained_variance_table, fit_pca, pca_report, pca_scores_table
from brainvae.analysis.stats import confidence_interval, permutation_p_value
from brainvae.analysis.tables import (
    classification_table,
    format_classification_table,
    format_reconstruction_table,
    reconstruction_table,
    summarise_folds,
    to_markdown,
    write_table,
    write_tsv,
)

__all__ = [
    "CLASSIFIERS",
    "METRICS",
    "AnalysisError",
    "ClassificationResult",
    "FeatureSet",
    "NestedCVResult",
    "OuterFold",
    "PCAResult",
    "affine_scale",
    "align_rows",
    "build_pipeline",
    "check_labels",
    "classification_table",
    "confidence_interval",
    "confound_matrix",
    "encode_labels",
    "explained_variance_table",
    "fit_pca",
    "folds_from_table",
    "folds_to_table",
    "format_classification_table",
    "format_reconstruction_table",
    "icv_ml",
    "latent_matrix",
    "load_latents",
    "load_voxel_matrix",
    "make_outer_folds",
    "nested_cv",
    "participant_groups",
    "pca_report",
    "pca_scores_table",
    "permutation_null",
    "permutation_p_value",
    "permute_labels_by_group",
    "reconstruction_table",
    "run_classification",
    "site_check",
    "summarise_folds",
    "to_markdown",
    "voxel_matrix_from_images",
    "write_classification_outputs",
    "write_table",
    "write_tsv",
]
