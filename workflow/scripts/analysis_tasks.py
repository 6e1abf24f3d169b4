"""Rules analysis_tasks_latents / analysis_tasks_baselines: every prediction task on the feature sets of one
model (latents, latents + confounds) or on the baselines (voxels, confounds), cross-validated and external."""

from brainvae.workflow import job_logging

with job_logging(snakemake.log[0], snakemake.threads) as log:
    from pathlib import Path

    import pandas as pd

    from brainvae.analysis.features import load_latents
    from brainvae.analysis.steps import read_scan_table
    from brainvae.analysis.task_steps import select_scans, tasks_step
    from brainvae.vae.cohort import model_splits

    i, p = snakemake.input, snakemake.params
    model = snakemake.wildcards.get("model")
    if model is not None:
        # This model's own split of every scan, as its latents table carries it (brainvae.vae.latents).
        split_tables = [load_latents(i.latents, required=("scan", "split"))[["scan", "split"]]]
    else:
        split_tables = [model_splits(i.splits, i.index, labels, model=name)
                        for name, labels in zip(p.models, p.model_train_labels, strict=True)]
    # Tasks with required: false are left out (a note row) when no scan is left; a required one fails here.
    scans = select_scans(read_scan_table(i.scans), split_tables, p.splits,
                         allow_empty=not any(t["required"] for t in p.tasks))
    log.info("%d analysed scans of %s; splits %s", len(scans), ", ".join(sorted(set(scans["dataset"]))),
             scans["split"].value_counts().to_dict())
    paths = tasks_step(scans, p.tasks, Path(snakemake.output.results).parent, feature_sets=p.feature_sets,
                       model=model, latents=i.get("latents"), voxels=i.get("voxels") or None,
                       voxel_index=i.get("voxel_index") or None, **p.settings)
    results = pd.read_csv(paths["results"], sep="\t", keep_default_na=False, na_values=["n/a"])
    for row in results[results["note"].astype(str) != ""].itertuples():
        log.warning("%s: %s", row.task, row.note)
    for row in results[results["note"].astype(str) == ""].itertuples():
        log.info("%s %s/%s %s on %s: %s %.3f [%.3f, %.3f], p=%s", row.task, row.model, row.feature_set, row.classifier,
                 row.evaluated_on, row.metric, row.score, row.ci_low, row.ci_high, row.p_perm)
