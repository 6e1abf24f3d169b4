"""BIDS inputs -> one samples table (one row per T1w scan).

The table is the single source of truth for the rest of the workflow: its ``scan`` column is the
Snakemake wildcard and ``path`` is the NIfTI to read. :func:`collect_samples` checks everything a
user can get wrong in a BIDS folder or in the ``datasets`` config and reports *all* problems in one
:class:`~brainvae.errors.InputError`, so one run is enough to see what to fix.

Why not ``ancpbids.BIDSLayout(root).get(suffix="T1w")``? Measured with ancpbids 0.4.10:

* building the layout is quadratic in the number of folders: 0.4 s / 1.5 s / 8.7 s for
  1,000 / 2,000 / 5,000 subjects here (``paths=`` mode is no better, ~11 s);
* it walks and returns files from ``sourcedata/``, ``code/`` and ``.git/`` (``scope="raw"`` only
  drops ``derivatives/``), and ``sourcedata/`` may hold millions of DICOMs;
* it silently skips names whose labels contain ``_`` or ``.`` (``sub-a_b``), reads ``sub-a-b`` as
  ``sub-a``, keeps labels with spaces, accepts T1w files outside ``anat/`` or whose ``sub-``
  differs from the folder, and turns ``run-01`` into the integer ``1``;
* it unpickles ``.ancpbids-dataset.pickle`` from the dataset root when given options.

So we list the only places a raw T1w may live, ``sub-*/[ses-*/]anat/*_T1w.nii[.gz]``, ourselves
(linear, never enters ``derivatives/`` or ``sourcedata/``), split each name with ancpbids' BIDS
name parser, and turn every bad folder or file name into an error instead of a silently
missing subject. A T1w in another format (``sub-01_T1w.mgz``, ``.mgh``, ``.img``, ``.nrrd``,
``.mnc``, a DICOM folder) is an error too, naming the file and how to convert it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

import pandas as pd
from ancpbids.utils import parse_bids_name

from .errors import ConfigError, InputError
from .naming import SCAN_ENTITIES, is_bids_label, scan_dir, scan_key, scan_path

#: Fixed columns of the samples table, in order; covariate columns follow.
SAMPLE_COLUMNS = ("scan", "scan_key", "dataset", "subject", "session", "acquisition", "run",
                  "path", "label", "role", "train", "analyse")

ROLES = {"train": (True, False), "analyse": (False, True), "both": (True, True)}

T1W_PATTERNS = "sub-*/anat/*_T1w.nii[.gz], sub-*/ses-*/anat/*_T1w.nii[.gz]"
T1W_EXTENSIONS = (".nii.gz", ".nii")
#: T1w images in formats BIDS raw data does not allow (it holds .nii/.nii.gz only): extension ->
#: (what it is, how to convert it). They are reported, never silently ignored.
FOREIGN_T1W = {
    ".mgz": ("a FreeSurfer MGH image", "mri_convert {name} {stem}.nii.gz"),
    ".mgh": ("a FreeSurfer MGH image", "mri_convert {name} {stem}.nii.gz"),
    ".img": ("an Analyze/NIfTI pair image", "e.g. nibabel or mri_convert, to {stem}.nii.gz"),
    ".hdr": ("an Analyze/NIfTI pair header", "e.g. nibabel or mri_convert, to {stem}.nii.gz"),
    ".nrrd": ("an NRRD image", "e.g. 3D Slicer or c3d, to {stem}.nii.gz"),
    ".nhdr": ("an NRRD header", "e.g. 3D Slicer or c3d, to {stem}.nii.gz"),
    ".mnc": ("a MINC image", "mnc2nii, to {stem}.nii.gz"),
    ".dcm": ("a DICOM file", "dcm2niix -z y -f {stem} <its folder>"),
    "": ("a folder (a DICOM series?)", "dcm2niix -z y -f {stem} {name}"),
}

#: Cell values that mean "no value" in a BIDS TSV (BIDS writes n/a).
MISSING = {"", "n/a", "N/A", "NA", "nan", "NaN"}

_DATASET_NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")


class _Problems:
    """Collects (where, reason) pairs so that one error can list every problem."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []

    def add(self, where: str | Path, reason: str) -> None:
        self.items.append((str(where), reason))

    def __len__(self) -> int:
        return len(self.items)

    def raise_if_any(self, where: str | Path) -> None:
        if not self.items:
            return
        if len(self.items) == 1:
            raise InputError(*self.items[0])
        lines = "\n".join(f"  - {w}: {r}" for w, r in self.items)
        raise InputError(where, f"{len(self.items)} problems in the input data:\n{lines}")


