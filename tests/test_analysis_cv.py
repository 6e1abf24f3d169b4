"""Participant-grouped folds, label checks and participant-level permutation (brainvae.analysis.cv)."""

import numpy as np
import pandas as pd
import pytest

from brainvae.analysis import (
    AnalysisError,
    check_labels,
    folds_from_table,
    folds_to_table,
    make_outer_folds,
    participant_groups,
    permute_labels_by_group,
    run_classification,
)
from brainvae.analysis.cv import inner_splits
from brainvae.analysis.features import FeatureSet
from synthetic_latents import synthetic_cohort


@pytest.fixture(scope="module")
def cohort():
    return synthetic_cohort(n_subjects=40, second_session_fraction=0.5, seed=3)


def test_no_participant_in_train_and_test_of_a_fold(cohort):
    groups = participant_groups(cohort.meta)
    assert len(set(groups)) < len(groups)  # some participants really have two sessions
    folds = make_outer_folds(cohort.meta["group"], groups, n_splits=5, n_repeats=3, seed=0)
    assert len(folds) == 15
    for f in folds:
        assert not set(groups[f.train]) & set(groups[f.test])
        assert len(np.intersect1d(f.train, f.test)) == 0
    for r in range(3):  # within a repeat the test parts partition the scans
        tests = np.concatenate([f.test for f in folds if f.repeat == r])
        np.testing.assert_array_equal(np.sort(tests), np.arange(len(groups)))
        # both classes in every test fold (stratified), so every fold's AUC is defined
        for f in (f for f in folds if f.repeat == r):
            assert cohort.meta["group"].iloc[f.test].nunique() == 2


def test_inner_splits_are_grouped_too(cohort):
    groups = participant_groups(cohort.meta)
    labels = cohort.meta["group"].to_numpy()
    for tr, te in inner_splits(labels, groups, 3, seed=1):
        assert not set(groups[tr]) & set(groups[te])


def test_folds_deterministic_and_independent_of_row_order(cohort):
    meta = cohort.meta
    groups = participant_groups(meta)
    a = folds_to_table(make_outer_folds(meta["group"], groups, n_repeats=2, seed=7), groups)
    b = folds_to_table(make_outer_folds(meta["group"], groups, n_repeats=2, seed=7), groups)
    pd.testing.assert_frame_equal(a, b)
    shuffled = meta.sample(frac=1.0, random_state=0).reset_index(drop=True)
    g2 = participant_groups(shuffled)
    c = folds_to_table(make_outer_folds(shuffled["group"], g2, n_repeats=2, seed=7), g2)
    pd.testing.assert_frame_equal(a, c)
    other = folds_to_table(make_outer_folds(meta["group"], groups, n_repeats=2, seed=8), groups)
    assert not a.equals(other)


def test_fold_table_round_trip(cohort):
    groups = participant_groups(cohort.meta)
    folds = make_outer_folds(cohort.meta["group"], groups, n_splits=4, n_repeats=2, seed=0)
    back = folds_from_table(folds_to_table(folds, groups), groups)
    assert [(f.repeat, f.fold) for f in back] == [(f.repeat, f.fold) for f in folds]
    for f, g in zip(folds, back):
        np.testing.assert_array_equal(f.test, g.test)
        np.testing.assert_array_equal(f.train, g.train)
    with pytest.raises(AnalysisError, match="not assigned"):
        folds_from_table(folds_to_table(folds, groups), np.append(groups, "X/sub-new"))


def test_permutation_keeps_sessions_of_a_participant_together(cohort):
    groups = participant_groups(cohort.meta)
    labels = cohort.meta["group"].to_numpy()
    perm = permute_labels_by_group(labels, groups, np.random.default_rng(0))
    frame = pd.DataFrame({"g": groups, "y": perm})
    assert (frame.groupby("g")["y"].nunique() == 1).all()
    # the class counts of participants are unchanged, but the assignment changed
    per_orig = pd.Series(labels, index=groups).groupby(level=0).first()
    per_perm = frame.groupby("g")["y"].first()
    assert per_orig.value_counts().to_dict() == per_perm.value_counts().to_dict()
    assert (per_orig.sort_index() != per_perm.sort_index()).any()


def test_k_larger_than_minority_is_reduced_with_warning():
    c = synthetic_cohort(n_subjects=20, ds_fraction=0.2, seed=0)  # 4 DS participants
    groups = participant_groups(c.meta)
    with pytest.warns(UserWarning, match="using k=4"):
        folds = make_outer_folds(c.meta["group"], groups, n_splits=5, n_repeats=1)
    assert len(folds) == 4


def test_class_with_one_member_is_a_clear_error():
    c = synthetic_cohort(n_subjects=20, ds_fraction=0.05, seed=0)  # 1 DS participant
    groups = participant_groups(c.meta)
    with pytest.raises(AnalysisError, match="class 'DS' of column 'group' has 1 participant"):
        check_labels(c.meta["group"], groups, datasets=c.meta["dataset"], positive="DS", label_name="group")
    with pytest.raises(AnalysisError, match="has 1 participant"):
        run_classification(c.meta, [FeatureSet("latents", c.latents)], classifiers=["logreg"], n_permutations=0)


def test_single_class_dataset_error_names_the_dataset():
    c = synthetic_cohort(n_subjects=40, seed=0)
    meta = c.meta.copy()
    meta.loc[meta["dataset"] == "IXI", "group"] = "euploid"
    with pytest.raises(AnalysisError, match=r"^dataset IXI: column 'group' has a single class 'euploid'"):
        run_classification(meta, [FeatureSet("latents", c.latents)], dataset="IXI", classifiers=["logreg"],
                           n_permutations=0)
    pooled = meta.assign(group="euploid")
    with pytest.raises(AnalysisError, match=r"^datasets HCP, IXI: column 'group' has a single class"):
        run_classification(pooled, [FeatureSet("latents", c.latents)], classifiers=["logreg"], n_permutations=0)
    # pooled with one single-class dataset: allowed, but warns about the site confound
    with pytest.warns(UserWarning, match=r"IXI \(only 'euploid'\)"):
        check_labels(meta["group"], participant_groups(meta), datasets=meta["dataset"], positive="DS")


def test_positive_class_must_exist_and_labels_per_participant_consistent():
    c = synthetic_cohort(n_subjects=20, seed=0)
    groups = participant_groups(c.meta)
    with pytest.raises(AnalysisError, match="positive class 'Down'"):
        check_labels(c.meta["group"], groups, positive="Down")
    meta = c.meta.copy()
    twice = meta["participant"].duplicated(keep=False)
    first = meta.index[twice][0]
    meta.loc[first, "group"] = "DS" if meta.loc[first, "group"] == "euploid" else "euploid"
    with pytest.raises(AnalysisError, match="different labels"):
        check_labels(meta["group"], participant_groups(meta))
