"""Rule demo_cohort: generate the synthetic BIDS cohort with ground truth."""

from brainvae.demo_cohort import generate_cohort
from brainvae.workflow import job_logging

with job_logging(snakemake.log[0], snakemake.threads) as log:
    p = snakemake.params
    scans = generate_cohort(p.out_dir, p.subjects, p.seed, ds_strength=p.ds_strength,
                            ds_fraction=p.ds_fraction, sites=tuple(p.sites), n_jobs=snakemake.threads)
    log.info("generated %d scans in %s", len(scans), p.out_dir)