def _label_or_problem(kind: str, label: str, where: Path, problems: _Problems) -> bool:
    if is_bids_label(label):
        return True
    problems.add(where, f"{kind} label {label!r} is not a BIDS label (letters and digits only; "
                        "no '-', '_', '.', spaces or path characters)")
    return False


# --------------------------------------------------------------------------------------------
# Finding and parsing T1w files
# --------------------------------------------------------------------------------------------

def _subdirs(path: Path, prefix: str) -> list[os.DirEntry]:
    with os.scandir(path) as it:
        return sorted((e for e in it if e.name.startswith(prefix) and e.is_dir()),
                      key=lambda e: e.name)


def _find_t1w(root: Path, problems: _Problems) -> list[tuple[str, str, str | None]]:
    """Relative paths of candidate T1w files as (rel_path, folder sub label, folder ses label).

    Only ``sub-*/[ses-*/]anat/`` is listed: derivatives/, sourcedata/, code/ and .git/ are never
    entered. Folders with bad labels are reported, not skipped, so no subject goes missing silently.
    """
    found: list[tuple[str, str, str | None]] = []
    for sub_entry in _subdirs(root, "sub-"):
        sub = sub_entry.name[len("sub-"):]
        if not _label_or_problem("subject folder", sub, Path(sub_entry.path), problems):
            continue
        anat_dirs = [(None, Path(sub_entry.path, "anat"))]
        for ses_entry in _subdirs(Path(sub_entry.path), "ses-"):
            ses = ses_entry.name[len("ses-"):]
            if _label_or_problem("session folder", ses, Path(ses_entry.path), problems):
                anat_dirs.append((ses, Path(ses_entry.path, "anat")))
        for ses, anat in anat_dirs:
            if not anat.is_dir():
                continue
            with os.scandir(anat) as it:
                names = sorted(e.name for e in it)
            for name in names:
                # '._sub-01_T1w.nii.gz' are macOS resource forks, not images.
                if name.startswith("."):
                    continue
                if not name.endswith(("_T1w.nii", "_T1w.nii.gz")):
                    _foreign_t1w(anat / name, problems)
                    continue
                found.append((anat.relative_to(root).joinpath(name).as_posix(), sub, ses))
    return found


def _foreign_t1w(path: Path, problems: _Problems) -> None:
    """Report a T1w image in a format other than NIfTI (``sub-01_T1w.mgz``), naming the fix."""
    stem, sep, extension = path.name.rpartition("_T1w")
    if not sep or extension.lower() not in FOREIGN_T1W or (not extension and not path.is_dir()):
        return  # not a T1w (sidecars, other suffixes), or a format we do not know
    what, how = FOREIGN_T1W[extension.lower()]
    how = how.format(name=path.name, stem=f"{stem}_T1w")
    if extension.lower() in (".mgz", ".mgh"):
        how += ", or let `brainvae import-table` convert it into a new BIDS folder"
    problems.add(path, f"{what}, not NIfTI: BIDS raw data holds T1w images as .nii/.nii.gz only; "
                       f"convert it ({how})")


def _parse_name(name: str) -> dict[str, str] | str:
    """``sub-01_run-01_T1w.nii.gz`` -> ``{'sub': '01', 'run': '01'}``, or why it is invalid.

    Labels are kept as written (ancpbids' layout would turn ``run-01`` into ``1``). We split the
    name ourselves for specific messages, then require ancpbids' BIDS name parser to agree.
    """
    extension = ".nii.gz" if name.endswith(".nii.gz") else ".nii"
    stem = name[: -len(f"_T1w{extension}")]
    entities: dict[str, str] = {}
    for part in stem.split("_"):
        key, sep, value = part.partition("-")
        if not sep:
            return f"{part!r} is not an entity-label pair"
        if key in entities:
            return f"entity {key!r} appears twice"
        if key not in SCAN_ENTITIES:
            return (f"entity {key!r} is not supported for T1w inputs (brainvae tells scans apart "
                    f"by {', '.join(SCAN_ENTITIES)}); move or rename the file")
        if not is_bids_label(value):
            return (f"{key} label {value!r} is not a BIDS label (letters and digits only; "
                    "no '-', '_', '.', spaces or path characters)")
        entities[key] = value
    if next(iter(entities)) != "sub":
        return "it must start with sub-<label>"
    parsed = parse_bids_name(name)
    if parsed is None or parsed["entities"] != entities or parsed["suffix"] != "T1w":
        return "ancpbids cannot parse it"
    return entities


