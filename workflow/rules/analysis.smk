# Analysis: PCA of latents (and of voxels), the prediction tasks (analysis.tasks: DS vs euploid, AD stage, brain
# age, ...) with nested participant-grouped cross-validation of each model's latents against baselines (voxel PCA,
# confounds) and external validation, a site check, and the report's tables.
# Needs MODELS (vae.smk) and COHORT_SCANS (cohort.smk).
#
# Which scans: those of datasets with role analyse or both whose split in the model analysed (its own splits.tsv)
# is in analysis.splits (default [none]: scans the model never saw); baselines take the scans in the selection of
# every model (brainvae.analysis.task_steps.select_scans).

from brainvae.analysis.names import classification_output_files, pca_output_files
from brainvae.analysis.plan import plan_analysis
from brainvae.resample import GRIDS

ANALYSIS = config["analysis"]
ANALYSIS_DIR = f"{OUT}/analysis"
TABLES_DIR = f"{OUT}/tables"
# Checked when the DAG is built (brainvae.analysis.plan): a positive class or level no dataset has, a task column
# missing from the samples table, too few participants (tasks with required: true) raise ConfigError naming the
# key; tasks with required: false are left out with a note.
ANALYSIS_PLAN = plan_analysis(ANALYSIS, SAMPLES.loc[COHORT_SCANS], config["datasets"], GRIDS[GRID].shape)
if workflow.is_main_process:
    for note in ANALYSIS_PLAN.notes:
        print(f"brainvae: analysis: {note}", file=sys.stderr)
TASKS = ANALYSIS_PLAN.tasks
TASK_NAMES = ANALYSIS_PLAN.task_names
MODEL_SETS = ANALYSIS_PLAN.model_feature_sets
BASELINE_SETS = ANALYSIS_PLAN.baseline_feature_sets
TASK_SETTINGS = ANALYSIS_PLAN.task_settings
TASK_RESULT_DIRS = [f"{ANALYSIS_DIR}/models/{m}/tasks" for m in (MODELS if MODEL_SETS else [])] + (
    [f"{ANALYSIS_DIR}/baselines/tasks"] if BASELINE_SETS else [])
SITES = ANALYSIS_PLAN.sites
SITE_CHECK = ANALYSIS_PLAN.site_check
SITE_CHECK_SETTINGS = ANALYSIS_PLAN.site_check_settings
VOXEL_JOB_MB = ANALYSIS_PLAN.voxel_job_mb
# The PCA figures are coloured by each task's column too.
TASK_COLUMNS = ANALYSIS_PLAN.task_columns
# Report captions of the site check's figures and tables, by kind (see brainvae.analysis.names).
SITE_CHECK_CAPTIONS = {
    "table": "../report/site_check.rst",
    "summary": "../report/site_check.rst",
    "confusion matrix": "../report/confusion_matrix.rst",
    "ROC curves": "../report/roc_curves.rst",
}
PCA_CAPTIONS = {"PC1 vs PC2": "../report/pca_{data}.rst", "explained variance": "../report/pca_explained_variance.rst"}


rule analysis_scans:
    input:
        index=rules.cohort_array.output.index,
        qc=each_scan_file("qc_metrics", COHORT_SCANS),
        xfm=each_scan_file("xfm_info", COHORT_SCANS),
    output:
        f"{ANALYSIS_DIR}/scans.tsv",
    log:
        f"{LOGS}/analysis/scans.log",
    params:
        scans=COHORT_SCANS,
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    conda:
        "../../envs/analysis.yaml"
    script:
        "../scripts/analysis_scans.py"


rule analysis_voxels:
    input:
        array=rules.cohort_array.output.array,
        mask=rules.cohort_array.output.mask,
        index=rules.cohort_array.output.index,
    output:
        # A masked float32 copy of the cohort array: rebuilt in seconds, so not kept.
        voxels=temp(f"{ANALYSIS_DIR}/voxels/voxels.npy"),
        index=f"{ANALYSIS_DIR}/voxels/voxels_index.tsv",
    log:
        f"{LOGS}/analysis/voxels.log",
    params:
        downsample=ANALYSIS["voxel_downsample"],
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    conda:
        "../../envs/analysis.yaml"
    script:
        "../scripts/analysis_voxels.py"


