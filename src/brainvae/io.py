"""Small shared I/O helpers: atomic writes of NIfTI and JSON, and file hashing.

Every output is first written to a hidden temporary file in the destination folder and then
moved into place with :func:`os.replace` (atomic on POSIX when source and destination are on one
file system, which the same folder guarantees). A job that is killed or fails half-way therefore
never leaves a valid-looking partial output under the real name: Snakemake (and a human) either
sees the complete file or no file at all, and a previous complete version stays intact.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

__all__ = [
    "load_float_image",
    "atomic_path",
    "atomic_write_json",
    "atomic_write_nifti",
    "atomic_write_text",
    "nifti_suffix",
    "read_json",
    "sha256_file",
    "to_jsonable",
]

_NIFTI_SUFFIXES = (".nii.gz", ".nii")


def load_float_image(path: str | os.PathLike[str]) -> nib.Nifti1Image:
    """A 3D image as float32 (the workflow's own intermediates: conformed, RAS, 3D); an unreadable file or one
    that is not 3D is an InputError naming it."""
    from .errors import InputError

    try:
        img = nib.load(os.fspath(path))
    except Exception as exc:
        raise InputError(path, f"cannot read NIfTI ({exc})") from exc
    data = np.asarray(img.dataobj, dtype=np.float32)
    if data.ndim != 3:
        raise InputError(path, f"expected a 3D image, got shape {data.shape}")
    return nib.Nifti1Image(data, img.affine)


def nifti_suffix(path: str | os.PathLike[str]) -> str:
    """``'.nii.gz'`` or ``'.nii'`` for a NIfTI file name; ValueError otherwise."""
    name = os.fspath(path).lower()
    for suffix in _NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    raise ValueError(f"{os.fspath(path)}: not a NIfTI file name (expected .nii or .nii.gz)")


def _current_umask() -> int:
    # mkstemp creates files 0600; outputs must get the permissions of normally created files so
    # a group sharing a project folder can read them. Linux exposes the umask read-only in /proc;
    # elsewhere it can only be read by setting it (briefly, then restored).
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success move it onto ``path``.

    The temporary name keeps ``suffix`` (default: the final suffix of ``path``) so that writers
    that choose the format from the extension (nibabel: ``.nii.gz`` means gzip) behave as for
    the real name. If the body raises, the temporary file is removed and ``path`` is untouched.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    if suffix is None:
        suffix = final.suffix
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=f".tmp{suffix}", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_current_umask())
        # Flush file contents to disk before the rename, so a crash right after cannot leave
        # the final name pointing at an empty/short file.
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except BaseException:  # also KeyboardInterrupt / SystemExit from a cancelled job
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write_nifti(img: nib.Nifti1Image, path: str | os.PathLike[str]) -> Path:
    """Write ``img`` to ``path`` (``.nii`` or ``.nii.gz``) atomically; return the path."""
    suffix = nifti_suffix(path)
    with atomic_path(path, suffix=suffix) as tmp:
        nib.save(img, tmp)
    return Path(path)


def to_jsonable(obj: Any) -> Any:
    """Convert numpy scalars/arrays, paths, tuples and sets to plain JSON types (recursively).

    Non-finite floats raise ValueError: JSON has no NaN/Infinity, and writing them would produce
    files that strict parsers (jq, JavaScript, the BIDS validator) reject.
    """
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted(to_jsonable(v) for v in obj)
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        value = float(obj)
        if not math.isfinite(value):
            raise ValueError(f"cannot write non-finite number {value!r} to JSON")
        return value
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if obj is None or isinstance(obj, str):
        return obj
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


def atomic_write_text(text: str, path: str | os.PathLike[str]) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically; return the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_json(obj: Any, path: str | os.PathLike[str]) -> Path:
    """Write ``obj`` as JSON (sorted keys, 2-space indent, trailing newline) atomically.

    Sorted keys make outputs byte-identical across runs, so diffs and checksums are meaningful.
    The object is fully serialised before anything touches the disk.
    """
    text = json.dumps(to_jsonable(obj), sort_keys=True, indent=2, allow_nan=False) + "\n"
    return atomic_write_text(text, path)


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read a JSON file written by :func:`atomic_write_json` (or any UTF-8 JSON)."""
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def sha256_file(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks (scans can be hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()
