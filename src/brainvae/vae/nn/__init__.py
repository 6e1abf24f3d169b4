"""Networks of brainvae's VAE family and their losses (torch; MONAI building blocks).

* :mod:`.dense` -- one latent vector per scan (brainvae's own 3D conv VAE).
* :mod:`.spatial` -- a latent grid (MONAI ``AutoencoderKL``).
* :mod:`.losses` -- reconstruction, KL (warm-up, free bits, per dimension), adversarial (MONAI
  ``PatchDiscriminator``) and perceptual terms.

:func:`build_model` turns a resolved ``model`` config (:func:`brainvae.vae.config.resolve_config`)
into a network; :func:`load_model` reads a trained one from its model folder. Evaluation and latent
export use only these, never the trainer.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...runtime import resolve_device  # noqa: F401  (kept importable from here)
from .dense import VAE, VAEConfig, count_parameters
from .spatial import SpatialConfig, SpatialVAE

__all__ = ["VAE", "SpatialVAE", "VAEConfig", "SpatialConfig", "build_model", "count_parameters", "load_model",
           "model_config", "resolve_device"]


def model_config(data: Mapping[str, Any]) -> VAEConfig | SpatialConfig:
    """The typed architecture config of a resolved ``model`` section (no ``architecture``: dense)."""
    arch = data.get("architecture", "dense")
    if arch == "dense":
        return VAEConfig.from_dict(data)
    if arch == "spatial":
        return SpatialConfig.from_dict(data)
    raise ValueError(f"unknown architecture {arch!r}")


def build_model(config: Mapping[str, Any] | VAEConfig | SpatialConfig) -> nn.Module:
    """A dense :class:`VAE` or a :class:`SpatialVAE` from a config object or its dict form."""
    cfg = config if isinstance(config, (VAEConfig, SpatialConfig)) else model_config(config)
    return VAE(cfg) if isinstance(cfg, VAEConfig) else SpatialVAE(cfg)


def load_model(model_dir: str | os.PathLike[str], device: str | torch.device = "cpu") -> nn.Module:
    """The trained model in ``model_dir`` (``config.json`` + ``model.pt``), in eval mode."""
    model_dir = Path(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    model = build_model(cfg["model"])
    state = torch.load(model_dir / "model.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.to(device).eval()
