"""Errors that name the offending file and the reason, so a user can fix their input."""

from __future__ import annotations

from pathlib import Path


class BrainvaeError(Exception):
    """Base class of every error brainvae raises on purpose."""


class InputError(BrainvaeError):
    """A user-supplied file or value is unusable.

    The message always starts with the path (or config key) and then says why, e.g.
    ``/data/sub-01_T1w.nii.gz: not a NIfTI file (bad magic bytes)``.
    """

    def __init__(self, where: str | Path, reason: str):
        self.where = str(where)
        self.reason = reason
        super().__init__(f"{self.where}: {reason}")


class ConfigError(BrainvaeError):
    """The workflow configuration is invalid; the message names the key."""
