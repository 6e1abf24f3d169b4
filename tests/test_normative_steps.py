"""The normative stage's file-level step (brainvae.analysis.normative_steps) on a tiny trained VAE."""

from __future__ import annotations

import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from brainvae.analysis.normative import ReferenceStats, residual
from brainvae.analysis.normative_steps import (
    DEVIATION_SCORES,
    MIN_REFERENCE,
    REGION_NAMES,
    NormativeError,
    expected_ds_change,
    grid_regions,
    normative_step,
    resample_to_grid,
)
from brainvae.vae.cohort import make_splits, read_index, select_training
from brainvae.vae.latents import export_latents
from brainvae.vae.train import train_vae
from synthetic_brains import write_synthetic_cohort

TINY = {"model": {"latent_dim": 6, "widths": [4, 8]}, "epochs": 1, "batch_size": 4}
SHAPE = (16, 16, 16)
# A coarse grid over the MNI field of view, so the template regions and the DS field fall on it.
AFFINE = np.array([[10.0, 0, 0, -78.5], [0, 12.0, 0, -111.5], [0, 0, 10.0, -73.5], [0, 0, 0, 1]])


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("normative")
    paths = write_synthetic_cohort(root, 30, shape=SHAPE, seed=3)
    index = read_index(paths["index"])
    splits = make_splits(select_training(index), seed=0)
    splits.to_csv(root / "splits.tsv", sep="\t", index=False)
    train_vae(TINY, paths["array"], paths["mask"], paths["index"], root / "splits.tsv", root / "model",
              checkpoint_dir=root / "ckpt", device="cpu", threads=1, progress=False)
    export_latents(root / "model", paths["array"], paths["mask"], paths["index"], root / "splits.tsv",
                   root / "latents.parquet", device="cpu")
    return {**paths, "root": root, "splits": root / "splits.tsv", "model": root / "model",
            "latents": root / "latents.parquet", "index_df": index, "splits_df": splits}


def _run(cohort: dict, out: Path, scans: pd.DataFrame | None = None, splits=None, **kwargs) -> dict[str, Path]:
    scans = cohort["index_df"][["scan", "label"]] if scans is None else scans
    return normative_step(cohort["model"], scans, cohort["array"], cohort["mask"], cohort["index"],
                          cohort["splits"] if splits is None else splits, cohort["latents"], out,
                          affine=AFFINE, n_permutations=50, traversal_permutations=20, device="cpu", **kwargs)


@pytest.fixture(scope="module")
def outputs(cohort: dict) -> tuple[dict[str, Path], float]:
    start = time.perf_counter()
    paths = _run(cohort, cohort["root"] / "out", ds_strength=0.6)
    return paths, time.perf_counter() - start


