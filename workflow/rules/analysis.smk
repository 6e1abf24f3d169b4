# Analysis: PCA of latents (and of voxels), classification with nested cross-validation against
# baselines on the same participant-grouped folds, a site check, and the report's tables.
# Needs MODELS (vae.smk) and COHORT_SCANS (cohort.smk).

from math import prod

from brainvae.analysis.names import MIN_PARTICIPANTS_PER_CLASS, classification_output_files, pca_output_files
from brainvae.errors import ConfigError
from brainvae.resample import GRIDS

ANALYSIS = config["analysis"]
ANALYSIS_DIR = f"{OUT}/analysis"
TABLES_DIR = f"{OUT}/tables"
LABEL = ANALYSIS["label_column"] or "label"
if LABEL not in SAMPLES.columns:
    raise ConfigError(
        f"config key analysis.label_column: column {LABEL!r} is not in the samples table "
        f"(add it to the datasets' covariates; columns: {', '.join(SAMPLES.columns)})"
    )
# Participants per class of the label among the cohort's scans (before the analysis.splits filter).
COHORT_PARTICIPANTS = (
    SAMPLES.loc[COHORT_SCANS]
    .loc[lambda t: ~t[LABEL].astype(str).isin(["", "n/a"])]
    .drop_duplicates(["dataset", "subject"])
    .groupby(LABEL)
    .size()
)
COHORT_LABELS = sorted(COHORT_PARTICIPANTS.index.astype(str))
# Decided when the DAG is built: a label with one class (e.g. euploid training data only), or a class with
# fewer participants than nested CV needs, has nothing to classify; a site check needs two datasets.
# Both are then left out with a message, not failed.
CLASSIFY = len(COHORT_LABELS) >= 2 and COHORT_PARTICIPANTS.min() >= MIN_PARTICIPANTS_PER_CLASS
BINARY = len(COHORT_LABELS) == 2
POSITIVE = ANALYSIS["positive_class"] if BINARY else None
SITE_PARTICIPANTS = SAMPLES.loc[COHORT_SCANS].groupby("dataset")["subject"].nunique()
SITES = sorted(SITE_PARTICIPANTS.index.astype(str))
SITE_CHECK = ANALYSIS["site_check"] and len(SITES) >= 2 and SITE_PARTICIPANTS.min() >= MIN_PARTICIPANTS_PER_CLASS
if not CLASSIFY:
    counts = ", ".join(f"{label}: {n}" for label, n in COHORT_PARTICIPANTS.items()) or "no labelled scans"
    print(f"brainvae: analysis: classification of {LABEL!r} is skipped: it needs two or more classes with at "
          f"least {MIN_PARTICIPANTS_PER_CLASS} participants each ({counts})", file=sys.stderr)
BASELINES = [f for f in ANALYSIS["feature_sets"] if f != "latents"]
MODELS_CLASSIFIED = list(MODELS) if "latents" in ANALYSIS["feature_sets"] else []
# Permutation tests only for classifiers that are run at all.
PERMUTATION_CLASSIFIERS = [c for c in ANALYSIS["permutation_classifiers"] if c in ANALYSIS["classifiers"]]
# Keyword arguments of brainvae.analysis.steps.classification_step, per feature set.
CLASSIFICATION_SETTINGS = {
    features: dict(
        classifiers=ANALYSIS["classifiers"],
        n_splits=ANALYSIS["outer_folds"],
        n_repeats=ANALYSIS["outer_repeats"],
        n_inner=ANALYSIS["inner_folds"],
        seed=ANALYSIS["seed"],
        n_permutations=ANALYSIS["permutations"] if features in ANALYSIS["permutation_feature_sets"] else 0,
        permutation_classifiers=PERMUTATION_CLASSIFIERS,
        n_estimators=ANALYSIS["random_forest_trees"],
        param_grids=ANALYSIS["grids"],
    )
    for features in ("latents", "voxels_pca", "confounds")
}
SITE_CHECK_SETTINGS = dict(
    CLASSIFICATION_SETTINGS["latents"], classifiers=ANALYSIS["site_check_classifiers"], n_permutations=0,
    permutation_classifiers=None,
)
# Memory of the voxel jobs: the scans x voxels float32 matrix, a training-set copy and the PCA's work.
VOXEL_JOB_MB = 1000 + int(3 * 4 * len(COHORT_SCANS) * prod(GRIDS[GRID].shape) / ANALYSIS["voxel_downsample"] ** 3 / 1e6)
# Report captions of the classification figures and tables, by kind (see brainvae.analysis.names).
CLASSIFICATION_CAPTIONS = {
    "table": "../report/classification.rst",
    "summary": "../report/classification.rst",
    "confusion matrix": "../report/confusion_matrix.rst",
    "ROC curves": "../report/roc_curves.rst",
}
SITE_CHECK_CAPTIONS = {**CLASSIFICATION_CAPTIONS, "table": "../report/site_check.rst", "summary": "../report/site_check.rst"}
PCA_CAPTIONS = {"PC1 vs PC2": "../report/pca_{data}.rst", "explained variance": "../report/pca_explained_variance.rst"}
# Folders of every classification job, models first then baselines (the combined table's row order).
CLASSIFICATION_DIRS = [f"{ANALYSIS_DIR}/models/{m}/classification" for m in MODELS_CLASSIFIED] + [
    f"{ANALYSIS_DIR}/baselines/{b}/classification" for b in BASELINES
]


