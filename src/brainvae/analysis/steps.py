"""File-level steps of the analysis rules: read the workflow's files, call the library, write outputs.

The Snakemake scripts in ``workflow/scripts/analysis_*.py`` are one call each into this module, so
everything here is tested without Snakemake.

The analysis table (``scans.tsv``, :func:`scan_table`) has one row per scan of the cohort array, in
its order: identifiers, the label and covariates from the cohort index, and the size confounds
(QC brain volume, native-to-MNI affine scale, and ``tiv_ml``: the participants' ``icv_ml`` where
given, else the QC brain volume). It holds no VAE split: which scans a model saw comes from that
model's own splits (brainvae.analysis.task_steps.select_scans). Every feature matrix is aligned to it
by the ``scan`` column. The prediction tasks' steps are in brainvae.analysis.task_steps.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from brainvae.analysis.classify import site_check
from brainvae.analysis.errors import AnalysisError
from brainvae.analysis.features import (
    FeatureSet,
    affine_scale,
    align_rows,
    confound_features,
    latent_matrix,
    load_latents,
    load_voxel_matrix,
)
from brainvae.analysis.outputs import write_classification_outputs
from brainvae.analysis.tables import (
    classification_table,
    format_classification_table,
    format_reconstruction_summary,
    reconstruction_summary_table,
    write_table,
    write_tsv,
)
from brainvae.io import read_json

__all__ = [
    "NOT_IN_SPLIT",
    "confounds_from_files",
    "feature_set",
    "read_scan_table",
    "reconstruction_tables",
    "scan_table",
    "site_check_step",
    "site_check_tables",
]

#: Split of a scan the VAE never saw (same word as the latents table, brainvae.vae.latents).
NOT_IN_SPLIT = "none"
#: Columns of the analysis table that hold numbers (everything else is read as text).
NUMERIC_COLUMNS = ("icv_ml", "brain_volume_ml", "affine_scale", "tiv_ml", "age")
#: Model column value of baseline rows (voxels, confounds) in the combined tables: they use no VAE.
#: Not "n/a", which TSV readers (and write_tsv) take for a missing value.
NO_MODEL = "(none)"


def confounds_from_files(qc_json: str | os.PathLike[str], xfm_json: str | os.PathLike[str]) -> dict[str, float]:
    """Brain volume (mL, the native brain mask of the QC metrics) and the native→MNI affine scale."""
    qc = read_json(qc_json)
    icv = qc.get("brain_volume_ml") if isinstance(qc, dict) else None
    if not isinstance(icv, (int, float)) or not np.isfinite(icv) or icv <= 0:
        raise AnalysisError(str(qc_json), f"no positive 'brain_volume_ml' (got {icv!r})")
    xfm = read_json(xfm_json)
    matrix = xfm.get("affine_native_to_mni_ras") if isinstance(xfm, dict) else None
    if matrix is None:
        raise AnalysisError(str(xfm_json), "no 'affine_native_to_mni_ras' matrix")
    try:
        scale = affine_scale(np.asarray(matrix, dtype=np.float64))
    except (ValueError, TypeError) as error:
        raise AnalysisError(str(xfm_json), f"'affine_native_to_mni_ras' is not a 4×4 matrix ({error})") from error
    if not np.isfinite(scale) or scale <= 0:
        raise AnalysisError(str(xfm_json), f"degenerate native→MNI affine (scale {scale})")
    return {"brain_volume_ml": float(icv), "affine_scale": scale}


def scan_table(
    index: pd.DataFrame,
    splits: pd.DataFrame | None,
    confounds: Mapping[str, Mapping[str, float]],
) -> pd.DataFrame:
    """The analysis table: the cohort index (row order kept) with participant, confounds and ``tiv_ml``.

    ``index``: the cohort index (scan, scan_key, dataset, subject, session, run, label, covariates);
    ``splits``: a (scan, split) table to add as ``split`` (scans absent get ``none``), or None for no
    split column (the workflow: each model has its own); ``confounds``: scan → {brain_volume_ml,
    affine_scale}, every scan of the index needed. ``tiv_ml`` is the index's ``icv_ml`` (participants
    column) where it holds a positive number, else the QC brain volume; ``tiv_source`` says which.
    """
    missing = [c for c in ("scan", "dataset", "subject", "label") if c not in index.columns]
    if missing:
        raise AnalysisError("cohort index", f"missing column(s): {', '.join(missing)}")
    no_confounds = [s for s in index["scan"] if s not in confounds]
    if no_confounds:
        raise AnalysisError("confounds", f"no QC/transform values for {len(no_confounds)} scan(s): "
                                         f"{', '.join(no_confounds[:5])}")
    table = index.sort_values("row").reset_index(drop=True) if "row" in index.columns else index.reset_index(drop=True)
    table = table.rename(columns={"subject": "participant"}).drop(columns=["row"], errors="ignore")
    if splits is not None:
        split_of = dict(zip(splits["scan"].astype(str), splits["split"].astype(str)))
        table["split"] = [split_of.get(s, NOT_IN_SPLIT) for s in table["scan"].astype(str)]
    table["brain_volume_ml"] = [float(confounds[s]["brain_volume_ml"]) for s in table["scan"]]
    table["affine_scale"] = [float(confounds[s]["affine_scale"]) for s in table["scan"]]
    given = pd.to_numeric(table["icv_ml"], errors="coerce") if "icv_ml" in table.columns else \
        pd.Series(np.nan, index=table.index)
    has = (given > 0).to_numpy()
    table["tiv_ml"] = np.where(has, given.to_numpy(dtype=float), table["brain_volume_ml"].to_numpy())
    table["tiv_source"] = np.where(has, "participants icv_ml", "qc brain_volume_ml")
    lead = [c for c in ("scan", "scan_key", "dataset", "participant", "session", "run", "label", "split",
                        "tiv_ml", "tiv_source", "brain_volume_ml", "affine_scale") if c in table.columns]
    return table[lead + [c for c in table.columns if c not in lead]]


def read_scan_table(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read ``scans.tsv``: identifiers as text (empty session stays ""), confounds and age as numbers."""
    path = Path(path)
    if not path.exists():
        raise AnalysisError(str(path), "analysis table does not exist")
    table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, na_filter=False)
    for column in NUMERIC_COLUMNS:
        if column in table.columns:
            table[column] = pd.to_numeric(table[column].replace({"n/a": ""}), errors="coerce").astype(float)
    return table