def test_every_output_with_shapes_and_names(cohort: dict, outputs) -> None:
    paths, seconds = outputs
    out = cohort["root"] / "out"
    index = cohort["index_df"]
    masks = np.load(cohort["mask"])
    for scan, row in zip(index["scan"], index["row"], strict=True):
        for desc in ("residual", "zmap"):
            img = nib.load(out / "maps" / f"{scan}_desc-{desc}_T1w.nii.gz")
            assert img.shape == SHAPE and np.allclose(img.affine, AFFINE)
        z = np.asarray(nib.load(out / "maps" / f"{scan}_desc-zmap_T1w.nii.gz").dataobj)
        assert np.all(z[masks[row] == 0] == 0) and np.abs(z).max() > 0  # 0 outside the mask
    regional = pd.read_csv(paths["regional"], sep="\t")
    assert len(regional) == len(index) * len(REGION_NAMES)
    assert set(regional["region"]) == set(REGION_NAMES.values())
    assert {"mean_z", "mean_abs_z", "fraction_abs_z_over_2"} <= set(regional.columns)
    for key in ("group_difference", "group_t"):
        assert nib.load(paths[key]).shape == SHAPE
    traversal = nib.load(paths["traversal_nifti"])
    assert traversal.shape == (*SHAPE, 5)
    for key in ("group_png", "traversal_png", "interpolation_png"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    group = json.loads(paths["group_json"].read_text())
    assert group["n_permutations"] == 50 and np.isfinite(group["threshold"])
    agreement = json.loads(paths["agreement"].read_text())
    assert agreement["ds_strength"] == 0.6 and agreement["voxels"] > 0 and agreement["n_permutations"] == 20
    assert -1 <= agreement["correlation"] <= 1 and -1 <= agreement["observed_correlation"] <= 1
    assert 1 / 21 <= agreement["p_value"] <= 1 and isinstance(agreement["agrees"], bool)
    assert agreement["agrees"] == (agreement["correlation"] > 0 and agreement["p_value"] < 0.05)
    assert set(agreement["null_quantiles"]) == {"q50", "q95", "q99"}
    print(f"normative step on {len(index)} scans of {SHAPE}: {seconds:.1f} s; "
          f"traversal agreement r = {agreement['correlation']:.3f}")


def test_deviation_scores_one_row_per_analysed_scan(cohort: dict, tmp_path: Path) -> None:
    index = cohort["index_df"]
    analysed = index[index["scan"].isin(index["scan"].iloc[::2])][["scan", "label"]]
    paths = _run(cohort, tmp_path)
    deviation = pd.read_csv(paths["deviation"], sep="\t")
    assert list(deviation.columns) == ["scan", "label", "mse_mask", "latent_mahalanobis", "recon_error_z"]
    assert len(deviation) == len(index) and deviation["scan"].tolist() == index["scan"].tolist()
    assert (deviation["latent_mahalanobis"] > 0).all() and np.isfinite(deviation["recon_error_z"]).all()
    paths = _run(cohort, tmp_path / "half", scans=analysed)
    deviation = pd.read_csv(paths["deviation"], sep="\t")
    assert deviation["scan"].tolist() == analysed["scan"].tolist()
    assert len(list((tmp_path / "half" / "maps").rglob("*_desc-zmap_T1w.nii.gz"))) == len(analysed)
    agreement = json.loads(paths["agreement"].read_text())  # no ds_strength: no truth
    assert agreement["correlation"] is None and agreement["ds_strength"] is None and agreement["reason"]


def test_reference_is_the_models_held_out_scans_only(cohort: dict, outputs) -> None:
    paths, _ = outputs
    index, splits = cohort["index_df"], cohort["splits_df"]
    label = dict(zip(index["scan"], index["label"]))
    held_out = sorted(s for s, sp in zip(splits["scan"], splits["split"]) if sp in ("val", "test"))
    assert {label[s] for s in held_out} == {"euploid"}  # the model learnt from euploid scans only
    reference = pd.read_csv(paths["reference_scans"], sep="\t")
    assert reference["scan"].tolist() == held_out and len(held_out) >= MIN_REFERENCE
    # The reference mean is the mean residual of exactly these scans (not of training or DS scans).
    from brainvae.vae.evaluate import reconstruct
    from brainvae.vae.nn import load_model

    model = load_model(cohort["model"], "cpu")
    array, masks = np.load(cohort["array"], mmap_mode="r"), np.load(cohort["mask"], mmap_mode="r")
    row = dict(zip(index["scan"], index["row"]))

    def mean_residual(scans: list[str]) -> np.ndarray:
        res, ms = [], []
        for r, x, y in reconstruct(model, array, [row[s] for s in scans], device="cpu"):
            res.append(residual(x, y, masks[r] > 0))
            ms.append(masks[r] > 0)
        return ReferenceStats.fit(res, ms).mean

    written = np.asarray(nib.load(paths["reference_mean"]).dataobj)
    np.testing.assert_allclose(written, mean_residual(held_out), atol=1e-5)
    train = [s for s, sp in zip(splits["scan"], splits["split"]) if sp == "train"][:len(held_out)]
    ds = [s for s in index["scan"] if label[s] == "DS"]
    assert not np.allclose(written, mean_residual(train), atol=1e-5)
    assert not np.allclose(written, mean_residual(held_out[:-1] + ds[:1]), atol=1e-5)


def test_positive_among_the_models_labels_is_a_named_error(cohort: dict, tmp_path: Path) -> None:
    with pytest.raises(NormativeError, match="labels the model learnt from"):
        _run(cohort, tmp_path, normative_labels=["euploid", "DS"])


def test_too_few_held_out_scans_is_a_named_error(cohort: dict, tmp_path: Path) -> None:
    splits = cohort["splits_df"].copy()
    held = splits.index[splits["split"].isin(["val", "test"])]
    splits.loc[held[MIN_REFERENCE - 1:], "split"] = "train"
    with pytest.raises(NormativeError, match="val/test splits.*needs 3 or more"):
        _run(cohort, tmp_path, splits=splits)


def test_regions_and_expected_ds_change_on_the_demo_grid() -> None:
    from brainvae.resample import GRIDS
    from brainvae.templates import mni152_brain

    grid = GRIDS["demo"]
    labels = grid_regions(grid.shape, grid.affine)
    assert labels.shape == tuple(grid.shape) and set(np.unique(labels)) == {0, *REGION_NAMES}
    brain = mni152_brain(2)
    image = resample_to_grid(np.asarray(brain.dataobj, np.float32), brain.affine, grid.shape, grid.affine, order=1)
    change = expected_ds_change(image, grid.affine)
    # DS ventricles are larger: dark CSF spreads into the tissue around them, so the image darkens there.
    from scipy import ndimage

    ventricles = labels == 2
    around = ndimage.binary_dilation(ventricles) & ~ventricles
    assert change[around].mean() < 0 and (change[around] < 0).mean() > 0.9
    # The change is the image pulled back through the DS field, so a flat image does not change, nor does any
    # image at ds_strength 0.
    assert np.abs(expected_ds_change(np.full(grid.shape, 3.0), grid.affine)).max() < 1e-5
    assert np.abs(expected_ds_change(image, grid.affine, ds_strength=0.0)).max() == 0


def test_workflow_plans_the_normative_rule_once_per_model(tmp_path: Path) -> None:
    import yaml

    from test_workflow import REPO, demo_config, planned_jobs, snakemake

    config = demo_config(tmp_path)
    result = snakemake(tmp_path, config, "--dry-run")
    jobs = planned_jobs(result.stdout + result.stderr)
    models = yaml.safe_load((REPO / "config" / "config.yaml").read_text())["models"]
    assert jobs["normative_maps"] == len(models) == jobs["train_vae"]
    data = yaml.safe_load(config.read_text())
    data["analysis"]["normative"] = {"enabled": False}
    config.write_text(yaml.safe_dump(data))
    result = snakemake(tmp_path, config, "--dry-run")
    assert "normative_maps" not in planned_jobs(result.stdout + result.stderr)


def test_workflow_leaves_the_normative_rule_out_without_both_labels(tmp_path: Path) -> None:
    import yaml

    from test_workflow import demo_config, planned_jobs, snakemake

    config = demo_config(tmp_path)
    data = yaml.safe_load(config.read_text())
    data["analysis"]["normative"] = {"positive": "trisomy"}
    config.write_text(yaml.safe_dump(data))
    result = snakemake(tmp_path, config, "--dry-run")
    assert "normative_maps" not in planned_jobs(result.stdout + result.stderr)
    assert "left out: it needs two or more analysed scans" in result.stderr and "'trisomy'" in result.stderr


def test_workflow_leaves_out_a_model_that_learnt_from_the_positive_label(tmp_path: Path) -> None:
    import yaml

    from test_workflow import demo_config, planned_jobs, snakemake

    config = demo_config(tmp_path)
    data = yaml.safe_load(config.read_text())
    first, *rest = data["models"]
    data["models"][first] = {**(data["models"][first] or {}), "train_labels": None}  # every label, DS too
    config.write_text(yaml.safe_dump(data))
    result = snakemake(tmp_path, config, "--dry-run")
    assert planned_jobs(result.stdout + result.stderr).get("normative_maps", 0) == len(rest)
    assert f"normative maps of model {first} left out: it learnt from 'DS' scans" in result.stderr


def test_deviation_scores_are_the_latents_tables(cohort: dict, outputs) -> None:
    # One definition of the scores (brainvae.vae.latents.deviation_columns): the stage copies them per scan, and
    # its own reconstructions of the reference scans have the table's errors.
    from brainvae.latents_table import read_latents

    paths, _ = outputs
    table, _ = read_latents(cohort["latents"])
    deviation = pd.read_csv(paths["deviation"], sep="\t")
    joined = deviation.merge(table, on="scan", suffixes=("", "_table"))
    assert len(joined) == len(cohort["index_df"]) and list(deviation.columns[2:]) == list(DEVIATION_SCORES)
    for column in DEVIATION_SCORES:
        np.testing.assert_allclose(joined[column], joined[f"{column}_table"], rtol=1e-5)
    reference = pd.read_csv(paths["reference_scans"], sep="\t").merge(table, on="scan", suffixes=("", "_table"))
    np.testing.assert_allclose(reference["mse_mask"], reference["mse_mask_table"], rtol=1e-3)
