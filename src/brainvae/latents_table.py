"""The latents table: one Parquet file per model, one row per scan. Its schema, writer and reader.

The model stage writes it (:mod:`brainvae.vae.latents` encodes the scans), the analysis stage reads it
(:func:`brainvae.analysis.features.load_latents` checks it); both go through this module, which needs
pyarrow and pandas only (no torch), so the format has one definition.

Columns: identifiers (``dataset``, ``participant``, ``session``, ``run``, ``scan``), ``label``, ``split``
(``train``/``val``/``test`` of the model, or :data:`NOT_IN_SPLIT` for scans it never saw), the optional
covariates of :data:`COVARIATE_TYPES`, ``mu_0..mu_{d-1}`` and ``logvar_0..`` (float32), and
``mse_mask``/``ssim_mask``. The schema is explicit so that an empty session column is still a string
column, and readers in other languages (R arrow, polars, DuckDB) see the same types for every cohort.
Key-value metadata under ``brainvae.*`` says which model wrote the file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .io import atomic_path

__all__ = ["COVARIATE_TYPES", "DEVIATION_COLUMNS", "IDENTIFIER_COLUMNS", "METADATA_PREFIX", "NOT_IN_SPLIT", "latent_schema",
           "read_latents", "write_latents"]

#: ``split`` of a scan the model never saw (not in its splits.tsv).
NOT_IN_SPLIT = "none"
#: Optional covariates copied from the cohort index when present, with their Arrow types.
COVARIATE_TYPES: dict[str, pa.DataType] = {"age": pa.float64(), "sex": pa.string()}
#: Identifying and grouping columns, in order, and whether they may be null.
IDENTIFIER_COLUMNS: tuple[tuple[str, bool], ...] = (
    ("dataset", False), ("participant", False), ("session", True), ("run", True), ("scan", False),
    ("label", False), ("split", False))
METADATA_PREFIX = "brainvae."
#: Normative deviation scores (:mod:`brainvae.deviation`): the Mahalanobis distance of the latent mean to the
#: model's training scans, and the z-score of ``mse_mask`` against its held-out (val and test) scans; null when
#: the model's splits do not give such a reference.
DEVIATION_COLUMNS = ("latent_mahalanobis", "recon_error_z")


def latent_schema(latent_dim: int, covariates: Sequence[str] = (),
                  metadata: Mapping[str, str] | None = None) -> pa.Schema:
    """The Arrow schema of a latents table with ``latent_dim`` latent columns."""
    fields = [pa.field(name, pa.string(), nullable=nullable) for name, nullable in IDENTIFIER_COLUMNS]
    fields += [pa.field(c, COVARIATE_TYPES[c]) for c in covariates]
    fields += [pa.field(f"mu_{i}", pa.float32(), nullable=False) for i in range(latent_dim)]
    fields += [pa.field(f"logvar_{i}", pa.float32(), nullable=False) for i in range(latent_dim)]
    fields += [pa.field("mse_mask", pa.float64()), pa.field("ssim_mask", pa.float64())]
    fields += [pa.field(name, pa.float64()) for name in DEVIATION_COLUMNS]
    return pa.schema(fields, metadata={k.encode(): v.encode() for k, v in (metadata or {}).items()})


def write_latents(columns: Mapping[str, Any], schema: pa.Schema, out_path: str | os.PathLike[str]) -> pa.Table:
    """Write ``columns`` (name -> values, every field of ``schema``) atomically; return the table."""
    table = pa.Table.from_pydict({name: columns[name] for name in schema.names}, schema=schema)
    with atomic_path(out_path, suffix=".parquet") as tmp:
        pq.write_table(table, tmp)
    return table


def read_latents(path: str | os.PathLike[str]) -> tuple[pd.DataFrame, dict[str, str]]:
    """The latents table as a DataFrame and its ``brainvae.*`` metadata."""
    table = pq.read_table(path)
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()
            if k.decode().startswith(METADATA_PREFIX)}
    return table.to_pandas(), meta
