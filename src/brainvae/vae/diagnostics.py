"""Diagnostics of a trained model's latent space: KL per dimension, active units, posterior collapse.

On the scans given (the evaluation uses every scan of the model's splits), with ``mu`` and
``logvar`` of the encoder in eval mode:

* **KL per dimension**: the mean over scans of ``KL(q(z_d|x) || N(0, 1))`` (nats), per flattened
  latent dimension (spatial latents: C order over channel, x, y, z).
* **Active units** (Burda et al. 2016): dimensions whose posterior mean varies across scans,
  ``Var_x(mu_d) > active_threshold`` (0.01). A dimension that is not active carries no information
  about the scan.
* **Posterior collapse**: flagged when fewer than ``collapse_fraction`` (10 %) of the dimensions are
  active, or the mean KL per dimension is below 0.01 nats; a warning goes to the log and
  ``diagnostics.json`` says so in ``posterior_collapse`` and ``warning``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from brainvae.io import atomic_write_json, atomic_write_text

__all__ = ["latent_diagnostics", "summarise_latents", "write_diagnostics"]

log = logging.getLogger(__name__)

ACTIVE_THRESHOLD = 0.01
COLLAPSE_FRACTION = 0.10
COLLAPSE_KL = 0.01


def summarise_latents(mu: np.ndarray, logvar: np.ndarray, *, active_threshold: float = ACTIVE_THRESHOLD,
                      collapse_fraction: float = COLLAPSE_FRACTION) -> dict[str, Any]:
    """Diagnostics of flattened ``mu``/``logvar`` (scans x dimensions)."""
    mu = np.asarray(mu, dtype=np.float64).reshape(len(mu), -1)
    logvar = np.asarray(logvar, dtype=np.float64).reshape(len(logvar), -1)
    kl = 0.5 * (mu ** 2 + np.exp(logvar) - 1.0 - logvar)
    kl_dim = kl.mean(axis=0)
    var_mu = mu.var(axis=0, ddof=1) if len(mu) > 1 else np.zeros(mu.shape[1])
    active = var_mu > active_threshold
    n_dim = int(mu.shape[1])
    n_active = int(active.sum())
    collapsed = n_active < collapse_fraction * n_dim or float(kl_dim.mean()) < COLLAPSE_KL
    out: dict[str, Any] = {
        "n_scans": int(len(mu)),
        "latent_dim": n_dim,
        "active_units": n_active,
        "active_fraction": n_active / n_dim if n_dim else 0.0,
        "active_threshold": active_threshold,
        "kl_total_mean": float(kl.sum(axis=1).mean()) if len(mu) else float("nan"),
        "kl_per_dim_mean": float(kl_dim.mean()),
        "kl_per_dim_max": float(kl_dim.max()),
        "posterior_collapse": bool(collapsed),
        "warning": (f"posterior collapse: {n_active} of {n_dim} latent dimensions active (Var(mu) > "
                    f"{active_threshold}), mean KL {kl_dim.mean():.3g} nats per dimension; the latents carry "
                    "little information about the scan (lower beta, raise free_bits or beta_warmup_epochs)"
                    if collapsed else None),
        "_kl_per_dim": kl_dim,
        "_var_mu": var_mu,
    }
    return out


def _encode(model: torch.nn.Module, array: np.ndarray, rows: Sequence[int], device: torch.device | str,
            batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    model.eval()
    mus, lvs = [], []
    rows = list(rows)
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start: start + batch_size]
            x = torch.from_numpy(np.stack([np.asarray(array[r], dtype=np.float32) for r in chunk])).unsqueeze(1)
            mu, logvar = model.encode(x.to(device))
            mus.append(mu.float().flatten(1).cpu().numpy())
            lvs.append(logvar.float().flatten(1).cpu().numpy())
    if not mus:
        d = int(model.latent_dim)
        return np.zeros((0, d), np.float32), np.zeros((0, d), np.float32)
    return np.concatenate(mus), np.concatenate(lvs)


def latent_diagnostics(model: torch.nn.Module, array: np.ndarray, rows: Sequence[int], *,
                       device: torch.device | str = "cpu", batch_size: int = 4) -> dict[str, Any]:
    """:func:`summarise_latents` of the model's encodings of ``rows``; logs the collapse warning."""
    mu, logvar = _encode(model, array, rows, device, batch_size)
    out = summarise_latents(mu, logvar)
    out["latent_shape"] = [int(s) for s in model.latent_shape]
    if out["warning"]:
        log.warning(out["warning"])
    return out


def write_diagnostics(diagnostics: dict[str, Any], out_dir: str | os.PathLike[str]) -> None:
    """``diagnostics.json`` (the scalars) and ``kl_per_dimension.tsv`` (dimension, kl, var_mu, active)."""
    out_dir = Path(out_dir)
    scalars = {k: v for k, v in diagnostics.items() if not k.startswith("_")}
    atomic_write_json(json.loads(json.dumps(scalars)), out_dir / "diagnostics.json")
    kl, var = diagnostics["_kl_per_dim"], diagnostics["_var_mu"]
    table = pd.DataFrame({"dimension": np.arange(len(kl)), "kl": kl, "var_mu": var,
                          "active": var > diagnostics["active_threshold"]})
    atomic_write_text(table.to_csv(sep="\t", index=False, float_format="%.6g"), out_dir / "kl_per_dimension.tsv")
