"""Rule conform: validate one T1w scan and reorient it to the canonical orientation.

An unusable input fails the job with `<file>: <reason>` and leaves a failure record, so that the next
workflow start leaves the scan out (brainvae.failures).
"""

from brainvae.conform import conform_scan
from brainvae.failures import recording_input_errors, records_dir
from brainvae.workflow import job_logging

with job_logging(snakemake.log[0], snakemake.threads) as log:
    p = snakemake.params
    with recording_input_errors(records_dir(snakemake.config["output_dir"]), snakemake.wildcards.scan,
                                snakemake.input.t1w, step="conform", settings=snakemake.config["conform"]):
        sidecar = conform_scan(snakemake.input.t1w, snakemake.output.image, snakemake.output.sidecar,
                               volume_index=p.volume_index, orientation=p.orientation,
                               min_voxel_mm=p.min_voxel_mm, max_voxel_mm=p.max_voxel_mm,
                               max_anisotropy=p.max_anisotropy, source_uri=p.source_uri)
    log.info("conformed %s -> %s", snakemake.input.t1w, snakemake.output.image)
