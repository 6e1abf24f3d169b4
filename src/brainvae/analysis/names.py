"""Names of the files the analysis writes, without importing it (the workflow declares them when the DAG is built).

Kept free of scikit-learn and matplotlib so that importing it costs nothing at workflow start.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

__all__ = [
    "MIN_PARTICIPANTS_PER_CLASS",
    "classification_figure_names",
    "classification_output_files",
    "pca_output_files",
    "slug",
]

#: Nested CV needs >= 2 outer folds, and each outer training set needs >= 2 participants of every
#: class for a >= 2-fold inner split: with 3 participants and 3 outer folds every training set has 2.
MIN_PARTICIPANTS_PER_CLASS = 3


def slug(text: str) -> str:
    """A file-name-safe form of ``text``: names of letters, digits and ``_`` are kept as they are."""
    return re.sub(r"[^A-Za-z0-9_]+", "-", text).strip("-") or "x"


def classification_figure_names(feature_set: str, classifier: str, *, binary: bool = True) -> dict[str, str]:
    """File names of the per-(feature set, classifier) figures :func:`~brainvae.analysis.outputs.write_classification_outputs`
    writes: ``{"roc": ..., "confusion": ...}`` (no ROC for more than two classes). A wildcard
    (``{baseline}``) is kept as it is, so a workflow can declare the files before they exist."""
    keep = re.fullmatch(r"\{[A-Za-z_]+\}", feature_set)
    stem = f"{feature_set if keep else slug(feature_set)}_{slug(classifier)}"
    names = {"confusion": f"confusion_{stem}.png"}
    if binary:
        names["roc"] = f"roc_{stem}.png"
    return names


def classification_output_files(
    folder: str,
    feature_set: str,
    classifiers: Sequence[str],
    *,
    binary: bool = True,
    mark: Callable[[str, str, str], Any] | None = None,
) -> dict[str, Any]:
    """Every file :func:`~brainvae.analysis.outputs.write_classification_outputs` writes for one feature set, by name, for a
    workflow to declare (``folder`` and ``feature_set`` may hold wildcards such as ``{model}``).

    Figures and the HTML table are passed through ``mark(path, kind, classifier)`` when given
    (Snakemake's ``report()`` flag); kind is ``table``, ``summary``, ``confusion matrix`` or
    ``ROC curves``, classifier ``all`` for the table and summary. ``confusion`` and ``roc`` are
    lists in the order of ``classifiers``.
    """
    def item(path: str, kind: str, classifier: str = "all") -> Any:
        return path if mark is None else mark(path, kind, classifier)

    metric = "roc_auc" if binary else "balanced_accuracy"
    names = {c: classification_figure_names(feature_set, c, binary=binary) for c in classifiers}
    files: dict[str, Any] = {
        "folds": f"{folder}/folds.tsv",
        "predictions": f"{folder}/predictions.tsv",
        "outer_folds": f"{folder}/outer_folds.tsv",
        "permutations": f"{folder}/permutations.tsv",
        "null": f"{folder}/null.tsv",
        "summary": f"{folder}/summary.tsv",
        "settings": f"{folder}/settings.json",
        "table": f"{folder}/classification.tsv",
        "table_md": f"{folder}/classification.md",
        "table_html": item(f"{folder}/classification.html", "table"),
        "summary_png": item(f"{folder}/summary_{metric}.png", "summary"),
        "confusion": [item(f"{folder}/{names[c]['confusion']}", "confusion matrix", c) for c in classifiers],
    }
    if binary:
        files["roc"] = [item(f"{folder}/{names[c]['roc']}", "ROC curves", c) for c in classifiers]
    return files


def pca_output_files(folder: str, name: str, *, mark: Callable[[str, str], Any] | None = None) -> dict[str, Any]:
    """The files :func:`~brainvae.analysis.pca.pca_report` writes, by the keys it returns, for a workflow to declare.

    The two figures are passed through ``mark(path, kind)`` when given (Snakemake's ``report()``
    flag); kind is ``PC1 vs PC2`` or ``explained variance``.
    """
    def item(path: str, kind: str) -> Any:
        return path if mark is None else mark(path, kind)

    return {
        "scores": f"{folder}/{name}_scores.tsv",
        "explained_variance": f"{folder}/{name}_explained_variance.tsv",
        "scatter": item(f"{folder}/{name}_scatter.png", "PC1 vs PC2"),
        "variance_plot": item(f"{folder}/{name}_explained_variance.png", "explained variance"),
    }
