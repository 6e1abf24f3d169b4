"""Rule derivatives_description: the BIDS-Derivatives dataset_description.json of brainvae's outputs."""

from brainvae.derivatives import write_dataset_description
from brainvae.workflow import job_logging

with job_logging(snakemake.log[0]):
    write_dataset_description(snakemake.output[0], source_datasets=snakemake.params.datasets)
