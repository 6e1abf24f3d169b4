"""BIDS-Derivatives metadata of brainvae's outputs."""

from __future__ import annotations

import os

from . import __version__
from .io import atomic_write_json


def dataset_description(source_datasets: list[str]) -> dict:
    return {
        "Name": "brainvae derivatives",
        "BIDSVersion": "1.9.0",
        "DatasetType": "derivative",
        "GeneratedBy": [{
            "Name": "brainvae",
            "Version": __version__,
            "Description": "Preprocessing for 3D VAEs: conform, N4, two-level affine to MNI152, skull-strip, "
                           "one resampling, intensity normalisation.",
        }],
        "SourceDatasets": [{"Name": name} for name in source_datasets],
    }


def write_dataset_description(path: str | os.PathLike, source_datasets: list[str]) -> None:
    atomic_write_json(dataset_description(source_datasets), path)
