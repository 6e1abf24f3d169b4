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


def _inside(zmaps: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return zmaps[:, mask]


def test_group_map_finds_a_planted_difference_and_nothing_under_the_null():
    rng = np.random.default_rng(0)
    mask = np.ones((6, 6, 6), bool)
    a = rng.normal(size=(12, 6, 6, 6))
    b = rng.normal(size=(12, 6, 6, 6))
    in_a = np.repeat([True, False], 12)
    null = nm.group_map(_inside(np.concatenate([a, b]), mask), in_a, mask, n_permutations=200, seed=1)
    assert not null.significant.any()  # FWE 5 %: a null map is clean (with this seed)
    a[:, :2, :2, :2] += 3.0  # an effect of 3 sd in 8 voxels
    found = nm.group_map(_inside(np.concatenate([a, b]), mask), in_a, mask, n_permutations=200, seed=1)
    assert found.significant[:2, :2, :2].all() and found.significant.sum() <= 10
    assert found.difference[:2, :2, :2].mean() == pytest.approx(3.0, abs=0.6)


def test_group_map_by_blocks_from_a_memory_map_is_welch_t(tmp_path):
    from scipy import stats

    rng = np.random.default_rng(4)
    mask = rng.random((5, 6, 7)) > 0.3
    values = np.lib.format.open_memmap(tmp_path / "z.npy", mode="w+", dtype=np.float32,
                                       shape=(15, int(mask.sum())))
    values[:] = rng.normal(size=values.shape) * 2.0 + 50.0  # far from 0: the sums of squares must stay exact
    values[:6] += 0.5
    in_a = np.arange(15) < 6
    in_b = np.arange(15) >= 8  # scans 6 and 7 are in neither group
    whole = nm.group_map(values, in_a, mask, in_b=in_b, n_permutations=100, seed=2, block_voxels=10 ** 6)
    blocks = nm.group_map(values, in_a, mask, in_b=in_b, n_permutations=100, seed=2, block_voxels=7)
    expected = stats.ttest_ind(values[in_a], values[in_b], equal_var=False).statistic
    np.testing.assert_allclose(whole.t[mask], expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(blocks.t, whole.t, rtol=1e-5, atol=1e-5)
    assert blocks.threshold == pytest.approx(whole.threshold, rel=1e-6)
    np.testing.assert_allclose(whole.difference[mask], values[in_a].mean(0) - values[in_b].mean(0), atol=1e-4)
    assert np.all(whole.t[~mask] == 0)
    with pytest.raises(ValueError, match="voxels in the mask"):
        nm.group_map(values[:, :-1], in_a, mask)
    with pytest.raises(ValueError, match="both groups"):
        nm.group_map(values, in_a, mask, in_b=np.ones(15, bool))


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


def _linear_decoder(pattern: np.ndarray, rng: np.random.Generator, dims: int):
    """decode(z) = mean + z[0] * pattern + z[1:] @ noise patterns: a decoder whose first latent axis makes the
    known pattern."""
    others = rng.normal(size=(dims - 1, pattern.size))
    others *= np.linalg.norm(pattern) / np.linalg.norm(others, axis=1, keepdims=True)  # as strong as the pattern
    basis = np.vstack([pattern.ravel(), others])

    def decode(codes: np.ndarray) -> np.ndarray:
        return (np.asarray(codes) @ basis).reshape(len(codes), *pattern.shape)

    return decode


def test_traversal_agreement_against_label_shuffles():
    rng = np.random.default_rng(5)
    pattern = np.zeros((8, 8, 8))
    pattern[2:5, 2:5, 2:5] = -1.0
    pattern[5:7, 5:7, 5:7] = 0.5
    mask = np.ones(pattern.shape, bool)
    decode = _linear_decoder(pattern, rng, 16)
    labels = np.array(["DS"] * 15 + ["eu"] * 15)
    latents = rng.normal(size=(30, 16))
    with_effect = latents.copy()
    with_effect[:15, 0] += 3.0  # the positive group lies along the pattern's axis
    change = nm.traversal_change(with_effect, labels, "DS", "eu", -1.0, 3.0, decode)
    found = nm.traversal_agreement(change, with_effect, labels, "DS", "eu", -1.0, 3.0, decode, pattern, mask,
                                   n_permutations=99, seed=0)
    assert found.correlation > 0.8 and found.p_value < 0.05 and found.agrees(0.05)
    assert found.n_permutations == 99 and found.null_quantiles["q95"] < found.correlation
    # No group effect (the labels say nothing about the latents): no agreement.
    change = nm.traversal_change(latents, labels, "DS", "eu", -1.0, 3.0, decode)
    none = nm.traversal_agreement(change, latents, labels, "DS", "eu", -1.0, 3.0, decode, pattern, mask,
                                  n_permutations=99, seed=0)
    assert none.p_value > 0.05 and not none.agrees(0.05)
    # The opposite effect correlates negatively: never agreement.
    against = latents.copy()
    against[:15, 0] -= 3.0
    change = nm.traversal_change(against, labels, "DS", "eu", -1.0, 3.0, decode)
    assert not nm.traversal_agreement(change, against, labels, "DS", "eu", -1.0, 3.0, decode, pattern, mask,
                                      n_permutations=99).agrees(0.05)
