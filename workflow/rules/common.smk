# Configuration, the samples table and helpers shared by every rule file.

import sys
from pathlib import Path

sys.path.insert(0, str(Path(workflow.basedir) / "src"))  # run from a checkout without installing

from brainvae.config import validate_config
from brainvae.inputs import write_samples
from brainvae.workflow import SCAN_WILDCARD, bids_uri, build_samples

validate_config(config, Path(workflow.basedir) / "workflow" / "schemas" / "config.schema.yaml")

OUT = config["output_dir"]
DERIV = f"{OUT}/derivatives/brainvae"
LOGS = f"{OUT}/logs"
SAMPLES_TSV = f"{OUT}/samples.tsv"

# Indexed once per workflow start; written only when its content changes, so a no-op run stays one.
SAMPLES = build_samples(config).set_index("scan", drop=False)
write_samples(SAMPLES, SAMPLES_TSV)


wildcard_constraints:
    scan=SCAN_WILDCARD,


def scan_input(wildcards):
    """The raw T1w file of one scan."""
    return SAMPLES.loc[wildcards.scan, "path"]


def scan_source_uri(wildcards):
    """BIDS URI of the raw scan (``bids:<dataset>:<path in dataset>``), recorded in every sidecar."""
    return bids_uri(SAMPLES.loc[wildcards.scan], config)