rule analysis_pca_latents:
    input:
        scans=rules.analysis_scans.output[0],
        latents=rules.encode_latents.output[0],
    output:
        **pca_output_files(
            f"{ANALYSIS_DIR}/models/{{model}}/pca",
            "latents",
            mark=lambda path, kind: report(path, caption=PCA_CAPTIONS[kind].format(data="latents"),
                                           category="Latent space (PCA)", subcategory="{model}",
                                           labels={"data": "latent means of {model}", "figure": kind}),
        ),
    log:
        f"{LOGS}/analysis/pca_latents/{{model}}.log",
    params:
        kind="latents",
        title=lambda wildcards: f"PCA of the latent means, model {wildcards.model}",
        color_by=TASK_COLUMNS,
        n_components=ANALYSIS["pca_components"],
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../../envs/analysis.yaml"
    script:
        "../scripts/analysis_pca.py"


rule analysis_pca_voxels:
    input:
        scans=rules.analysis_scans.output[0],
        voxels=rules.analysis_voxels.output.voxels,
        voxel_index=rules.analysis_voxels.output.index,
    output:
        **pca_output_files(
            f"{ANALYSIS_DIR}/voxels/pca",
            "voxels",
            mark=lambda path, kind: report(path, caption=PCA_CAPTIONS[kind].format(data="voxels"),
                                           category="Latent space (PCA)", subcategory="voxels (baseline)",
                                           labels={"data": "preprocessed voxels", "figure": kind}),
        ),
    log:
        f"{LOGS}/analysis/pca_voxels.log",
    params:
        kind="voxels",
        title="PCA of the preprocessed voxels (baseline)",
        color_by=TASK_COLUMNS,
        n_components=ANALYSIS["pca_components"],
    threads: 1
    resources:
        mem_mb=VOXEL_JOB_MB,
        runtime=20,
    conda:
        "../../envs/analysis.yaml"
    script:
        "../scripts/analysis_pca.py"


rule analysis_tasks_latents:
    input:
        scans=rules.analysis_scans.output[0],
        # Carries this model's own split of every scan (from its splits.tsv).
        latents=rules.encode_latents.output[0],
    output:
        results=f"{ANALYSIS_DIR}/models/{{model}}/tasks/results.tsv",
        predictions=f"{ANALYSIS_DIR}/models/{{model}}/tasks/predictions.tsv",
    log:
        f"{LOGS}/analysis/tasks_latents/{{model}}.log",
    params:
        tasks=TASKS,
        feature_sets=MODEL_SETS,
        splits=ANALYSIS["splits"],
        settings=TASK_SETTINGS,
    threads: 1
    resources:
        mem_mb=2000,
        runtime=60,
    conda:
        "../../envs/analysis.yaml"
    script:
        "../scripts/analysis_tasks.py"


rule analysis_tasks_baselines:
    input:
        scans=rules.analysis_scans.output[0],
        # Baselines take the scans in the selection of every model: each model's splits, made from the cohort
        # splits and its train_labels as train_vae makes them (not read from the models, so a retrained model
        # does not rerun the baselines).
        splits=rules.cohort_splits.output[0],
        index=rules.cohort_array.output.index,
        voxels=rules.analysis_voxels.output.voxels if "voxels_pca" in BASELINE_SETS else [],
        voxel_index=rules.analysis_voxels.output.index if "voxels_pca" in BASELINE_SETS else [],
    output:
        results=f"{ANALYSIS_DIR}/baselines/tasks/results.tsv",
        predictions=f"{ANALYSIS_DIR}/baselines/tasks/predictions.tsv",
    log:
        f"{LOGS}/analysis/tasks_baselines.log",
    params:
        tasks=TASKS,
        models=list(MODELS),
        model_train_labels=[MODEL_TRAIN_LABELS[m] for m in MODELS],
        feature_sets=BASELINE_SETS,
        splits=ANALYSIS["splits"],
        settings=TASK_SETTINGS,
    threads: 1
    resources:
        mem_mb=VOXEL_JOB_MB if "voxels_pca" in BASELINE_SETS else 2000,
        runtime=60,
    conda:
        "../../envs/analysis.yaml"
    script:
        "../scripts/analysis_tasks.py"


