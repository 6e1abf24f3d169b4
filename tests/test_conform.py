"""Validate-and-conform step (brainvae.conform): real scans and synthetic broken inputs."""

from __future__ import annotations

import csv
import gzip
import json
import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.orientations import axcodes2ornt, ornt_transform

import brainvae
from brainvae.conform import conform_image, conform_scan, load_nifti
from brainvae.errors import ConfigError, InputError

REAL = Path(__file__).parent / "data" / "real_t1w"
REAL_SCANS = sorted(p.relative_to(REAL).as_posix() for p in REAL.glob("*/*.nii.gz"))
with open(REAL / "MANIFEST.tsv", newline="") as _fh:
    MANIFEST = {row["local_path"]: row for row in csv.DictReader(_fh, delimiter="\t")}

SIDECAR_KEYS = {
    "Sources", "SpatialReference", "SkullStripped", "SourcePath", "SourceFormat", "SourceDataType",
    "OriginalShape", "OriginalAxisCodes", "OriginalVoxelSizeMm", "OriginalAffine", "AffineSource",
    "OriginalSformCode", "OriginalQformCode", "SformQformMaxDiffMm", "ScaleSlope", "ScaleIntercept",
    "ScaleFactorsApplied", "NumberOfVolumes", "VolumeIndex", "Shape", "VoxelSizeMm", "Orientation",
    "Affine", "DataType", "SformCode", "QformCode", "ObliquityDeg", "ObliquityPerAxisDeg", "Anisotropy",
    "IntensityMin", "IntensityMax", "IntensityPercentiles", "Warnings", "BrainvaeVersion",
}


# --- helpers -----------------------------------------------------------------------------------

def _pattern(shape: tuple[int, ...], dtype: type = np.float32) -> np.ndarray:
    """Distinct value per voxel, so any wrong flip/permutation shows up."""
    return np.arange(np.prod(shape), dtype=np.float64).reshape(shape).astype(dtype) + 1


def _img(shape: tuple[int, ...] = (6, 7, 8), zooms: tuple[float, ...] = (1.0, 1.0, 1.0),
         data: np.ndarray | None = None, affine: np.ndarray | None = None) -> nib.Nifti1Image:
    if affine is None:
        affine = np.diag([*zooms, 1.0])
        affine[:3, 3] = [-10.0, -20.0, -30.0]
    return nib.Nifti1Image(_pattern(shape) if data is None else data, affine)


def _save(img: nib.Nifti1Image, path: Path) -> Path:
    nib.save(img, path)
    return path


def _rot_x(deg: float) -> np.ndarray:
    t = np.radians(deg)
    rot = np.eye(4)
    rot[1:3, 1:3] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
    return rot


def _reorient(img: nib.Nifti1Image, codes: str) -> nib.Nifti1Image:
    """The same image (same voxels at the same world positions) stored in another orientation."""
    xform = ornt_transform(axcodes2ornt(nib.aff2axcodes(img.affine)), axcodes2ornt(tuple(codes)))
    return img.as_reoriented(xform)


def assert_same_world_mapping(src: nib.Nifti1Image, src_data: np.ndarray, out: nib.Nifti1Image,
                              n_random: int = 300, seed: int = 0) -> None:
    """Voxels of ``src`` at world point w appear in ``out`` at the voxel that maps to w, unchanged.

    Checks the 8 corner voxels (so flips are caught at both ends of every axis) and random voxels.
    """
    shape = np.array(src_data.shape[:3])
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in shape], indexing="ij")).reshape(3, -1).T
    rng = np.random.default_rng(seed)
    ijk = np.vstack([corners, rng.integers(0, shape, size=(n_random, 3))])
    world = nib.affines.apply_affine(src.affine, ijk)
    out_ijk = nib.affines.apply_affine(np.linalg.inv(out.affine), world)
    # Reorientation never resamples: every voxel centre lands exactly on an output voxel centre.
    np.testing.assert_allclose(out_ijk, np.rint(out_ijk), atol=1e-3)
    out_ijk = np.rint(out_ijk).astype(int)
    out_data = np.asanyarray(out.dataobj)
    assert np.all(out_ijk >= 0) and np.all(out_ijk < np.array(out_data.shape))
    got = out_data[tuple(out_ijk.T)]
    want = src_data[tuple(ijk.T)].astype(np.float32)
    np.testing.assert_array_equal(got, want)


