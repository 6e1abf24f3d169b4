"""Encode every scan of a cohort array into a Parquet table of latent vectors.

The table's format (columns, types, reader) is :mod:`brainvae.latents_table`: one row per scan,
identifiers, label, split (``none`` for scans the VAE never saw, e.g. DS scans), age/sex when the
index has them, ``mu_*``/``logvar_*`` and the reconstruction MSE and SSIM inside the brain mask.

Encoding uses ``mu`` in eval mode (no sampling), so it is deterministic: the same model and
array give identical latents on every run. Parquet key-value metadata records which model made
the file: ``brainvae.model_name``, ``brainvae.config_sha256`` (sha256 of the canonical JSON of
the resolved training config), ``brainvae.version``, ``brainvae.checkpoint_sha256`` (sha256 of
``model.pt``), ``brainvae.latent_dim``, ``brainvae.architecture``, ``brainvae.latent_shape`` (JSON)
and ``brainvae.latent_order``.

Spatial models (latent grid ``C x x x y x z``) store the **flattened** ``mu`` and ``logvar``:
``mu_i`` with ``i = ((c * nx + ix) * ny + iy) * nz + iz`` (C order over channel, x, y, z, as
``mu.flatten(1)``; ``brainvae.latent_order`` = ``C-order (channel, x, y, z)``). The analysis uses
every ``mu_*`` column of the table, i.e. the whole flattened posterior mean, for both architectures
(a dense model's ``mu_i`` is its latent vector).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

import brainvae
from brainvae.io import sha256_file
from brainvae.deviation import mahalanobis_scores, zscores
from brainvae.latents_table import COVARIATE_TYPES, NOT_IN_SPLIT, latent_schema, read_latents, write_latents

from ..runtime import resolve_device
from .cohort import read_index, read_splits
from .config import config_sha256
from .evaluate import metrics_for_rows
from .nn import load_model

__all__ = ["deviation_columns", "encode_rows", "export_latents", "latent_schema", "read_latents", "NOT_IN_SPLIT"]


def encode_rows(model: torch.nn.Module, array: np.ndarray, rows: Sequence[int], *,
                device: torch.device | str = "cpu", batch_size: int = 4
                ) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, logvar)`` as float32 arrays ``len(rows) x latent_dim`` (eval mode, no sampling; spatial
    latents flattened in C order)."""
    model.eval()
    rows = list(rows)
    mus, logvars = [], []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start: start + batch_size]
            x = np.stack([np.asarray(array[r], dtype=np.float32) for r in chunk])
            mu, logvar = model.encode(torch.from_numpy(x).unsqueeze(1).to(device))
            mus.append(mu.float().flatten(1).cpu().numpy())
            logvars.append(logvar.float().flatten(1).cpu().numpy())
    d = int(model.latent_dim)
    if not rows:
        return np.zeros((0, d), np.float32), np.zeros((0, d), np.float32)
    return np.concatenate(mus), np.concatenate(logvars)


def _nullable(values: pd.Series) -> list[str | None]:
    return [None if v in ("", "n/a") else str(v) for v in values.astype(str)]


