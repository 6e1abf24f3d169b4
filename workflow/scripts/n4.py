"""Rule n4: N4 bias-field correction inside a head mask."""

from brainvae.workflow import job_logging

with job_logging(snakemake.log[0], snakemake.threads) as log:
    from brainvae.preprocess import bias_correct_file

    p = snakemake.params
    bias_correct_file(snakemake.input.image, snakemake.output.corrected, snakemake.output.biasfield,
                      snakemake.output.headmask, shrink_factor=p.shrink_factor, iterations=p.iterations,
                      convergence=p.convergence, bias_fwhm=p.bias_fwhm, threads=snakemake.threads)
    log.info("N4 done: %s", snakemake.output.biasfield)
