"""File-level pipeline steps (the part of each Snakemake job that is not wiring)."""

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml

from brainvae import steps
from brainvae.errors import InputError
from brainvae.qc import DEFAULT_THRESHOLDS


def _write(tmp_path, name, data, affine=np.eye(4)):
    path = tmp_path / name
    nib.save(nib.Nifti1Image(np.asarray(data, np.float32), affine), path)
    return path


def test_bias_corrected_divides_by_the_field(tmp_path):
    rng = np.random.default_rng(0)
    truth = rng.uniform(100, 200, (8, 9, 10))
    field = np.linspace(0.8, 1.2, 8)[:, None, None] * np.ones((8, 9, 10))
    image = _write(tmp_path, "t1w.nii.gz", truth * field)
    bias = _write(tmp_path, "bias.nii.gz", field)
    np.testing.assert_allclose(steps.bias_corrected(image, bias).get_fdata(), truth, rtol=1e-5)
    wrong = _write(tmp_path, "wrong.nii.gz", field[:4])
    with pytest.raises(InputError, match="wrong.nii.gz"):
        steps.bias_corrected(image, wrong)


def _metrics(scan, **overrides):
    base = {"scan": scan, "template_correlation": 0.6, "brain_volume_ml": 1400.0, "mask_dice": 0.95,
            "fov_coverage": 1.0, "mask_excess": 0.0, "wm_csf_contrast": 0.5, "wm_gm_contrast": 0.2, "flags": []}
    base.update(overrides)
    return base


def test_qc_table_combines_flags_outliers_and_exclusions(tmp_path):
    rows = [_metrics(f"sub-{i:02d}", brain_volume_ml=1400.0 + i) for i in range(8)]
    rows.append(_metrics("sub-bad", brain_volume_ml=400.0, flags=["brain_volume_out_of_range"]))
    paths = []
    for row in rows:
        path = tmp_path / f"{row['scan']}.json"
        path.write_text(json.dumps(row))
        paths.append(path)
    out = tmp_path / "qc.tsv"
    table = steps.qc_table_file(paths, out, excluded=["sub-03"])
    assert len(table) == 9
    written = pd.read_csv(out, sep="\t", keep_default_na=False)
    bad = written.set_index("scan").loc["sub-bad"]
    assert "brain_volume_out_of_range" in bad["flags"] and "outlier_brain_volume_ml" in bad["flags"]
    assert str(bad["passed"]) == "False"
    excluded = written.set_index("scan").loc["sub-03"]
    assert str(excluded["excluded"]) == "True" and str(excluded["passed"]) == "False"
    good = written.set_index("scan").loc["sub-01"]
    assert str(good["passed"]) == "True" and good["flags"] in ("", "n/a")


def test_schema_knows_every_qc_threshold(repo_root):
    schema = yaml.safe_load((repo_root / "workflow" / "schemas" / "config.schema.yaml").read_text())
    keys = set(schema["properties"]["qc"]["properties"]["thresholds"]["properties"])
    assert keys == set(DEFAULT_THRESHOLDS)
