# brainvae: T1w brain MRI -> preprocessing -> 3D VAE -> latent vectors -> analysis.
# Thin on purpose: configuration, includes and the final targets. Logic lives in src/brainvae.

from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/demo.smk"
include: "workflow/rules/conform.smk"
include: "workflow/rules/preprocess.smk"
include: "workflow/rules/qc.smk"
include: "workflow/rules/cohort.smk"
include: "workflow/rules/vae.smk"
include: "workflow/rules/analysis.smk"


rule all:
    input:
        SAMPLES_TSV,
        f"{DERIV}/dataset_description.json",
        expand(f"{DERIV}/{{scan}}_space-{MNI}_res-{GRID}_desc-preproc_T1w.nii.gz", scan=SAMPLES.index),
        expand(f"{DERIV}/{{scan}}_space-{MNI}_res-{GRID}_desc-brain_mask.nii.gz", scan=SAMPLES.index),
        f"{OUT}/qc/qc.tsv",
        COHORT_TARGETS,
        VAE_TARGETS,
        ANALYSIS_TARGETS,
    default_target: True
