"""Rule qc_scan: QC metrics, automatic flags and a three-plane picture of one scan."""

from brainvae.workflow import job_logging

with job_logging(snakemake.log[0], snakemake.threads) as log:
    from brainvae.steps import qc_file

    i = snakemake.input
    metrics = qc_file(i.image, i.biasfield, i.mask, i.xfm, {"level1": i.level1, "level2": i.level2},
                      snakemake.output.png, snakemake.output.metrics, scan=snakemake.params.scan_key,
                      thresholds=snakemake.params.thresholds, skullstrip_info=i.strip_info)
    log.info("QC flags: %s", ", ".join(metrics["flags"]) or "none")