def _scan_rows(root: Path, problems: _Problems) -> list[dict[str, str]]:
    """One dict per valid T1w file of one dataset (subject, session, ..., path, scan, scan_key)."""
    rows: list[dict[str, str]] = []
    seen: dict[str, Path] = {}
    for rel, folder_sub, folder_ses in _find_t1w(root, problems):
        path = root / rel
        ours = _parse_name(path.name)
        if isinstance(ours, str):
            problems.add(path, f"not a valid BIDS T1w file name: {ours}")
            continue
        if ours["sub"] != folder_sub or ours.get("ses") != folder_ses:
            problems.add(path, f"file name says {scan_dir(ours['sub'], ours.get('ses'))} but it "
                               f"lies in {scan_dir(folder_sub, folder_ses)}")
            continue
        if not path.is_file():  # e.g. a broken git-annex/datalad symlink
            problems.add(path, "not a readable file (broken symlink or not fetched?)")
            continue
        key = scan_key(**ours)
        if key in seen:
            problems.add(path, f"same scan as {seen[key]} (two files with key {key!r}; "
                               "keep only one of .nii / .nii.gz)")
            continue
        seen[key] = path
        rows.append({
            "scan": scan_path(**ours), "scan_key": key, "subject": ours["sub"],
            "session": ours.get("ses", ""), "acquisition": ours.get("acq", ""),
            "run": ours.get("run", ""),
            # abspath, not resolve(): keep the user's names even when files are symlinks.
            "path": os.path.abspath(path),
        })
    return rows


# --------------------------------------------------------------------------------------------
# participants.tsv
# --------------------------------------------------------------------------------------------

def _read_participants(tsv: Path, label_column: str | None, problems: _Problems
                       ) -> pd.DataFrame | None:
    """participants.tsv indexed by subject label (without ``sub-``), all cells as strings."""
    if not tsv.is_file():
        problems.add(tsv, "participants.tsv is missing (it must list every subject with "
                          "a participant_id column)")
        return None
    try:
        # Strings only and no NA guessing: IDs like '001' or labels like 'NA' must stay as
        # written, and nothing in the file is ever evaluated. utf-8-sig drops an Excel BOM that
        # would otherwise hide the participant_id header.
        table = pd.read_csv(tsv, sep="\t", dtype=str, keep_default_na=False, na_filter=False,
                            encoding="utf-8-sig")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        problems.add(tsv, f"cannot read as a tab-separated table ({exc})")
        return None
    table.columns = [c.strip() for c in table.columns]
    missing = [c for c in ("participant_id", label_column) if c and c not in table.columns]
    if missing:
        problems.add(tsv, f"no column {' or '.join(map(repr, missing))} "
                          f"(columns are: {', '.join(table.columns)})")
        return None
    ids = table["participant_id"].str.strip()
    bad = []
    for line, pid in zip(range(2, len(ids) + 2), ids):
        if not (pid.startswith("sub-") and is_bids_label(pid[len("sub-"):])):
            bad.append(f"line {line}: {pid!r}")
    if bad:
        problems.add(tsv, "participant_id values must be 'sub-<label>' with a label of letters "
                          f"and digits only; invalid: {', '.join(bad)}")
    duplicated = sorted(set(ids[ids.duplicated()]))
    if duplicated:
        problems.add(tsv, f"participant_id listed more than once: {', '.join(duplicated)}")
    # Go on with the usable rows (the problems above already fail the run) so that the user
    # also sees, in the same message, every other problem of this dataset.
    table.index = ids.str[len("sub-"):]
    return table[ids.str.startswith("sub-").to_numpy() & ~ids.duplicated().to_numpy()]


