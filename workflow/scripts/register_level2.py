"""Rule register_level2: brain -> MNI152 2009a brain, starting from level 1; writes the composed transform."""

from brainvae.workflow import import_ants_core, job_logging

with job_logging(snakemake.log[0], snakemake.threads) as log:
    import_ants_core()  # ~1 s less start-up per job
    from brainvae.preprocess import level2_file

    level2_file(snakemake.input.corrected, snakemake.input.mask, snakemake.input.level1, snakemake.output.xfm,
                snakemake.output.info, mask_space="native", threads=snakemake.threads)
    log.info("native -> MNI affine: %s", snakemake.output.xfm)
