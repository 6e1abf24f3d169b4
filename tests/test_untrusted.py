"""Untrusted data: nothing from participants.tsv, the config or a checkpoint is run as code.

Code-like strings go into participants.tsv cells and config values; a workflow dry run (which indexes the
inputs, validates the config and plans every job with its parameters) must leave them as plain strings and
run nothing. Checkpoints are loaded with ``torch.load(weights_only=True)``: a pickle that would run code is
refused.
"""

import json
import pickle
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from brainvae.vae.model import VAE, VAEConfig
from brainvae.vae.train import load_model
from test_bad_inputs import IXI, _run

#: Strings that would run something if they were evaluated by Python, a shell, str.format or Snakemake.
PAYLOADS = {
    "python": "__import__('os').system('touch {marker}')",
    "shell": "$(touch {marker})",
    "backticks": "`touch {marker}`",
    "semicolon": "x; touch {marker}",
    "format": "{{config}}",
    "double_format": "{{{{config}}}}",
}


def _payloads(folder: Path) -> dict[str, str]:
    return {name: text.format(marker=folder / f"PWNED_{name}") for name, text in PAYLOADS.items()}


def _no_marker(folder: Path) -> None:
    made = sorted(p.name for p in folder.rglob("PWNED*")) + sorted(p.name for p in Path.cwd().glob("PWNED*"))
    assert not made, f"a payload ran: {made}"


def _bids_of_one_scan_each(tmp_path: Path, real_t1w_dir: Path, participants: list[dict[str, str]]) -> Path:
    """A BIDS dataset with one copy of a real scan per participant (sub-s0, sub-s1, ...) and these
    participants.tsv columns."""
    bids = tmp_path / "bids"
    bids.mkdir()
    (bids / "dataset_description.json").write_text(json.dumps({"Name": "x", "BIDSVersion": "1.9.0"}))
    rows = []
    for i, columns in enumerate(participants):
        subject = f"s{i}"
        (bids / f"sub-{subject}" / "anat").mkdir(parents=True)
        shutil.copy(real_t1w_dir / "ixi" / f"{IXI['ixi012']}.nii.gz", bids / f"sub-{subject}" / "anat" / f"sub-{subject}_T1w.nii.gz")
        rows.append({"participant_id": f"sub-{subject}", **columns})
    pd.DataFrame(rows).to_csv(bids / "participants.tsv", sep="\t", index=False)
    return bids


def test_participants_cells_stay_strings(tmp_path, real_t1w_dir):
    payloads = _payloads(tmp_path)
    bids = _bids_of_one_scan_each(tmp_path, real_t1w_dir,
                                  [{"group": "euploid", "age": text, "site": text} for text in payloads.values()])
    config = {"output_dir": "results", "datasets": [
        {"name": "untrusted", "bids_dir": str(bids), "role": "both", "label_column": "group",
         "covariates": ["age", "site"]}]}
    configfile = tmp_path / "config.yaml"
    configfile.write_text(yaml.safe_dump(config))
    result = _run(tmp_path, configfile, "--dry-run", timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    _no_marker(tmp_path)
    samples = pd.read_csv(tmp_path / "results" / "samples.tsv", sep="\t", dtype=str, keep_default_na=False)
    assert samples["age"].tolist() == list(payloads.values()) == samples["site"].tolist()


def test_code_in_a_label_cell_stays_a_string(tmp_path, real_t1w_dir):
    """Labels flow into job parameters (the analysis): they must not be formatted as Snakemake wildcards."""
    payloads = _payloads(tmp_path)
    # three participants per label: the fewest a classification task accepts
    bids = _bids_of_one_scan_each(tmp_path, real_t1w_dir, [{"group": text} for text in [*payloads.values()] * 3])
    # The labels are the classes of a multiclass task, so they reach the analysis jobs' parameters.
    config = {"output_dir": "results", "cohort": {"train_labels": None},
              "datasets": [{"name": "untrusted", "bids_dir": str(bids), "role": "both", "label_column": "group"}],
              "analysis": {"tasks": {"payload_classes": {"column": "group", "kind": "multiclass", "required": True}}}}
    configfile = tmp_path / "config.yaml"
    configfile.write_text(yaml.safe_dump(config))
    result = _run(tmp_path, configfile, "--dry-run", timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    _no_marker(tmp_path)
    samples = pd.read_csv(tmp_path / "results" / "samples.tsv", sep="\t", dtype=str, keep_default_na=False)
    assert set(samples["label"]) == set(payloads.values())


def test_code_in_config_strings_is_refused_or_kept_as_text(tmp_path):
    payloads = _payloads(tmp_path)
    config = yaml.safe_load((Path(__file__).parents[1] / "config" / "config.yaml").read_text())
    config["analysis"]["tasks"]["ds_vs_euploid"]["positive"] = payloads["python"]
    config["qc"] = {**(config.get("qc") or {}), "exclude": [payloads["shell"], payloads["format"]]}
    configfile = tmp_path / "config.yaml"
    configfile.write_text(yaml.safe_dump(config))
    result = _run(tmp_path, configfile, "--dry-run", timeout=600)
    output = result.stdout + result.stderr
    _no_marker(tmp_path)
    # Scan keys are names, not free text: the schema refuses these with the key's name.
    assert result.returncode != 0 and "qc.exclude" in output, output


def test_yaml_python_tags_in_the_config_are_refused(tmp_path):
    marker = tmp_path / "PWNED_tag"
    configfile = tmp_path / "config.yaml"
    configfile.write_text(f'output_dir: !!python/object/apply:os.system ["touch {marker}"]\n')
    result = _run(tmp_path, configfile, "--dry-run", timeout=600)
    assert result.returncode != 0
    assert not marker.exists()


class _RunsCode:
    """Unpickling this would call os.system: what a malicious checkpoint carries."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def model_dir(tmp_path):
    config = VAEConfig(in_shape=(8, 8, 8), latent_dim=2, widths=(2,), blocks=0)
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model": config.to_dict()}))
    torch.save(VAE(config).state_dict(), folder / "model.pt")
    return folder


def test_a_checkpoint_that_runs_code_is_refused(model_dir, tmp_path):
    load_model(model_dir)  # the honest checkpoint loads
    marker = tmp_path / "PWNED_checkpoint"
    with open(model_dir / "model.pt", "wb") as handle:
        pickle.dump({"state": _RunsCode(marker)}, handle)
    with pytest.raises(pickle.UnpicklingError):
        load_model(model_dir)
    torch.save({"state": _RunsCode(marker)}, model_dir / "model.pt")  # the same inside torch's zip format
    with pytest.raises(pickle.UnpicklingError):
        load_model(model_dir)
    assert not marker.exists()


def test_the_resume_checkpoint_is_loaded_weights_only(tmp_path):
    from brainvae.vae.train import _load_checkpoint

    marker = tmp_path / "PWNED_resume"
    torch.save({"epoch": 3, "rng": _RunsCode(marker)}, tmp_path / "checkpoint.pt")
    with pytest.raises(pickle.UnpicklingError):
        _load_checkpoint(tmp_path / "checkpoint.pt")
    assert not marker.exists()
