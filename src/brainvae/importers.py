"""Importers: public T1w layouts (IXI, HCP, any table of paths) -> a BIDS raw dataset brainvae reads.

Like Clinica's ``convert ixi-to-bids``: one function per source layout finds the T1w images and the
participant table and returns a :class:`Dataset`; :func:`write_dataset` writes it as BIDS
(``sub-<label>/[ses-<label>/]anat/sub-<label>_[ses-<label>_][run-<n>_]T1w.nii.gz``, JSON sidecars,
``participants.tsv``/``.json``, ``dataset_description.json``, ``README``). Nothing is skipped
silently: every file or row left out is in :attr:`Dataset.skipped` with the reason.

Images are copied by default (a symlink breaks when the source moves); ``.mgz``/``.mgh`` files are
converted to ``.nii.gz`` with nibabel, since BIDS raw data holds NIfTI only.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import pandas as pd

from . import __version__
from .errors import InputError
from .naming import is_bids_label, scan_dir, scan_key

BIDS_VERSION = "1.10.0"
NA = "n/a"
NIFTI_EXTENSIONS = (".nii.gz", ".nii")
#: Extensions converted to .nii.gz on import (FreeSurfer MGH).
CONVERTED_EXTENSIONS = (".mgz", ".mgh")

#: IXI sites (the second part of the file name) and their scanners, from brain-development.org.
IXI_SITES = {
    "Guys": {"InstitutionName": "Guy's Hospital, London", "Manufacturer": "Philips",
             "MagneticFieldStrength": 1.5},
    "HH": {"InstitutionName": "Hammersmith Hospital, London", "Manufacturer": "Philips",
           "MagneticFieldStrength": 3.0},
    "IOP": {"InstitutionName": "Institute of Psychiatry, London", "Manufacturer": "GE",
            "MagneticFieldStrength": 1.5},
}
IXI_NAME_RE = re.compile(r"(IXI\d{3})-([A-Za-z]+)-(\d{4})-([A-Za-z0-9-]+)\.nii(\.gz)?")
HCP_LAYOUTS = ("auto", "unprocessed", "preprocessed")
HCP_PREPROCESSED = "T1w/T1w_acpc_dc_restore.nii.gz"

_COLUMNS = {
    "age": {"Description": "age at scan", "Units": "year"},
    "sex": {"Description": "sex", "Levels": {"M": "male", "F": "female"}},
    "group": {"Description": "diagnostic group", "Levels": {"euploid": "no known chromosomal "
                                                                       "condition (healthy volunteer)"}},
    "site": {"Description": "acquisition site"},
    # No Units: a range such as "26-30" is text, and the validator checks that numbers-with-units are numbers.
    "age_range": {"Description": "age range in years as released (the age column holds its midpoint)"},
}


@dataclass
class Scan:
    """One T1w image to import and the BIDS entities it gets."""

    source: Path
    sub: str
    ses: str | None = None
    run: str | None = None
    sidecar: dict[str, Any] = field(default_factory=dict)

    @property
    def stem(self) -> str:
        """``sub-01/ses-1/anat/sub-01_ses-1_T1w``: the BIDS path without extension."""
        return f"{scan_dir(self.sub, self.ses)}/{scan_key(self.sub, self.ses, run=self.run)}_T1w"


@dataclass
class Dataset:
    """What an importer found: scans, one participants row per subject, and what it left out."""

    name: str
    command: str
    scans: list[Scan]
    participants: pd.DataFrame  # participant_id first, then one column per variable; strings
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file or row, reason)
    notes: list[str] = field(default_factory=list)
    source_url: str | None = None
    license: str | None = None


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------

def read_table(path: str | os.PathLike[str]) -> pd.DataFrame:
    """A CSV, TSV or (when pandas can read it here) XLS/XLSX file as strings, headers stripped."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "table not found")
    suffix = path.suffix.lower()
    try:
        if suffix in (".xls", ".xlsx"):
            table = pd.read_excel(path, dtype=str, keep_default_na=False)
        else:
            table = pd.read_csv(path, sep="\t" if suffix == ".tsv" else None, engine="python",
                                dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except ImportError as exc:
        raise InputError(path, f"pandas cannot read {suffix} files here ({exc}); save the sheet "
                               "as CSV (File > Save As > CSV) and pass the .csv file") from None
    except Exception as exc:  # noqa: BLE001 - pandas/xlrd/openpyxl raise many types on bad files
        raise InputError(path, f"cannot read as a table ({type(exc).__name__}: {exc}); save it as "
                               "CSV and pass the .csv file") from None
    table.columns = [str(c).strip() for c in table.columns]
    return table.fillna("").apply(lambda column: column.str.strip())


def _column(table: pd.DataFrame, path: Path, *names: str) -> str:
    """The first of ``names`` that is a column of ``table``, else InputError.

    Case is ignored, and so is a note in parentheses: IXI.xls has ``SEX_ID (1=m, 2=f)``.
    """
    by_lower = {c.split(" (")[0].strip().lower(): c for c in table.columns}
    for name in names:
        if name.lower() in by_lower:
            return by_lower[name.lower()]
    raise InputError(path, f"no column {' or '.join(map(repr, names))} (columns are: "
                           f"{', '.join(table.columns)})")


def _image_suffix(name: str) -> str | None:
    lower = name.lower()
    return next((s for s in (*NIFTI_EXTENSIONS, *CONVERTED_EXTENSIONS) if lower.endswith(s)), None)


def _participants(rows: dict[str, dict[str, str]], columns: list[str]) -> pd.DataFrame:
    table = pd.DataFrame([{"participant_id": f"sub-{sub}", **{c: row.get(c) or NA for c in columns}}
                          for sub, row in sorted(rows.items())], columns=["participant_id", *columns])
    return table.fillna(NA)


def _by_id(table: pd.DataFrame, id_column: str, to_label, where: Path, notes: list[str]
           ) -> dict[str, pd.Series]:
    """Rows of a demographics table by subject label; repeated IDs keep their first row (noted)."""
    out: dict[str, pd.Series] = {}
    for _, row in table.iterrows():
        label = to_label(row[id_column])
        if label is None:
            continue
        if label in out:
            notes.append(f"{where}: {id_column} {row[id_column]!r} is listed more than once; "
                         "the first row is used")
            continue
        out[label] = row
    return out


def _join_demographics(path: str | os.PathLike[str], rows: dict[str, dict[str, str]], notes: list[str],
                       id_names: tuple[str, ...], sex_names: tuple[str, ...], age_names: tuple[str, ...],
                       to_label, fill) -> None:
    """Fill ``rows`` (subject label -> participants.tsv row) from a demographics table: ``fill(row, sex
    cell, age cell)`` for each subject found by ``to_label(ID cell)``; a subject without a row is noted."""
    where = Path(path)
    table = read_table(where)
    id_col, sex_col, age_col = (_column(table, where, *id_names), _column(table, where, *sex_names),
                                _column(table, where, *age_names))
    found = _by_id(table, id_col, to_label, where, notes)
    for sub, row in rows.items():
        if sub in found:
            fill(row, found[sub][sex_col], found[sub][age_col])
        else:
            notes.append(f"{where}: no row for {sub}; its age and sex are n/a")


# --------------------------------------------------------------------------------------------
# Layouts
# --------------------------------------------------------------------------------------------


def ixi_dataset(src: str | os.PathLike[str], demographics: str | os.PathLike[str] | None = None
                ) -> Dataset:
    """IXI's flat folder of ``IXI###-<Site>-####-T1.nii.gz`` files (+ IXI.xls saved as CSV).

    Subject ``IXI002`` becomes ``sub-IXI002``. The sheet's IXI_ID (a number), SEX_ID (1 = male,
    2 = female) and AGE give participants.tsv's age and sex; every IXI subject is a healthy
    volunteer (group ``euploid``), and the site comes from the file name.
    """
    src = Path(src)
    if not src.is_dir():
        raise InputError(src, "IXI source folder not found")
    scans: list[Scan] = []
    skipped: list[tuple[str, str]] = []
    notes: list[str] = []
    rows: dict[str, dict[str, str]] = {}
    for path in sorted(src.iterdir()):
        if path.name.startswith("."):
            continue
        match = IXI_NAME_RE.fullmatch(path.name)
        if not match:
            skipped.append((str(path), "name does not match IXI###-<Site>-####-T1.nii.gz"))
            continue
        sub, site, _, modality = match.group(1, 2, 3, 4)
        if modality != "T1":
            skipped.append((str(path), f"an IXI {modality} image, not T1"))
        elif sub in rows:
            skipped.append((str(path), f"a second T1 of {sub} (the first is imported)"))
        else:
            scans.append(Scan(path, sub, sidecar=dict(IXI_SITES.get(site, {"InstitutionName": site}))))
            rows[sub] = {"group": "euploid", "site": site}
            if site not in IXI_SITES:
                notes.append(f"{path}: unknown IXI site {site!r}; no scanner facts in its sidecar")
    if demographics is not None:
        def to_label(value: str) -> str | None:
            digits = value.upper().removeprefix("IXI")
            return f"IXI{int(float(digits)):03d}" if re.fullmatch(r"\d+(\.0*)?", digits) else None

        def fill(row: dict[str, str], sex: str, age: str) -> None:
            row["sex"] = {"1": "M", "2": "F"}.get(sex.split(".")[0], NA)
            row["age"] = f"{float(age):.2f}" if re.fullmatch(r"\d+(\.\d*)?", age) else NA

        _join_demographics(demographics, rows, notes, ("IXI_ID",), ("SEX_ID", "SEX"), ("AGE",), to_label, fill)
    return Dataset("IXI", "brainvae import-ixi", scans,
                   _participants(rows, ["age", "sex", "group", "site"]), skipped, notes,
                   source_url="https://brain-development.org/ixi-dataset/",
                   license="CC BY-SA 3.0")


def _hcp_images(subject_dir: Path, layout: str) -> tuple[list[Path], str] | str:
    """The T1w images of one HCP subject folder and which layout they come from, or why none."""
    sub = subject_dir.name
    unprocessed = sorted(subject_dir.glob(f"unprocessed/3T/T1w_MPR*/{sub}_3T_T1w_MPR*.nii.gz"))
    preprocessed = [p for p in [subject_dir / HCP_PREPROCESSED] if p.is_file()]
    if layout in ("auto", "unprocessed") and unprocessed:
        return unprocessed, "unprocessed"
    if layout in ("auto", "preprocessed") and preprocessed:
        return preprocessed, "preprocessed"
    wanted = {"auto": f"unprocessed/3T/T1w_MPR1/{sub}_3T_T1w_MPR1.nii.gz or {HCP_PREPROCESSED}",
              "unprocessed": f"unprocessed/3T/T1w_MPR1/{sub}_3T_T1w_MPR1.nii.gz",
              "preprocessed": HCP_PREPROCESSED}[layout]
    return f"no T1w image (looked for {wanted})"


def _age_midpoint(text: str) -> str:
    """'26-30' -> '28', '22' -> '22'; open ranges such as '36+' have no midpoint (n/a)."""
    if match := re.fullmatch(r"(\d+(?:\.\d+)?)\s*-\s*(\d+(?:\.\d+)?)", text):
        return f"{(float(match[1]) + float(match[2])) / 2:g}"
    return text if re.fullmatch(r"\d+(\.\d+)?", text) else NA


def hcp_dataset(src: str | os.PathLike[str], behavioral: str | os.PathLike[str] | None = None,
                layout: str = "auto") -> Dataset:
    """HCP subject folders ``<subject>/unprocessed/3T/T1w_MPR<n>/`` or ``<subject>/T1w/``.

    ``layout``: ``unprocessed`` (the raw MPRAGE, ``<subject>_3T_T1w_MPR1.nii.gz``; MPR2 as run 2),
    ``preprocessed`` (``T1w/T1w_acpc_dc_restore.nii.gz``: bias-corrected, ACPC-aligned) or ``auto``
    (unprocessed where a subject has it, else preprocessed). Each sidecar says which was taken.
    The behavioural CSV's Subject, Gender (M/F) and Age (a range such as ``26-30``) give sex, age
    (the range's midpoint) and age_range. Every HCP subject is a healthy adult (group euploid).
    """
    src = Path(src)
    if not src.is_dir():
        raise InputError(src, "HCP source folder not found")
    if layout not in HCP_LAYOUTS:
        raise InputError("--layout", f"{layout!r} must be one of {', '.join(HCP_LAYOUTS)}")
    scans: list[Scan] = []
    skipped: list[tuple[str, str]] = []
    notes: list[str] = []
    rows: dict[str, dict[str, str]] = {}
    used: dict[str, int] = {}
    for subject_dir in sorted(src.iterdir()):
        if subject_dir.name.startswith("."):
            continue
        if not subject_dir.is_dir():
            skipped.append((str(subject_dir), "not a subject folder"))
            continue
        sub = subject_dir.name
        if not is_bids_label(sub):
            skipped.append((str(subject_dir), f"subject {sub!r} is not a valid BIDS label "
                                              "(letters and digits only)"))
            continue
        found = _hcp_images(subject_dir, layout)
        if isinstance(found, str):
            skipped.append((str(subject_dir), found))
            continue
        images, kind = found
        used[kind] = used.get(kind, 0) + 1
        for image in images:
            run = re.search(r"MPR(\d+)", image.name)
            run_label = run[1] if run and len(images) > 1 else None
            sidecar = {"Manufacturer": "Siemens", "ManufacturersModelName": "Connectome Skyra",
                       "MagneticFieldStrength": 3.0, "InstitutionName": "Washington University "
                       "in St. Louis", "HCPLayout": kind, "HCPSourceFile": str(image.relative_to(src))}
            scans.append(Scan(image, sub, run=run_label, sidecar=sidecar))
        rows[sub] = {"group": "euploid"}
    notes += [f"{n} subjects from the {kind} layout" for kind, n in sorted(used.items())]
    if behavioral is not None:
        def fill(row: dict[str, str], sex: str, age_range: str) -> None:
            row["sex"] = sex.upper() if sex.upper() in ("M", "F") else NA
            row["age_range"] = age_range or NA
            row["age"] = _age_midpoint(age_range)

        _join_demographics(behavioral, rows, notes, ("Subject",), ("Gender", "Sex"), ("Age",),
                           lambda v: v if is_bids_label(v) else None, fill)
    return Dataset("HCP", "brainvae import-hcp", scans,
                   _participants(rows, ["age", "age_range", "sex", "group"]), skipped, notes,
                   source_url="https://www.humanconnectome.org/")


def table_dataset(csv: str | os.PathLike[str], path_column: str = "path",
                  subject_column: str = "subject", session_column: str | None = None,
                  columns: list[str] | tuple[str, ...] = ()) -> Dataset:
    """Any layout, from a table with one row per T1w image: its path, subject and session.

    Relative paths are taken relative to the table's folder. Subject and session values must be
    BIDS labels (letters and digits; a ``sub-``/``ses-`` prefix is dropped); ``columns`` are copied
    into participants.tsv from each subject's first row.
    """
    csv = Path(csv)
    table = read_table(csv)
    path_col, sub_col = _column(table, csv, path_column), _column(table, csv, subject_column)
    ses_col = _column(table, csv, session_column) if session_column else None
    extra = [_column(table, csv, c) for c in columns]
    scans: list[Scan] = []
    skipped: list[tuple[str, str]] = []
    notes: list[str] = []
    rows: dict[str, dict[str, str]] = {}
    seen: dict[tuple[str, str | None], int] = {}
    for line, row in zip(range(2, len(table) + 2), table.to_dict("records")):
        where = f"{csv}, line {line}"
        sub = row[sub_col].removeprefix("sub-")
        ses = (row[ses_col].removeprefix("ses-") or None) if ses_col else None
        path = Path(row[path_col])
        path = path if path.is_absolute() else csv.parent / path
        if not is_bids_label(sub):
            reason = f"subject {row[sub_col]!r} is not a valid BIDS label (letters and digits only)"
        elif ses is not None and not is_bids_label(ses):
            reason = f"session {row[ses_col]!r} is not a valid BIDS label (letters and digits only)"
        elif not row[path_col] or not path.exists():
            reason = f"image {str(path)!r} not found"
        elif _image_suffix(path.name) is None:
            reason = (f"{path.name!r} is not a .nii, .nii.gz, .mgz or .mgh file (convert it to "
                      "NIfTI first, e.g. dcm2niix for DICOM)")
        elif (sub, ses) in seen:
            reason = f"same subject and session as line {seen[sub, ses]} (give a session column)"
        else:
            seen[sub, ses] = line
            scans.append(Scan(path, sub, ses))
            rows.setdefault(sub, {c: row[c] for c in extra})
            continue
        skipped.append((where, reason))
    return Dataset(csv.stem, "brainvae import-table", scans, _participants(rows, extra), skipped,
                   notes)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------

def _prepare_out(out: Path, force: bool) -> None:
    """Refuse a non-empty ``out`` unless ``force`` and it holds an earlier brainvae import."""
    if out.exists() and not out.is_dir():
        raise InputError(out, "exists and is not a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not force:
        raise InputError(out, "exists and is not empty; choose another folder, or pass --force "
                              "to replace an earlier import")
    try:
        made_by = json.loads((out / "dataset_description.json").read_text())["GeneratedBy"][0]["Name"]
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        made_by = ""
    if not str(made_by).startswith("brainvae import"):
        raise InputError(out, "not written by a brainvae importer (no dataset_description.json "
                              "with GeneratedBy 'brainvae import-...'); --force replaces only "
                              "those: remove it yourself or choose another folder")


def _place_image(scan: Scan, target_stem: Path, copy: bool) -> str:
    """Copy, link or convert one image; returns the BIDS file name written."""
    suffix = _image_suffix(scan.source.name)
    if suffix in CONVERTED_EXTENSIONS:
        try:
            img = nib.load(scan.source)
            target = target_stem.with_name(target_stem.name + ".nii.gz")
            nib.save(nib.Nifti1Image.from_image(img), target)
        except Exception as exc:  # noqa: BLE001 - nibabel raises many types on bad files
            raise InputError(scan.source, f"cannot convert to NIfTI ({type(exc).__name__}: "
                                          f"{exc})") from None
        scan.sidecar.setdefault("ConvertedFrom", scan.source.name)
        return target.name
    target = target_stem.with_name(target_stem.name + (suffix or ".nii.gz"))
    if copy:
        shutil.copyfile(scan.source, target)
    else:
        target.symlink_to(os.path.abspath(scan.source))
    return target.name


def _readme(ds: Dataset, copy: bool) -> str:
    lines = [f"# {ds.name} (imported by brainvae)", "",
             f"T1w images imported with `{ds.command}` (brainvae {__version__}) into BIDS "
             f"{BIDS_VERSION}: {len(ds.scans)} images of {len(ds.participants)} participants, "
             f"{'copied' if copy else 'symlinked (absolute links to the source files)'}."]
    if ds.source_url:
        lines += ["", f"Source: {ds.source_url}" + (f" (licence: {ds.license})." if ds.license
                                                    else "; see its data use terms.")]
    if ds.notes:
        lines += ["", "Notes:", *(f"- {n}" for n in ds.notes)]
    if ds.skipped:
        lines += ["", "Left out:", *(f"- {w}: {r}" for w, r in ds.skipped)]
    return "\n".join(lines) + "\n"


def write_dataset(ds: Dataset, out: str | os.PathLike[str], copy: bool = True,
                  force: bool = False) -> Path:
    """Write ``ds`` as a BIDS raw dataset in ``out`` (built next to it, then moved into place).

    ``out`` must be missing or empty; with ``force`` an earlier brainvae import there is replaced.
    """
    out = Path(out).absolute()
    if not ds.scans:
        raise InputError(out, f"nothing to import from {ds.name}: no usable T1w image"
                              + "".join(f"\n  - {w}: {r}" for w, r in ds.skipped))
    _prepare_out(out, force)
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        for scan in ds.scans:
            stem = partial / scan.stem
            stem.parent.mkdir(parents=True, exist_ok=True)
            _place_image(scan, stem, copy)
            if scan.sidecar:
                stem.with_name(stem.name + ".json").write_text(json.dumps(scan.sidecar, indent=2) + "\n")
        ds.participants.to_csv(partial / "participants.tsv", sep="\t", index=False,
                               lineterminator="\n")
        columns = {"participant_id": {"Description": "participant label"}}
        columns |= {c: _COLUMNS.get(c, {"Description": c}) for c in ds.participants.columns[1:]}
        if "site" in columns:
            columns["site"] = {**columns["site"], "Levels": {
                s: IXI_SITES.get(s, {}).get("InstitutionName", s)
                for s in sorted(set(ds.participants["site"]) - {NA})}}
        description: dict[str, Any] = {
            "Name": ds.name, "BIDSVersion": BIDS_VERSION, "DatasetType": "raw",
            "GeneratedBy": [{"Name": ds.command, "Version": __version__}]}
        if ds.license:
            description["License"] = ds.license
        if ds.source_url:
            description["SourceDatasets"] = [{"URL": ds.source_url}]
        for name, obj in (("participants.json", columns), ("dataset_description.json", description)):
            (partial / name).write_text(json.dumps(obj, indent=2) + "\n")
        (partial / "README").write_text(_readme(ds, copy))
        if out.exists():
            shutil.rmtree(out) if any(out.iterdir()) else out.rmdir()
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(partial, out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return out
