"""Rule analysis_classification_tables: every model x feature set x classifier in one table and figure."""

from brainvae.workflow import job_logging

with job_logging(snakemake.log[0], snakemake.threads) as log:
    from pathlib import Path

    from brainvae.analysis.steps import classification_tables

    p = snakemake.params
    classification_tables(p.dirs, Path(snakemake.output.tsv).parent, snakemake.output.overview, label=p.label,
                          positive=p.positive)
    log.info("classification table of %d result folder(s)", len(p.dirs))
