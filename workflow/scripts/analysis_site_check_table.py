"""Rule analysis_site_check_table: the site check of every model in one table."""

from brainvae.workflow import job_logging

with job_logging(snakemake.log[0], snakemake.threads) as log:
    from pathlib import Path

    from brainvae.analysis.steps import site_check_tables

    site_check_tables(snakemake.params.dirs, Path(snakemake.output.tsv).parent)
    log.info("site check table of %d model(s)", len(snakemake.params.dirs))
