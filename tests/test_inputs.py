"""BIDS folders -> samples table (brainvae.inputs)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest

from brainvae.errors import ConfigError, InputError
from brainvae.inputs import SAMPLE_COLUMNS, collect_samples, read_samples, write_samples


def make_bids(root: Path, scans: list[str], participants: str | None = None,
              description: bool = True) -> Path:
    """Tiny BIDS tree: empty files at the relative ``scans`` paths, plus the top-level files."""
    root.mkdir(parents=True, exist_ok=True)
    if description:
        (root / "dataset_description.json").write_text(
            json.dumps({"Name": root.name, "BIDSVersion": "1.9.0"}))
    for rel in scans:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).touch()
    if participants is not None:
        (root / "participants.tsv").write_text(participants)
    return root


def tsv(*rows: str, header: str = "participant_id\tgroup\tage\tsex") -> str:
    return "\n".join([header, *rows]) + "\n"


def dataset(root: Path, **overrides) -> dict:
    return {"name": "A", "bids_dir": str(root), "role": "both", "label_column": "group",
            "labels": ["euploid", "DS"], **overrides}


def error_of(datasets: list[dict], base_dir: Path | str = ".") -> str:
    with pytest.raises(InputError) as info:
        collect_samples(datasets, base_dir)
    return str(info.value)


@pytest.fixture
def simple(tmp_path: Path) -> Path:
    return make_bids(tmp_path / "A", ["sub-01/anat/sub-01_T1w.nii.gz",
                                      "sub-02/anat/sub-02_T1w.nii"],
                     tsv("sub-01\tDS\t30\tF", "sub-02\teuploid\t41\tM"))


# --- parsing ---------------------------------------------------------------------------------

def test_multi_session_multi_run(tmp_path: Path) -> None:
    root = make_bids(tmp_path / "A", [
        "sub-01/ses-1/anat/sub-01_ses-1_run-1_T1w.nii.gz",
        "sub-01/ses-1/anat/sub-01_ses-1_run-02_T1w.nii",
        "sub-01/ses-2/anat/sub-01_ses-2_acq-mprage_T1w.nii.gz",
        "sub-01/ses-2/anat/sub-01_ses-2_T1w.json",          # sidecar: not a scan
        "sub-01/ses-2/anat/._sub-01_ses-2_T1w.nii.gz",      # macOS resource fork
        "sub-02/anat/sub-02_rec-norm_T1w.nii.gz",
        "sub-02/anat/sub-02_T2w.nii.gz",
    ], tsv("sub-01\tDS\t30\tF", "sub-02\teuploid\t41\tM"))
    df = collect_samples([dataset(root)])
    assert list(df.columns) == list(SAMPLE_COLUMNS)
    assert list(df["scan"]) == [
        "sub-01/ses-1/anat/sub-01_ses-1_run-02",   # zero padding kept as written
        "sub-01/ses-1/anat/sub-01_ses-1_run-1",
        "sub-01/ses-2/anat/sub-01_ses-2_acq-mprage",
        "sub-02/anat/sub-02_rec-norm",
    ]
    first = df.iloc[0]
    assert (first.scan_key, first.subject, first.session, first.run, first.acquisition) == \
        ("sub-01_ses-1_run-02", "01", "1", "02", "")
    assert first.path == str(root / "sub-01/ses-1/anat/sub-01_ses-1_run-02_T1w.nii")
    assert list(df["acquisition"]) == ["", "", "mprage", ""]
    assert list(df["label"]) == ["DS", "DS", "DS", "euploid"]
    assert df["train"].dtype == bool and df["train"].all() and df["analyse"].all()
    assert df["scan"].is_unique


def test_roles_sorting_and_relative_bids_dir(tmp_path: Path) -> None:
    make_bids(tmp_path / "data/B", ["sub-b1/anat/sub-b1_T1w.nii.gz"], tsv("sub-b1\tDS\t1\tF"))
    make_bids(tmp_path / "data/A", ["sub-a1/anat/sub-a1_T1w.nii.gz"], tsv("sub-a1\tDS\t1\tF"))
    df = collect_samples([
        {"name": "B", "bids_dir": "data/B", "role": "analyse", "label_column": "group"},
        {"name": "A", "bids_dir": "data/A", "role": "train", "label_column": "group"},
    ], base_dir=tmp_path)
    assert list(df["dataset"]) == ["A", "B"]
    assert list(df["train"]) == [True, False] and list(df["analyse"]) == [False, True]
    assert Path(df["path"][0]).is_absolute()


def test_derivatives_sourcedata_and_stray_files_ignored(simple: Path) -> None:
    make_bids(simple, ["derivatives/fmriprep/sub-09/anat/sub-09_T1w.nii.gz",
                       "sourcedata/sub-10/anat/sub-10_T1w.nii.gz",
                       "code/sub-11/anat/sub-11_T1w.nii.gz",
                       "sub-01/func/sub-01_T1w.nii.gz"])
    df = collect_samples([dataset(simple)])
    assert list(df["subject"]) == ["01", "02"]


def test_include_exclude_and_covariates(simple: Path) -> None:
    make_bids(simple, ["sub-03/anat/sub-03_T1w.nii.gz"],
              tsv("sub-01\tDS\t30\tF", "sub-02\teuploid\t41\tM", "sub-03\tDS\tn/a\tF",
                  header="participant_id\tgroup\tage\tsex"))
    df = collect_samples([dataset(simple, include=["sub-01", "03"], exclude=["01"],
                                  covariates=["age", "handedness"])])
    assert list(df["subject"]) == ["03"]
    assert list(df.columns)[-2:] == ["age", "handedness"]
    assert df.loc[0, "age"] == "n/a" and df.loc[0, "handedness"] == ""  # strings, verbatim


def test_participants_read_as_strings(tmp_path: Path) -> None:
    root = make_bids(tmp_path / "A", ["sub-001/anat/sub-001_T1w.nii.gz"],
                     tsv("sub-001\tTrue\t=1+1\tNaN"))
    df = collect_samples([dataset(root, labels=["True"], covariates=["age", "sex"])])
    assert df.loc[0, ["subject", "label", "age", "sex"]].tolist() == ["001", "True", "=1+1", "NaN"]


# --- errors ----------------------------------------------------------------------------------

def test_bids_dir_missing_not_dir_no_description(tmp_path: Path) -> None:
    (tmp_path / "file").touch()
    make_bids(tmp_path / "nodesc", ["sub-01/anat/sub-01_T1w.nii.gz"], tsv(), description=False)
    msg = error_of([dataset(tmp_path / "missing", name="M"), dataset(tmp_path / "file", name="F"),
                    dataset(tmp_path / "nodesc", name="N")])
    assert msg.startswith("datasets: 3 problems")
    assert f"{tmp_path / 'missing'}: bids_dir of dataset 'M' does not exist" in msg
    assert f"{tmp_path / 'file'}: bids_dir of dataset 'F' is not a directory" in msg
    assert f"{tmp_path / 'nodesc' / 'dataset_description.json'}: missing" in msg


def test_no_t1w(tmp_path: Path) -> None:
    root = make_bids(tmp_path / "A", ["sub-01/anat/sub-01_T2w.nii.gz"], tsv())
    msg = error_of([dataset(root)])
    assert msg.startswith(f"{root}: no T1w images found")
    assert "sub-*/anat/*_T1w.nii[.gz]" in msg and "sub-*/ses-*/anat/*_T1w.nii[.gz]" in msg


def test_duplicate_participant_across_datasets(tmp_path: Path) -> None:
    a = make_bids(tmp_path / "A", ["sub-01/anat/sub-01_T1w.nii.gz"], tsv("sub-01\tDS\t1\tF"))
    b = make_bids(tmp_path / "B", ["sub-01/anat/sub-01_T1w.nii.gz"], tsv("sub-01\tDS\t1\tF"))
    msg = error_of([dataset(a, name="A"), dataset(b, name="B")])
    assert msg.startswith("sub-01: participant ID used by datasets 'A' and 'B'")
    # ...and excluding it from one dataset resolves it (B then has no subjects left, which
    # is itself reported, so give B a second subject).
    make_bids(b, ["sub-02/anat/sub-02_T1w.nii.gz"], tsv("sub-01\tDS\t1\tF", "sub-02\tDS\t1\tF"))
    df = collect_samples([dataset(a, name="A"), dataset(b, name="B", exclude=["sub-01"])])
    assert list(zip(df["dataset"], df["subject"])) == [("A", "01"), ("B", "02")]


def test_subjects_missing_from_participants(simple: Path) -> None:
    (simple / "participants.tsv").write_text(tsv("sub-01\tDS\t1\tF"))
    make_bids(simple, ["sub-03/anat/sub-03_T1w.nii.gz"])
    msg = error_of([dataset(simple)])
    assert msg.startswith(f"{simple / 'participants.tsv'}: subjects with T1w scans are not listed")
    assert "sub-02, sub-03" in msg


@pytest.mark.parametrize("content, reason", [
    (None, "participants.tsv is missing"),
    ("subject\tgroup\nsub-01\tDS\n", "no column 'participant_id'"),
    ("participant_id\tdiagnosis\nsub-01\tDS\n", "no column 'group'"),
    ("", "cannot read as a tab-separated table"),
])
def test_participants_file_problems(tmp_path: Path, content: str | None, reason: str) -> None:
    root = make_bids(tmp_path / "A", ["sub-01/anat/sub-01_T1w.nii.gz"], content)
    msg = error_of([dataset(root)])
    assert msg.startswith(f"{root / 'participants.tsv'}: {reason}")


def test_bad_and_empty_labels(tmp_path: Path) -> None:
    root = make_bids(tmp_path / "A", [f"sub-0{i}/anat/sub-0{i}_T1w.nii.gz" for i in range(1, 6)],
                     tsv("sub-01\tDS\t1\tF", "sub-02\tTrisomy\t1\tF", "sub-03\t\t1\tF",
                         "sub-04\tn/a\t1\tF", "sub-05\tNaN\t1\tF"))
    msg = error_of([dataset(root)])
    assert msg.startswith(f"{root / 'participants.tsv'}: column 'group' must be one of euploid, DS")
    assert "bad values: sub-02='Trisomy', sub-03 (empty), sub-04 (empty), sub-05 (empty)" \
        in msg
    # Without a list of allowed labels any non-empty value is fine, empty still is not.
    msg = error_of([dataset(root, labels=None)])
    assert "must be a non-empty value; bad values: sub-03 (empty), sub-04 (empty), " \
        "sub-05 (empty)" in msg


def test_invalid_labels_in_folders_files_and_participants(tmp_path: Path) -> None:
    root = make_bids(tmp_path / "A", [
        "sub-01/anat/sub-01_T1w.nii.gz",
        "sub-a_b/anat/sub-a_b_T1w.nii.gz",          # ancpbids silently skips these
        "sub-x.y/anat/sub-x.y_T1w.nii.gz",
        "sub-sp ace/anat/sub-sp ace_T1w.nii.gz",
        "sub-01/ses-1_2/anat/sub-01_ses-1_2_T1w.nii.gz",
        "sub-01/anat/sub-01_run-1.5_T1w.nii.gz",
        "sub-01/anat/sub-01_echo-1_T1w.nii.gz",
        "sub-01/anat/sub-02_T1w.nii.gz",
    ], tsv("sub-01\tDS\t1\tF", "sub-../x\tDS\t1\tF", "01\tDS\t1\tF"))
    msg = error_of([dataset(root)])
    for where, reason in [
        (root / "sub-a_b", "subject folder label 'a_b' is not a BIDS label"),
        (root / "sub-x.y", "subject folder label 'x.y' is not a BIDS label"),
        (root / "sub-sp ace", "subject folder label 'sp ace' is not a BIDS label"),
        (root / "sub-01/ses-1_2", "session folder label '1_2' is not a BIDS label"),
        (root / "sub-01/anat/sub-01_run-1.5_T1w.nii.gz",
         "not a valid BIDS T1w file name: run label '1.5' is not a BIDS label"),
        (root / "sub-01/anat/sub-01_echo-1_T1w.nii.gz",
         "not a valid BIDS T1w file name: entity 'echo' is not supported"),
        (root / "sub-01/anat/sub-02_T1w.nii.gz",
         "file name says sub-02/anat but it lies in sub-01/anat"),
        (root / "participants.tsv", "participant_id values must be 'sub-<label>'"),
    ]:
        assert f"{where}: {reason}" in msg, (where, msg)
    assert "line 3: 'sub-../x', line 4: '01'" in msg


def test_include_exclude_typos(simple: Path) -> None:
    msg = error_of([dataset(simple, include=["sub-01", "sub-1"], exclude=["sub-99"])])
    assert "datasets[A].include: no subject with T1w scans" in msg and ": 1" in msg
    assert "datasets[A].exclude: no subject with T1w scans" in msg and ": 99" in msg


def test_duplicate_scan_nii_and_niigz(simple: Path) -> None:
    make_bids(simple, ["sub-01/anat/sub-01_T1w.nii"])
    msg = error_of([dataset(simple)])
    assert "sub-01_T1w.nii.gz: same scan as" in msg or "sub-01_T1w.nii: same scan as" in msg


def test_broken_symlink(simple: Path) -> None:
    link = simple / "sub-01/anat/sub-01_run-2_T1w.nii.gz"
    os.symlink(simple / "nowhere.nii.gz", link)
    assert error_of([dataset(simple)]).startswith(f"{link}: not a readable file")


def test_config_errors(simple: Path) -> None:
    with pytest.raises(ConfigError, match=r"datasets\[0\].role"):
        collect_samples([dataset(simple, role="test")])
    with pytest.raises(ConfigError, match="used twice"):
        collect_samples([dataset(simple), dataset(simple)])
    with pytest.raises(ConfigError, match="label_column: required"):
        collect_samples([dataset(simple, label_column=None)])
    with pytest.raises(ConfigError, match="clash"):
        collect_samples([dataset(simple, covariates=["path"])])


# --- samples file ----------------------------------------------------------------------------

def test_write_samples_roundtrip_and_noop_keeps_mtime(simple: Path, tmp_path: Path) -> None:
    df = collect_samples([dataset(simple, covariates=["age"])])
    out = tmp_path / "out/samples.tsv"
    assert write_samples(df, out) is True
    os.utime(out, (1_000_000, 1_000_000))
    assert write_samples(collect_samples([dataset(simple, covariates=["age"])]), out) is False
    assert out.stat().st_mtime == 1_000_000
    back = read_samples(out)
    pd.testing.assert_frame_equal(back, df)
    assert write_samples(df.iloc[:1], out) is True and out.stat().st_mtime != 1_000_000


def test_read_samples_rejects_other_tables(tmp_path: Path) -> None:
    bad = tmp_path / "x.tsv"
    bad.write_text("a\tb\n1\t2\n")
    with pytest.raises(InputError, match=rf"^{bad}: not a samples table"):
        read_samples(bad)
