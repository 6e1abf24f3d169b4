"""The permuted-label check (AUC within 0.5 ± 0.1) and proof that it catches leakage.

With labels permuted among participants there is nothing to learn, so an honest procedure scores
chance. A procedure that lets the test scans influence what is learnt — here the classic mistake of
selecting features on all scans before cross-validating — scores well above chance on the same
permuted labels, and the check fails. The workflow runs the same check on its own permutation test
(tests/test_workflow_pipeline.py).
"""

import numpy as np
import pytest
from sklearn.feature_selection import f_classif

from brainvae.analysis import (
    encode_labels,
    make_outer_folds,
    nested_cv,
    participant_groups,
    permutation_null,
    permute_labels_by_group,
)
from synthetic_latents import synthetic_cohort

CHANCE_TOLERANCE = 0.1
# Each permuted AUC scatters by ~0.14 at this size: the mean of 10 is within ~0.05 of its expectation.
N_PERMUTATIONS = 10
CV = dict(n_splits=5, n_repeats=1, n_inner=3, seed=0)


def assert_chance(auc: float) -> None:
    """The check: a mean AUC on permuted labels within 0.5 ± 0.1."""
    assert abs(auc - 0.5) <= CHANCE_TOLERANCE, f"AUC {auc:.3f} on permuted labels: leakage"


@pytest.fixture(scope="module")
def noise():
    # Many noisy features, few participants (some with two sessions), no group effect at all.
    c = synthetic_cohort(n_subjects=40, n_latent=16, n_voxels=2000, effect=0.0, site_effect=0.0, seed=7)
    return c.voxels.astype(np.float64), c.meta["group"].to_numpy(), participant_groups(c.meta)


def leaky_null(X, labels, groups, *, k=10):
    """Permuted-label AUCs of a pipeline that picks the k best features on *all* scans before the CV."""
    aucs = []
    for i in range(N_PERMUTATIONS):
        perm = permute_labels_by_group(labels, groups, np.random.default_rng([CV["seed"], i]))
        y, classes = encode_labels(perm, "DS")
        best = np.argsort(f_classif(X, y)[0])[::-1][:k]  # the leak: test scans' labels choose the features
        folds = make_outer_folds(perm, groups, n_splits=CV["n_splits"], n_repeats=CV["n_repeats"], seed=CV["seed"])
        res = nested_cv(X[:, best], y, groups, folds, classifier="logreg", classes=classes, n_inner=CV["n_inner"],
                        seed=CV["seed"], param_grid={"C": [1.0]})
        aucs.append(res.statistic("roc_auc"))
    return np.array(aucs)


def test_nested_grouped_procedure_is_at_chance_on_permuted_labels(noise):
    X, labels, groups = noise
    null = permutation_null(X, labels, groups, classifier="logreg", positive="DS", n_permutations=N_PERMUTATIONS,
                            param_grid={"C": [1.0]}, **CV)
    assert_chance(float(np.mean(null)))


def test_the_check_fails_a_pipeline_that_selects_features_on_all_scans(noise):
    X, labels, groups = noise
    leaky = float(np.mean(leaky_null(X, labels, groups)))
    assert leaky > 0.5 + CHANCE_TOLERANCE
    with pytest.raises(AssertionError, match="leakage"):
        assert_chance(leaky)
