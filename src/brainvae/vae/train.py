"""Training entry points, kept under their old names; the code lives in :mod:`brainvae.vae.config`,
:mod:`brainvae.vae.nn`, :mod:`brainvae.vae.optim` and :mod:`brainvae.vae.trainer`.
"""

from __future__ import annotations

from .config import DEFAULT_CONFIG, canonical_json, config_sha256, resolve_config  # noqa: F401
from .nn import load_model, resolve_device  # noqa: F401
from .optim import beta_at  # noqa: F401
from .optim import make_scheduler as _make_scheduler  # noqa: F401
from .trainer.augment import augment  # noqa: F401
from .trainer.checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_NAME  # noqa: F401
from .trainer.checkpoint import load_checkpoint as _load_checkpoint  # noqa: F401
from .trainer.loop import train_vae  # noqa: F401
from .trainer.outputs import LOG_COLUMNS, environment_report  # noqa: F401

__all__ = ["CHECKPOINT_NAME", "DEFAULT_CONFIG", "LOG_COLUMNS", "config_sha256", "load_model", "resolve_config",
           "resolve_device", "train_vae"]
