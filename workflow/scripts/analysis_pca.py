"""Rules analysis_pca_latents / analysis_pca_voxels: descriptive PCA with scatter and explained variance."""

from brainvae.workflow import job_logging

with job_logging(snakemake.log[0], snakemake.threads) as log:
    from pathlib import Path

    from brainvae.analysis.features import load_latents
    from brainvae.analysis.pca import pca_report
    from brainvae.analysis.steps import feature_set, read_scan_table

    i, p = snakemake.input, snakemake.params
    scans = read_scan_table(i.scans)
    if p.kind == "latents":
        X = feature_set("latents", scans, latents=i.latents).X
        # Colour by this model's own split: a variant that learns from fewer labels saw fewer scans.
        latents = load_latents(i.latents, required=("scan", "split"))
        scans = scans.assign(split=scans["scan"].map(dict(zip(latents["scan"], latents["split"]))))
        name = "latents"
    else:
        X = feature_set("voxels_pca", scans, voxels=i.voxels, voxel_index=i.voxel_index).X
        name = "voxels"
    color_by = list(dict.fromkeys(["dataset", p.label, "split"]))
    pca_report(scans, X, Path(snakemake.output.scatter).parent, name=name, title=p.title, color_by=color_by,
               n_components=p.n_components)
    log.info("PCA of %d scans x %d features", *X.shape)
