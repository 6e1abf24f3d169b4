"""Rules analysis_classify_latents / analysis_classify_baseline: nested CV of one feature set."""

from brainvae.workflow import job_logging

with job_logging(snakemake.log[0], snakemake.threads) as log:
    from pathlib import Path

    import pandas as pd

    from brainvae.analysis.steps import analysed_scans, classification_step, feature_set, read_scan_table

    i, p = snakemake.input, snakemake.params
    scans = analysed_scans(read_scan_table(i.scans), p.splits, label=p.label)
    features = feature_set(p.kind, scans, latents=i.get("latents"), voxels=i.get("voxels"),
                           voxel_index=i.get("voxel_index"), pca_components=p.get("voxel_pca_components", 10))
    folds = pd.read_csv(i.folds, sep="\t", dtype={"group": str})
    model = snakemake.wildcards.get("model")
    classification_step(scans, folds, features, Path(snakemake.output.summary).parent, label=p.label,
                        positive=p.positive, model=model, ci=p.ci, n_jobs=snakemake.threads, **p.settings)
    summary = pd.read_csv(snakemake.output.summary, sep="\t")
    auc = summary[summary["metric"] == "roc_auc"].set_index("classifier")["mean"].round(3).to_dict()
    log.info("%s%s: %d scans x %d features; ROC AUC %s", f"{model}/" if model else "", features.name,
             *features.X.shape, auc)
