"""The dense VAE; moved to :mod:`brainvae.vae.nn.dense` (this name is kept for existing imports)."""

from .nn.dense import (VAE, VAEConfig, build_model, check_input_shape, count_parameters,  # noqa: F401
                       kl_divergence, to_channels_last_3d, vae_loss, widths_for_grid)

__all__ = ["VAE", "VAEConfig", "build_model", "check_input_shape", "count_parameters", "kl_divergence",
           "to_channels_last_3d", "vae_loss", "widths_for_grid"]