def assert_clean_header(out: nib.Nifti1Image, codes: str = "RAS") -> None:
    hdr = out.header
    assert nib.aff2axcodes(out.affine) == tuple(codes)
    assert hdr.get_data_dtype() == np.float32
    assert np.asanyarray(out.dataobj).dtype == np.float32
    assert hdr.get_xyzt_units() == ("mm", "sec")
    assert int(hdr["sform_code"]) > 0 and int(hdr["qform_code"]) > 0
    np.testing.assert_allclose(hdr.get_sform(), out.affine, atol=1e-5)
    np.testing.assert_allclose(hdr.get_qform(), out.affine, atol=1e-4)
    np.testing.assert_allclose(hdr.get_zooms()[:3], nib.affines.voxel_sizes(out.affine), rtol=1e-5)


# --- real scans --------------------------------------------------------------------------------

@pytest.mark.parametrize("rel", REAL_SCANS)
def test_real_scan_conforms_losslessly(rel: str) -> None:
    path = REAL / rel
    img = load_nifti(path)
    src_data = np.asanyarray(img.dataobj)
    out, side = conform_image(img, source=path)

    assert_clean_header(out)
    assert_same_world_mapping(img, src_data, out)
    # Only a flip/permutation: same voxel count, same voxel sizes, same values.
    assert sorted(out.shape) == sorted(img.shape)
    np.testing.assert_allclose(sorted(side["VoxelSizeMm"]), sorted(side["OriginalVoxelSizeMm"]), atol=1e-5)
    assert out.shape == tuple(side["Shape"])
    np.testing.assert_allclose(float(np.asanyarray(out.dataobj).sum(dtype=np.float64)),
                               float(src_data.sum(dtype=np.float64)), rtol=1e-6)
    # Oblique scans keep their obliquity: the output affine has the same rotation up to axis flips.
    np.testing.assert_allclose(side["ObliquityDeg"],
                               np.degrees(nib.affines.obliquity(img.affine)).max(), atol=1e-4)

    assert set(side) == SIDECAR_KEYS
    assert side["Orientation"] == "RAS" and side["DataType"] == "float32"
    assert side["OriginalAxisCodes"] == "".join(nib.aff2axcodes(img.affine))
    assert side["OriginalShape"] == list(img.shape)
    assert side["BrainvaeVersion"] == brainvae.__version__
    assert side["IntensityPercentiles"]["0.5"] <= side["IntensityPercentiles"]["99.5"] <= side["IntensityMax"]
    assert side["Warnings"] == []
    json.dumps(side, allow_nan=False)


def test_real_scan_specifics() -> None:
    """The properties the README promises are seen and recorded."""
    ixi = conform_image(load_nifti(REAL / "ixi/IXI012-HH-1211-T1_ds.nii.gz"), source="ixi")[1]
    assert ixi["OriginalAxisCodes"] == "PSR" and ixi["SourceDataType"] == "uint8"
    assert ixi["ScaleFactorsApplied"] and ixi["ScaleSlope"] == pytest.approx(13.895223617553711)
    assert ixi["Shape"] == [90, 120, 120] and ixi["Anisotropy"] == pytest.approx(1.0)

    ms = conform_image(load_nifti(REAL / "open_ms/longitudinal_raw_patient03_study2_T1W.nii.gz"), source="ms")[1]
    assert ms["OriginalAxisCodes"] == "LPS"
    assert ms["ObliquityDeg"] > 15  # clinical, strongly oblique: kept, recorded
    assert ms["Anisotropy"] == pytest.approx(3.0 / 0.91015583, rel=1e-4)

    bc = conform_image(load_nifti(REAL / "brainchop/t1_crop.nii.gz"), source="bc")[1]
    assert bc["OriginalAxisCodes"] == "LIA" and bc["AffineSource"] == "sform"
    assert bc["OriginalQformCode"] == 0 and bc["SformCode"] == 2 == bc["QformCode"]  # code kept


