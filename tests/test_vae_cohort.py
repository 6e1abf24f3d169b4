"""Cohort arrays (memory-mapped .npy + index) and subject-level, stratified splits."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from brainvae.vae.cohort import (build_cohort_array, check_splits, cohort_samples, make_splits,
                                 mask_path_for, model_splits, read_index, select_training, training_splits)


def _samples(n_subjects: int = 40, sessions: int = 2) -> pd.DataFrame:
    rows = []
    for s in range(n_subjects):
        dataset = ["IXI", "HCP", "ABIDE"][s % 3]
        label = "DS" if s % 4 == 3 else "euploid"
        for ses in range(1, sessions + 1 if s % 2 == 0 else 2):
            rows.append({"scan": f"{dataset}_sub-{s:02d}_ses-{ses}", "scan_key": "k", "dataset": dataset,
                         "subject": f"{s:02d}", "session": str(ses), "acquisition": "", "run": "",
                         "path": f"/x/{s}_{ses}.nii.gz", "label": label, "role": "both",
                         "train": True, "analyse": True, "age": "30", "sex": "F"})
    return pd.DataFrame(rows)


def test_build_cohort_array_roundtrip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    samples = _samples(3, sessions=1)
    images, masks, vols = {}, {}, []
    for scan in samples["scan"]:
        vol = rng.normal(size=(8, 10, 6)).astype(np.float32)
        mask = (rng.random((8, 10, 6)) > 0.5).astype(np.uint8)
        vols.append((vol, mask))
        images[scan] = tmp_path / f"{scan}_T1w.nii.gz"
        masks[scan] = tmp_path / f"{scan}_mask.nii.gz"
        nib.save(nib.Nifti1Image(vol, np.eye(4)), images[scan])
        nib.save(nib.Nifti1Image(mask, np.eye(4)), masks[scan])
    index = build_cohort_array(samples, images, masks, tmp_path / "c.npy", tmp_path / "c.tsv")

    arr = np.load(tmp_path / "c.npy", mmap_mode="r")
    msk = np.load(mask_path_for(tmp_path / "c.npy"), mmap_mode="r")
    assert isinstance(arr, np.memmap) and arr.dtype == np.float16 and arr.shape == (3, 8, 10, 6)
    assert msk.dtype == np.uint8
    for i, (vol, mask) in enumerate(vols):
        np.testing.assert_allclose(arr[i], vol, rtol=1e-3, atol=1e-3)
        np.testing.assert_array_equal(msk[i], mask)
    on_disk = read_index(tmp_path / "c.tsv")
    assert on_disk["row"].tolist() == [0, 1, 2] and on_disk["scan"].tolist() == samples["scan"].tolist()
    assert "path" not in on_disk.columns and "age" in on_disk.columns
    assert index["scan"].tolist() == on_disk["scan"].tolist()
    assert sorted(p.name for p in tmp_path.glob(".*")) == []  # no temporaries left


def test_build_cohort_array_rejects_mixed_grids(tmp_path: Path) -> None:
    samples = _samples(2, sessions=1)
    paths = []
    for i, shape in enumerate([(4, 4, 4), (4, 4, 6)]):
        p = tmp_path / f"{i}.nii.gz"
        nib.save(nib.Nifti1Image(np.zeros(shape, np.float32), np.eye(4)), p)
        paths.append(p)
    with pytest.raises(ValueError, match="one grid"):
        build_cohort_array(samples, paths, paths, tmp_path / "c.npy", tmp_path / "c.tsv")
    assert not (tmp_path / "c.npy").exists() and not list(tmp_path.glob(".c.npy*"))


def test_splits_are_subject_level_stratified_and_deterministic() -> None:
    samples = _samples(60)
    splits = make_splits(samples, seed=3)
    check_splits(samples, splits)
    assert splits["scan"].tolist() == samples["scan"].tolist()
    merged = samples.merge(splits, on="scan")
    assert (merged.groupby(["dataset", "subject"])["split"].nunique() == 1).all()
    per_subject = merged.drop_duplicates(["dataset", "subject"])
    counts = per_subject["split"].value_counts()
    assert counts["train"] == 42 and counts["val"] == 9 and counts["test"] == 9
    # Every dataset x label stratum is represented in train and, where large enough, elsewhere.
    for _, stratum in per_subject.groupby(["dataset", "label"]):
        frac = stratum["split"].value_counts(normalize=True)
        assert abs(frac.get("train", 0) - 0.7) <= 0.2
    # Same seed and content -> same result, whatever the row order; another seed differs.
    shuffled = samples.sample(frac=1.0, random_state=1)
    again = make_splits(shuffled, seed=3).set_index("scan").loc[samples["scan"], "split"]
    assert again.tolist() == splits["split"].tolist()
    assert make_splits(samples, seed=4)["split"].tolist() != splits["split"].tolist()


def test_small_strata_still_fill_val_and_test() -> None:
    samples = _samples(12, sessions=1)  # 6 strata of ~2 subjects each
    counts = make_splits(samples, seed=0)["split"].value_counts()
    assert counts.sum() == 12 and counts["val"] >= 1 and counts["test"] >= 1


def test_same_subject_label_in_two_datasets_is_two_people() -> None:
    samples = pd.DataFrame({"scan": ["a1", "b1"], "dataset": ["A", "B"], "subject": ["01", "01"],
                            "label": ["euploid", "euploid"]})
    check_splits(samples, pd.DataFrame({"scan": ["a1", "b1"], "split": ["train", "test"]}))


def test_check_splits_detects_leakage() -> None:
    samples = _samples(4)
    splits = make_splits(samples, seed=0)
    first = samples.index[samples["subject"] == "00"]
    splits.loc[first[0], "split"] = "train"
    splits.loc[first[1], "split"] = "test"
    with pytest.raises(ValueError, match="more than one split"):
        check_splits(samples, splits)
    with pytest.raises(ValueError, match="unknown split"):
        check_splits(samples, splits.assign(split="holdout"))


def test_select_training_defaults_to_euploid_training_datasets() -> None:
    samples = _samples(8, sessions=1)
    samples.loc[0, "train"] = False
    selected = select_training(samples)
    assert set(selected["label"]) == {"euploid"} and samples.loc[0, "scan"] not in set(selected["scan"])
    assert set(select_training(samples, ["euploid", "DS"])["label"]) == {"euploid", "DS"}


@pytest.mark.parametrize("n_subjects", [3, 4, 5, 7])
def test_tiny_cohorts_get_a_subject_in_every_split(n_subjects: int) -> None:
    samples = _samples(n_subjects, sessions=1).assign(label="euploid")
    counts = make_splits(samples, seed=0)["split"].value_counts()
    assert counts.get("train", 0) >= 1 and counts.get("val", 0) == 1 and counts.get("test", 0) == 1


def test_cohort_samples_drop_qc_excluded_scans() -> None:
    samples = _samples(4, sessions=1)
    samples["scan_key"] = samples["scan"].str.replace("IXI_", "")
    kept = cohort_samples(samples, [samples.loc[1, "scan_key"]])
    assert kept["scan"].tolist() == samples["scan"].drop(index=1).tolist()


def test_training_splits_follow_labels_roles_exclusions_and_qc() -> None:
    samples = _samples(30, sessions=1)
    samples["scan_key"] = samples["scan"]
    samples.loc[samples["dataset"] == "ABIDE", "train"] = False  # an analyse-only dataset
    failed = samples.loc[(samples["label"] == "euploid") & samples["train"], "scan"].iloc[0]
    excluded = samples.loc[(samples["label"] == "euploid") & samples["train"], "scan"].iloc[1]
    qc = pd.DataFrame({"scan": samples["scan"], "passed": ["False" if s == failed else "True"
                                                          for s in samples["scan"]]})
    splits = training_splits(samples, exclude=[excluded], qc_table=qc, seed=2)
    chosen = samples.set_index("scan").loc[splits["scan"]]
    assert set(chosen["label"]) == {"euploid"} and chosen["train"].all()
    assert failed not in set(splits["scan"]) and excluded not in set(splits["scan"])
    assert set(splits["split"]) == {"train", "val", "test"}
    every_label = training_splits(samples, train_labels=None, seed=2)
    assert set(samples.set_index("scan").loc[every_label["scan"], "label"]) == {"euploid", "DS"}
    with pytest.raises(ValueError, match="at least one each"):
        training_splits(samples, train_labels=["nobody"])


def test_a_model_learns_from_its_labels_part_of_the_cohort_splits() -> None:
    samples = _samples(30, sessions=1)
    splits = training_splits(samples, train_labels=None, seed=2)
    index = samples[["scan", "label"]]
    euploid = model_splits(splits, index, ["euploid"], model="paper")
    assert set(index.set_index("scan").loc[euploid["scan"], "label"]) == {"euploid"}
    # Every kept scan stays in its cohort split; nothing else is dropped.
    assert euploid.merge(splits, on="scan", suffixes=("", "_cohort")).eval("split == split_cohort").all()
    assert len(euploid) == (index.set_index("scan").loc[splits["scan"], "label"] == "euploid").sum()
    assert model_splits(splits, index, None).equals(splits)
    with pytest.raises(ValueError, match="model 'only_ds_x'.*no scan with a label in \\['nobody'\\]"):
        model_splits(splits, index, ["nobody"], model="only_ds_x")
