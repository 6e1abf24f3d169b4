"""Rule resample: the one resampling of the native bias-corrected head onto the training grid, normalised."""

from brainvae.workflow import job_logging

with job_logging(snakemake.log[0], snakemake.threads) as log:
    from brainvae.steps import preprocess_file

    p = snakemake.params
    preprocess_file(snakemake.input.image, snakemake.input.biasfield, snakemake.input.mask, snakemake.input.xfm,
                    snakemake.output.image, snakemake.output.mask, grid=p.grid, order=p.order,
                    method=p.normalisation["method"], percentiles=p.normalisation["percentiles"],
                    background=p.normalisation["background"])
    log.info("preprocessed: %s", snakemake.output.image)