def test_conform_scan_writes_outputs(tmp_path: Path) -> None:
    rel = "ixi/IXI014-HH-1236-T1_ds.nii.gz"
    src = REAL / rel
    out_img, out_json = tmp_path / "anat" / "sub-01_T1w.nii.gz", tmp_path / "anat" / "sub-01_T1w.json"
    side = conform_scan(src, out_img, out_json, source_uri="bids:raw:sub-01/anat/sub-01_T1w.nii.gz")

    assert sorted(p.name for p in out_img.parent.iterdir()) == ["sub-01_T1w.json", "sub-01_T1w.nii.gz"]
    assert out_img.read_bytes()[:2] == b"\x1f\x8b"
    on_disk = json.loads(out_json.read_text())
    assert on_disk == side
    assert list(on_disk) == sorted(on_disk)
    assert side["SourceSHA256"] == MANIFEST[rel]["sha256"]
    assert side["SourcePath"] == str(src)
    assert side["Sources"] == ["bids:raw:sub-01/anat/sub-01_T1w.nii.gz"] and side["SpatialReference"] == side["Sources"][0]

    # What a later step reads back: float32, RAS, same world mapping and values as the input.
    back = nib.load(out_img)
    orig = nib.load(src)
    assert_clean_header(back)
    assert_same_world_mapping(orig, np.asanyarray(orig.dataobj), back)
    slope = float(back.header["scl_slope"])
    assert np.isnan(slope) or slope == 1.0  # no scaling stored (nibabel writes NaN for "none")


# --- orientation, obliquity, scaling -----------------------------------------------------------

@pytest.mark.parametrize("codes", ["LPS", "LAS", "PSR", "LIA", "ASL", "RAS"])
def test_any_orientation_becomes_ras_with_same_world_mapping(codes: str) -> None:
    ras = _img(shape=(5, 6, 7), zooms=(1.0, 1.5, 2.0))
    src = _reorient(ras, codes)
    assert "".join(nib.aff2axcodes(src.affine)) == codes
    out, side = conform_image(src, source="x.nii.gz")
    assert side["OriginalAxisCodes"] == codes
    # Reorienting back to RAS must give exactly the original RAS image.
    np.testing.assert_array_equal(np.asanyarray(out.dataobj), ras.get_fdata(dtype=np.float32))
    np.testing.assert_allclose(out.affine, ras.affine, atol=1e-9)
    assert side["VoxelSizeMm"] == [1.0, 1.5, 2.0]
    assert_same_world_mapping(src, np.asanyarray(src.dataobj), out, n_random=50)


def test_other_target_orientation() -> None:
    src = _img()
    out, side = conform_image(src, source="x", orientation="lps")
    assert nib.aff2axcodes(out.affine) == ("L", "P", "S") and side["Orientation"] == "LPS"
    assert_same_world_mapping(src, np.asanyarray(src.dataobj), out, n_random=50)


def test_oblique_affine_is_kept_not_resampled() -> None:
    ras = _img(shape=(8, 9, 10))
    oblique = nib.Nifti1Image(np.asanyarray(_reorient(ras, "LPS").dataobj), _rot_x(15) @ _reorient(ras, "LPS").affine)
    out, side = conform_image(oblique, source="x")
    assert out.shape == (8, 9, 10)
    np.testing.assert_array_equal(np.asanyarray(out.dataobj), np.asanyarray(ras.dataobj))  # no interpolation
    np.testing.assert_allclose(out.affine, _rot_x(15) @ ras.affine, atol=1e-9)
    assert side["ObliquityDeg"] == pytest.approx(15, abs=1e-4)
    assert side["ObliquityPerAxisDeg"] == pytest.approx([0, 15, 15], abs=1e-4)
    assert_same_world_mapping(oblique, np.asanyarray(oblique.dataobj), out, n_random=50)


def test_int16_with_scale_factors(tmp_path: Path) -> None:
    raw = (np.arange(6 * 7 * 8).reshape(6, 7, 8) % 300 - 100).astype(np.int16)
    img = nib.Nifti1Image(raw, np.diag([1.0, 1.0, 1.0, 1.0]))
    img.header.set_data_dtype(np.int16)
    img.header.set_slope_inter(0.25, 10.0)
    path = _save(img, tmp_path / "scaled.nii.gz")
    loaded = load_nifti(path)
    out, side = conform_image(loaded, source=path)
    data = np.asanyarray(out.dataobj)
    assert data.dtype == np.float32
    np.testing.assert_allclose(data, raw.astype(np.float64) * 0.25 + 10.0, rtol=1e-6)
    assert side["ScaleSlope"] == 0.25 and side["ScaleIntercept"] == 10.0 and side["ScaleFactorsApplied"]
    assert side["SourceDataType"] == "int16"


def test_nifti2_input_and_output_is_nifti1(tmp_path: Path) -> None:
    path = _save(nib.Nifti2Image(_pattern((5, 6, 7)), np.eye(4)), tmp_path / "n2.nii")
    out, side = conform_image(load_nifti(path), source=path)
    assert side["SourceFormat"] == "NIfTI-2" and type(out) is nib.Nifti1Image