def export_latents(
    model_dir: str | os.PathLike[str],
    array_path: str | os.PathLike[str],
    mask_path: str | os.PathLike[str] | None,
    index: str | os.PathLike[str] | pd.DataFrame,
    splits: str | os.PathLike[str] | pd.DataFrame | None,
    out_path: str | os.PathLike[str],
    *,
    model_name: str | None = None,
    device: str = "auto",
    batch_size: int = 4,
) -> pa.Table:
    """Encode every row of the cohort array with the model in ``model_dir``; write Parquet.

    ``mask_path=None`` skips the reconstruction metrics (columns left null). ``splits=None``
    marks every scan ``none``. The file is written atomically. Returns the table.
    """
    model_dir = Path(model_dir)
    dev = resolve_device(device)
    model = load_model(model_dir, dev)
    cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    index_df = index.copy() if isinstance(index, pd.DataFrame) else read_index(index)
    index_df = index_df.sort_values("row").reset_index(drop=True)
    split_of = {} if splits is None else dict(read_splits(splits)[["scan", "split"]].to_numpy())
    array = np.load(array_path, mmap_mode="r")
    rows = index_df["row"].astype(int).tolist()
    mu, logvar = encode_rows(model, array, rows, device=dev, batch_size=batch_size)
    if mask_path is not None:
        masks = np.load(mask_path, mmap_mode="r")
        rec = metrics_for_rows(model, array, masks, rows, device=dev, batch_size=batch_size)
        mse = [rec[r]["mse_mask"] for r in rows]
        ssim = [rec[r]["ssim_mask"] for r in rows]
    else:
        mse = ssim = [None] * len(rows)

    covariates = [c for c in COVARIATE_TYPES if c in index_df.columns]
    metadata = {
        "brainvae.model_name": model_name or model_dir.name,
        "brainvae.config_sha256": config_sha256(cfg),
        "brainvae.version": brainvae.__version__,
        "brainvae.checkpoint_sha256": sha256_file(model_dir / "model.pt"),
        "brainvae.latent_dim": str(model.latent_dim),
        "brainvae.architecture": str(cfg["model"].get("architecture", "dense")),
        "brainvae.latent_shape": json.dumps([int(s) for s in model.latent_shape]),
        "brainvae.latent_order": ("C-order (channel, x, y, z)" if len(model.latent_shape) > 1 else "vector"),
    }
    schema = latent_schema(model.latent_dim, covariates, metadata)
    columns: dict[str, Any] = {
        "dataset": index_df["dataset"].astype(str).tolist(),
        "participant": index_df["subject"].astype(str).tolist(),
        "session": _nullable(index_df["session"]) if "session" in index_df else [None] * len(rows),
        "run": _nullable(index_df["run"]) if "run" in index_df else [None] * len(rows),
        "scan": index_df["scan"].astype(str).tolist(),
        "label": index_df["label"].astype(str).tolist(),
        "split": [split_of.get(s, NOT_IN_SPLIT) for s in index_df["scan"]],
    }
    if "age" in covariates:
        columns["age"] = pd.to_numeric(index_df["age"].replace({"n/a": "", "NA": ""}),
                                       errors="coerce").astype(float).tolist()
        columns["age"] = [None if not np.isfinite(a) else a for a in columns["age"]]
    if "sex" in covariates:
        columns["sex"] = _nullable(index_df["sex"])
    for i in range(model.latent_dim):
        columns[f"mu_{i}"] = mu[:, i]
    for i in range(model.latent_dim):
        columns[f"logvar_{i}"] = logvar[:, i]
    columns["mse_mask"] = mse
    columns["ssim_mask"] = ssim
    columns.update(deviation_columns(mu, mse, columns["split"]))
    return write_latents(columns, schema, out_path)


def deviation_columns(mu: np.ndarray, mse: Sequence[float | None], splits: Sequence[str]) -> dict[str, list]:
    """The normative deviation scores of every scan (:data:`~brainvae.latents_table.DEVIATION_COLUMNS`).

    The model learnt what typical looks like from its ``train`` split (the euploid scans, by default): a scan's
    latent Mahalanobis distance is measured to those scans' latent means, and its reconstruction error is a
    z-score against the scans the model held out (``val`` and ``test``), whose errors are those of unseen typical
    brains. Null where there are fewer than two reference scans (or no reconstruction errors).
    """
    splits = np.asarray(splits, dtype=str)
    n = len(splits)
    out: dict[str, list] = {"latent_mahalanobis": [None] * n, "recon_error_z": [None] * n}
    train = splits == "train"
    if train.sum() >= 2:
        out["latent_mahalanobis"] = mahalanobis_scores(mu, mu[train]).tolist()
    errors = np.array([np.nan if v is None else float(v) for v in mse])
    held_out = np.isin(splits, ["val", "test"]) & np.isfinite(errors)
    if held_out.sum() >= 2 and np.ptp(errors[held_out]) > 0:
        z = zscores(errors, errors[held_out])
        out["recon_error_z"] = [None if not np.isfinite(v) else float(v) for v in z]
    return out
