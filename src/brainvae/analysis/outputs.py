"""Write everything of one classification run (tables and figures) in one call, for a Snakemake rule."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from brainvae.analysis.classify import ClassificationResult
from brainvae.analysis.cv import folds_to_table
from brainvae.analysis.names import classification_figure_names, slug
from brainvae.analysis.plots import plot_confusion, plot_metric_summary, plot_roc
from brainvae.analysis.tables import classification_table, format_classification_table, write_table, write_tsv
from brainvae.io import atomic_write_json

__all__ = ["write_classification_outputs"]


def write_classification_outputs(
    result: ClassificationResult,
    out_dir: str | os.PathLike[str],
    *,
    model: str | None = None,
    meta: pd.DataFrame | None = None,
    ci: str = "corrected_t",
    confidence: float = 0.95,
    figures: bool = True,
) -> dict[str, Path]:
    """Write the tables and figures of ``result`` under ``out_dir``; return {name: path}.

    Files: ``folds.tsv`` (every outer fold's metrics and chosen hyper-parameters),
    ``predictions.tsv`` (every outer test prediction; with scan ids when ``meta`` is given),
    ``outer_folds.tsv`` (participant → repeat/fold, to reuse the same folds elsewhere),
    ``permutations.tsv`` and ``null.tsv`` (permutation test), ``summary.tsv`` (long: metric mean,
    sd, CI), ``classification.tsv`` / ``.md`` / ``.html`` (one row per feature set × classifier),
    ``settings.json``; figures ``roc_<features>_<classifier>.png`` (binary labels only),
    ``confusion_<features>_<classifier>.png`` and ``summary_<metric>.png``. ``model`` adds a model
    column to the tables so several models' tables can be concatenated.
    """
    out = Path(out_dir)
    tag = {} if model is None else {"model": model}
    summary = result.summary(ci=ci, confidence=confidence)
    folds, preds, perms = result.folds, result.predictions, result.permutations
    if model is not None:
        summary, folds, preds, perms = (df.assign(**tag)[["model", *df.columns]] for df in (summary, folds, preds, perms))
    if meta is not None:
        ids = [c for c in ("scan", "dataset", "participant", "session", "run") if c in meta.columns]
        preds = preds.join(meta[ids].reset_index(drop=True), on="row")
    wide = classification_table(summary, perms)
    paths: dict[str, Path] = {
        "folds": write_tsv(folds, out / "folds.tsv"),
        "predictions": write_tsv(preds, out / "predictions.tsv"),
        "outer_folds": write_tsv(folds_to_table(result.outer_folds, result.groups), out / "outer_folds.tsv"),
        "permutations": write_tsv(perms, out / "permutations.tsv"),
        "null": write_tsv(result.null, out / "null.tsv"),
        "summary": write_tsv(summary, out / "summary.tsv"),
        "settings": atomic_write_json({**result.settings, "ci_method": ci, "confidence": confidence, **tag},
                                      out / "settings.json"),
    }
    binary = len(result.classes) == 2
    metrics = ("roc_auc", "balanced_accuracy", "sensitivity", "specificity") if binary else ("balanced_accuracy", "roc_auc", "f1")
    caption = (
        f"Label '{result.label}'" + (f", positive class '{result.positive}'" if binary else f", classes {', '.join(result.classes)}")
        + f"; {result.settings.get('n_repeats')}× {result.settings.get('n_splits')}-fold participant-grouped outer CV; "
        f"mean ± sd over outer folds [{int(100 * confidence)}% CI, {ci}]."
    )
    table_paths = write_table(wide, out / "classification.tsv", out / "classification.md",
                              formatted=format_classification_table(wide, metrics=metrics), caption=caption,
                              html_path=out / "classification.html",
                              title=f"{model + ': ' if model else ''}classification of '{result.label}'")
    paths["classification"], paths["classification_md"] = table_paths["tsv"], table_paths["md"]
    paths["classification_html"] = table_paths["html"]
    if figures:
        chance_ba = 1.0 / len(result.classes)
        paths["summary_plot"] = plot_metric_summary(
            summary, out / f"summary_{'roc_auc' if binary else 'balanced_accuracy'}.png",
            metric="roc_auc" if binary else "balanced_accuracy", chance=0.5 if binary else chance_ba,
            title=f"{model + ': ' if model else ''}{result.label}",
        )
        for (fs, clf), part in result.predictions.groupby(["feature_set", "classifier"], sort=False):
            names = classification_figure_names(fs, clf, binary=binary)
            stem = f"{slug(fs)}_{slug(clf)}"
            title = f"{model + ' · ' if model else ''}{fs} · {clf}"
            if binary:
                paths[f"roc_{stem}"] = plot_roc(part, out / names["roc"], title=title,
                                                positive_label=str(result.positive))
            paths[f"confusion_{stem}"] = plot_confusion(part, result.classes, out / names["confusion"], title=title)
    return paths
