"""BIDS and BIDS-Derivatives names.

A *scan* is one T1w image. Its key is the BIDS entity prefix of its file name, e.g.
``sub-01_ses-2_acq-mprage_run-1``; its derivative folder is ``sub-01/ses-2/anat``.
Every per-scan output of the workflow is ``<derivatives root>/<scan_dir>/<scan_key>_<suffix>``.
"""

from __future__ import annotations

import re

#: Entities that may tell two T1w images of one session apart, in BIDS filename order.
SCAN_ENTITIES = ("sub", "ses", "acq", "ce", "rec", "run")

#: A BIDS label: ASCII letters and digits only (no path characters, no '-' or '_'). Always apply it
#: with ``fullmatch``: ``$`` after ``match`` also accepts a trailing newline ("01\n").
LABEL_RE = re.compile(r"[A-Za-z0-9]+")


def is_bids_label(value: object) -> bool:
    return isinstance(value, str) and LABEL_RE.fullmatch(value) is not None


def scan_key(sub: str, ses: str | None = None, acq: str | None = None, ce: str | None = None,
             rec: str | None = None, run: str | int | None = None) -> str:
    """``sub-01_ses-2_run-1``: the BIDS entity prefix that identifies one scan."""
    values = {"sub": sub, "ses": ses, "acq": acq, "ce": ce, "rec": rec, "run": run}
    parts = []
    for entity in SCAN_ENTITIES:
        value = values[entity]
        if value is None or value == "":
            continue
        value = str(value)
        if not is_bids_label(value):
            raise ValueError(f"{entity}-{value!r} is not a BIDS label (letters and digits only)")
        parts.append(f"{entity}-{value}")
    return "_".join(parts)


def scan_dir(sub: str, ses: str | None = None) -> str:
    """``sub-01/ses-2/anat``: where a scan's derivatives live."""
    return f"sub-{sub}/ses-{ses}/anat" if ses else f"sub-{sub}/anat"


def scan_path(sub: str, ses: str | None = None, **entities) -> str:
    """``sub-01/ses-2/anat/sub-01_ses-2_run-1``: folder and key, the stem of every per-scan output."""
    return f"{scan_dir(sub, ses)}/{scan_key(sub, ses, **entities)}"


def parse_scan_key(key: str) -> dict[str, str]:
    """Inverse of :func:`scan_key`: ``'sub-01_run-2'`` -> ``{'sub': '01', 'run': '2'}``."""
    out = {}
    for part in key.split("_"):
        entity, _, value = part.partition("-")
        if entity not in SCAN_ENTITIES or not is_bids_label(value):
            raise ValueError(f"{key!r} is not a scan key")
        out[entity] = value
    if "sub" not in out:
        raise ValueError(f"{key!r} has no sub- entity")
    if scan_key(**out) != key:  # a repeated entity (the last one would win) or entities out of order
        raise ValueError(f"{key!r} is not a scan key (entities repeated or not in BIDS order)")
    return out
