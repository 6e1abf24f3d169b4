"""QC metrics, flags, figure and table on a real scan (IXI, DLMUSE mask) aligned to MNI."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.image as mpimg
import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from brainvae import qc
from brainvae import skullstrip as ss
from brainvae.templates import mni152_brain, mni152_brain_mask

IXI = Path(__file__).parent / "data" / "real_t1w" / "ixi"
SCAN = IXI / "IXI014-HH-1236-T1_ds.nii.gz"
MASK = IXI / "dlmuse" / "IXI014-HH-1236-T1_ds_DLMUSE.nii.gz"


class Aligned:
    """A native scan + mask and a fixed native->MNI (2 mm) resampler, as the workflow would have."""

    def __init__(self) -> None:
        import SimpleITK as sitk

        self.native = nib.load(SCAN)
        self.data = ss._volume(self.native)
        self.mask = (np.asarray(nib.load(MASK).dataobj) > 0).astype(np.uint8)
        self.native_mask = nib.Nifti1Image(self.mask, self.native.affine)
        self.transform = ss._register_template(self.native, self.data, 1, "moments", True).GetInverse()
        self.grid = mni152_brain(2)
        self.ref = ss._to_sitk(np.zeros(self.grid.shape, np.float32), self.grid.affine)
        self._sitk = sitk

    def warp(self, vol: np.ndarray, nearest: bool = False) -> np.ndarray:
        sitk = self._sitk
        interp = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear
        src = ss._to_sitk(vol.astype(np.float32), self.native.affine)
        return ss._from_sitk(sitk.Resample(src, self.ref, self.transform, interp, 0.0))

    def preprocessed(self, data: np.ndarray, mask: np.ndarray) -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
        """Skull-stripped, z-scored MNI image and MNI mask (what the workflow writes)."""
        x = self.warp(data)
        m = self.warp(mask, nearest=True) > 0.5
        inside = x[m]
        x = np.where(m, (x - inside.mean()) / inside.std(), 0.0).astype(np.float32)
        return nib.Nifti1Image(x, self.grid.affine), nib.Nifti1Image(m.astype(np.uint8), self.grid.affine)

    def metrics(self, data: np.ndarray, mask: np.ndarray) -> dict[str, float]:
        pre, mni_mask = self.preprocessed(data, mask)
        native_mask = nib.Nifti1Image(mask.astype(np.uint8), self.native.affine)
        return qc.qc_metrics(pre, mni_mask, native_mask, self.native, mni152_brain(1), mni152_brain_mask(1))


@pytest.fixture(scope="module")
def aligned() -> Aligned:
    return Aligned()


@pytest.fixture(scope="module")
def good_metrics(aligned: Aligned) -> dict[str, float]:
    return aligned.metrics(aligned.data, aligned.mask)


def _superior_axis(img: nib.Nifti1Image) -> tuple[int, bool]:
    codes = nib.aff2axcodes(img.affine)
    for axis, code in enumerate(codes):
        if code in "SI":
            return axis, code == "S"
    raise AssertionError(codes)


# ----------------------------------------------------------------------------- metrics


def test_metrics_good_scan(good_metrics: dict[str, float]) -> None:
    m = good_metrics
    assert 0.5 <= m["template_correlation"] <= 0.95  # 0.58 (no N4 on this scan)
    assert m["mask_dice"] >= 0.9
    assert m["mask_excess"] < 0.02
    assert m["fov_coverage"] >= 0.98
    assert m["brain_volume_ml"] == pytest.approx(1351.8, abs=1.0)  # DLMUSE mask, 2 mm voxels
    assert 1500 <= m["brain_volume_mni_ml"] <= 2100  # affine normalisation enlarges a small head
    assert m["wm_csf_contrast"] > 0.3 and m["wm_gm_contrast"] > 0.1  # T1w: WM > GM > CSF
    assert m["voxel_min_mm"] == m["voxel_max_mm"] == 2.0 and m["anisotropy"] == 1.0
    assert qc.qc_flags(m) == []


def test_metrics_t2_like_contrast_is_flagged(aligned: Aligned) -> None:
    # Invert intensities inside the head: bright CSF, dark WM, as in a T2w given as T1w.
    data = aligned.data
    head = data > 0.1 * np.percentile(data, 99)
    t2 = np.where(head, np.percentile(data[head], 99.5) - data, 0.0).clip(min=0)
    m = aligned.metrics(t2, aligned.mask)
    assert m["wm_csf_contrast"] < 0
    assert "not_t1w_contrast" in qc.qc_flags(m)
    assert "low_template_correlation" in qc.qc_flags(m)


def test_metrics_partial_coverage_is_flagged(aligned: Aligned) -> None:
    # Zero the top 40% of the slices (native), as a field of view that misses the vertex.
    axis, up = _superior_axis(aligned.native)
    n = aligned.data.shape[axis]
    cut = [slice(None)] * 3
    cut[axis] = slice(int(0.6 * n), n) if up else slice(0, int(0.4 * n))
    data, mask = aligned.data.copy(), aligned.mask.copy()
    data[tuple(cut)] = 0
    mask[tuple(cut)] = 0
    m = aligned.metrics(data, mask)
    assert m["fov_coverage"] < 0.9
    assert "partial_coverage" in qc.qc_flags(m)
    assert "low_mask_dice" in qc.qc_flags(m)


def test_metrics_misregistration_lowers_correlation(aligned: Aligned, good_metrics: dict[str, float]) -> None:
    pre, mni_mask = aligned.preprocessed(aligned.data, aligned.mask)
    shifted = nib.Nifti1Image(np.roll(np.asarray(pre.dataobj), 10, axis=1), pre.affine)  # 20 mm
    m = qc.qc_metrics(shifted, mni_mask, aligned.native_mask, aligned.native)  # default template
    assert m["template_correlation"] < good_metrics["template_correlation"] - 0.15
    assert "low_template_correlation" in qc.qc_flags(m)


# ----------------------------------------------------------------------------- flags


def test_flags_thresholds_and_missing_values() -> None:
    m = {"brain_volume_ml": 2100.0, "anisotropy": 4.2, "voxel_max_mm": 3.0, "mask_dice": float("nan")}
    assert qc.qc_flags(m) == ["brain_volume_out_of_range", "extreme_anisotropy"]
    assert qc.qc_flags(m, {"max_brain_volume_ml": 2200, "max_anisotropy": 5}) == []
    assert qc.qc_flags({"brain_volume_ml": 900}) == ["brain_volume_out_of_range"]
    assert qc.qc_flags({"voxel_max_mm": 5.0}) == ["thick_voxels"]
    with pytest.raises(KeyError, match="unknown QC threshold"):
        qc.qc_flags(m, {"min_brain_volume": 1})


def test_outlier_flags() -> None:
    rng = np.random.default_rng(0)
    rows = [
        {"scan_id": f"sub-{i:02d}", "brain_volume_ml": float(v), "mask_dice": 0.95}
        for i, v in enumerate(rng.normal(1400, 60, 12))
    ]
    rows[3]["brain_volume_ml"] = 2600.0
    flags = qc.outlier_flags(qc.qc_table(rows))
    assert flags.iloc[3] == ["outlier_brain_volume_ml"]
    assert sum(bool(f) for f in flags) == 1  # constant mask_dice (MAD 0) flags nothing
    assert all(f == [] for f in qc.outlier_flags(rows[:4]))  # too few scans to judge


# ----------------------------------------------------------------------------- table


def test_qc_table_tsv_roundtrip(tmp_path: Path, good_metrics: dict[str, float]) -> None:
    rows = [
        {"scan_id": "sub-01", **good_metrics, "flags": []},
        {"scan_id": "sub-02", **good_metrics, "brain_volume_ml": float("nan"), "flags": ["a", "b"]},
    ]
    table = qc.qc_table(rows)
    assert list(table.columns[:2]) == ["scan_id", "template_correlation"]
    out = qc.write_qc_table(table, tmp_path / "qc.tsv")
    back = pd.read_csv(out, sep="\t", na_values="n/a", keep_default_na=False)
    assert back["flags"].tolist() == ["", "a;b"]
    assert math.isnan(back["brain_volume_ml"][1])
    assert back["mask_dice"][0] == pytest.approx(good_metrics["mask_dice"], rel=1e-5)
    assert "n/a" in out.read_text()


# ----------------------------------------------------------------------------- figure


def test_qc_figure(tmp_path: Path, aligned: Aligned, good_metrics: dict[str, float]) -> None:
    pre, mni_mask = aligned.preprocessed(aligned.data, aligned.mask)
    title = f"sub-IXI014  r={good_metrics['template_correlation']:.2f}  vol={good_metrics['brain_volume_ml']:.0f} mL"
    # Its speed is measured by benchmarks/bench_qc.py (a wall-clock bound here fails on a busy machine).
    first = qc.qc_figure(pre, mni_mask, mni152_brain(1), tmp_path / "first.png", title)
    out = qc.qc_figure(pre, mni_mask, mni152_brain(1), tmp_path / "qc.png", title)
    rgb = mpimg.imread(out)[..., :3]
    np.testing.assert_array_equal(mpimg.imread(first)[..., :3], rgb)  # cached template: same picture
    assert rgb.shape[:2] == (320, 900)
    assert rgb.std() > 0.05  # not blank
    red = (rgb[..., 0] > 0.8) & (rgb[..., 1] < 0.3) & (rgb[..., 2] < 0.3)
    cyan = (rgb[..., 0] < 0.3) & (rgb[..., 1] > 0.8) & (rgb[..., 2] > 0.8)
    assert red.sum() > 200 and cyan.sum() > 200  # mask contour and template edges drawn
    for panel in range(3):  # sagittal, coronal, axial side by side: each shows contour and edges
        columns = slice(panel * 300, (panel + 1) * 300)
        assert red[:, columns].sum() > 50 and cyan[:, columns].sum() > 50, panel
    assert not list(tmp_path.glob(".*tmp*"))  # atomic write left no temporaries


def test_qc_figure_without_mask_and_from_path(tmp_path: Path, aligned: Aligned) -> None:
    pre, _ = aligned.preprocessed(aligned.data, aligned.mask)
    tpl_path = tmp_path / "tpl.nii.gz"
    nib.save(mni152_brain(2), tpl_path)
    out = qc.qc_figure(pre, None, tpl_path, tmp_path / "nomask.png", "no mask")
    assert mpimg.imread(out).shape[:2] == (320, 900)
