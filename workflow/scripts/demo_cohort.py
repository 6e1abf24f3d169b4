"""Rule demo_cohort: generate the synthetic BIDS cohort with ground truth."""

from brainvae.demo_cohort import generate_cohort
from brainvae.workflow import job_logging

with job_logging(snakemake.log[0], snakemake.threads) as log:
    p = snakemake.params
    scans = generate_cohort(p.out_dir, None, p.seed, ds_strength=p.ds_strength, sites=dict(p.sites),
                            session_fraction=p.session_fraction, n_jobs=snakemake.threads)
    log.info("generated %d scans in %s", len(scans), p.out_dir)
