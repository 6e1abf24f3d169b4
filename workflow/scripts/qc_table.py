"""Rule qc_table: one QC table for the cohort (metrics, flags, cohort outliers, exclusions, failed inputs)."""

from brainvae.workflow import job_logging

with job_logging(snakemake.log[0]) as log:
    from brainvae.failures import read_failed_inputs
    from brainvae.steps import qc_table_file

    table = qc_table_file(snakemake.input.metrics, snakemake.output[0], excluded=snakemake.params.exclude,
                          failed_inputs=read_failed_inputs(snakemake.input.failed_inputs),
                          datasets=snakemake.params.datasets)
    log.info("%d scans, %d passed", len(table), int(table["passed"].sum()) if len(table) else 0)
