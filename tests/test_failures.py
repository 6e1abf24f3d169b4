"""brainvae.failures: failure records of unusable inputs, and leaving those scans out at the next start."""

import json

import pandas as pd
import pytest

from brainvae.errors import InputError
from brainvae.failures import (
    read_failed_inputs,
    record_path,
    recording_input_errors,
    split_failed_inputs,
    write_failed_inputs,
)
from brainvae.qc import failed_input_rows
from brainvae.steps import qc_table_file

SETTINGS = {"orientation": "RAS", "volume_index": None, "min_voxel_mm": 0.2, "max_voxel_mm": 8.0,
            "max_anisotropy": 20.0}


@pytest.fixture
def samples(tmp_path):
    rows = []
    for subject in ("a", "b"):
        path = tmp_path / f"sub-{subject}_T1w.nii.gz"
        path.write_bytes(b"not really an image " + subject.encode())
        rows.append({"scan": f"sub-{subject}/anat/sub-{subject}", "scan_key": f"sub-{subject}", "dataset": "d",
                     "subject": subject, "session": "", "path": str(path)})
    return pd.DataFrame(rows)


def _fail(records, sample, settings=SETTINGS, exc=None):
    with pytest.raises(type(exc) if exc else InputError):
        with recording_input_errors(records, sample["scan"], sample["path"], step="conform", settings=settings):
            raise exc or InputError(sample["path"], "truncated gzip file")


def test_an_input_error_is_recorded_and_the_scan_left_out(tmp_path, samples):
    records = tmp_path / "records"
    _fail(records, samples.iloc[0])
    record = json.loads(record_path(records, "sub-a/anat/sub-a").read_text())
    assert record["reason"] == "truncated gzip file" and record["message"].startswith(samples.at[0, "path"])
    usable, failed = split_failed_inputs(samples, records, SETTINGS)
    assert usable["subject"].tolist() == ["b"]
    assert failed[["subject", "step", "reason"]].values.tolist() == [["a", "conform", "truncated gzip file"]]
    # 8 and 8.0, or another key order, are the same settings.
    assert len(split_failed_inputs(samples, records, {**dict(reversed(SETTINGS.items())), "max_voxel_mm": 8})[1]) == 1


def test_a_record_lapses_when_the_file_or_the_settings_change(tmp_path, samples):
    records = tmp_path / "records"
    _fail(records, samples.iloc[0])
    assert len(split_failed_inputs(samples, records, {**SETTINGS, "volume_index": 0})[1]) == 0
    moved = samples.assign(path=samples["path"] + ".moved")
    assert len(split_failed_inputs(moved, records, SETTINGS)[1]) == 0
    with open(samples.at[0, "path"], "ab") as handle:
        handle.write(b"the rest of the download")
    assert len(split_failed_inputs(samples, records, SETTINGS)[1]) == 0


def test_success_clears_the_record_and_other_errors_leave_none(tmp_path, samples):
    records = tmp_path / "records"
    _fail(records, samples.iloc[0])
    with recording_input_errors(records, "sub-a/anat/sub-a", samples.at[0, "path"], step="conform", settings=SETTINGS):
        pass
    assert not record_path(records, "sub-a/anat/sub-a").exists()
    _fail(records, samples.iloc[1], exc=MemoryError("killed"))  # not a verdict on the input
    assert not record_path(records, "sub-b/anat/sub-b").exists()


def test_failed_inputs_table_round_trip_and_qc_rows(tmp_path, samples):
    records = tmp_path / "records"
    _fail(records, samples.iloc[0])
    failed = split_failed_inputs(samples, records, SETTINGS)[1]
    table = tmp_path / "failed_inputs.tsv"
    assert write_failed_inputs(failed, table) and not write_failed_inputs(failed, table)  # unchanged: not rewritten
    assert read_failed_inputs(table).equals(failed)
    assert read_failed_inputs(tmp_path / "missing.tsv").empty
    metrics = tmp_path / "sub-b_qc.json"
    metrics.write_text(json.dumps({"scan": "sub-b", "template_correlation": 0.8, "flags": []}))
    qc = qc_table_file([metrics], tmp_path / "qc.tsv", failed_inputs=failed).set_index("scan")
    assert qc.at["sub-b", "passed"] and not qc.at["sub-a", "passed"] and qc.at["sub-a", "excluded"]
    assert qc.at["sub-a", "flags"] == "input_error" and qc.at["sub-a", "failure_reason"] == "truncated gzip file"
    assert failed_input_rows(None) == []


def test_cohort_outliers_are_judged_within_each_dataset(tmp_path):
    """A site with another contrast (here 5 synthetic-like scans next to 8 real ones) is not an outlier."""
    paths, datasets = [], {}
    for i, (site, contrast) in enumerate([("demo", 0.88 + 0.002 * k) for k in range(5)]
                                         + [("real", 0.50 + 0.005 * k) for k in range(8)]):
        path = tmp_path / f"{i}.json"
        path.write_text(json.dumps({"scan": f"sub-{site}{i}", "wm_csf_contrast": contrast, "flags": []}))
        paths.append(path)
        datasets[f"sub-{site}{i}"] = site
    pooled = qc_table_file(paths, tmp_path / "pooled.tsv")
    assert pooled.loc[pooled["scan"].str.startswith("sub-demo"), "flags"].eq("outlier_wm_csf_contrast").all()
    per_site = qc_table_file(paths, tmp_path / "qc.tsv", datasets=datasets)
    assert per_site["passed"].all() and per_site["dataset"].tolist() == list(datasets.values())
