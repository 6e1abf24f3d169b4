"""Rule cohort_splits: frozen subject-level train/val/test splits of the scans the VAE learns from."""

from brainvae.workflow import job_logging

with job_logging(snakemake.log[0], snakemake.threads) as log:
    from brainvae.inputs import read_samples
    from brainvae.vae.cohort import training_splits, write_splits

    p = snakemake.params
    splits = training_splits(read_samples(snakemake.input.samples), train_labels=p.train_labels,
                             fractions=p.fractions, seed=p.seed, exclude=p.exclude,
                             qc_table=snakemake.input.qc or None)
    write_splits(splits, snakemake.output[0])
    log.info("splits: %s", splits["split"].value_counts().to_dict())
