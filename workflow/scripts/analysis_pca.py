"""Rules analysis_pca_latents / analysis_pca_voxels: descriptive PCA with scatter and explained variance."""

from brainvae.workflow import job_logging

with job_logging(snakemake.log[0], snakemake.threads) as log:
    from pathlib import Path

    import pandas as pd

    from brainvae.analysis.features import align_rows, latent_matrix, load_latents
    from brainvae.analysis.pca import pca_report
    from brainvae.analysis.steps import feature_set, read_scan_table

    i, p = snakemake.input, snakemake.params
    scans = read_scan_table(i.scans)
    if p.kind == "latents":
        # Read once: the latent means, and this model's own split to colour by (a variant that learns from
        # fewer labels saw fewer scans), both matched to the analysis table as feature_set("latents") does.
        latents = load_latents(i.latents, required=("scan", "dataset", "participant", "split"))
        X = align_rows(scans, latents, latent_matrix(latents), what=str(i.latents))
        scans = scans.assign(split=align_rows(scans, latents, latents["split"].to_numpy(), what=str(i.latents)))
        name = "latents"
    else:
        X = feature_set("voxels_pca", scans, voxels=i.voxels, voxel_index=i.voxel_index).X
        name = "voxels"
    # Coloured by dataset, this model's split and each task's column (brainvae.analysis.tasks).
    color_by = [c for c in dict.fromkeys(["dataset", "split", *p.color_by]) if c in scans.columns]
    for column in color_by:
        values = pd.to_numeric(scans[column], errors="coerce")
        if values.notna().all() and values.nunique() > 10:  # a continuous column (age): coloured by tertile
            scans[column] = pd.qcut(values, 3, duplicates="drop").astype(str)
    pca_report(scans, X, Path(snakemake.output.scatter).parent, name=name, title=p.title, color_by=color_by,
               n_components=p.n_components)
    log.info("PCA of %d scans x %d features", *X.shape)
