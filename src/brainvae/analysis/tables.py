"""Summary tables as TSV (numbers, for machines) and Markdown (formatted, for the report).

* classification: per (model ×) feature set × classifier — mean ± sd over outer folds, a CI
  (see :mod:`brainvae.analysis.stats` for the method) and the permutation p-value;
* reconstruction: per model (and optionally split/dataset) — mean ± sd of each metric from the
  VAE step's per-scan table.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from brainvae.analysis.errors import AnalysisError
from brainvae.analysis.stats import confidence_interval
from brainvae.io import atomic_write_text

__all__ = [
    "METRIC_NAMES",
    "classification_table",
    "format_classification_table",
    "format_reconstruction_summary",
    "format_reconstruction_table",
    "reconstruction_summary_table",
    "reconstruction_table",
    "summarise_folds",
    "to_html",
    "to_markdown",
    "write_table",
    "write_tsv",
]

METRIC_NAMES = {
    "roc_auc": "ROC AUC",
    "balanced_accuracy": "Balanced accuracy",
    "accuracy": "Accuracy",
    "f1": "F1",
    "sensitivity": "Sensitivity",
    "specificity": "Specificity",
}
_KEYS = ("model", "feature_set", "classifier")


def summarise_folds(
    folds: pd.DataFrame,
    *,
    metrics: Sequence[str] = tuple(METRIC_NAMES),
    by: Sequence[str] | None = None,
    ci: str = "corrected_t",
    confidence: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """Long table: one row per (``by`` ..., metric) with n_folds, mean, sd, ci_low, ci_high, ci_method.

    ``by`` defaults to those of model, feature_set, classifier present. The corrected t-interval
    uses each group's mean n_test/n_train (from the fold table's n_test, n_train columns). CIs are
    clipped to [0, 1], the range of every metric of :data:`~brainvae.analysis.classify.METRICS`.
    """
    by = [c for c in _KEYS if c in folds.columns] if by is None else list(by)
    rows = []
    for key, part in folds.groupby(by, sort=False) if by else [((), folds)]:
        key = key if isinstance(key, tuple) else (key,)
        ratio = float((part["n_test"] / part["n_train"]).mean()) if {"n_test", "n_train"} <= set(part.columns) else None
        for m in metrics:
            if m not in part.columns:
                continue
            v = part[m].to_numpy(dtype=float)
            finite = v[np.isfinite(v)]
            lo, hi = confidence_interval(v, method=ci, confidence=confidence, test_train_ratio=ratio, seed=seed)
            # Every metric here is a proportion: a t-interval can overshoot [0, 1], the metric cannot.
            lo, hi = max(lo, 0.0), min(hi, 1.0)
            rows.append({
                **dict(zip(by, key)), "metric": m, "n_folds": int(finite.size),
                "mean": float(finite.mean()) if finite.size else float("nan"),
                "sd": float(finite.std(ddof=1)) if finite.size > 1 else float("nan"),
                "ci_low": lo, "ci_high": hi, "ci_method": ci, "confidence": confidence,
            })
    return pd.DataFrame(rows)


def _wide_stats(long: pd.DataFrame, keys: list[str], metrics: Sequence[str], count: str) -> pd.DataFrame:
    """Long (keys, metric, mean, sd, ci_low, ci_high, ``count``) -> one row per observed key combination:
    keys, ``count`` (its maximum) and ``<metric>_{mean,sd,ci_low,ci_high}`` (NaN where absent)."""
    # dropna=False keeps all-NaN metrics, but makes every combination of the keys; keep the observed ones.
    observed = long.groupby(keys, sort=False)[count].max()
    wide = long.pivot_table(index=keys, columns="metric", values=["mean", "sd", "ci_low", "ci_high"], sort=False,
                            dropna=False).reindex(observed.index)
    out = pd.DataFrame(index=wide.index)
    out[count] = observed
    for m in metrics:
        for stat in ("mean", "sd", "ci_low", "ci_high"):
            out[f"{m}_{stat}"] = wide[(stat, m)] if (stat, m) in wide.columns else np.nan
    return out.reset_index()


def classification_table(
    summary: pd.DataFrame, permutations: pd.DataFrame | None = None, *, metrics: Sequence[str] | None = None
) -> pd.DataFrame:
    """Wide numeric table: keys, n_folds, ``<metric>_{mean,sd,ci_low,ci_high}``, and the permutation
    test (``perm_metric``, ``perm_observed``, ``n_permutations``, ``p_value``; NaN where not run)."""
    keys = [c for c in _KEYS if c in summary.columns]
    metrics = list(dict.fromkeys(summary["metric"])) if metrics is None else list(metrics)
    part = summary[summary["metric"].isin(metrics)]
    out = _wide_stats(part, keys, metrics, "n_folds")
    if permutations is not None and len(permutations):
        perm_keys = [k for k in keys if k in permutations.columns]
        perm = permutations[perm_keys + ["metric", "observed", "n_permutations", "p_value"]].rename(
            columns={"metric": "perm_metric", "observed": "perm_observed"})
        out = out.merge(perm, on=perm_keys, how="left")
    else:
        out["perm_metric"], out["perm_observed"], out["n_permutations"], out["p_value"] = None, np.nan, np.nan, np.nan
    out["ci_method"] = summary["ci_method"].iloc[0] if len(summary) else ""
    return out


def _fmt(x: float, digits: int) -> str:
    return "–" if x is None or not np.isfinite(x) else f"{x:.{digits}f}"


def _fmt_p(p: float, n: float) -> str:
    if p is None or not np.isfinite(p):
        return "–"
    return f"{p:.3g} (n={int(n)})"


def format_classification_table(
    table: pd.DataFrame, *, metrics: Sequence[str] = ("roc_auc", "balanced_accuracy", "sensitivity", "specificity"),
    digits: int = 2,
) -> pd.DataFrame:
    """Strings for the report: ``mean ± sd [ci_low, ci_high]`` per metric and ``p (n=perms)``."""
    keys = [c for c in _KEYS if c in table.columns]
    out = table[keys].rename(columns={"model": "Model", "feature_set": "Features", "classifier": "Classifier"}).copy()
    for m in metrics:
        if f"{m}_mean" not in table.columns:
            continue
        out[METRIC_NAMES.get(m, m)] = [
            f"{_fmt(r[f'{m}_mean'], digits)} ± {_fmt(r[f'{m}_sd'], digits)} [{_fmt(r[f'{m}_ci_low'], digits)}, "
            f"{_fmt(r[f'{m}_ci_high'], digits)}]"
            for _, r in table.iterrows()
        ]
    if "p_value" in table.columns:
        out["p (permutation)"] = [_fmt_p(p, n) for p, n in zip(table["p_value"], table["n_permutations"])]
    return out


def reconstruction_table(
    per_scan: pd.DataFrame, *, by: Sequence[str] = ("model",), metrics: Sequence[str] | None = None
) -> pd.DataFrame:
    """Mean, sd and n of each reconstruction metric per ``by`` group (e.g. model, or model × split).

    ``metrics``: default the ``recon_*`` columns if there are any (the latents Parquet), else every
    numeric column that is not an identifier, covariate, latent (``mu_*``, ``logvar_*``) or
    grouping column. Accepts an already per-model table too (sd is then NaN).
    """
    missing = [c for c in by if c not in per_scan.columns]
    if missing:
        raise AnalysisError("reconstruction table", f"missing grouping column(s): {', '.join(missing)}")
    if metrics is None:
        recon = [c for c in per_scan.columns if str(c).startswith("recon_")]
        skip = set(by) | {"age", "run", "session", "icv_ml", "affine_scale"}
        metrics = recon or [
            c for c in per_scan.columns
            if c not in skip and pd.api.types.is_numeric_dtype(per_scan[c])
            and not str(c).startswith(("mu_", "logvar_"))
        ]
    if not metrics:
        raise AnalysisError("reconstruction table", "no numeric metric columns found")
    grouped = per_scan.groupby(list(by), sort=True)
    out = grouped.size().rename("n").to_frame()
    for m in metrics:
        out[f"{m}_mean"] = grouped[m].mean()
        out[f"{m}_sd"] = grouped[m].std(ddof=1)
    return out.reset_index()


def format_reconstruction_table(table: pd.DataFrame, *, digits: int = 4) -> pd.DataFrame:
    """``mean ± sd`` strings for each metric of :func:`reconstruction_table` output."""
    metrics = [c[: -len("_mean")] for c in table.columns if c.endswith("_mean")]
    keys = [c for c in table.columns if not c.endswith(("_mean", "_sd"))]
    out = table[keys].copy()
    for m in metrics:
        out[m] = [
            f"{r[f'{m}_mean']:.{digits}g}" + (f" ± {r[f'{m}_sd']:.{digits}g}" if np.isfinite(r[f"{m}_sd"]) else "")
            for _, r in table.iterrows()
        ]
    return out


def reconstruction_summary_table(
    summaries: Mapping[str, pd.DataFrame], *, regions: Sequence[str] | None = None
) -> pd.DataFrame:
    """One row per (model, method, region) from each model's evaluation ``summary.tsv``.

    ``summaries``: model name → the VAE step's long table (method, metric, region, n, mean, sd,
    ci_low, ci_high). Columns: model, method, region, n, then ``<metric>_{mean,sd,ci_low,ci_high}``
    for every metric present (e.g. mse, mae, psnr, ssim). ``regions``: keep only these.
    """
    needed = {"method", "metric", "region", "n", "mean", "sd", "ci_low", "ci_high"}
    parts = []
    for model, summary in summaries.items():
        missing = sorted(needed - set(summary.columns))
        if missing:
            raise AnalysisError(f"evaluation summary of model '{model}'", f"missing column(s): {', '.join(missing)}")
        part = summary if regions is None else summary[summary["region"].isin(list(regions))]
        parts.append(part.assign(model=model))
    if not parts:
        raise AnalysisError("reconstruction table", "no evaluation summaries given")
    long = pd.concat(parts, ignore_index=True)
    if long.empty:
        raise AnalysisError("reconstruction table", "the evaluation summaries hold no rows")
    keys = ["model", "method", "region"]
    metrics = list(dict.fromkeys(long["metric"]))
    return _wide_stats(long, keys, metrics, "n")


def format_reconstruction_summary(table: pd.DataFrame, *, digits: int = 4) -> pd.DataFrame:
    """``mean ± sd [ci_low, ci_high]`` strings for :func:`reconstruction_summary_table` output."""
    metrics = [c[: -len("_mean")] for c in table.columns if c.endswith("_mean")]
    keys = [c for c in ("model", "method", "region", "n") if c in table.columns]
    out = table[keys].rename(columns={"model": "Model", "method": "Method", "region": "Region"}).copy()

    def num(x: float) -> str:
        return "–" if x is None or not np.isfinite(x) else f"{x:.{digits}g}"

    for m in metrics:
        out[m.upper() if len(m) <= 4 else m] = [
            f"{num(r[f'{m}_mean'])} ± {num(r[f'{m}_sd'])} [{num(r[f'{m}_ci_low'])}, {num(r[f'{m}_ci_high'])}]"
            for _, r in table.iterrows()
        ]
    return out


def to_html(table: pd.DataFrame, *, title: str = "", caption: str | None = None) -> str:
    """A self-contained HTML page with the table (the Snakemake report shows HTML inline)."""
    import html

    body = table.to_html(index=False, border=0, na_rep="–", escape=True, classes="brainvae-table")
    head = f"<h3>{html.escape(title)}</h3>\n" if title else ""
    note = f"<p>{html.escape(caption)}</p>\n" if caption else ""
    style = (
        "body{font-family:sans-serif;font-size:13px;margin:1em}"
        "table{border-collapse:collapse}th,td{padding:3px 8px;border-bottom:1px solid #ddd;text-align:left;"
        "white-space:nowrap}th{background:#f3f3f3}p{max-width:60em;color:#444}"
    )
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title or 'table')}</title>"
            f"<style>{style}</style></head>\n<body>\n{head}{note}{body}\n</body></html>\n")


def to_markdown(table: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (no extra dependency); ``|`` in cells is escaped."""
    def cell(v: object) -> str:
        text = "" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v)
        return text.replace("|", r"\|").replace("\n", " ")

    header = "| " + " | ".join(cell(c) for c in table.columns) + " |"
    sep = "|" + "|".join("---" for _ in table.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join([header, sep, *body]) + "\n"


def write_tsv(table: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Write a TSV atomically (NaN as ``n/a``, the BIDS convention; floats to 6 significant digits)."""
    return atomic_write_text(table.to_csv(sep="\t", index=False, na_rep="n/a", float_format="%.6g"), path)


def write_table(
    numeric: pd.DataFrame,
    tsv_path: str | os.PathLike[str],
    md_path: str | os.PathLike[str] | None = None,
    *,
    formatted: pd.DataFrame | None = None,
    caption: str | None = None,
    html_path: str | os.PathLike[str] | None = None,
    title: str = "",
) -> dict[str, Path]:
    """Numbers to ``tsv_path``; ``formatted`` (default: ``numeric``) to ``md_path`` as Markdown and to
    ``html_path`` as an HTML page (for the report), each with ``caption``."""
    paths = {"tsv": write_tsv(numeric, tsv_path)}
    shown = numeric if formatted is None else formatted
    if md_path is not None:
        text = to_markdown(shown)
        if caption:
            text = f"{caption}\n\n{text}"
        paths["md"] = atomic_write_text(text, md_path)
    if html_path is not None:
        paths["html"] = atomic_write_text(to_html(shown, title=title, caption=caption), html_path)
    return paths
