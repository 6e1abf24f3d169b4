"""Normative maps: z-map arithmetic against a hand-computed case, group maps with a family-wise threshold,
Mahalanobis and error z-scores, traversals and their agreement with a known field."""

import numpy as np
import pytest

from brainvae.analysis import normative as nm


def test_residual_and_zmap_by_hand():
    mask = np.array([True, True, False, True])
    image = np.array([1.0, 2.0, 9.0, 4.0])
    recon = np.array([0.5, 2.5, 0.0, 4.0])
    assert nm.residual(image, recon, mask).tolist() == [0.5, -0.5, 0.0, 0.0]
    # Reference residuals of three euploid scans; the last voxel is outside one scan's mask.
    refs = [np.array([0.0, 0.0, 0.0, 1.0]), np.array([1.0, -1.0, 0.0, 2.0]), np.array([2.0, 1.0, 0.0, 3.0])]
    masks = [mask, mask, np.array([True, True, False, False])]
    stats = nm.ReferenceStats.fit(refs, masks)
    # voxel 0: mean 1, sd 1; voxel 1: mean 0, sd 1; voxel 2: sd 0 -> the floor; voxel 3 not in every mask
    assert stats.mean.tolist() == pytest.approx([1.0, 0.0, 0.0, 2.0])
    assert stats.sd.tolist() == pytest.approx([1.0, 1.0, nm.MIN_SD, 1.0])
    assert stats.mask.tolist() == [True, True, False, False] and stats.n == 3
    z = nm.zmap(np.array([3.0, -2.0, 5.0, 9.0]), stats, mask)
    assert z.tolist() == pytest.approx([2.0, -2.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="two or more"):
        nm.ReferenceStats.fit(refs[:1], masks[:1])


def test_regional_summary():
    z = np.array([2.5, -1.0, 0.0, 3.0, 1.0])
    labels = np.array([1, 1, 1, 2, 0])
    table = nm.regional_summary(z, labels, {0: "background", 1: "a", 2: "b"})
    assert table["region"].tolist() == ["a", "b"]
    a = table.set_index("region").loc["a"]
    assert a["voxels"] == 2 and a["mean_z"] == pytest.approx(0.75) and a["mean_abs_z"] == pytest.approx(1.75)
    assert a["fraction_abs_z_over_2"] == pytest.approx(0.5)


def test_group_map_finds_a_planted_difference_and_nothing_under_the_null():
    rng = np.random.default_rng(0)
    mask = np.ones((6, 6, 6), bool)
    a = rng.normal(size=(12, 6, 6, 6))
    b = rng.normal(size=(12, 6, 6, 6))
    null = nm.group_map(a, b, mask, n_permutations=200, seed=1)
    assert not null.significant.any()  # FWE 5 %: a null map is clean (with this seed)
    a[:, :2, :2, :2] += 3.0  # an effect of 3 sd in 8 voxels
    found = nm.group_map(a, b, mask, n_permutations=200, seed=1)
    assert found.significant[:2, :2, :2].all() and found.significant.sum() <= 10
    assert found.difference[:2, :2, :2].mean() == pytest.approx(3.0, abs=0.6)


def test_mahalanobis_and_error_scores():
    rng = np.random.default_rng(3)
    reference = rng.normal(size=(200, 3)) * np.array([1.0, 2.0, 0.5])
    scores = nm.mahalanobis_scores(np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0]]),
                                   reference)
    # One sd along each axis is distance ~1, whatever that axis' scale; the centre ~0.
    assert scores[0] < 0.2 and scores[1:] == pytest.approx([1.0, 1.0, 2.0], rel=0.2)
    assert nm.zscores([3.0], [1.0, 2.0, 3.0]).tolist() == pytest.approx([1.0])
    with pytest.raises(ValueError):
        nm.zscores([1.0], [2.0, 2.0])


def test_traversal_and_field_agreement():
    latents = np.array([[0.0, 0.0], [0.0, 2.0], [4.0, 0.0], [4.0, 2.0]])
    direction = nm.traversal_direction(latents, ["eu", "eu", "DS", "DS"], "DS", "eu")
    assert direction.tolist() == pytest.approx([1.0, 0.0])
    codes = nm.traversal_codes(np.array([1.0, 1.0]), direction, [-1, 0, 2])
    np.testing.assert_allclose(codes, [[0.0, 1.0], [1.0, 1.0], [3.0, 1.0]])
    field = np.linspace(-1, 1, 50)
    mask = np.ones(50, bool)
    assert nm.field_agreement(2 * field + 1, field, mask) == pytest.approx(1.0)
    assert abs(nm.field_agreement(np.random.default_rng(0).normal(size=50), field, mask)) < 0.4
    with pytest.raises(ValueError):
        nm.traversal_direction(latents, ["eu"] * 4, "DS", "eu")
