"""Rule analysis_scans: the analysis table (one row per cohort scan: ids, label, covariates, confounds, tiv_ml).

No VAE split: each model's own splits decide which scans it is scored on (rules analysis_tasks_*).
"""

from brainvae.workflow import job_logging

with job_logging(snakemake.log[0], snakemake.threads) as log:
    from brainvae.analysis.steps import confounds_from_files, scan_table
    from brainvae.analysis.tables import write_tsv
    from brainvae.vae.cohort import read_index

    i = snakemake.input
    confounds = {scan: confounds_from_files(qc, xfm) for scan, qc, xfm in zip(snakemake.params.scans, i.qc, i.xfm,
                                                                                strict=True)}
    table = scan_table(read_index(i.index), None, confounds)
    write_tsv(table, snakemake.output[0])
    log.info("%d scans; TIV from %s", len(table), table["tiv_source"].value_counts().to_dict())
