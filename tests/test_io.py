"""Atomic writes of NIfTI/JSON and hashing (brainvae.io)."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import stat
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from brainvae import io as bio


def _img() -> nib.Nifti1Image:
    data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    return nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0]))


def _only_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --- JSON --------------------------------------------------------------------------------------

def test_json_sorted_keys_numpy_types_and_roundtrip(tmp_path: Path) -> None:
    obj = {"b": np.float32(1.5), "a": [np.int64(3), np.bool_(True)], "c": {"z": np.arange(3), "y": None},
           "p": Path("x/y.nii.gz"), "t": (1, 2)}
    out = bio.atomic_write_json(obj, tmp_path / "sub" / "x.json")  # parent folder is created
    text = out.read_text()
    assert text.endswith("\n")
    assert list(json.loads(text)) == ["a", "b", "c", "p", "t"]
    assert text.index('"y"') < text.index('"z"')  # nested keys sorted too
    assert bio.read_json(out) == {"a": [3, True], "b": 1.5, "c": {"y": None, "z": [0, 1, 2]},
                                  "p": "x/y.nii.gz", "t": [1, 2]}
    # Deterministic bytes: writing the same object again gives the same file.
    again = bio.atomic_write_json(obj, tmp_path / "again.json")
    assert again.read_bytes() == out.read_bytes()


@pytest.mark.parametrize("bad, error", [({"x": float("nan")}, ValueError), ({"x": object()}, TypeError),
                                        ({"x": np.array([1.0, np.inf])}, ValueError)])
def test_json_failure_leaves_no_file_and_keeps_old(tmp_path: Path, bad: dict, error: type) -> None:
    target = tmp_path / "side.json"
    with pytest.raises(error):
        bio.atomic_write_json(bad, target)
    assert _only_files(tmp_path) == []
    target.write_text('{"old": 1}\n')
    with pytest.raises(error):
        bio.atomic_write_json(bad, target)
    assert target.read_text() == '{"old": 1}\n'
    assert _only_files(tmp_path) == ["side.json"]


def test_atomic_path_cleans_up_on_error_midway(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    with pytest.raises(RuntimeError):
        with bio.atomic_path(target) as tmp:
            assert tmp.parent == tmp_path and tmp.name.startswith(".out.txt.")
            tmp.write_text("partial")
            raise RuntimeError("killed")
    assert _only_files(tmp_path) == []


def test_written_files_respect_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        path = bio.atomic_write_text("hi", tmp_path / "a.txt")
    finally:
        os.umask(old)
    # mkstemp creates 0600 files; the output must be readable like any normally created file.
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


# --- NIfTI -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, gzipped", [("x.nii.gz", True), ("x.nii", False), ("X.NII.GZ", True)])
def test_nifti_roundtrip_and_compression_by_extension(tmp_path: Path, name: str, gzipped: bool) -> None:
    img = _img()
    path = bio.atomic_write_nifti(img, tmp_path / name)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") is gzipped
    back = nib.load(path)
    np.testing.assert_array_equal(back.get_fdata(), img.get_fdata())
    np.testing.assert_allclose(back.affine, img.affine)
    assert _only_files(tmp_path) == [name]


def test_nifti_failure_midway_leaves_no_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "out.nii.gz"

    def dying_save(img: nib.Nifti1Image, filename: os.PathLike) -> None:
        # Simulate a job killed during the write: some gzip bytes reach the disk, then it fails.
        with gzip.open(filename, "wb") as fh:
            fh.write(img.header.binaryblock)
        raise OSError("No space left on device")

    monkeypatch.setattr(bio.nib, "save", dying_save)
    with pytest.raises(OSError, match="No space"):
        bio.atomic_write_nifti(_img(), target)
    assert _only_files(tmp_path) == []

    # An earlier complete output is not clobbered by a failed rewrite.
    monkeypatch.undo()
    bio.atomic_write_nifti(_img(), target)
    before = target.read_bytes()
    monkeypatch.setattr(bio.nib, "save", dying_save)
    with pytest.raises(OSError):
        bio.atomic_write_nifti(_img(), target)
    assert target.read_bytes() == before
    assert _only_files(tmp_path) == ["out.nii.gz"]


def test_nifti_bad_extension(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="expected .nii or .nii.gz"):
        bio.atomic_write_nifti(_img(), tmp_path / "x.mgz")
    assert _only_files(tmp_path) == []


def test_nifti_suffix() -> None:
    assert bio.nifti_suffix("a/b.nii.gz") == ".nii.gz"
    assert bio.nifti_suffix(Path("b.nii")) == ".nii"
    with pytest.raises(ValueError):
        bio.nifti_suffix("b.gz")


def test_sha256_file(tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 + 17)
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert bio.sha256_file(path, chunk_size=1024) == hashlib.sha256(data).hexdigest()