# --------------------------------------------------------------------------------------------
# One dataset
# --------------------------------------------------------------------------------------------

def _normalise_ids(values: Iterable[object] | None) -> list[str]:
    return [str(v).strip().removeprefix("sub-") for v in (values or [])]


def _check_config(datasets: list[dict]) -> None:
    """Cheap structural checks; the JSON schema should already catch these, but this module is
    also called directly (tests, notebooks) and a KeyError would be a poor message."""
    names: set[str] = set()
    for i, ds in enumerate(datasets):
        key = f"datasets[{i}]"
        for field in ("name", "bids_dir", "role"):
            if not ds.get(field):
                raise ConfigError(f"{key}.{field}: required")
        if not _DATASET_NAME_RE.match(str(ds["name"])):
            raise ConfigError(f"{key}.name: {ds['name']!r} must use letters, digits, '-' or '_'")
        if ds["name"] in names:
            raise ConfigError(f"{key}.name: dataset name {ds['name']!r} is used twice")
        names.add(ds["name"])
        if ds["role"] not in ROLES:
            raise ConfigError(f"{key}.role: {ds['role']!r} must be one of {', '.join(ROLES)}")
        if not ds.get("label_column") and ds["role"] != "train":
            raise ConfigError(f"{key}.label_column: required for role {ds['role']!r}")
        clash = sorted(set(ds.get("covariates") or []) & set(SAMPLE_COLUMNS))
        if clash:
            raise ConfigError(f"{key}.covariates: {clash} clash with columns of the samples table")


def _dataset_rows(ds: dict, base_dir: Path, problems: _Problems) -> list[dict[str, object]]:
    name = ds["name"]
    root = (base_dir / ds["bids_dir"]).absolute()
    if any(c in str(root) for c in "\t\n\r"):
        problems.add(root, "bids_dir path contains a tab or newline, which the samples TSV "
                           "cannot hold")
        return []
    if not root.exists():
        problems.add(root, f"bids_dir of dataset {name!r} does not exist")
        return []
    if not root.is_dir():
        problems.add(root, f"bids_dir of dataset {name!r} is not a directory")
        return []
    description = root / "dataset_description.json"
    if not description.is_file():
        problems.add(description, f"missing: bids_dir of dataset {name!r} is not a BIDS "
                                  "dataset without it")
        return []
    try:
        if not isinstance(json.loads(description.read_text(encoding="utf-8")), dict):
            raise ValueError("top level is not a JSON object")
    except (ValueError, UnicodeDecodeError) as exc:
        problems.add(description, f"not valid JSON ({exc})")
        return []

    n_before = len(problems)
    scans = _scan_rows(root, problems)
    if not scans:
        if len(problems) == n_before:
            problems.add(root, f"no T1w images found in dataset {name!r} (searched {T1W_PATTERNS})")
        return []

    label_column = ds.get("label_column")
    participants = _read_participants(root / "participants.tsv", label_column, problems)
    if participants is None:
        return []

    subjects = sorted({s["subject"] for s in scans})
    unlisted = [s for s in subjects if s not in participants.index]
    if unlisted:
        problems.add(root / "participants.tsv", "subjects with T1w scans are not listed: "
                     + ", ".join(f"sub-{s}" for s in unlisted))

    include = _normalise_ids(ds.get("include"))
    exclude = _normalise_ids(ds.get("exclude"))
    for field, ids in (("include", include), ("exclude", exclude)):
        unknown = [i for i in ids if i not in subjects]
        if unknown:
            problems.add(f"datasets[{name}].{field}", "no subject with T1w scans in "
                         f"{root} matches: {', '.join(unknown)}")
    selected = [s for s in subjects if (not include or s in include) and s not in exclude]
    if not selected and not unlisted:
        problems.add(f"datasets[{name}]", "include/exclude leave no subjects")

    train, analyse = ROLES[ds["role"]]
    allowed = ds.get("labels")
    labels: dict[str, str] = {}
    bad_labels = []
    for subject in selected:
        if subject not in participants.index:
            continue  # already reported as unlisted
        value = participants.at[subject, label_column].strip() if label_column else ""
        if label_column and value in MISSING:
            bad_labels.append(f"sub-{subject} (empty)")
        elif allowed and value not in allowed:
            bad_labels.append(f"sub-{subject}={value!r}")
        labels[subject] = value
    if bad_labels:
        expected = f"one of {', '.join(map(str, allowed))}" if allowed else "a non-empty value"
        problems.add(root / "participants.tsv", f"column {label_column!r} must be {expected}; "
                     f"bad values: {', '.join(bad_labels)}")

    covariates = list(ds.get("covariates") or [])
    rows: list[dict[str, object]] = []
    for scan in scans:
        subject = scan["subject"]
        if subject not in labels:
            continue
        row: dict[str, object] = {**scan, "dataset": name, "label": labels[subject],
                                  "role": ds["role"], "train": train, "analyse": analyse}
        for column in covariates:
            # Covariates are optional per dataset: a column missing from this participants.tsv
            # gives empty cells rather than an error.
            row[column] = (participants.at[subject, column].strip()
                           if column in participants.columns else "")
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------

