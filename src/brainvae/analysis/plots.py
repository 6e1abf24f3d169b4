"""Figures of the analysis: PCA scatter with KDE contours, explained variance, ROC, confusion, metric summary.

Figure + Agg canvas directly (no pyplot): no global backend state, safe in worker processes and
threads, and nothing is left open. Every figure is written atomically (brainvae.io.atomic_path).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from brainvae.io import atomic_path

__all__ = [
    "plot_confusion",
    "plot_explained_variance",
    "plot_message",
    "plot_metric_summary",
    "plot_pca_scatter",
    "plot_roc",
    "plot_task_figure",
]

_PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")


def _figure(width: float, height: float):  # -> matplotlib.figure.Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, out_png: str | os.PathLike[str]) -> Path:
    out = Path(out_png)
    with atomic_path(out, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    return out


def _kde_contours(ax, xy: np.ndarray, color: str, grid: tuple[np.ndarray, np.ndarray]) -> None:
    """Contours of a Gaussian KDE enclosing about 50% and 90% of the group's points.

    The levels are quantiles of the density at the group's own points (a highest-density-region
    estimate), so contours mean the same thing for groups of different size. Groups too small or
    degenerate for a 2-D KDE (fewer than 4 points, collinear) get no contour.
    """
    from scipy.stats import gaussian_kde

    if xy.shape[0] < 4:
        return
    try:
        kde = gaussian_kde(xy.T)
    except (np.linalg.LinAlgError, ValueError):
        return
    gx, gy = grid
    dens = kde(np.vstack([gx.ravel(), gy.ravel()])).reshape(gx.shape)
    levels = np.quantile(kde(xy.T), [0.1, 0.5])
    if not (np.all(np.isfinite(levels)) and levels[1] > levels[0] > 0):
        return
    ax.contour(gx, gy, dens, levels=levels, colors=[color], linewidths=[0.8, 1.3], alpha=0.9)


def plot_pca_scatter(
    scores: pd.DataFrame,
    out_png: str | os.PathLike[str],
    *,
    color_by: Sequence[str] = ("dataset", "label"),
    pcs: tuple[str, str] = ("PC1", "PC2"),
    explained_ratio: Sequence[float] | None = None,
    title: str = "",
) -> Path:
    """PC scatter, one panel per ``color_by`` column, points coloured by group with KDE contours."""
    color_by = [c for c in color_by if c in scores.columns] or ["__all__"]
    data = scores.assign(__all__="all") if "__all__" in color_by else scores
    x, y = data[pcs[0]].to_numpy(float), data[pcs[1]].to_numpy(float)
    pad_x, pad_y = 0.15 * (np.ptp(x) or 1.0), 0.15 * (np.ptp(y) or 1.0)
    gx, gy = np.meshgrid(np.linspace(x.min() - pad_x, x.max() + pad_x, 120), np.linspace(y.min() - pad_y, y.max() + pad_y, 120))
    fig = _figure(4.6 * len(color_by), 4.4)
    axes = np.atleast_1d(fig.subplots(1, len(color_by), squeeze=False)[0])

    def axis_label(i: int) -> str:
        if explained_ratio is not None and len(explained_ratio) > i:
            return f"{pcs[i]} ({100 * float(explained_ratio[i]):.1f}% var.)"
        return pcs[i]

    for ax, column in zip(axes, color_by):
        values = data[column].astype(str).fillna("n/a")
        for j, group in enumerate(sorted(values.unique())):
            sel = (values == group).to_numpy()
            color = _PALETTE[j % len(_PALETTE)]
            ax.scatter(x[sel], y[sel], s=16, color=color, alpha=0.75, edgecolors="none", label=f"{group} (n={sel.sum()})")
            _kde_contours(ax, np.column_stack([x[sel], y[sel]]), color, (gx, gy))
        ax.set_xlabel(axis_label(0))
        ax.set_ylabel(axis_label(1))
        ax.set_title(f"by {column}" if column != "__all__" else "all scans", fontsize=10)
        ax.legend(fontsize=7, frameon=False, loc="best")
        ax.set_xlim(gx.min(), gx.max())
        ax.set_ylim(gy.min(), gy.max())
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _save(fig, out_png)


def plot_explained_variance(
    explained_ratio: Sequence[float] | np.ndarray, out_png: str | os.PathLike[str], *, title: str = "", n_show: int = 20
) -> Path:
    """Bars: variance explained by each of the first ``n_show`` PCs; line: cumulative (of total)."""
    ratio = np.asarray(explained_ratio, dtype=float)
    shown = ratio[:n_show]
    idx = np.arange(1, shown.size + 1)
    fig = _figure(6.0, 3.8)
    ax = fig.subplots()
    ax.bar(idx, 100 * shown, color="#1f77b4", alpha=0.8, label="per component")
    ax2 = ax.twinx()
    ax2.plot(idx, 100 * np.cumsum(ratio)[: shown.size], color="#d62728", marker="o", ms=3, label="cumulative")
    ax2.set_ylim(0, 100)
    ax.set_xlabel("principal component")
    ax.set_ylabel("explained variance (%)")
    ax2.set_ylabel("cumulative (%)")
    ax.set_xticks(idx if idx.size <= 20 else idx[::2])
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(handles, ["per component", "cumulative"], fontsize=8, frameon=False, loc="center right")
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, out_png)


def plot_roc(
    predictions: pd.DataFrame, out_png: str | os.PathLike[str], *, title: str = "", positive_label: str = "positive"
) -> Path:
    """ROC of every outer test fold (thin), their vertical mean ± 1 sd (band), and the chance line.

    ``predictions``: one (feature set, classifier): columns repeat, fold, y_true (0/1), score.
    Folds with a single class have no ROC and are skipped.
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    grid = np.linspace(0.0, 1.0, 201)
    tprs, aucs = [], []
    fig = _figure(4.6, 4.4)
    ax = fig.subplots()
    for _, part in predictions.groupby(["repeat", "fold"], sort=True):
        yt, sc = part["y_true"].to_numpy(), part["score"].to_numpy(float)
        if len(np.unique(yt)) < 2:
            continue
        fpr, tpr, _ = roc_curve(yt, sc)
        ax.plot(fpr, tpr, color="0.6", lw=0.5, alpha=0.5)
        interp = np.interp(grid, fpr, tpr)
        interp[0] = 0.0
        tprs.append(interp)
        aucs.append(roc_auc_score(yt, sc))
    if tprs:
        mean, sd = np.mean(tprs, axis=0), np.std(tprs, axis=0)
        mean[-1] = 1.0
        ax.fill_between(grid, np.clip(mean - sd, 0, 1), np.clip(mean + sd, 0, 1), color="#1f77b4", alpha=0.2, label="± 1 sd")
        ax.plot(grid, mean, color="#1f77b4", lw=2, label=f"mean ROC (AUC {np.mean(aucs):.2f} ± {np.std(aucs, ddof=1) if len(aucs) > 1 else 0:.2f})")
    ax.plot([0, 1], [0, 1], ls="--", color="k", lw=0.8, label="chance")
    ax.set_xlabel("1 − specificity")
    ax.set_ylabel(f"sensitivity ({positive_label})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_aspect("equal")
    ax.legend(fontsize=7, frameon=False, loc="lower right")
    ax.set_title(title or "ROC over outer test folds", fontsize=9)
    fig.tight_layout()
    return _save(fig, out_png)


def plot_confusion(
    predictions: pd.DataFrame, classes: Sequence[str], out_png: str | os.PathLike[str], *, title: str = ""
) -> Path:
    """Confusion matrix summed over all outer test folds of all repeats (each scan counted once per
    repeat), with counts and row percentages (row = true class)."""
    k = len(classes)
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (predictions["y_true"].to_numpy(int), predictions["y_pred"].to_numpy(int)), 1)
    row_pct = 100 * cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig = _figure(1.2 + 1.1 * k, 1.0 + 1.0 * k)
    ax = fig.subplots()
    ax.imshow(row_pct, cmap="Blues", vmin=0, vmax=100)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, f"{cm[i, j]}\n{row_pct[i, j]:.0f}%", ha="center", va="center", fontsize=8,
                    color="white" if row_pct[i, j] > 60 else "black")
    ax.set_xticks(range(k), labels=list(classes), fontsize=8)
    ax.set_yticks(range(k), labels=list(classes), fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    n_folds = predictions.groupby(["repeat", "fold"]).ngroups if {"repeat", "fold"} <= set(predictions) else 0
    note = f"summed over {n_folds} outer test folds" if n_folds else "summed over outer test folds"
    ax.set_title(f"{title}\n{note}" if title else note, fontsize=9)
    fig.tight_layout()
    return _save(fig, out_png)


def plot_metric_summary(
    summary: pd.DataFrame, out_png: str | os.PathLike[str], *, metric: str = "roc_auc", chance: float | None = 0.5,
    title: str = "",
) -> Path:
    """Mean and CI of ``metric`` for every (feature set, classifier) of a long summary table."""
    part = summary[summary["metric"] == metric].reset_index(drop=True)
    labels = [f"{r.feature_set} · {r.classifier}" for r in part.itertuples()]
    fig = _figure(6.0, 0.8 + 0.28 * max(len(part), 1))
    ax = fig.subplots()
    ypos = np.arange(len(part))[::-1]
    sets = sorted(part["feature_set"].unique()) if len(part) else []
    colors = {s: _PALETTE[i % len(_PALETTE)] for i, s in enumerate(sets)}
    for yy, r in zip(ypos, part.itertuples()):
        c = colors[r.feature_set]
        if np.isfinite(r.ci_low) and np.isfinite(r.ci_high):
            ax.plot([r.ci_low, r.ci_high], [yy, yy], color=c, lw=2)
        ax.plot([r.mean], [yy], "o", color=c)
    if chance is not None:
        ax.axvline(chance, ls="--", color="k", lw=0.8)
    ax.set_yticks(ypos, labels=labels, fontsize=7)
    ax.set_xlabel(metric.replace("_", " "))
    ax.set_title(title or f"{metric} (mean and CI over outer folds)", fontsize=9)
    fig.tight_layout()
    return _save(fig, out_png)


def plot_task_figure(predictions: pd.DataFrame, out_png: str | os.PathLike[str], *, kind: str, title: str = "") -> Path:
    """One figure of a task's cross-validated predictions, one curve or panel per model × feature set.

    ``kind`` binary: ROC curves of the positive-class score (``score``, truth ``y_true`` 1 = positive);
    otherwise predicted (``value``, else ``code``) against true value, with the identity line. Repeat 0.
    """
    from sklearn.metrics import roc_curve

    preds = predictions[predictions["repeat"] == predictions["repeat"].min()] if "repeat" in predictions else predictions
    model = preds["model"].astype(str) if "model" in preds.columns else pd.Series("(none)", index=preds.index)
    names = np.where(model == "(none)", preds["feature_set"].astype(str), model + ": " + preds["feature_set"].astype(str))
    groups = list(dict.fromkeys(names))
    if kind == "binary":
        fig = _figure(5.2, 4.6)
        ax = fig.subplots()
        for j, name in enumerate(groups):
            part = preds[names == name]
            y, s = part["y_true"].to_numpy(int), part["score"].to_numpy(float)
            if len(set(y.tolist())) < 2:
                continue
            fpr, tpr, _ = roc_curve(y, s)
            ax.plot(fpr, tpr, color=_PALETTE[j % len(_PALETTE)], lw=1.4, label=name)
        ax.plot([0, 1], [0, 1], color="#999999", lw=0.8, ls="--")
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.legend(fontsize=7, frameon=False, loc="lower right")
    else:
        columns = min(4, len(groups))
        rows = int(np.ceil(len(groups) / columns))
        fig = _figure(3.2 * columns, 3.0 * rows)
        axes = np.atleast_1d(fig.subplots(rows, columns, squeeze=False).ravel())
        value = "value" if "value" in preds.columns and preds["value"].notna().any() else "code"
        truth = preds["y_true"].to_numpy(float)
        lo, hi = float(np.nanmin(truth)), float(np.nanmax(truth))
        for ax, name in zip(axes, groups):
            sel = names == name
            jitter = 0.0 if kind == "regression" else np.random.default_rng(0).uniform(-0.15, 0.15, sel.sum())
            ax.scatter(truth[sel] + jitter, preds.loc[sel, value].to_numpy(float), s=10, alpha=0.7, color=_PALETTE[0],
                       edgecolors="none")
            ax.plot([lo, hi], [lo, hi], color="#999999", lw=0.8, ls="--")
            ax.set_title(name, fontsize=8)
            ax.set_xlabel("true" + ("" if kind == "regression" else " (level code)"), fontsize=8)
            ax.set_ylabel("predicted", fontsize=8)
        for ax in axes[len(groups):]:
            ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _save(fig, out_png)


def plot_message(out_png: str | os.PathLike[str], title: str, message: str) -> Path:
    """A figure holding only a message (a declared figure of something that was left out, and why)."""
    import textwrap

    fig = _figure(6.0, 2.0)
    ax = fig.subplots()
    ax.axis("off")
    ax.text(0.5, 0.5, "\n".join(textwrap.wrap(message, 90)), ha="center", va="center", fontsize=8, wrap=True)
    ax.set_title(title, fontsize=11)
    return _save(fig, out_png)