rule analysis_site_check:
    input:
        scans=rules.analysis_scans.output[0],
        latents=rules.encode_latents.output[0],
    output:
        **classification_output_files(
            f"{ANALYSIS_DIR}/models/{{model}}/site_check",
            "latents",
            ANALYSIS["site_check_classifiers"],
            binary=len(SITES) == 2,
            mark=lambda path, kind, classifier: report(
                path, caption=SITE_CHECK_CAPTIONS[kind], category="Site check", subcategory="{model}",
                labels={"classifier": classifier, "figure": kind}),
        ),
    log:
        f"{LOGS}/analysis/site_check/{{model}}.log",
    params:
        settings=SITE_CHECK_SETTINGS,
        ci=ANALYSIS["ci"],
    threads: ANALYSIS["threads"]
    resources:
        mem_mb=2000,
        runtime=30,
    conda:
        "../../envs/analysis.yaml"
    script:
        "../scripts/analysis_site_check.py"


rule analysis_reconstruction_table:
    input:
        expand(rules.evaluate_vae.output.summary, model=MODELS),
    output:
        tsv=f"{TABLES_DIR}/reconstruction.tsv",
        md=f"{TABLES_DIR}/reconstruction.md",
        html=report(f"{TABLES_DIR}/reconstruction.html", caption="../report/table_reconstruction.rst",
                    category="Tables", labels={"table": "reconstruction per model"}),
    log:
        f"{LOGS}/analysis/reconstruction_table.log",
    params:
        models=list(MODELS),
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    conda:
        "../../envs/analysis.yaml"
    script:
        "../scripts/analysis_reconstruction_table.py"


rule analysis_tasks_table:
    input:
        results=[f"{d}/results.tsv" for d in TASK_RESULT_DIRS],
        predictions=[f"{d}/predictions.tsv" for d in TASK_RESULT_DIRS],
    output:
        tsv=f"{TABLES_DIR}/classification.tsv",
        # The external-validation rows alone (evaluated_on: an external dataset), same columns.
        external=f"{TABLES_DIR}/external.tsv",
        md=f"{TABLES_DIR}/classification.md",
        html=report(f"{TABLES_DIR}/classification.html", caption="../report/table_classification.rst",
                    category="Tables", labels={"table": "prediction tasks: every model, feature set and estimator"}),
        task_tables=[report(f"{TABLES_DIR}/tasks/{t}.html", caption="../report/task_table.rst",
                            category="Prediction tasks", subcategory=t, labels={"task": t, "figure": "table"})
                     for t in TASK_NAMES],
        figures=[report(f"{ANALYSIS_DIR}/tasks/{t['name']}.png", caption="../report/task_figure.rst",
                        category="Prediction tasks", subcategory=t["name"],
                        labels={"task": t["name"],
                                "figure": "ROC curves" if t["kind"] == "binary" else "predicted vs true"})
                 for t in TASKS],
    log:
        f"{LOGS}/analysis/tasks_table.log",
    params:
        # <tables>/classification.tsv -> <tables>, derived from the output (no hard-coded prefix).
        tables_dir=lambda wildcards, output: os.path.dirname(output.tsv),
        tasks=TASK_NAMES,
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    conda:
        "../../envs/analysis.yaml"
    script:
        "../scripts/analysis_tasks_table.py"


rule analysis_site_check_table:
    input:
        expand(rules.analysis_site_check.output.summary, model=MODELS),
    output:
        tsv=f"{TABLES_DIR}/site_check.tsv",
        md=f"{TABLES_DIR}/site_check.md",
        html=report(f"{TABLES_DIR}/site_check.html", caption="../report/table_site_check.rst", category="Tables",
                    labels={"table": "site check per model"}),
    log:
        f"{LOGS}/analysis/site_check_table.log",
    params:
        dirs=[f"{ANALYSIS_DIR}/models/{m}/site_check" for m in MODELS],
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    conda:
        "../../envs/analysis.yaml"
    script:
        "../scripts/analysis_site_check_table.py"


# Final outputs of this stage, requested by rule all.
ANALYSIS_TARGETS = [
    *expand(rules.analysis_pca_latents.output, model=MODELS),
    *rules.analysis_pca_voxels.output,
    *rules.analysis_reconstruction_table.output,
]
if TASKS and TASK_RESULT_DIRS:
    ANALYSIS_TARGETS += [*rules.analysis_tasks_table.output]
if SITE_CHECK:
    ANALYSIS_TARGETS += [*expand(rules.analysis_site_check.output, model=MODELS), *rules.analysis_site_check_table.output]