def test_output_does_not_alias_input() -> None:
    src = _img()
    out, _ = conform_image(src, source="x")
    np.asanyarray(out.dataobj)[:] = 0
    assert np.asanyarray(src.dataobj).max() > 0


# --- dimensionality ----------------------------------------------------------------------------

def test_4d_needs_volume_index() -> None:
    img = _img(shape=(5, 6, 7, 12))
    with pytest.raises(InputError, match=r"^sub-01_T1w\.nii\.gz: 4D image with 12 volumes; "
                                         r"set conform\.volume_index to pick one$"):
        conform_image(img, source="sub-01_T1w.nii.gz")
    out, side = conform_image(img, source="x", volume_index=3)
    assert out.shape == (5, 6, 7)
    np.testing.assert_array_equal(np.asanyarray(out.dataobj), np.asanyarray(img.dataobj)[..., 3])
    assert side["VolumeIndex"] == 3 and side["NumberOfVolumes"] == 12 and side["OriginalShape"] == [5, 6, 7, 12]
    with pytest.raises(InputError, match="volume_index=12 is out of range .* 12 volumes"):
        conform_image(img, source="x", volume_index=12)


@pytest.mark.parametrize("shape", [(5, 6, 7, 1), (5, 6, 7, 1, 1)])
def test_singleton_trailing_axes_are_squeezed(shape: tuple[int, ...]) -> None:
    img = _img(shape=shape)
    out, side = conform_image(img, source="x")
    assert out.shape == (5, 6, 7) and side["VolumeIndex"] is None and side["NumberOfVolumes"] == 1
    np.testing.assert_array_equal(np.asanyarray(out.dataobj), np.asanyarray(img.dataobj).reshape(5, 6, 7))


def test_volume_index_ignored_for_3d() -> None:
    _, side = conform_image(_img(), source="x", volume_index=2)
    assert side["VolumeIndex"] is None


def test_5d_with_two_series_axes_rejected() -> None:
    with pytest.raises(InputError, match="5D image"):
        conform_image(_img(shape=(5, 6, 7, 2, 3)), source="x")


@pytest.mark.parametrize("shape, match", [((6, 7), "2D image"), ((6, 7, 1), "single slice"),
                                          ((1, 7, 8), "single slice")])
def test_2d_and_single_slice_rejected(shape: tuple[int, ...], match: str) -> None:
    affine = np.eye(4)
    img = nib.Nifti1Image(_pattern(shape), affine)
    with pytest.raises(InputError, match=f"^x.nii: {match}"):
        conform_image(img, source="x.nii")


# --- values --------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_voxels_rejected_with_count(bad: float) -> None:
    data = _pattern((6, 7, 8))
    data[0, 0, :3] = bad
    with pytest.raises(InputError, match="3 of 336 voxels are NaN or Inf"):
        conform_image(_img(data=data), source="x")


def test_all_zero_and_constant_rejected() -> None:
    with pytest.raises(InputError, match="all voxels are zero"):
        conform_image(_img(data=np.zeros((6, 7, 8), np.int16)), source="x")
    with pytest.raises(InputError, match=r"same value \(5\)"):
        conform_image(_img(data=np.full((6, 7, 8), 5, np.float32)), source="x")


def test_float64_beyond_float32_range_rejected() -> None:
    data = _pattern((6, 7, 8), np.float64)
    data[1, 1, 1] = 1e300
    with pytest.raises(InputError, match="float32 range"):
        conform_image(_img(data=data), source="x")


def test_complex_data_rejected() -> None:
    img = nib.Nifti1Image(_pattern((4, 5, 6)).astype(np.complex64), np.eye(4))
    with pytest.raises(InputError, match="unsupported voxel data type complex64"):
        conform_image(img, source="x")


# --- geometry --------------------------------------------------------------------------------------

@pytest.mark.parametrize("zooms, match", [((1.0, 1.0, 20.0), r"voxel size 1 x 1 x 20 mm is outside .*\[0.2, 8\]"),
                                          ((0.1, 1.0, 1.0), "outside the allowed range")])
def test_bad_voxel_sizes_rejected(zooms: tuple[float, ...], match: str) -> None:
    with pytest.raises(InputError, match=match):
        conform_image(_img(zooms=zooms), source="x")


def test_zero_voxel_size_rejected() -> None:
    # As in a file whose qform has pixdim 0 (nibabel will not build such an image directly).
    img = _img()
    img.header.set_sform(np.diag([1.0, 0.0, 1.0, 1.0]), code=1)
    img.header.set_qform(None, code=0)
    with pytest.raises(InputError, match="^x: degenerate affine: sform zero-length voxel axis"):
        conform_image(img, source="x")