def feature_set(
    kind: str,
    scans: pd.DataFrame,
    *,
    latents: str | os.PathLike[str] | None = None,
    voxels: str | os.PathLike[str] | None = None,
    voxel_index: str | os.PathLike[str] | None = None,
    pca_components: int = 10,
) -> FeatureSet:
    """The ``kind`` feature set (``latents``, ``voxels_pca`` or ``confounds``), rows aligned to ``scans``."""
    if kind == "latents":
        if latents is None:
            raise AnalysisError("latents", "no latents file given")
        table = load_latents(latents, required=("scan", "dataset", "participant"))
        X = np.asarray(align_rows(scans, table, latent_matrix(table), what=str(latents)))
        return FeatureSet("latents", X)
    if kind == "voxels_pca":
        if voxels is None or voxel_index is None:
            raise AnalysisError("voxels", "no voxel matrix or index given")
        X, index = load_voxel_matrix(voxels, voxel_index)
        return FeatureSet("voxels_pca", align_rows(scans, index, X, what=str(voxels)), pca_components=pca_components)
    if kind == "confounds":
        from brainvae.analysis.tasks import CONFOUNDS

        return confound_features(scans, list(CONFOUNDS), name="confounds")
    raise AnalysisError("feature set", f"unknown kind {kind!r}; choose latents, voxels_pca or confounds")


def site_check_step(
    scans: pd.DataFrame,
    features: FeatureSet,
    out_dir: str | os.PathLike[str],
    *,
    model: str | None = None,
    ci: str = "corrected_t",
    **settings: Any,
) -> dict[str, Path]:
    """How well ``features`` predict the dataset (site); tables and figures to ``out_dir``."""
    result = site_check(scans, [features], site_col="dataset", **settings)
    return write_classification_outputs(result, out_dir, model=model, meta=scans, ci=ci)


def _read_tsv(path: str | os.PathLike[str], what: str) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        raise AnalysisError(str(path), f"{what} does not exist")
    return pd.read_csv(path, sep="\t", na_values=["n/a"], keep_default_na=True)


def _with_model(table: pd.DataFrame) -> pd.DataFrame:
    if "model" not in table.columns:
        table = table.assign(model=NO_MODEL)
    table["model"] = table["model"].fillna(NO_MODEL).astype(str)
    return table[["model", *[c for c in table.columns if c != "model"]]]


def reconstruction_tables(
    evaluation_summaries: Mapping[str, str | os.PathLike[str]], out_dir: str | os.PathLike[str]
) -> dict[str, Path]:
    """Reconstruction per model (VAE and its PCA baseline) from each model's evaluation ``summary.tsv``:
    ``reconstruction.{tsv,md,html}`` in ``out_dir``."""
    out = Path(out_dir)
    recon = reconstruction_summary_table({m: _read_tsv(p, "evaluation summary") for m, p in evaluation_summaries.items()})
    return write_table(
        recon, out / "reconstruction.tsv", out / "reconstruction.md", formatted=format_reconstruction_summary(recon),
        html_path=out / "reconstruction.html", title="Reconstruction of the held-out test scans",
        caption="Per model: the VAE and a PCA baseline with as many components as latent dimensions, scored on the "
                "test split; mean ± sd over scans [bootstrap 95% CI of the mean]; region mask = inside the brain "
                "mask, whole = the whole volume.")


def _gather(dirs: Sequence[str | os.PathLike[str]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    summaries, perms = [], []
    for d in dirs:
        summaries.append(_with_model(_read_tsv(Path(d) / "summary.tsv", "classification summary")))
        p = _read_tsv(Path(d) / "permutations.tsv", "permutation table")
        if len(p):
            perms.append(_with_model(p))
    if not summaries:
        raise AnalysisError("classification tables", "no classification results given")
    summary = pd.concat(summaries, ignore_index=True)
    perm = pd.concat(perms, ignore_index=True) if perms else pd.DataFrame()
    return summary, perm


def site_check_tables(site_check_dirs: Sequence[str | os.PathLike[str]], out_dir: str | os.PathLike[str]
                      ) -> dict[str, Path]:
    """The site check of every model in one table: ``site_check.{tsv,md,html}`` in ``out_dir``."""
    out = Path(out_dir)
    summary, _ = _gather(site_check_dirs)
    wide = classification_table(summary)
    return write_table(
        wide, out / "site_check.tsv", out / "site_check.md",
        formatted=format_classification_table(wide, metrics=("balanced_accuracy", "roc_auc", "f1")),
        html_path=out / "site_check.html", title="Site check: predicting the dataset from the latents",
        caption="Chance is 1/K for balanced accuracy and 0.5 for ROC AUC (one-vs-rest macro for K > 2 datasets). "
                "High values mean the representation encodes the site, which a DS effect can be confounded with "
                "when groups are spread unevenly over sites.")
