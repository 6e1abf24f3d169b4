"""Participant-grouped cross-validation folds, label checks and participant-level label permutation.

Every split here is made on *participants*, never on scans: two sessions of one person are nearly
identical images, so a split that put one in training and the other in testing would measure
re-identification, not classification. Folds are a pure function of (labels, groups, seed), so the
same call gives the same folds for every feature set and every model (paired comparisons), and the
fold assignment can be written to a table and reused by a later job.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from brainvae.analysis.errors import AnalysisError
from brainvae.analysis.names import MIN_PARTICIPANTS_PER_CLASS

__all__ = [
    "MIN_PARTICIPANTS_PER_CLASS",
    "OuterFold",
    "check_labels",
    "effective_n_splits",
    "folds_from_table",
    "folds_to_table",
    "group_labels",
    "inner_splits",
    "make_outer_folds",
    "participant_groups",
    "permutation_matrix",
    "permute_labels_by_group",
]


@dataclass(frozen=True)
class OuterFold:
    """One outer split: row indices (into the analysed table) of the training and test scans."""

    repeat: int
    fold: int
    train: np.ndarray
    test: np.ndarray


def participant_groups(
    meta: pd.DataFrame, *, dataset_col: str = "dataset", participant_col: str = "participant"
) -> np.ndarray:
    """One group id per row: ``<dataset>/<participant>``.

    Qualified by dataset so that two datasets that both have a ``sub-01`` never merge into one
    person (inputs are validated to be unique, but tables from elsewhere may not be).
    """
    missing = [c for c in (participant_col,) if c not in meta.columns]
    if missing:
        raise AnalysisError("table", f"missing column(s) {missing} needed to group scans by participant")
    participant = meta[participant_col].astype(str)
    if dataset_col in meta.columns:
        return (meta[dataset_col].astype(str) + "/" + participant).to_numpy()
    return participant.to_numpy()


def group_labels(labels: Sequence | np.ndarray, groups: Sequence | np.ndarray) -> pd.Series:
    """The label of each participant (index: group id, sorted); error if a participant has two."""
    frame = pd.DataFrame({"group": np.asarray(groups), "label": np.asarray(labels)})
    n_per_group = frame.groupby("group")["label"].nunique()
    mixed = n_per_group[n_per_group > 1].index.tolist()
    if mixed:
        raise AnalysisError(
            "labels",
            f"participant(s) {', '.join(map(str, mixed[:10]))} have scans with different labels; "
            "a participant-level analysis needs one label per participant",
        )
    return frame.groupby("group")["label"].first().sort_index()


def check_labels(
    labels: Sequence | np.ndarray,
    groups: Sequence | np.ndarray,
    *,
    datasets: Sequence | np.ndarray | None = None,
    positive: str | None = None,
    label_name: str = "label",
) -> None:
    """Raise :class:`AnalysisError` unless the labels support a grouped nested cross-validation.

    Checks: at least two classes (error names the dataset(s)), the positive class present, at least
    :data:`MIN_PARTICIPANTS_PER_CLASS` participants per class, one label per participant. A dataset
    holding a single class within a pooled analysis only warns: label and site are then confounded,
    which the site check and the confounds baseline are there to expose.
    """
    labels = np.asarray(labels).astype(str)
    per_group = group_labels(labels, groups)
    classes = sorted(set(per_group))
    where = "labels"
    if datasets is not None:
        names = sorted(set(np.asarray(datasets).astype(str)))
        where = f"dataset{'s' if len(names) > 1 else ''} {', '.join(names)}"
    if len(classes) < 2:
        only = classes[0] if classes else "(none)"
        raise AnalysisError(
            where,
            f"column '{label_name}' has a single class '{only}'; classification needs at least two "
            "(add a dataset with the other class, or choose another label)",
        )
    if positive is not None and positive not in classes:
        raise AnalysisError(
            where, f"positive class '{positive}' does not occur in column '{label_name}' (classes: {', '.join(classes)})"
        )
    counts = per_group.value_counts()
    for cls, n in counts.items():
        if n < MIN_PARTICIPANTS_PER_CLASS:
            members = ", ".join(per_group[per_group == cls].index.astype(str))
            raise AnalysisError(
                where,
                f"class '{cls}' of column '{label_name}' has {n} participant{'s' if n != 1 else ''} ({members}); "
                f"nested cross-validation needs at least {MIN_PARTICIPANTS_PER_CLASS} per class",
            )
    if datasets is not None:
        frame = pd.DataFrame({"dataset": np.asarray(datasets).astype(str), "label": labels})
        per_dataset = frame.groupby("dataset")["label"].unique()
        single = {d: v[0] for d, v in per_dataset.items() if len(v) == 1}
        if single and len(per_dataset) > 1:
            listed = ", ".join(f"{d} (only '{c}')" for d, c in sorted(single.items()))
            warnings.warn(
                f"dataset(s) {listed} hold a single class of '{label_name}': label and site are confounded; "
                "compare with the confounds-only baseline and the site check",
                UserWarning,
                stacklevel=2,
            )


def effective_n_splits(
    labels: Sequence | np.ndarray, groups: Sequence | np.ndarray, n_splits: int, *, what: str = "outer"
) -> int:
    """``n_splits`` reduced (with a warning) to the number of participants in the smallest class.

    Every fold needs at least one participant of each class in its test part; asking for more
    folds than the minority class has participants makes empty-class folds and undefined AUCs.
    """
    if n_splits < 2:
        raise AnalysisError(f"{what} folds", f"n_splits={n_splits}; cross-validation needs at least 2")
    per_group = group_labels(labels, groups)
    smallest = int(per_group.value_counts().min())
    if smallest < 2:
        raise AnalysisError(
            f"{what} folds",
            f"the smallest class has {smallest} participant(s) in this data; {what} cross-validation needs at least 2",
        )
    if n_splits > smallest:
        warnings.warn(
            f"{what} cross-validation: k={n_splits} is larger than the {smallest} participants of the smallest "
            f"class; using k={smallest}",
            UserWarning,
            stacklevel=2,
        )
        return smallest
    return n_splits


def make_outer_folds(
    labels: Sequence | np.ndarray,
    groups: Sequence | np.ndarray,
    *,
    n_splits: int = 5,
    n_repeats: int = 5,
    seed: int = 0,
) -> list[OuterFold]:
    """Repeated stratified group k-fold: ``n_repeats`` × k folds, repeat r shuffled with ``seed + r``.

    Stratified on the label, grouped by participant. The result does not depend on row order
    (StratifiedGroupKFold works on sorted unique group ids), so separate jobs agree on it.
    """
    labels = np.asarray(labels).astype(str)
    groups = np.asarray(groups)
    k = effective_n_splits(labels, groups, n_splits, what="outer")
    folds: list[OuterFold] = []
    for repeat in range(n_repeats):
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed + repeat)
        with warnings.catch_warnings():
            # sklearn warns when the smallest class has fewer *scans* than k; we already checked participants.
            warnings.simplefilter("ignore", UserWarning)
            splits = list(splitter.split(np.zeros(len(labels)), labels, groups))
        for fold, (train, test) in enumerate(splits):
            folds.append(OuterFold(repeat, fold, np.sort(train), np.sort(test)))
    return folds


def inner_splits(
    labels: Sequence | np.ndarray, groups: Sequence | np.ndarray, n_splits: int, *, seed: int = 0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Grouped stratified splits of an outer *training* set for the inner grid search.

    k is reduced to the minority class's participants in this training set (warning suppressed:
    it is expected whenever the outer k was already reduced, and would repeat for every fold).
    """
    labels = np.asarray(labels).astype(str)
    per_group = group_labels(labels, groups)
    smallest = int(per_group.value_counts().min()) if per_group.nunique() > 1 else 0
    if smallest < 2:
        raise AnalysisError(
            "inner folds",
            f"an outer training set holds {smallest} participant(s) of its smallest class; "
            "the inner grid search needs at least 2",
        )
    k = min(n_splits, smallest)
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return [(np.sort(tr), np.sort(te)) for tr, te in splitter.split(np.zeros(len(labels)), labels, groups)]


