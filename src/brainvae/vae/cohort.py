"""Cohort arrays and subject-level splits for VAE training.

:func:`build_cohort_array` stacks every preprocessed volume of a cohort into one ``.npy`` file
(``N x X x Y x Z``, float16 by default), the brain masks into a second one (uint8), and writes an
index TSV whose row ``i`` describes volume ``i``. A DataLoader memory-maps the ``.npy``
(``np.load(..., mmap_mode="r")``): workers share the page cache instead of each decoding gzip
NIfTIs every epoch, which on 2 cores costs more than the VAE step at the demo grid.

float16 halves the file and the page-cache footprint; the inputs are normalised (|x| of order 1-10)
so its 11-bit mantissa (relative error <= 2**-11 ~ 0.05 %) is far below MRI noise.

:func:`make_splits` assigns whole subjects to train/val/test, stratified by dataset and label.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from brainvae.io import atomic_path, atomic_write_text

__all__ = [
    "INDEX_COLUMNS",
    "SPLITS",
    "build_cohort_array",
    "check_splits",
    "cohort_samples",
    "make_splits",
    "model_splits",
    "mask_path_for",
    "read_index",
    "read_splits",
    "select_training",
    "training_splits",
    "write_splits",
]

SPLITS = ("train", "val", "test")

#: Leading columns of the index TSV; covariate columns of the samples table follow.
INDEX_COLUMNS = ("row", "scan", "scan_key", "dataset", "subject", "session", "acquisition", "run",
                 "label", "role", "train", "analyse")
_DROP = {"path"}  # input paths are machine-specific and not needed downstream


def mask_path_for(array_path: str | os.PathLike[str]) -> Path:
    """Default mask array next to ``array_path``: ``cohort.npy`` -> ``cohort_mask.npy``."""
    p = Path(array_path)
    return p.with_name(f"{p.stem}_mask.npy")


def _paths_in_order(samples: pd.DataFrame, paths: Mapping[str, str | os.PathLike[str]]
                    | Sequence[str | os.PathLike[str]], what: str) -> list[Path]:
    if isinstance(paths, Mapping):
        missing = [s for s in samples["scan"] if s not in paths]
        if missing:
            raise ValueError(f"no {what} path for scan(s): {', '.join(missing[:5])}")
        return [Path(paths[s]) for s in samples["scan"]]
    paths = list(paths)
    if len(paths) != len(samples):
        raise ValueError(f"{len(paths)} {what} paths for {len(samples)} samples")
    return [Path(p) for p in paths]


def build_cohort_array(
    samples_df: pd.DataFrame,
    image_paths: Mapping[str, str | os.PathLike[str]] | Sequence[str | os.PathLike[str]],
    mask_paths: Mapping[str, str | os.PathLike[str]] | Sequence[str | os.PathLike[str]],
    out_array: str | os.PathLike[str],
    out_index: str | os.PathLike[str],
    dtype: str = "float16",
    *,
    out_mask: str | os.PathLike[str] | None = None,
) -> pd.DataFrame:
    """Stack the volumes of ``samples_df`` (in its row order) into ``out_array`` and masks.

    ``image_paths``/``mask_paths``: a mapping scan -> path, or sequences aligned with the rows.
    ``out_mask`` defaults to :func:`mask_path_for`. Every volume must have the same shape (one grid)
    and finite values. Outputs are written to temporary files and moved into place only when all
    volumes are in, so a killed job leaves no partial array. Returns the index table.
    """
    if len(samples_df) == 0:
        raise ValueError("no samples to stack")
    if samples_df["scan"].duplicated().any():
        raise ValueError("duplicate scan names in samples table")
    samples = samples_df.reset_index(drop=True)
    images = _paths_in_order(samples, image_paths, "image")
    masks = _paths_in_order(samples, mask_paths, "mask")
    out_mask = mask_path_for(out_array) if out_mask is None else Path(out_mask)

    shape = tuple(nib.load(images[0]).shape)
    if len(shape) != 3:
        raise ValueError(f"{images[0]}: expected a 3D volume, got shape {shape}")
    n = len(samples)
    with atomic_path(out_array, suffix=".npy") as tmp_arr, atomic_path(out_mask, suffix=".npy") as tmp_msk:
        arr = np.lib.format.open_memmap(tmp_arr, mode="w+", dtype=np.dtype(dtype), shape=(n, *shape))
        msk = np.lib.format.open_memmap(tmp_msk, mode="w+", dtype=np.uint8, shape=(n, *shape))
        for i, (ip, mp) in enumerate(zip(images, masks, strict=True)):
            data = np.asarray(nib.load(ip).dataobj, dtype=np.float32)
            mask = np.asarray(nib.load(mp).dataobj)
            if data.shape != shape or mask.shape != shape:
                raise ValueError(f"{ip}: shape {data.shape} (mask {mask.shape}) differs from "
                                 f"{shape} of {images[0]}; all scans must be on one grid")
            if not np.isfinite(data).all():
                raise ValueError(f"{ip}: non-finite voxel values")
            arr[i] = data
            msk[i] = mask > 0
        arr.flush()
        msk.flush()
        del arr, msk  # close the memmaps before the files are moved into place

    index = samples.drop(columns=[c for c in _DROP if c in samples.columns])
    index.insert(0, "row", np.arange(n))
    lead = [c for c in INDEX_COLUMNS if c in index.columns]
    index = index[lead + [c for c in index.columns if c not in lead]]
    atomic_write_text(index.to_csv(sep="\t", index=False), out_index)
    return index


def read_index(path: str | os.PathLike[str]) -> pd.DataFrame:
    """The index TSV of :func:`build_cohort_array`: strings, with int ``row`` and bool flags."""
    df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, na_filter=False)
    df["row"] = df["row"].astype(int)
    for column in ("train", "analyse"):
        if column in df.columns:
            df[column] = df[column].astype(str) == "True"
    return df


def select_training(samples_df: pd.DataFrame, train_labels: Sequence[str] = ("euploid",)) -> pd.DataFrame:
    """Scans the VAE may learn from: ``train`` datasets whose label is in ``train_labels``.

    The default (euploid only) keeps every DS scan out of training, so its latents are never
    fitted to it; pass more labels to train on them too.
    """
    keep = samples_df["label"].isin(list(train_labels))
    if "train" in samples_df.columns:
        keep &= samples_df["train"].astype(str).isin(["True", "true", "1"])
    return samples_df[keep].reset_index(drop=True)


def _stable_seed(seed: int, *parts: str) -> int:
    # Per-stratum seeds from a hash: adding a dataset never reshuffles the others' subjects.
    text = "\x1f".join([str(seed), *parts]).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little")


def _largest_remainder(total: int, fractions: np.ndarray) -> np.ndarray:
    exact = total * fractions
    counts = np.floor(exact).astype(int)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: total - counts.sum()]] += 1
    # A split asked for (fraction > 0) gets at least one subject when there are enough subjects,
    # taken from the largest split: a tiny cohort still has a validation and a test subject.
    wanted = fractions > 0
    if total >= wanted.sum():
        for k in np.flatnonzero(wanted & (counts == 0)):
            counts[int(np.argmax(counts))] -= 1
            counts[k] += 1
    return counts


def make_splits(
    samples_df: pd.DataFrame,
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    stratify: Sequence[str] = ("dataset", "label"),
    group: str = "subject",
) -> pd.DataFrame:
    """Assign every scan to train/val/test with all scans of one subject in one split.

    Subjects are identified by (``dataset``, ``group``): the same label in two datasets is two
    people. A subject's stratum is the ``stratify`` values of its first scan (sorted by scan name).
    Global split sizes are the largest-remainder rounding of ``n_subjects * fractions``; each
    stratum gets ``floor(n_stratum * fraction)`` subjects per split and its leftovers go, greedily
    by largest remainder, to the splits still short of their global size, so small strata do not
    all end up in train. Within a stratum, subjects are shuffled with a seed derived from ``seed``
    and the stratum. The result depends only on the table's content, not on its row order.
    Returns DataFrame(scan, split) in the order of ``samples_df``.
    """
    fr = np.asarray(fractions, dtype=float)
    if fr.shape != (3,) or (fr < 0).any() or not np.isclose(fr.sum(), 1.0):
        raise ValueError(f"fractions must be 3 non-negative numbers summing to 1, got {fractions}")
    df = samples_df.copy()
    gkey = [c for c in ("dataset", group) if c in df.columns]
    df["_g"] = df[gkey].astype(str).agg("\x1f".join, axis=1)
    first = df.sort_values("scan").groupby("_g", sort=True).first()
    strata_cols = [c for c in stratify if c in df.columns]
    first["_s"] = first[strata_cols].astype(str).agg("\x1f".join, axis=1) if strata_cols else ""

    n_subjects = len(first)
    target = _largest_remainder(n_subjects, fr)
    assignment: dict[str, str] = {}
    leftovers: list[tuple[float, str, int, list[str]]] = []
    given = np.zeros(3, dtype=int)
    for stratum, members in first.groupby("_s", sort=True):
        subjects = sorted(members.index)
        rng = np.random.default_rng(_stable_seed(seed, stratum))
        subjects = [subjects[i] for i in rng.permutation(len(subjects))]
        exact = len(subjects) * fr
        base = np.floor(exact).astype(int)
        pos = 0
        for k, count in enumerate(base):
            for subject in subjects[pos: pos + count]:
                assignment[subject] = SPLITS[k]
            pos += count
        given += base
        rest = subjects[pos:]
        for k in range(3):
            leftovers.append((exact[k] - base[k], stratum, k, rest))
    # Hand out each stratum's leftover subjects: largest remainder first, only to splits short of
    # their global target; ties broken by stratum name and split order (deterministic).
    need = target - given
    taken: dict[str, int] = {}
    for remainder, stratum, k, rest in sorted(leftovers, key=lambda t: (-t[0], t[1], t[2])):
        i = taken.get(stratum, 0)
        if i < len(rest) and need[k] > 0 and remainder > 0:
            assignment[rest[i]] = SPLITS[k]
            taken[stratum] = i + 1
            need[k] -= 1
    for stratum, members in first.groupby("_s", sort=True):  # anything left (rounding): largest need
        for subject in members.index:
            if subject not in assignment:
                k = int(np.argmax(need)) if need.max() > 0 else int(np.argmax(fr))
                assignment[subject] = SPLITS[k]
                need[k] -= 1
    # Per-stratum floors can overfill train in a tiny cohort (one stratum of 3 subjects: 2 + 1);
    # move a subject from the most overfilled split into any wanted split that is still empty.
    for k, name in enumerate(SPLITS):
        filled = {s: sum(v == s for v in assignment.values()) for s in SPLITS}
        if target[k] > 0 and filled[name] == 0:
            donor = max(SPLITS, key=lambda s: (filled[s] - target[SPLITS.index(s)], filled[s]))
            moved = sorted(subj for subj, v in assignment.items() if v == donor)[-1]
            assignment[moved] = name
    out = pd.DataFrame({"scan": df["scan"].to_numpy(), "split": df["_g"].map(assignment).to_numpy()})
    check_splits(samples_df, out, group=group)
    return out


def cohort_samples(samples_df: pd.DataFrame, exclude: Sequence[str] = ()) -> pd.DataFrame:
    """The scans that go into the cohort array: every scan except those whose ``scan_key`` (or
    ``scan``) is in ``exclude`` (``qc.exclude``), in the samples table's order."""
    excluded = set(exclude)
    keys = samples_df["scan_key"] if "scan_key" in samples_df.columns else samples_df["scan"]
    keep = ~(keys.isin(excluded) | samples_df["scan"].isin(excluded))
    return samples_df[keep].reset_index(drop=True)


