"""The error the analysis raises on purpose: unusable labels, folds or feature tables."""

from __future__ import annotations

from brainvae.errors import BrainvaeError


class AnalysisError(BrainvaeError, ValueError):
    """The data cannot support the requested analysis.

    Like :class:`brainvae.errors.InputError` the message is ``<where>: <reason>``, where ``where``
    names the dataset(s), table or file. A ``ValueError`` too, so callers that only know
    scikit-learn conventions still catch it.
    """

    def __init__(self, where: str, reason: str):
        self.where = str(where)
        self.reason = reason
        super().__init__(f"{self.where}: {reason}")