def permute_labels_by_group(
    labels: Sequence | np.ndarray, groups: Sequence | np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Shuffle labels among participants; every scan of a participant gets that participant's new label.

    Permuting scans instead would give two sessions of one person different labels, a null
    distribution that the real data can never come from.
    """
    group_labels(labels, groups)  # one label per participant, or an error naming them
    seed = int(rng.integers(0, 2**63 - 1))
    return permutation_matrix(labels, groups, 1, seed=seed)[:, 1]


def permutation_matrix(
    values: Sequence | np.ndarray, groups: Sequence | np.ndarray, n_permutations: int, *, seed: int = 0,
    blocks: Sequence | np.ndarray | None = None,
) -> np.ndarray:
    """(n, 1 + n_permutations): ``values`` in column 0, then permutations among participants (numpy only).

    Scans of one participant move together. When every participant's scans share one value (a
    diagnosis), participants' values are permuted among participants. When values differ within a
    participant (age at each session), whole value vectors are exchanged among participants with the
    same number of scans (in their row order), so every permuted column is a relabelling of
    participants that keeps each one's within-person pattern. ``blocks`` (one id per scan, constant
    within a participant, e.g. its outer test fold): values are permuted only within each block.
    """
    values = np.asarray(values)
    groups = np.asarray(groups)
    n = values.shape[0]
    if groups.shape[0] != n:
        raise AnalysisError("permutation", f"{n} values but {groups.shape[0]} group ids")
    rng = np.random.default_rng(seed)
    out = np.empty((n, 1 + n_permutations), dtype=values.dtype)
    out[:, 0] = values
    if n_permutations == 0 or n == 0:
        return out
    _, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    n_groups = len(first)
    block = np.zeros(n_groups, dtype=np.int64)
    if blocks is not None:
        _, block_codes = np.unique(np.asarray(blocks), return_inverse=True)
        block = block_codes.reshape(-1)[first]
        if not np.array_equal(block[inverse], block_codes.reshape(-1)):
            raise AnalysisError("permutation", "a participant's scans lie in different blocks")
    sizes = np.bincount(inverse)
    constant = np.array_equal(values[first][inverse], values)
    # Participants are exchanged within cells of equal block (and, for values varying within participants,
    # equal number of scans): random keys sorted within each cell give every cell a uniform permutation.
    cell = block if constant else block * (sizes.max() + 1) + sizes
    order = np.argsort(cell, kind="stable")  # the slots of every cell, in a fixed order
    keys = rng.random((n_permutations, n_groups)) + cell[order][None, :]
    donors = np.empty((n_permutations, n_groups), dtype=np.int64)
    donors[:, order] = order[np.argsort(keys, axis=1)]  # donors[p, g]: whose values participant g receives
    if constant:
        out[:, 1:] = values[first][donors][:, inverse].T
        return out
    by_group = np.argsort(inverse, kind="stable")
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    rank = np.empty(n, dtype=np.int64)  # position of each scan among its participant's scans
    rank[by_group] = np.arange(n) - np.repeat(starts, sizes)
    # Scan k of participant g receives scan k of its donor (same number of scans, by construction).
    donor_rows = starts[donors[:, inverse]] + rank[None, :]
    out[:, 1:] = values[by_group][donor_rows].T
    return out


def folds_to_table(folds: Sequence[OuterFold], groups: Sequence | np.ndarray) -> pd.DataFrame:
    """Participant-level fold table (repeat, fold, group) of the *test* assignments, for reuse."""
    groups = np.asarray(groups)
    rows = [
        {"repeat": f.repeat, "fold": f.fold, "group": g}
        for f in folds
        for g in sorted(set(groups[f.test].tolist()))
    ]
    return pd.DataFrame(rows, columns=["repeat", "fold", "group"])


def folds_from_table(table: pd.DataFrame, groups: Sequence | np.ndarray) -> list[OuterFold]:
    """Rebuild :class:`OuterFold` row indices for ``groups`` from :func:`folds_to_table` output.

    Lets two jobs with different row orders (or one model's table and a voxel table) use exactly
    the same participant-level folds.
    """
    groups = np.asarray(groups).astype(str)
    table = table.astype({"group": str})
    missing = sorted(set(groups) - set(table["group"]))
    if missing:
        raise AnalysisError("fold table", f"participant(s) not assigned to any fold: {', '.join(missing[:10])}")
    folds = []
    for (repeat, fold), part in table.groupby(["repeat", "fold"], sort=True):
        is_test = np.isin(groups, part["group"].to_numpy())
        folds.append(OuterFold(int(repeat), int(fold), np.flatnonzero(~is_test), np.flatnonzero(is_test)))
    return folds
