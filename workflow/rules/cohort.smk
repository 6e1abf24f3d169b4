# Cohort: one stacked array of every included scan, its index and frozen subject-level splits.
# Every scan of every role goes into the array (the VAE encodes them all); scans in qc.exclude are
# left out everywhere. Scans with automatic QC flags stay in the array but, with
# cohort.exclude_flagged (default), are left out of the training splits.

from brainvae.vae.cohort import cohort_samples
from brainvae.vae.variants import cohort_split_labels, split_train_labels

COHORT = f"{OUT}/cohort"
COHORT_SCANS = cohort_samples(SAMPLES, config["qc"]["exclude"])["scan"].tolist()
# Labels each model variant learns from. One frozen split covers them all, so a scan is in the same
# split for every variant; each variant trains on its labels' part of it (rule train_vae).
MODEL_TRAIN_LABELS = {
    name: split_train_labels(overrides, config["cohort"]["train_labels"])[1]
    for name, overrides in config["models"].items()
}
SPLIT_LABELS = (cohort_split_labels(MODEL_TRAIN_LABELS.values()) if MODEL_TRAIN_LABELS
                else config["cohort"]["train_labels"])


rule cohort_splits:
    input:
        samples=SAMPLES_TSV,
        qc=f"{OUT}/qc/qc.tsv" if config["cohort"]["exclude_flagged"] else [],
    output:
        f"{COHORT}/splits.tsv",
    log:
        f"{LOGS}/cohort_splits.log",
    params:
        train_labels=SPLIT_LABELS,
        fractions=config["cohort"]["split_fractions"],
        seed=config["cohort"]["seed"],
        exclude=config["qc"]["exclude"],
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    conda:
        "../../envs/train.yaml"
    script:
        "../scripts/cohort_splits.py"


rule cohort_array:
    input:
        samples=SAMPLES_TSV,
        images=each_scan_file("preproc", COHORT_SCANS),
        masks=each_scan_file("preproc_mask", COHORT_SCANS),
    output:
        array=f"{COHORT}/cohort.npy",
        mask=f"{COHORT}/cohort_mask.npy",
        index=f"{COHORT}/cohort_index.tsv",
    log:
        f"{LOGS}/cohort_array.log",
    params:
        scans=COHORT_SCANS,
        dtype=config["cohort"]["dtype"],
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    conda:
        "../../envs/train.yaml"
    script:
        "../scripts/cohort_array.py"


# Final outputs of this stage, requested by rule all.
COHORT_TARGETS = [*rules.cohort_array.output, *rules.cohort_splits.output]
