"""Rule cohort_array: stack the preprocessed volumes and brain masks into memory-mappable arrays."""

from brainvae.workflow import job_logging

with job_logging(snakemake.log[0], snakemake.threads) as log:
    from brainvae.inputs import read_samples
    from brainvae.vae.cohort import build_cohort_array

    samples = read_samples(snakemake.input.samples).set_index("scan", drop=False)
    samples = samples.loc[snakemake.params.scans].reset_index(drop=True)
    index = build_cohort_array(samples, snakemake.input.images, snakemake.input.masks,
                               snakemake.output.array, snakemake.output.index, snakemake.params.dtype,
                               out_mask=snakemake.output.mask)
    log.info("%d scans stacked into %s", len(index), snakemake.output.array)
