# brainvae: T1w brain MRI -> preprocessing -> 3D VAE -> latent vectors -> analysis.
# Thin on purpose: configuration, includes and the final targets. Logic lives in src/brainvae.

import os

from snakemake.utils import min_version

min_version("9.0")


# The configuration: the --configfile files when given (each a whole configuration, like the default one;
# nothing of the workflow's own is merged under them, so a model or task of the demo cannot leak into your run);
# else config/config.yaml of the working directory when there is one (a copy you edit), else the workflow's own,
# so a run from another directory still starts from the documented defaults. The files read are printed at
# start (workflow/rules/common.smk); schema defaults fill what they leave out.
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml" if os.path.exists("config/config.yaml") else os.path.join(workflow.basedir, "config", "config.yaml")


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/demo.smk"
include: "workflow/rules/conform.smk"
include: "workflow/rules/preprocess.smk"
include: "workflow/rules/qc.smk"
include: "workflow/rules/cohort.smk"
include: "workflow/rules/vae.smk"
include: "workflow/rules/analysis.smk"
include: "workflow/rules/normative.smk"


rule all:
    input:
        SAMPLES_TSV,
        f"{DERIV}/dataset_description.json",
        # Every scan's preprocessed image and mask. With one job per scan the QC table (below) already asks for
        # every scan's job; listing its files here too would only slow planning (docs/performance.md, "Scale").
        [] if ONE_JOB_PER_SCAN else expand(SCAN_FILES["preproc"], scan=SAMPLES.index),
        [] if ONE_JOB_PER_SCAN else expand(SCAN_FILES["preproc_mask"], scan=SAMPLES.index),
        f"{OUT}/qc/qc.tsv",
        COHORT_TARGETS,
        VAE_TARGETS,
        ANALYSIS_TARGETS,
        NORMATIVE_TARGETS,
    default_target: True
