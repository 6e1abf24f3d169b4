"""Non-NIfTI inputs: a T1w in another format in a BIDS anat/ folder is reported with how to convert it, and a
file named .nii/.nii.gz that is something else (MGH, DICOM, HDF5, HTML, text, ...) is named for what it is."""

import gzip
import json
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from brainvae.conform import load_nifti
from brainvae.errors import InputError
from brainvae.inputs import collect_samples


def _nifti(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4)), path)
    return path


def _mgh(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.MGHImage(np.ones((8, 8, 8), np.float32), np.eye(4)), path)
    return path


def _bids(root: Path, subjects: list[str]) -> Path:
    root.mkdir(parents=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "t", "BIDSVersion": "1.10.0"}))
    (root / "participants.tsv").write_text("participant_id\n" + "".join(f"sub-{s}\n" for s in subjects))
    _nifti(root / "sub-01/anat/sub-01_T1w.nii.gz")
    (root / "sub-01/anat/sub-01_T1w.json").write_text("{}")
    return root


def _collect(root: Path):
    return collect_samples([{"name": "t", "bids_dir": str(root), "role": "train"}])


def test_mgz_in_anat_is_refused_by_name_with_the_conversion(tmp_path):
    root = _bids(tmp_path / "bids", ["01", "02"])
    mgz = _mgh(root / "sub-02/anat/sub-02_T1w.mgz")
    with pytest.raises(InputError) as error:
        _collect(root)
    message = str(error.value)
    assert message.startswith(f"{mgz}: a FreeSurfer MGH image, not NIfTI")
    assert "mri_convert sub-02_T1w.mgz sub-02_T1w.nii.gz" in message and "brainvae import-table" in message


@pytest.mark.parametrize("name, words", [
    ("sub-02_T1w.mgh", "mri_convert sub-02_T1w.mgh sub-02_T1w.nii.gz"),
    ("sub-02_T1w.img", "an Analyze/NIfTI pair image"),
    ("sub-02_T1w.nrrd", "an NRRD image"),
    ("sub-02_T1w.mnc", "mnc2nii"),
    ("sub-02_T1w", "a folder (a DICOM series?), not NIfTI: BIDS raw data holds T1w images as .nii/.nii.gz only; "
                   "convert it (dcm2niix -z y -f sub-02_T1w sub-02_T1w)"),
])
def test_other_formats_in_anat_are_reported(tmp_path, name, words):
    root = _bids(tmp_path / "bids", ["01", "02"])
    path = root / "sub-02/anat" / name
    path.parent.mkdir(parents=True)
    if name.endswith("_T1w"):
        path.mkdir()
        (path / "IM0001.dcm").write_bytes(b"\x00" * 128 + b"DICM")
    else:
        path.write_bytes(b"image")
    with pytest.raises(InputError, match=f"^{re.escape(str(path))}: .*{re.escape(words)}"):
        _collect(root)


def test_nifti_next_to_other_files_is_indexed(tmp_path):
    root = _bids(tmp_path / "bids", ["01"])
    (root / "sub-01/anat/sub-01_T2w.mgz").write_bytes(b"not a T1w: left alone")
    assert _collect(root)["scan_key"].tolist() == ["sub-01"]


def _dicom() -> bytes:
    return b"\x00" * 128 + b"DICM" + b"\x02\x00\x00\x00UL\x04\x00" + bytes(200)


@pytest.mark.parametrize("name, content, match", [
    ("mgz.nii.gz", "mgz", "not a NIfTI file: it is a FreeSurfer MGH image (.mgz/.mgh): convert it with "
                          "`mri_convert in.mgz out.nii.gz`"),
    ("mgh.nii.gz", "mgh", "named .nii.gz but not gzip-compressed (it is a FreeSurfer MGH image"),
    ("mgh.nii", "mgh", "not a NIfTI file: it is a FreeSurfer MGH image"),
    ("plain.nii.gz", "nii", "named .nii.gz but not gzip-compressed (it is an uncompressed NIfTI-1 file: rename it "
                            "to .nii)"),
    ("dicom.nii", _dicom(), "it is a DICOM file: convert the series with dcm2niix"),
    ("dicom.nii.gz", gzip.compress(_dicom()), "it is a DICOM file"),
    ("minc2.nii.gz", gzip.compress(b"\x89HDF\r\n\x1a\n" + bytes(400)), "it is an HDF5 file (MINC-2?)"),
    ("page.nii.gz", b"<!DOCTYPE html>\n<html><body>Please log in</body></html>\n",
     "named .nii.gz but not gzip-compressed (it is an HTML page"),
    ("lfs.nii.gz", b"version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 4096\n",
     "(it is a Git LFS pointer, not the image: run `git lfs pull`)"),
    ("log.nii", b"dcm2niix version v1.0\nConversion required 0.1 seconds\n" * 10,
     "it is plain text starting 'dcm2niix version v1.0'"),
], ids=["mgz-as-nii.gz", "mgh-as-nii.gz", "mgh-as-nii", "nii-as-nii.gz", "dicom", "gzipped-dicom", "hdf5", "html",
        "git-lfs", "text"])
def test_misnamed_file_says_what_it_is(tmp_path, name, content, match):
    path = tmp_path / name
    if content in ("mgz", "mgh"):
        shutil.move(_mgh(tmp_path / f"src.{content}"), path)
    elif content == "nii":
        shutil.move(_nifti(tmp_path / "src.nii"), path)
    else:
        path.write_bytes(content)
    with pytest.raises(InputError, match=f"^{re.escape(str(path))}: .*{re.escape(match)}"):
        load_nifti(path)
