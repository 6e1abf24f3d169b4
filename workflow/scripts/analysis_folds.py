"""Rule analysis_folds: participant-grouped outer folds shared by every classification job."""

from brainvae.workflow import job_logging

with job_logging(snakemake.log[0], snakemake.threads) as log:
    from brainvae.analysis.steps import analysed_scans, outer_folds_step, read_scan_table

    p = snakemake.params
    scans = analysed_scans(read_scan_table(snakemake.input[0]), p.splits, label=p.label)
    folds = outer_folds_step(scans, snakemake.output[0], label=p.label, positive=p.positive, n_splits=p.n_splits,
                             n_repeats=p.n_repeats, seed=p.seed)
    log.info("%d scans of %d participants; classes %s; %d repeat(s) x %d folds", len(scans),
             folds["group"].nunique(), scans[p.label].value_counts().to_dict(), folds["repeat"].nunique(),
             folds["fold"].nunique())
