"""Rule analysis_reconstruction_table: reconstruction of every model (and its PCA baseline) in one table."""

from brainvae.workflow import job_logging

with job_logging(snakemake.log[0], snakemake.threads) as log:
    from pathlib import Path

    from brainvae.analysis.steps import reconstruction_tables

    summaries = dict(zip(snakemake.params.models, snakemake.input, strict=True))
    reconstruction_tables(summaries, Path(snakemake.output.tsv).parent)
    log.info("reconstruction table of %d model(s)", len(summaries))
