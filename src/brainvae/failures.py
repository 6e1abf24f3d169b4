"""Scans whose input file cannot be used: recorded when their job fails, left out when the workflow restarts.

A Snakemake DAG is fixed when the workflow starts, so a scan found unusable while the workflow runs
(a truncated download, a 4D series, NaN voxels, ...) can only fail its own job; with ``--keep-going``
every other scan is still processed, but the cohort-level steps that need every scan cannot run. So:

1. The failing job (rule ``conform``) writes a *failure record*, ``<output_dir>/qc/failed_inputs/<scan>.json``:
   the file, its SHA-256, the reason and the settings it was checked with, then fails with
   ``<file>: <reason>`` in its log and on the terminal (:func:`recording_input_errors`).
2. When the workflow starts again, :func:`split_failed_inputs` leaves every scan with a current record
   out of the samples table and lists it in ``<output_dir>/failed_inputs.tsv``, so the same command
   completes the cohort, the VAE and the analysis without it; ``qc/qc.tsv`` and the report list it
   (``passed`` false, flag ``input_error``, the reason).
3. A record is current only while the file is byte-identical (SHA-256) and the checking settings are
   unchanged: a re-downloaded file, or e.g. ``conform.volume_index`` set for a 4D series, makes the
   scan be processed again. A successful run of the step deletes the record.

Only :class:`~brainvae.errors.InputError` (a problem of the input file) is recorded; bugs, crashes and
killed jobs are never mistaken for bad data.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from . import __version__
from .errors import InputError
from .io import atomic_write_json, atomic_write_text, sha256_file

__all__ = [
    "FAILED_INPUT_COLUMNS",
    "read_failed_inputs",
    "record_path",
    "records_dir",
    "recording_input_errors",
    "split_failed_inputs",
    "write_failed_inputs",
]

#: Columns of ``failed_inputs.tsv`` (and of the rows ``qc/qc.tsv`` gets for these scans).
FAILED_INPUT_COLUMNS = ("scan", "scan_key", "dataset", "subject", "session", "path", "step", "reason")


def records_dir(output_dir: str | os.PathLike[str]) -> Path:
    """The folder of failure records inside the workflow's ``output_dir``."""
    return Path(output_dir) / "qc" / "failed_inputs"


def record_path(records_dir: str | os.PathLike[str], scan: str) -> Path:
    """Where the failure record of ``scan`` (``sub-X[/ses-Y]/anat/<key>``) lives."""
    return Path(records_dir) / f"{scan}.json"


def _settings_key(settings: Mapping[str, Any]) -> str:
    """Settings in a canonical form, so that 8 and 8.0 or a reordered mapping compare equal."""
    def canonical(value: Any) -> Any:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        return value
    return json.dumps({k: canonical(settings[k]) for k in sorted(settings)}, sort_keys=True, default=str)


@contextlib.contextmanager
def recording_input_errors(records_dir: str | os.PathLike[str], scan: str, source: str | os.PathLike[str], *,
                           step: str, settings: Mapping[str, Any]) -> Iterator[None]:
    """Run a per-scan step; on :class:`InputError` write the scan's failure record and re-raise.

    On success any old record of the scan is deleted (the input became usable). Other exceptions pass
    through untouched and leave no record: they are not a verdict on the input.
    """
    path = record_path(records_dir, scan)
    try:
        yield
    except InputError as error:
        source = Path(source)
        record = {
            "scan": scan,
            "path": os.fspath(source),
            "step": step,
            "reason": error.reason,
            "message": str(error),
            "source_sha256": sha256_file(source) if source.is_file() else None,
            "settings": json.loads(_settings_key(settings)),
            "brainvae_version": __version__,
        }
        atomic_write_json(record, path)
        raise
    path.unlink(missing_ok=True)


def _current_record(path: Path, sample: Mapping[str, Any], settings_key: str) -> dict[str, Any] | None:
    """The record at ``path`` if it still describes this scan's file and settings, else None."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("path") != sample["path"]:
        return None
    if _settings_key(record.get("settings") or {}) != settings_key:
        return None
    source = Path(sample["path"])
    current_sha = sha256_file(source) if source.is_file() else None
    return record if record.get("source_sha256") == current_sha else None


def split_failed_inputs(samples: pd.DataFrame, records_dir: str | os.PathLike[str],
                        settings: Mapping[str, Any]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(usable samples, failed inputs)``: scans with a current failure record move to the second table.

    ``samples`` has the samples table's columns (``scan``, ``path``, ...); ``settings`` are the checking
    settings of the step that records failures (the ``conform`` config). Only scans with a record file
    are hashed, so this costs nothing when no scan has failed.
    """
    settings_key = _settings_key(settings)
    failed_rows = []
    records_dir = Path(records_dir)
    if records_dir.is_dir():
        for _, sample in samples.iterrows():
            path = record_path(records_dir, sample["scan"])
            if not path.is_file():
                continue
            record = _current_record(path, sample, settings_key)
            if record is not None:
                failed_rows.append({**{c: str(sample.get(c, "")) for c in FAILED_INPUT_COLUMNS},
                                    "step": record.get("step", ""), "reason": record.get("reason", "")})
    failed = pd.DataFrame(failed_rows, columns=list(FAILED_INPUT_COLUMNS))
    usable = samples[~samples["scan"].isin(set(failed["scan"]))].reset_index(drop=True)
    return usable, failed


def write_failed_inputs(failed: pd.DataFrame, path: str | os.PathLike[str]) -> bool:
    """Write the failed-inputs table (TSV) unless the file already holds exactly this; True if written.

    As with the samples table, an unchanged file keeps its modification time, so jobs that read it do
    not rerun after a restart that changed nothing.
    """
    path = Path(path)
    text = failed.reindex(columns=list(FAILED_INPUT_COLUMNS)).to_csv(sep="\t", index=False, lineterminator="\n")
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return False
    atomic_write_text(text, path)
    return True


def read_failed_inputs(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a table written by :func:`write_failed_inputs` (all cells as strings).

    A missing file is an empty table: output folders made before this table existed have none.
    """
    if not Path(path).is_file():
        return pd.DataFrame(columns=list(FAILED_INPUT_COLUMNS))
    return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, na_filter=False)