def training_splits(
    samples_df: pd.DataFrame,
    *,
    train_labels: Sequence[str] | None = ("euploid",),
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    exclude: Sequence[str] = (),
    qc_table: str | os.PathLike[str] | pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Splits of the scans the VAE may learn from, as the workflow builds them.

    Candidates are :func:`cohort_samples` (``exclude`` removed) of training datasets whose label is
    in ``train_labels`` (``None``: every label), see :func:`select_training`. With a ``qc_table``
    (``qc/qc.tsv``: ``scan`` = scan key, ``passed``), scans that did not pass QC are left out too;
    they stay in the cohort array and are still encoded. Raises ValueError when fewer than three
    subjects remain, since train, validation and test each need one.
    """
    candidates = cohort_samples(samples_df, exclude)
    if train_labels is None:
        train_labels = sorted(candidates["label"].astype(str).unique())
    candidates = select_training(candidates, train_labels)
    if qc_table is not None:
        if not isinstance(qc_table, pd.DataFrame):
            qc_table = pd.read_csv(qc_table, sep="\t", dtype=str, keep_default_na=False)
        passed = qc_table["passed"].astype(str).isin(["True", "true", "1"])
        failed = set(qc_table.loc[~passed, "scan"].astype(str))
        keys = candidates["scan_key"] if "scan_key" in candidates.columns else candidates["scan"]
        candidates = candidates[~keys.isin(failed)].reset_index(drop=True)
    subjects = candidates[[c for c in ("dataset", "subject") if c in candidates.columns]].drop_duplicates()
    if len(subjects) < 3:
        raise ValueError(f"only {len(subjects)} subject(s) can be used for training (labels "
                         f"{list(train_labels)} of datasets with role train/both, QC passed); "
                         "train, validation and test need at least one each")
    return make_splits(candidates, fractions=fractions, seed=seed)


def model_splits(splits: str | os.PathLike[str] | pd.DataFrame, index: str | os.PathLike[str] | pd.DataFrame,
                 labels: Sequence[str] | None, *, model: str = "model") -> pd.DataFrame:
    """The cohort splits restricted to the scans whose label is in ``labels`` (``None``: all of them).

    One frozen cohort split serves every model variant; a variant that learns from fewer labels
    (the paper's euploid-only VAE next to one trained on every label) keeps each of its scans in the
    same split. ``index``: the cohort index (``scan``, ``label``). Raises ValueError naming the
    model and labels when the result has no training scan.
    """
    table = read_splits(splits)
    if labels is not None:
        index_df = read_index(index) if not isinstance(index, pd.DataFrame) else index
        label_of = dict(zip(index_df["scan"].astype(str), index_df["label"].astype(str)))
        table = table[table["scan"].map(label_of).isin([str(v) for v in labels])].reset_index(drop=True)
    if not (table["split"] == "train").any():
        raise ValueError(f"model {model!r}: no scan with a label in {list(labels) if labels is not None else 'any'} "
                         "is in the cohort's train split; check models.<name>.train_labels and cohort.train_labels")
    return table


def check_splits(samples_df: pd.DataFrame, splits: pd.DataFrame, group: str = "subject") -> None:
    """Raise ValueError if a subject has scans in two splits, or splits/scans are inconsistent."""
    bad = set(splits["split"]) - set(SPLITS)
    if bad:
        raise ValueError(f"unknown split name(s): {sorted(bad)}")
    if splits["scan"].duplicated().any():
        raise ValueError("a scan appears twice in the splits table")
    merged = samples_df.merge(splits, on="scan", how="inner", validate="one_to_one")
    gkey = [c for c in ("dataset", group) if c in merged.columns]
    per_subject = merged.groupby(gkey)["split"].nunique()
    leaking = per_subject[per_subject > 1]
    if len(leaking):
        names = [("/".join(map(str, k)) if isinstance(k, tuple) else str(k)) for k in leaking.index[:5]]
        raise ValueError(f"subject(s) in more than one split (data leakage): {', '.join(names)}")


def write_splits(splits: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Write DataFrame(scan, split) as TSV atomically."""
    return atomic_write_text(splits[["scan", "split"]].to_csv(sep="\t", index=False), path)


def read_splits(path_or_df: str | os.PathLike[str] | pd.DataFrame) -> pd.DataFrame:
    """DataFrame(scan, split) from a TSV path (or pass a DataFrame through)."""
    if isinstance(path_or_df, pd.DataFrame):
        return path_or_df[["scan", "split"]].copy()
    return pd.read_csv(path_or_df, sep="\t", dtype=str, keep_default_na=False)[["scan", "split"]]