wildcard_constraints:
    baseline="voxels_pca|confounds",


rule analysis_scans:
    input:
        index=rules.cohort_array.output.index,
        splits=rules.cohort_splits.output[0],
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


rule analysis_folds:
    input:
        rules.analysis_scans.output[0],
    output:
        f"{ANALYSIS_DIR}/outer_folds.tsv",
    log:
        f"{LOGS}/analysis/folds.log",
    params:
        label=LABEL,
        positive=POSITIVE,
        splits=ANALYSIS["splits"],
        n_splits=ANALYSIS["outer_folds"],
        n_repeats=ANALYSIS["outer_repeats"],
        seed=ANALYSIS["seed"],
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    conda:
        "../../envs/analysis.yaml"
    script:
        "../scripts/analysis_folds.py"


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
        label=LABEL,
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
        label=LABEL,
        n_components=ANALYSIS["pca_components"],
    threads: 1
    resources:
        mem_mb=VOXEL_JOB_MB,
        runtime=20,
    conda:
        "../../envs/analysis.yaml"
    script:
        "../scripts/analysis_pca.py"


rule analysis_classify_latents:
    input:
        scans=rules.analysis_scans.output[0],
        folds=rules.analysis_folds.output[0],
        latents=rules.encode_latents.output[0],
    output:
        **classification_output_files(
            f"{ANALYSIS_DIR}/models/{{model}}/classification",
            "latents",
            ANALYSIS["classifiers"],
            binary=BINARY,
            mark=lambda path, kind, classifier: report(
                path, caption=CLASSIFICATION_CAPTIONS[kind], category="Classification", subcategory="{model}",
                labels={"features": "latents", "classifier": classifier, "figure": kind}),
        ),
    log:
        f"{LOGS}/analysis/classify_latents/{{model}}.log",
    params:
        kind="latents",
        label=LABEL,
        positive=POSITIVE,
        splits=ANALYSIS["splits"],
        settings=CLASSIFICATION_SETTINGS["latents"],
        ci=ANALYSIS["ci"],
    threads: ANALYSIS["threads"]
    resources:
        mem_mb=2000,
        runtime=60,
    conda:
        "../../envs/analysis.yaml"
    script:
        "../scripts/analysis_classify.py"


rule analysis_classify_baseline:
    input:
        scans=rules.analysis_scans.output[0],
        folds=rules.analysis_folds.output[0],
        # Only the voxel baseline reads the voxel matrix.
        voxels=lambda wildcards: rules.analysis_voxels.output.voxels if wildcards.baseline == "voxels_pca" else [],
        voxel_index=lambda wildcards: rules.analysis_voxels.output.index if wildcards.baseline == "voxels_pca" else [],
    output:
        **classification_output_files(
            f"{ANALYSIS_DIR}/baselines/{{baseline}}/classification",
            "{baseline}",
            ANALYSIS["classifiers"],
            binary=BINARY,
            mark=lambda path, kind, classifier: report(
                path, caption=CLASSIFICATION_CAPTIONS[kind], category="Classification", subcategory="baselines",
                labels={"features": "{baseline}", "classifier": classifier, "figure": kind}),
        ),
    log:
        f"{LOGS}/analysis/classify_baseline/{{baseline}}.log",
    params:
        kind=lambda wildcards: wildcards.baseline,
        label=LABEL,
        positive=POSITIVE,
        splits=ANALYSIS["splits"],
        settings=lambda wildcards: CLASSIFICATION_SETTINGS[wildcards.baseline],
        voxel_pca_components=ANALYSIS["voxel_pca_components"],
        ci=ANALYSIS["ci"],
    threads: ANALYSIS["threads"]
    resources:
        mem_mb=lambda wildcards: VOXEL_JOB_MB if wildcards.baseline == "voxels_pca" else 2000,
        runtime=60,
    conda:
        "../../envs/analysis.yaml"
    script:
        "../scripts/analysis_classify.py"


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


rule analysis_classification_tables:
    input:
        [f"{d}/summary.tsv" for d in CLASSIFICATION_DIRS],
    output:
        tsv=f"{TABLES_DIR}/classification.tsv",
        md=f"{TABLES_DIR}/classification.md",
        html=report(f"{TABLES_DIR}/classification.html", caption="../report/table_classification.rst",
                    category="Tables", labels={"table": "classification per model, feature set and classifier"}),
        overview=report(f"{ANALYSIS_DIR}/classification_overview.png", caption="../report/classification_overview.rst",
                        category="Tables", labels={"table": "classification overview (figure)"}),
    log:
        f"{LOGS}/analysis/classification_tables.log",
    params:
        dirs=CLASSIFICATION_DIRS,
        label=LABEL,
        positive=POSITIVE,
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    conda:
        "../../envs/analysis.yaml"
    script:
        "../scripts/analysis_classification_tables.py"


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
if CLASSIFY:
    ANALYSIS_TARGETS += [
        *expand(rules.analysis_classify_latents.output, model=MODELS_CLASSIFIED),
        *expand(rules.analysis_classify_baseline.output, baseline=BASELINES),
        *rules.analysis_classification_tables.output,
    ]
if SITE_CHECK:
    ANALYSIS_TARGETS += [*expand(rules.analysis_site_check.output, model=MODELS), *rules.analysis_site_check_table.output]
