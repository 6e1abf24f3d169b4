"""The traversal's agreement with the true DS deformation is a test that can fail: on a synthetic cohort with
``ds_strength: 0`` (the DS scans are their euploid counterparts) it finds no agreement, and on the same cohort
with the demo's ``ds_strength`` it does.

One normative VAE (the demo's dense variant, on the demo grid) learns from euploid template-space scans; it is
applied unchanged to two analysed cohorts of the same subjects that differ only in the DS effect: their euploid
scans are bit-identical, their DS scans carry the synthetic DS deformation at strength 0 or at the demo's. The
scans are the demo generator's template-space scans (brainvae.demo_cohort) put on the grid by the pipeline's own
resampling and normalisation (brainvae.preprocess.preprocess_image), without the slow native-space chain.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml

from brainvae import demo_cohort as dc
from brainvae.analysis.normative_steps import normative_step
from brainvae.preprocess import preprocess_image
from brainvae.resample import GRIDS
from brainvae.vae.cohort import build_cohort_array, make_splits, read_index, select_training
from brainvae.vae.latents import export_latents
from brainvae.vae.train import train_vae

REPO = Path(__file__).resolve().parents[1]
CONFIG = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
SEED = CONFIG["demo"]["seed"]
DEMO_STRENGTH = CONFIG["demo"]["ds_strength"]
#: Euploid training subjects and analysed subjects (half DS, age-matched controls), as many as in the demo.
TRAIN_SITE = {"HCP": {"subjects": 66, "ds_fraction": 0.0}}
ANALYSED_SITE = {"SantPau": {"subjects": 48, "ds_fraction": 0.5}}
ALPHA = CONFIG["analysis"]["normative"]["alpha"]


def _to_grid(out: Path, records: list[dict], work: Path) -> tuple[list[Path], list[Path]]:
    """Each template-space scan resampled and normalised onto the demo grid, as the pipeline does it."""
    norm = CONFIG["preprocess"]["normalisation"]
    images, masks = [], []
    for record in records:
        img = nib.load(out / record["path"])
        support = nib.Nifti1Image((np.asarray(img.dataobj) > 0).astype(np.uint8), img.affine)
        normalised, mask, _ = preprocess_image(img, support, np.eye(4), "demo", method=norm["method"],
                                               percentiles=tuple(norm["percentiles"]))
        name = record["path"].replace("/", "_")
        images.append(work / f"{name}_t1w.nii.gz")
        masks.append(work / f"{name}_mask.nii.gz")
        nib.save(normalised, images[-1])
        nib.save(mask, masks[-1])
    return images, masks


def _samples(records: list[dict]) -> pd.DataFrame:
    return pd.DataFrame({
        "scan": [f"{r['dataset']}/sub-{r['subject']}" for r in records],
        "dataset": [r["dataset"] for r in records], "subject": [r["subject"] for r in records],
        "label": [r["group"] for r in records], "role": ["train" if r["dataset"] in TRAIN_SITE else "analyse"
                                                         for r in records],
        "train": [r["dataset"] in TRAIN_SITE for r in records],
        "analyse": [r["dataset"] in ANALYSED_SITE for r in records]})


#: The demo's models (config/config.yaml), each trained once on the euploid scans and applied to both cohorts.
MODELS = ("vae_dense", "vae_spatial")


@pytest.fixture(scope="module")
def agreements(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, float], dict]:
    root = tmp_path_factory.mktemp("normative_control")
    train_records = dc.generate_cohort(root / "train", None, SEED, ds_strength=DEMO_STRENGTH, sites=TRAIN_SITE,
                                       n_jobs=2, session_fraction=0.0)
    (root / "grid").mkdir()
    train_images, train_masks = _to_grid(root / "train", train_records, root / "grid")
    results = {}
    for strength in (0.0, DEMO_STRENGTH):
        cohort = root / f"strength_{strength:g}"
        records = dc.generate_cohort(cohort, None, SEED, ds_strength=strength, sites=ANALYSED_SITE, n_jobs=2,
                                     session_fraction=0.0)
        (cohort / "grid").mkdir()
        images, masks = _to_grid(cohort, records, cohort / "grid")
        samples = _samples(train_records + records)
        build_cohort_array(samples, train_images + images, train_masks + masks, cohort / "cohort.npy",
                           cohort / "cohort_index.tsv", out_mask=cohort / "cohort_mask.npy")
        index = read_index(cohort / "cohort_index.tsv")
        splits = make_splits(select_training(index), seed=0)
        splits.to_csv(cohort / "splits.tsv", sep="\t", index=False)
        analysed = index[index["analyse"].astype(bool)][["scan", "label"]]
        for name in MODELS:
            model_dir = root / name
            if not model_dir.exists():  # one model for both cohorts: it learns from the same euploid scans
                settings = {**CONFIG["training"], **CONFIG["models"][name]}
                train_vae(settings, cohort / "cohort.npy", cohort / "cohort_mask.npy", cohort / "cohort_index.tsv",
                          cohort / "splits.tsv", model_dir, checkpoint_dir=root / f"{name}_checkpoints",
                          device="cpu", threads=1, progress=False)
            latents = cohort / f"{name}.parquet"
            export_latents(model_dir, cohort / "cohort.npy", cohort / "cohort_mask.npy", index,
                           cohort / "splits.tsv", latents, device="cpu")
            paths = normative_step(
                model_dir, analysed, cohort / "cohort.npy", cohort / "cohort_mask.npy", index, cohort / "splits.tsv",
                latents, cohort / "normative" / name, affine=GRIDS["demo"].affine, n_permutations=20,
                traversal_permutations=CONFIG["analysis"]["normative"]["traversal_permutations"], alpha=ALPHA,
                ds_strength=strength, device="cpu", seed=0)
            result = results[name, strength] = json.loads(paths["agreement"].read_text())
            print(f"{name}, ds_strength {strength:g}: traversal r = {result['correlation']:.3f}, "
                  f"p = {result['p_value']:.3f}; data r = {result['observed_correlation']:.3f}")
    return results


def test_the_cohorts_differ_only_in_the_ds_effect(agreements: dict[tuple[str, float], dict]) -> None:
    # What the data show: the DS-minus-euploid mean image follows the DS deformation only when there is one.
    assert abs(agreements[MODELS[0], 0.0]["observed_correlation"]) < 0.2
    assert agreements[MODELS[0], DEMO_STRENGTH]["observed_correlation"] > 0.4


@pytest.mark.parametrize("model", MODELS)
def test_no_agreement_without_a_ds_effect(agreements: dict[tuple[str, float], dict], model: str) -> None:
    control = agreements[model, 0.0]
    assert control["ds_strength"] == 0.0 and control["n_permutations"] > 0
    assert not control["agrees"] and control["p_value"] >= ALPHA


def test_agreement_at_the_demo_strength(agreements: dict[tuple[str, float], dict]) -> None:
    # The same models and test find the deformation when it is there: the control above can fail.
    found = [model for model in MODELS if agreements[model, DEMO_STRENGTH]["agrees"]]
    assert found, {model: agreements[model, DEMO_STRENGTH] for model in MODELS}