def test_anisotropy_recorded_and_limited() -> None:
    out, side = conform_image(_img(zooms=(1.0, 1.0, 6.0)), source="x")
    assert side["Anisotropy"] == 6.0 and side["VoxelSizeMm"] == [1.0, 1.0, 6.0]
    with pytest.raises(InputError, match="too anisotropic .*max_anisotropy = 20"):
        conform_image(_img(zooms=(0.3, 0.3, 7.5)), source="x")
    _, side = conform_image(_img(zooms=(0.3, 0.3, 7.5)), source="x", max_anisotropy=30)
    assert side["Anisotropy"] == pytest.approx(25.0)
    # The voxel-size range itself is configurable.
    _, side = conform_image(_img(zooms=(1.0, 1.0, 20.0)), source="x", max_voxel_mm=25)
    assert side["Anisotropy"] == 20.0


def test_degenerate_sform_falls_back_to_qform() -> None:
    img = _img()
    singular = np.array([[1.0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    img.header.set_sform(singular, code=1)
    img.header.set_qform(np.diag([2.0, 2.0, 2.0, 1.0]), code=1)
    out, side = conform_image(img, source="x")
    assert side["AffineSource"] == "qform" and side["VoxelSizeMm"] == [2.0, 2.0, 2.0]
    assert any("sform is degenerate" in w for w in side["Warnings"])


def test_all_forms_degenerate_rejected() -> None:
    img = _img()
    bad = np.diag([1.0, 1.0, 1.0, 1.0])
    bad[0, 0] = np.nan
    img.header.set_sform(bad, code=1)
    img.header.set_qform(None, code=0)
    with pytest.raises(InputError, match="^x: degenerate affine: sform contains NaN"):
        conform_image(img, source="x")


def test_sheared_affine_rejected() -> None:
    sheared = np.eye(4)
    sheared[0, 1] = 0.1  # y axis tilted ~5.7 degrees towards x
    img = _img()
    img.header.set_sform(sheared, code=1)
    with pytest.raises(InputError, match="^x: sheared affine: voxel axes are 5.71 degrees from perpendicular"):
        conform_image(img, source="x")


def test_uncoded_affine_is_recorded() -> None:
    img = _img(zooms=(2.0, 2.0, 2.0))
    img.header.set_sform(None, code=0)
    img.header.set_qform(None, code=0)
    out, side = conform_image(img, source="x")
    assert side["AffineSource"] == "none" and side["SformCode"] == 1
    assert any("left-right may be wrong" in w for w in side["Warnings"])
    assert_clean_header(out)


def test_sform_qform_disagreement_warned() -> None:
    img = _img()
    shifted = img.affine.copy()
    shifted[:3, 3] += 5
    img.header.set_qform(shifted, code=1)
    _, side = conform_image(img, source="x")
    assert side["AffineSource"] == "sform" and side["SformQformMaxDiffMm"] == pytest.approx(5 * np.sqrt(3), abs=1e-4)
    assert any("disagree" in w for w in side["Warnings"])


@pytest.mark.parametrize("kwargs, key", [({"orientation": "RAR"}, "conform.orientation"),
                                         ({"orientation": "RASX"}, "conform.orientation"),
                                         ({"volume_index": -1}, "conform.volume_index"),
                                         ({"volume_index": True}, "conform.volume_index"),
                                         ({"min_voxel_mm": 2, "max_voxel_mm": 1}, "min_voxel_mm"),
                                         ({"max_anisotropy": 0.5}, "conform.max_anisotropy")])
def test_bad_options_are_config_errors(kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        conform_image(_img(), source="x", **kwargs)


# --- loading broken files --------------------------------------------------------------------------

def _good_file(tmp_path: Path, name: str = "good.nii.gz") -> Path:
    return _save(_img(shape=(20, 20, 20), data=np.random.default_rng(0).random((20, 20, 20)).astype(np.float32)),
                 tmp_path / name)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "sub-01_T1w.nii.gz"
    with pytest.raises(InputError, match=f"^{re.escape(str(path))}: file not found$"):
        load_nifti(path)


def test_truncated_gzip(tmp_path: Path) -> None:
    good = _good_file(tmp_path).read_bytes()
    path = tmp_path / "cut.nii.gz"
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(InputError, match=f"^{re.escape(str(path))}: truncated gzip file"):
        load_nifti(path)


def test_gzip_crc_error(tmp_path: Path) -> None:
    raw = bytearray(_good_file(tmp_path).read_bytes())
    raw[-8] ^= 0xFF  # CRC32 in the gzip trailer, which nibabel alone never checks
    path = tmp_path / "crc.nii.gz"
    path.write_bytes(bytes(raw))
    with pytest.raises(InputError, match="corrupt gzip data"):
        load_nifti(path)


def test_complete_gzip_of_truncated_nifti(tmp_path: Path) -> None:
    raw = gzip.decompress(_good_file(tmp_path).read_bytes())
    path = tmp_path / "short.nii.gz"
    path.write_bytes(gzip.compress(raw[:-100]))
    with pytest.raises(InputError, match="truncated NIfTI: decompressed data is .* needs"):
        load_nifti(path)


def test_truncated_uncompressed(tmp_path: Path) -> None:
    raw = _good_file(tmp_path, "good.nii").read_bytes()
    path = tmp_path / "short.nii"
    path.write_bytes(raw[: len(raw) - 1000])
    with pytest.raises(InputError, match="truncated NIfTI: file is"):
        load_nifti(path)


_RANDOM_BYTES = np.random.default_rng(7).bytes(2001)  # fixed: every pytest-xdist worker must collect the same tests


@pytest.mark.parametrize("name, content, match", [
    ("rand.nii.gz", _RANDOM_BYTES[1:], "named .nii.gz but not gzip-compressed"),
    ("rand.nii", b"\x00" + _RANDOM_BYTES[1:], "not a NIfTI file"),
    ("text.nii", b"this is not an image\n" * 30, "not a NIfTI file"),
    ("gztext.nii.gz", gzip.compress(b"this is not an image\n" * 30, mtime=0), "not a NIfTI file"),
    ("empty.nii.gz", b"", "empty file"),
    ("image.txt", b"whatever", r"not a NIfTI file name \(expected .nii or .nii.gz\)"),
], ids=["random-bytes-gz", "random-bytes", "text", "gzipped-text", "empty", "wrong-extension"])
def test_not_a_nifti(tmp_path: Path, name: str, content: bytes, match: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(InputError, match=f"^{re.escape(str(path))}: {match}"):
        load_nifti(path)


def test_gzip_named_nii(tmp_path: Path) -> None:
    path = tmp_path / "x.nii"
    path.write_bytes(_good_file(tmp_path).read_bytes())
    with pytest.raises(InputError, match="rename it to .nii.gz"):
        load_nifti(path)


def test_bad_magic(tmp_path: Path) -> None:
    raw = bytearray(_good_file(tmp_path, "good.nii").read_bytes())
    raw[344:348] = b"xyz\x00"
    path = tmp_path / "magic.nii"
    path.write_bytes(bytes(raw))
    with pytest.raises(InputError, match="not a NIfTI"):
        load_nifti(path)


def test_other_format_rejected(tmp_path: Path) -> None:
    path = tmp_path / "x.nii"
    nib.save(nib.AnalyzeImage(_pattern((4, 5, 6)), np.eye(4)), tmp_path / "x.img")
    # An Analyze header renamed .nii is not a NIfTI file either.
    path.write_bytes((tmp_path / "x.hdr").read_bytes() + (tmp_path / "x.img").read_bytes())
    with pytest.raises(InputError, match="not a NIfTI"):
        load_nifti(path)


# --- conform_scan: no outputs on failure -------------------------------------------------------

def test_conform_scan_failure_leaves_no_outputs(tmp_path: Path) -> None:
    data = _pattern((6, 7, 8))
    data[2, 2, 2] = np.nan
    src = _save(_img(data=data), tmp_path / "in.nii.gz")
    out_dir = tmp_path / "out"
    with pytest.raises(InputError, match="1 of 336 voxels"):
        conform_scan(src, out_dir / "o.nii.gz", out_dir / "o.json")
    assert not out_dir.exists() or list(out_dir.iterdir()) == []


def test_conform_scan_json_failure_removes_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import brainvae.conform as conform_mod

    def boom(obj: object, path: os.PathLike) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(conform_mod, "atomic_write_json", boom)
    src = _save(_img(), tmp_path / "in.nii.gz")
    with pytest.raises(OSError, match="disk full"):
        conform_scan(src, tmp_path / "out" / "o.nii.gz", tmp_path / "out" / "o.json")
    assert list((tmp_path / "out").iterdir()) == []