def collect_samples(datasets: list[dict], base_dir: str | os.PathLike = ".") -> pd.DataFrame:
    """Index every dataset of the config and return one row per T1w scan.

    Columns: :data:`SAMPLE_COLUMNS` followed by the union of all datasets' covariates (empty
    string where a dataset lacks one). Rows are sorted by dataset name and then scan.
    Relative ``bids_dir`` values are taken relative to ``base_dir``.

    Raises :class:`ConfigError` for a malformed ``datasets`` list and one :class:`InputError`
    listing every problem found in the BIDS folders and participants.tsv files.
    """
    if not datasets:
        raise ConfigError("datasets: at least one dataset is required")
    _check_config(datasets)
    base = Path(base_dir)
    problems = _Problems()
    rows: list[dict[str, object]] = []
    owner: dict[str, str] = {}  # subject -> dataset name, to catch IDs used by two datasets
    for ds in datasets:
        ds_rows = _dataset_rows(ds, base, problems)
        clashes = sorted({r["subject"] for r in ds_rows
                          if owner.get(r["subject"], ds["name"]) != ds["name"]})
        for subject in clashes:
            problems.add(f"sub-{subject}",
                         f"participant ID used by datasets {owner[subject]!r} and "
                         f"{ds['name']!r}; IDs must be unique across datasets "
                         "(rename, or exclude it from one of them)")
        owner.update({r["subject"]: ds["name"] for r in ds_rows if r["subject"] not in owner})
        rows.extend(ds_rows)
    problems.raise_if_any("datasets")

    covariates: list[str] = []
    for ds in datasets:
        covariates += [c for c in ds.get("covariates") or [] if c not in covariates]
    table = pd.DataFrame(rows, columns=[*SAMPLE_COLUMNS, *covariates])
    table[covariates] = table[covariates].fillna("")
    table = table.sort_values(["dataset", "scan"], kind="stable").reset_index(drop=True)
    table["train"] = table["train"].astype(bool)
    table["analyse"] = table["analyse"].astype(bool)
    return table


def _to_tsv(df: pd.DataFrame) -> str:
    return df.to_csv(sep="\t", index=False, lineterminator="\n")


def write_samples(df: pd.DataFrame, path: str | os.PathLike) -> bool:
    """Write the table as TSV unless the file already has exactly this content.

    Leaving an unchanged file alone keeps its mtime, so Snakemake does not rerun every rule that
    depends on it after a no-op re-index. Returns True if the file was (re)written.
    """
    path = Path(path)
    text = _to_tsv(df)
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename, so a crash never leaves a half-written table behind.
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return True


def read_samples(path: str | os.PathLike) -> pd.DataFrame:
    """Read a table written by :func:`write_samples`: strings, with bool ``train``/``analyse``."""
    path = Path(path)
    try:
        df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, na_filter=False)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise InputError(path, f"cannot read samples table ({exc})") from exc
    missing = [c for c in SAMPLE_COLUMNS if c not in df.columns]
    if missing:
        raise InputError(path, f"not a samples table: missing columns {', '.join(missing)}")
    for column in ("train", "analyse"):
        values = set(df[column])
        if not values <= {"True", "False"}:
            raise InputError(path, f"column {column!r} must hold True/False, found "
                                   f"{sorted(values - {'True', 'False'})}")
        df[column] = df[column] == "True"
    return df
