"""Rule skullstrip: brain mask of the level-1-aligned head, carried back to the native grid."""

from brainvae.workflow import job_logging

with job_logging(snakemake.log[0], snakemake.threads) as log:
    from brainvae.steps import skullstrip_file

    info = skullstrip_file(snakemake.input.head, snakemake.input.level1, snakemake.input.native,
                           snakemake.output.mask, snakemake.output.info, method=snakemake.params.method,
                           threads=snakemake.threads, device=snakemake.params.device)
    log.info("brain mask: %.0f mL (%s)", info["BrainVolumeMl"], info["Method"])
