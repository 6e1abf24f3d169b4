"""Rule conform: validate one T1w scan and reorient it to the canonical orientation."""

from brainvae.conform import conform_scan
from brainvae.workflow import job_logging

with job_logging(snakemake.log[0], snakemake.threads) as log:
    p = snakemake.params
    sidecar = conform_scan(snakemake.input.t1w, snakemake.output.image, snakemake.output.sidecar,
                           volume_index=p.volume_index, orientation=p.orientation,
                           min_voxel_mm=p.min_voxel_mm, max_voxel_mm=p.max_voxel_mm,
                           max_anisotropy=p.max_anisotropy, source_uri=p.source_uri)
    log.info("conformed %s -> %s", snakemake.input.t1w, snakemake.output.image)
