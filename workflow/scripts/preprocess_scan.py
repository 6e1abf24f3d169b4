"""Rule preprocess_scan (preprocess.one_job_per_scan): one scan's whole chain, conform to QC, in one job.

An unusable input fails the job with `<file>: <reason>` and leaves a failure record, as rule conform does.
"""

from brainvae.workflow import import_ants_core, job_logging

with job_logging(snakemake.log[0], snakemake.threads) as log:
    import_ants_core()  # ~1 s less start-up
    from brainvae.failures import records_dir
    from brainvae.steps import SCAN_OUTPUTS, preprocess_scan_files

    p = snakemake.params
    metrics = preprocess_scan_files(
        snakemake.input.t1w, {name: snakemake.output[name] for name in SCAN_OUTPUTS}, scan_key=p.scan_key,
        conform=p.conform, n4=p.n4, skullstrip_method=p.skullstrip_method,
        skullstrip_device=p.skullstrip_device, grid=p.grid, order=p.order,
        normalisation=p.normalisation, qc_thresholds=p.qc_thresholds, threads=snakemake.threads,
        failure_records=records_dir(snakemake.config["output_dir"]), scan=snakemake.wildcards.scan,
        conform_settings=snakemake.config["conform"])
    log.info("preprocessed %s -> %s; QC flags: %s", snakemake.input.t1w, snakemake.output.preproc,
             ", ".join(metrics["flags"]) or "none")
