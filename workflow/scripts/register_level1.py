"""Rule register_level1: head -> whole-head template (Colin27, MNI space), rigid then affine."""

from brainvae.workflow import import_ants_core, job_logging

with job_logging(snakemake.log[0], snakemake.threads) as log:
    import_ants_core()  # ~1 s less start-up per job
    from brainvae.preprocess import level1_file

    level1_file(snakemake.input.corrected, snakemake.output.xfm, snakemake.output.head, snakemake.output.info,
                threads=snakemake.threads)
    log.info("level-1 affine: %s", snakemake.output.xfm)
