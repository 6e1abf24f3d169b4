"""brainvae import-ixi / import-hcp / import-table on small fake source trees: the BIDS they write is what
brainvae.inputs reads, nothing is skipped silently, and an existing folder is never overwritten without --force."""

import json
import shutil
import subprocess

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from brainvae.cli import main
from brainvae.errors import InputError
from brainvae.importers import hcp_dataset, ixi_dataset, read_table, table_dataset, write_dataset
from brainvae.inputs import collect_samples


def _nifti(path, value=1.0):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.full((8, 8, 8), value, np.float32), np.diag([1.0, 1.0, 1.0, 1.0])), path)
    return path


def _samples(bids, **extra):
    """The scans brainvae's workflow reads from an imported dataset."""
    return collect_samples([{"name": "imported", "bids_dir": str(bids), "role": "train", **extra}])


@pytest.fixture
def ixi(tmp_path):
    src = tmp_path / "IXI-T1"
    for name in ("IXI002-Guys-0828-T1.nii.gz", "IXI012-HH-1211-T1.nii.gz", "IXI035-IOP-0873-T1.nii.gz"):
        _nifti(src / name)
    _nifti(src / "IXI002-Guys-0828-T2.nii.gz")
    (src / "notes.txt").write_text("downloaded 2026\n")
    (src / "._IXI002-Guys-0828-T1.nii.gz").write_bytes(b"macOS resource fork")
    demographics = tmp_path / "IXI.csv"
    demographics.write_text("IXI_ID,\"SEX_ID (1=m, 2=f)\",HEIGHT,AGE\n2,2,164,35.8\n12,1,175,38.78\n"
                            "99,1,180,50\n")
    return src, demographics


def test_import_ixi_writes_bids_that_brainvae_reads(ixi, tmp_path, capsys):
    src, demographics = ixi
    out = tmp_path / "bids"
    assert main(["import-ixi", str(src), str(out), "--demographics", str(demographics)]) == 0
    printed = capsys.readouterr().out
    assert f"skipped {src / 'IXI002-Guys-0828-T2.nii.gz'}: an IXI T2 image, not T1" in printed
    assert f"skipped {src / 'notes.txt'}: name does not match IXI###-<Site>-####-T1.nii.gz" in printed
    assert "no row for IXI035; its age and sex are n/a" in printed
    assert "wrote 3 T1w images of 3 participants" in printed

    image = out / "sub-IXI002" / "anat" / "sub-IXI002_T1w.nii.gz"
    assert image.is_file() and not image.is_symlink()
    sidecar = json.loads(image.with_name("sub-IXI002_T1w.json").read_text())
    assert sidecar == {"InstitutionName": "Guy's Hospital, London", "Manufacturer": "Philips",
                       "MagneticFieldStrength": 1.5}
    assert json.loads((out / "sub-IXI012/anat/sub-IXI012_T1w.json").read_text())["MagneticFieldStrength"] == 3.0
    participants = pd.read_csv(out / "participants.tsv", sep="\t", dtype=str, keep_default_na=False)
    assert participants.to_dict("records") == [
        {"participant_id": "sub-IXI002", "age": "35.80", "sex": "F", "group": "euploid", "site": "Guys"},
        {"participant_id": "sub-IXI012", "age": "38.78", "sex": "M", "group": "euploid", "site": "HH"},
        {"participant_id": "sub-IXI035", "age": "n/a", "sex": "n/a", "group": "euploid", "site": "IOP"}]
    assert set(json.loads((out / "participants.json").read_text())) == set(participants.columns)
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["BIDSVersion"] == "1.10.0" and description["DatasetType"] == "raw"
    assert description["GeneratedBy"][0]["Name"] == "brainvae import-ixi"
    assert "IXI002-Guys-0828-T2.nii.gz: an IXI T2 image" in (out / "README").read_text()

    samples = _samples(out, label_column="group", covariates=["age", "sex"])
    assert samples["scan"].tolist() == ["sub-IXI002/anat/sub-IXI002", "sub-IXI012/anat/sub-IXI012",
                                        "sub-IXI035/anat/sub-IXI035"]
    assert samples["label"].tolist() == ["euploid"] * 3 and samples["sex"].tolist() == ["F", "M", "n/a"]


