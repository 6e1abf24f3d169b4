"""Rule encode_latents: encode every scan of the cohort array into a Parquet table of latents."""

from pathlib import Path

from brainvae.workflow import job_logging

with job_logging(snakemake.log[0], snakemake.threads) as log:
    from brainvae.vae.latents import export_latents

    i = snakemake.input
    table = export_latents(Path(i.model).parent, i.array, i.mask, i.index, i.splits, snakemake.output[0],
                           model_name=snakemake.wildcards.model, device=snakemake.params.device)
    log.info("%d scans encoded into %s", table.num_rows, snakemake.output[0])
