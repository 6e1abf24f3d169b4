"""Rule analysis_voxels: the cohort array as a scans x brain-voxels matrix for the voxel baseline."""

from brainvae.workflow import job_logging

with job_logging(snakemake.log[0], snakemake.threads) as log:
    import shutil

    from brainvae.analysis.features import voxel_matrix_from_cohort
    from brainvae.io import atomic_path

    i = snakemake.input
    X = voxel_matrix_from_cohort(i.array, i.mask, snakemake.output.voxels, downsample=snakemake.params.downsample)
    # Row i of the matrix is row i of the cohort array: the cohort index is its index.
    with atomic_path(snakemake.output.index, suffix=".tsv") as tmp:
        shutil.copyfile(i.index, tmp)
    log.info("%d scans x %d voxels", *X.shape)
