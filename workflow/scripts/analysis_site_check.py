"""Rule analysis_site_check: how well the latents predict the dataset (site)."""

from brainvae.workflow import job_logging

with job_logging(snakemake.log[0], snakemake.threads) as log:
    from pathlib import Path

    import pandas as pd

    from brainvae.analysis.steps import feature_set, read_scan_table, site_check_step

    i, p = snakemake.input, snakemake.params
    scans = read_scan_table(i.scans)
    features = feature_set("latents", scans, latents=i.latents)
    site_check_step(scans, features, Path(snakemake.output.summary).parent, model=snakemake.wildcards.model,
                    ci=p.ci, n_jobs=snakemake.threads, **p.settings)
    summary = pd.read_csv(snakemake.output.summary, sep="\t")
    ba = summary[summary["metric"] == "balanced_accuracy"].set_index("classifier")["mean"].round(3).to_dict()
    log.info("%s: site from latents, balanced accuracy %s", snakemake.wildcards.model, ba)
