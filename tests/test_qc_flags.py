"""QC flags on real-world cohorts: near-identical scans, clinical anisotropic voxels, flags on the picture."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image as mpimg
import nibabel as nib
import numpy as np
import pytest

from brainvae import qc
from brainvae.templates import mni152_brain, mni152_brain_mask

# ----------------------------------------------------------------------------- cohort outliers


def _near_identical_cohort(n: int = 12) -> list[dict[str, float]]:
    """What one scanner gives for 12 well-behaved scans: every metric within a hair of the others."""
    rng = np.random.default_rng(3)
    return [{"scan": f"sub-{i:02d}",
             "template_correlation": 0.55 + rng.normal(0, 0.001),
             "brain_volume_ml": 1400 + rng.normal(0, 2),
             "mask_dice": 0.93 + rng.normal(0, 0.0005),
             "fov_coverage": 0.999 + rng.normal(0, 0.0002),
             "mask_excess": 0.002 + rng.normal(0, 0.0002),
             "wm_csf_contrast": 0.45 + rng.normal(0, 0.001)} for i in range(n)]


def test_near_identical_cohort_flags_no_harmless_difference() -> None:
    rows = _near_identical_cohort()
    # Differences a reviewer would not call failures, but many MADs away in a cohort this uniform.
    rows[4].update(template_correlation=0.53, brain_volume_ml=1440.0, mask_excess=0.012, wm_csf_contrast=0.42)
    assert all(flags == [] for flags in qc.outlier_flags(rows))
    # The floor is what protects them: with the plain MAD the same scan is an outlier four times over.
    no_floor = {column: 0.0 for column in qc.MIN_OUTLIER_SPREAD}
    assert sorted(qc.outlier_flags(rows, min_spread=no_floor).iloc[4]) == [
        "outlier_brain_volume_ml", "outlier_mask_excess", "outlier_template_correlation", "outlier_wm_csf_contrast"]


def test_near_identical_cohort_still_flags_a_failed_scan() -> None:
    rows = _near_identical_cohort()
    rows[7].update(template_correlation=0.41, mask_excess=0.09, brain_volume_ml=1650.0)  # skull in the mask
    flags = qc.outlier_flags(rows)
    assert sorted(flags.iloc[7]) == ["outlier_brain_volume_ml", "outlier_mask_excess", "outlier_template_correlation"]
    assert sum(bool(f) for f in flags) == 1


def test_best_scan_is_not_a_mask_excess_outlier() -> None:
    # The reported misfire: a scan with no mask outside the template brain, in a cohort with some.
    rows = [{"scan": f"sub-{i:02d}", "mask_excess": 0.02 + 0.001 * i, "fov_coverage": 0.95 + 0.001 * i}
            for i in range(10)]
    rows[0].update(mask_excess=0.0, fov_coverage=1.0)
    no_floor = {"mask_excess": 0.0, "fov_coverage": 0.0}
    assert qc.outlier_flags(rows, min_spread=no_floor).iloc[0] == []
    # The suspicious side is still judged.
    rows[0].update(mask_excess=0.2, fov_coverage=0.7)
    assert sorted(qc.outlier_flags(rows).iloc[0]) == ["outlier_fov_coverage", "outlier_mask_excess"]


# ----------------------------------------------------------------------------- anisotropy


@pytest.fixture(scope="module")
def template_2mm() -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
    return mni152_brain(2), mni152_brain_mask(2)


def _native(zooms: tuple[float, float, float]) -> nib.Nifti1Image:
    shape = tuple(int(round(180 / z)) for z in zooms)
    return nib.Nifti1Image(np.ones(shape, np.float32), np.diag([*zooms, 1.0]))


@pytest.mark.parametrize(("zooms", "expected"), [
    ((1.0, 1.0, 1.0), []),
    ((1.0, 1.0, 3.3), []),  # common clinical 3D T1w protocol: admitted
    ((0.9, 0.9, 3.5), []),
    ((1.0, 1.0, 6.0), ["extreme_anisotropy", "thick_voxels"]),
    ((0.1, 1.0, 1.0), ["extreme_anisotropy"]),  # cm-for-mm slip on one axis: a broken header
    ((1.0, 1.0, 20.0), ["extreme_anisotropy", "thick_voxels"]),  # broken header
])
def test_voxel_size_flags(template_2mm, zooms, expected) -> None:
    image, mask = template_2mm
    native = _native(zooms)
    native_mask = nib.Nifti1Image(np.ones(native.shape, np.uint8), native.affine)
    metrics = qc.qc_metrics(image, mask, native_mask, native, image, mask)
    assert metrics["anisotropy"] == pytest.approx(max(zooms) / min(zooms))
    flags = qc.qc_flags(metrics)
    assert [f for f in flags if f in ("extreme_anisotropy", "thick_voxels")] == expected, metrics


# ----------------------------------------------------------------------------- picture


def _banner_red_fraction(png: Path, rows: int = 6) -> float:
    rgb = mpimg.imread(png)[..., :3]
    bottom = rgb[-rows:]
    red = (bottom[..., 0] > 0.7) & (bottom[..., 1] < 0.2) & (bottom[..., 2] < 0.2)
    return float(red.mean())


def test_flags_are_drawn_in_a_red_banner(tmp_path: Path, template_2mm) -> None:
    image, mask = template_2mm
    many = ["low_template_correlation", "brain_volume_out_of_range", "low_mask_dice", "partial_coverage",
            "mask_leak", "not_t1w_contrast", "extreme_anisotropy", "thick_voxels", "input_skull_stripped",
            "outlier_mask_excess"]
    clean = qc.qc_figure(image, mask, image, tmp_path / "clean.png", "sub-01")
    flagged = qc.qc_figure(image, mask, image, tmp_path / "flagged.png", "sub-01", flags=many)
    assert _banner_red_fraction(clean) < 0.01
    assert _banner_red_fraction(flagged) > 0.5  # red behind white text
    assert mpimg.imread(flagged).shape[:2] == (320, 900)  # same size; the planes make room


def test_long_flag_list_wraps_between_flags() -> None:
    flags = [f"outlier_metric_number_{i}" for i in range(8)]
    lines = qc.flag_banner_lines(flags, max_chars=60, max_lines=10)
    assert len(lines) > 1 and all(len(line) <= 60 for line in lines)
    assert " ".join(lines) == "QC FLAGS: " + ", ".join(flags)  # every flag, in order, none split
    truncated = qc.flag_banner_lines(flags, max_chars=60, max_lines=2)
    shown = sum(line.count("outlier_metric") for line in truncated)
    assert len(truncated) == 2 and truncated[-1] == f"... and {len(flags) - shown} more (see qc.tsv)"
    assert qc.flag_banner_lines([], max_chars=60) == []