def test_rerun_needs_force_and_force_replaces_only_an_import(ixi, tmp_path, capsys):
    src, _ = ixi
    out = tmp_path / "bids"
    assert main(["import-ixi", str(src), str(out)]) == 0
    (src / "IXI012-HH-1211-T1.nii.gz").unlink()
    assert main(["import-ixi", str(src), str(out)]) == 1
    assert f"{out}: exists and is not empty; choose another folder, or pass --force" in capsys.readouterr().err
    assert (out / "sub-IXI012").is_dir()
    assert main(["import-ixi", str(src), str(out), "--force"]) == 0
    assert not (out / "sub-IXI012").exists() and (out / "sub-IXI002").is_dir()

    other = tmp_path / "my_thesis"
    (other / "chapter1.tex").parent.mkdir()
    (other / "chapter1.tex").write_text("precious")
    assert main(["import-ixi", str(src), str(other), "--force"]) == 1
    assert "not written by a brainvae importer" in capsys.readouterr().err
    assert (other / "chapter1.tex").read_text() == "precious"
    assert not list(tmp_path.glob(".*partial*"))


def test_symlink_and_empty_source(ixi, tmp_path):
    src, _ = ixi
    out = write_dataset(ixi_dataset(src), tmp_path / "linked", copy=False)
    link = out / "sub-IXI002/anat/sub-IXI002_T1w.nii.gz"
    assert link.is_symlink() and link.resolve() == (src / "IXI002-Guys-0828-T1.nii.gz").resolve()
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "IXI002-T1.nii.gz").write_bytes(b"")
    with pytest.raises(InputError, match="nothing to import from IXI: no usable T1w image\n.*IXI002-T1.nii.gz: "
                                         "name does not match"):
        write_dataset(ixi_dataset(empty), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_xls_that_pandas_cannot_read_says_save_as_csv(tmp_path):
    sheet = tmp_path / "IXI.xls"
    sheet.write_bytes(b"\xd0\xcf\x11\xe0 not really a workbook")
    with pytest.raises(InputError, match=r"IXI\.xls: .*save .*as CSV"):
        read_table(sheet)


@pytest.fixture
def hcp(tmp_path):
    src = tmp_path / "HCP"
    _nifti(src / "100307/unprocessed/3T/T1w_MPR1/100307_3T_T1w_MPR1.nii.gz")
    _nifti(src / "100307/T1w/T1w_acpc_dc_restore.nii.gz", 2.0)
    _nifti(src / "100408/T1w/T1w_acpc_dc_restore.nii.gz")
    _nifti(src / "101915/unprocessed/3T/T1w_MPR1/101915_3T_T1w_MPR1.nii.gz")
    _nifti(src / "101915/unprocessed/3T/T1w_MPR2/101915_3T_T1w_MPR2.nii.gz")
    _nifti(src / "1020_bad/T1w/T1w_acpc_dc_restore.nii.gz")
    (src / "102311/MNINonLinear").mkdir(parents=True)
    behavioral = tmp_path / "unrestricted.csv"
    behavioral.write_text("Subject,Release,Gender,Age\n100307,Q1,F,26-30\n100408,Q1,M,31-35\n101915,Q3,F,36+\n")
    return src, behavioral


def test_import_hcp_prefers_unprocessed_and_writes_age_midpoints(hcp, tmp_path, capsys):
    src, behavioral = hcp
    out = tmp_path / "bids"
    assert main(["import-hcp", str(src), str(out), "--behavioral", str(behavioral)]) == 0
    printed = capsys.readouterr().out
    assert f"skipped {src / '1020_bad'}: subject '1020_bad' is not a valid BIDS label" in printed
    assert f"skipped {src / '102311'}: no T1w image (looked for unprocessed/3T/T1w_MPR1/" in printed
    assert "2 subjects from the unprocessed layout" in printed and "1 subjects from the preprocessed" in printed
    sidecar = json.loads((out / "sub-100307/anat/sub-100307_T1w.json").read_text())
    assert sidecar["HCPLayout"] == "unprocessed"
    assert nib.load(out / "sub-100307/anat/sub-100307_T1w.nii.gz").get_fdata().max() == 1.0
    assert json.loads((out / "sub-100408/anat/sub-100408_T1w.json").read_text())["HCPLayout"] == "preprocessed"
    participants = pd.read_csv(out / "participants.tsv", sep="\t", dtype=str, keep_default_na=False)
    assert participants.to_dict("records") == [
        {"participant_id": "sub-100307", "age": "28", "age_range": "26-30", "sex": "F", "group": "euploid"},
        {"participant_id": "sub-100408", "age": "33", "age_range": "31-35", "sex": "M", "group": "euploid"},
        {"participant_id": "sub-101915", "age": "n/a", "age_range": "36+", "sex": "F", "group": "euploid"}]
    samples = _samples(out, label_column="group", covariates=["age"])
    assert samples["scan_key"].tolist() == ["sub-100307", "sub-100408", "sub-101915_run-1", "sub-101915_run-2"]


def test_import_hcp_layout_option(hcp, tmp_path):
    src, _ = hcp
    dataset = hcp_dataset(src, layout="preprocessed")
    assert [s.sub for s in dataset.scans] == ["100307", "100408"]
    assert dataset.scans[0].source.name == "T1w_acpc_dc_restore.nii.gz"
    assert (str(src / "101915"), "no T1w image (looked for T1w/T1w_acpc_dc_restore.nii.gz)") in dataset.skipped
    assert [s.sub for s in hcp_dataset(src, layout="unprocessed").scans] == ["100307", "101915", "101915"]


def test_import_table_with_sessions_and_mgz(tmp_path, capsys):
    data = tmp_path / "scans"
    _nifti(data / "a1.nii.gz")
    _nifti(data / "a2.nii")
    img = nib.load(_nifti(data / "b.nii.gz", 3.0))
    nib.save(nib.MGHImage(img.get_fdata(dtype=np.float32), img.affine), data / "b1.mgz")
    (data / "c1.nrrd").write_bytes(b"NRRD0004\n")
    table = tmp_path / "scans.csv"
    table.write_text("subject,visit,file,age,sex,group\n"
                     "sub-A01,1,scans/a1.nii.gz,60,F,DS\nA01,2,scans/a2.nii,61,F,DS\n"
                     "B01,1,scans/b1.mgz,55,M,euploid\nB01,1,scans/b.nii.gz,55,M,euploid\n"
                     "C-01,1,scans/a1.nii.gz,50,M,DS\nC02,1,scans/c1.nrrd,50,M,DS\nC03,1,scans/gone.nii.gz,1,M,DS\n")
    out = tmp_path / "bids"
    assert main(["import-table", str(table), str(out), "--path-column", "file", "--session-column", "visit",
                 "--columns", "age", "sex", "group"]) == 0
    printed = capsys.readouterr().out
    assert f"skipped {table}, line 5: same subject and session as line 4 (give a session column)" in printed
    assert f"skipped {table}, line 6: subject 'C-01' is not a valid BIDS label" in printed
    assert f"skipped {table}, line 7: 'c1.nrrd' is not a .nii, .nii.gz, .mgz or .mgh file" in printed
    assert f"skipped {table}, line 8: image '{data / 'gone.nii.gz'}' not found" in printed
    converted = out / "sub-B01/ses-1/anat/sub-B01_ses-1_T1w.nii.gz"
    assert nib.load(converted).get_fdata().max() == 3.0
    assert np.allclose(nib.load(converted).affine, img.affine)
    assert json.loads(converted.with_name("sub-B01_ses-1_T1w.json").read_text()) == {"ConvertedFrom": "b1.mgz"}
    samples = _samples(out, label_column="group", labels=["DS", "euploid"], covariates=["age"])
    assert samples["scan_key"].tolist() == ["sub-A01_ses-1", "sub-A01_ses-2", "sub-B01_ses-1"]
    assert samples["path"].str.endswith(("_T1w.nii.gz", "_T1w.nii")).all()
    assert samples["age"].tolist() == ["60", "60", "55"]


def test_import_table_names_a_missing_column(tmp_path):
    table = tmp_path / "t.csv"
    table.write_text("id,path\n1,x.nii.gz\n")
    with pytest.raises(InputError, match=r"t\.csv: no column 'subject' \(columns are: id, path\)"):
        table_dataset(table)


def _python_validator():
    try:
        from bids_validator import BIDSValidator
    except ImportError:
        return None
    return BIDSValidator()


def _validator_command():
    """The schema-based validator (PyPI bids-validator-deno, or npm's bids-validator): it runs offline."""
    return shutil.which("bids-validator-deno") or shutil.which("bids-validator")


def test_imported_trees_pass_a_bids_validator(ixi, hcp, tmp_path):
    validator, command = _python_validator(), _validator_command()
    if validator is None and command is None:
        pytest.skip("no BIDS validator installed (pip install bids_validator or bids-validator-deno)")
    (ixi_src, demographics), (hcp_src, behavioral) = ixi, hcp
    trees = [write_dataset(ixi_dataset(ixi_src, demographics), tmp_path / "ixi_bids"),
             write_dataset(hcp_dataset(hcp_src, behavioral), tmp_path / "hcp_bids")]
    for tree in trees:
        if validator is not None:
            files = ["/" + p.relative_to(tree).as_posix() for p in tree.rglob("*") if p.is_file()]
            assert [f for f in files if not validator.is_bids(f)] == []
        if command is not None:
            result = subprocess.run([command, str(tree), "--format", "json"], capture_output=True, text=True,
                                    timeout=300)
            issues = json.loads(result.stdout)["issues"]["issues"]
            errors = [issue for issue in issues if issue["severity"] == "error"]
            assert errors == [], errors
