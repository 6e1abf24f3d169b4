"""Rule preprocess_template_scan: a scan already in a template space, conform to QC in one job.

An unusable input fails the job with `<file>: <reason>` and leaves a failure record, as rule conform does.
"""

from brainvae.workflow import job_logging

with job_logging(snakemake.log[0], snakemake.threads) as log:
    from brainvae.failures import records_dir
    from brainvae.steps import SCAN_OUTPUTS, template_scan_files

    p = snakemake.params
    metrics = template_scan_files(
        snakemake.input.t1w, {name: snakemake.output[name] for name in SCAN_OUTPUTS}, scan_key=p.scan_key,
        conform=p.conform, space=p.space, grid=p.grid, order=p.order, normalisation=p.normalisation,
        qc_thresholds=p.qc_thresholds, failure_records=records_dir(snakemake.config["output_dir"]),
        scan=snakemake.wildcards.scan, conform_settings=snakemake.config["conform"])
    log.info("preprocessed %s (%s) -> %s; QC flags: %s", snakemake.input.t1w, p.space, snakemake.output.preproc,
             ", ".join(metrics["flags"]) or "none")
