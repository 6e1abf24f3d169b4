"""Spatial-latent VAE on MONAI's ``AutoencoderKL`` (the paper's family of models).

The latent is a grid: ``latent_channels x (X, Y, Z) / downsample``. Two things are added around
MONAI's network, both to make it train on CPUs at brainvae's grids:

* **Space-to-depth** (``patch``): the volume is folded into ``patch**3`` channels at
  ``1/patch`` resolution before the encoder and unfolded after the decoder, so no convolution runs
  on multi-channel maps at full resolution (on 2 CPU cores at 40x48x40 a plain AutoencoderKL trains
  at ~1 volume/s, folded by 2 at ~4). ``downsample = patch * 2**(levels - 1)``.
* **Mean-image centring**, as in the dense VAE: the encoder sees ``x - mean_image``, the decoder's
  output is added to it and its last convolution starts at zero, so training starts at the mean
  brain (PCA's centring) rather than at noise.

``encode`` returns ``(mu, logvar)`` of shape ``(B, C, x, y, z)``; the flattened latent used for
analysis is ``mu.flatten(1)``, i.e. C order over (channel, x, y, z) (see
:mod:`brainvae.vae.latents`). Transposed convolutions upsample (``use_convtranspose``): the CUDA
backward of interpolation is non-deterministic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn

from .architecture import ArchitectureConfig

__all__ = ["SpatialConfig", "SpatialVAE", "fold", "unfold"]


@dataclass(frozen=True)
class SpatialConfig(ArchitectureConfig):
    """Architecture of :class:`SpatialVAE` (the resolved ``spatial`` section of the config)."""

    architecture: ClassVar[str] = "spatial"

    in_shape: tuple[int, int, int] = (40, 48, 40)
    downsample: int = 4
    latent_channels: int = 2
    patch: int = 2
    channels: tuple[int, ...] = (16, 32)
    res_blocks: int = 1
    attention: bool = False
    norm_groups: int = 8
    logvar_clamp: tuple[float, float] = field(default=(-10.0, 10.0))

    def __post_init__(self) -> None:
        object.__setattr__(self, "in_shape", tuple(int(s) for s in self.in_shape))
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        object.__setattr__(self, "logvar_clamp", tuple(float(v) for v in self.logvar_clamp))
        if self.patch * 2 ** (len(self.channels) - 1) != self.downsample:
            raise ValueError(f"downsample {self.downsample} != patch {self.patch} * 2**(levels - 1) with "
                             f"{len(self.channels)} levels")
        if any(s % self.downsample for s in self.in_shape):
            raise ValueError(f"in_shape {self.in_shape} is not divisible by downsample {self.downsample}")

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        return (self.latent_channels, *(s // self.downsample for s in self.in_shape))  # type: ignore[return-value]

    @property
    def latent_dim(self) -> int:
        return math.prod(self.latent_shape)


def fold(x: Tensor, p: int) -> Tensor:
    """Space-to-depth: ``(B, C, X, Y, Z) -> (B, C*p^3, X/p, Y/p, Z/p)``."""
    if p == 1:
        return x
    b, c, nx, ny, nz = x.shape
    x = x.reshape(b, c, nx // p, p, ny // p, p, nz // p, p).permute(0, 1, 3, 5, 7, 2, 4, 6)
    return x.reshape(b, c * p ** 3, nx // p, ny // p, nz // p)


def unfold(x: Tensor, p: int) -> Tensor:
    """Inverse of :func:`fold`."""
    if p == 1:
        return x
    b, c, nx, ny, nz = x.shape
    c0 = c // p ** 3
    x = x.reshape(b, c0, p, p, p, nx, ny, nz).permute(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(b, c0, nx * p, ny * p, nz * p)


class SpatialVAE(nn.Module):
    """AutoencoderKL with a spatial latent. ``forward`` samples in training mode, uses ``mu`` in eval."""

    def __init__(self, config: SpatialConfig) -> None:
        from monai.networks.nets import AutoencoderKL

        super().__init__()
        self.config = config
        levels = len(config.channels)
        c = config.patch ** 3
        self.ae = AutoencoderKL(
            spatial_dims=3, in_channels=c, out_channels=c, num_res_blocks=config.res_blocks,
            channels=config.channels, attention_levels=(False,) * (levels - 1) + (config.attention,),
            latent_channels=config.latent_channels, norm_num_groups=config.norm_groups,
            with_encoder_nonlocal_attn=config.attention, with_decoder_nonlocal_attn=config.attention,
            use_convtranspose=True)
        # Small initial posterior variance (sd ~0.05), as in the dense VAE: codes drowned in noise
        # teach the decoder to ignore them.
        nn.init.constant_(self.ae.quant_conv_log_sigma.conv.bias, -6.0)
        head = self.ae.decoder.blocks[-1].conv
        nn.init.zeros_(head.weight)  # start by reconstructing the mean image exactly
        nn.init.zeros_(head.bias)
        self.register_buffer("mean_image", torch.zeros(1, 1, *config.in_shape))

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return self.config.latent_shape

    @property
    def latent_dim(self) -> int:
        return self.config.latent_dim

    @torch.no_grad()
    def set_mean_image(self, mean: Tensor) -> None:
        self.mean_image.copy_(mean.reshape(self.mean_image.shape).to(self.mean_image))

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.ae.encoder(fold(x - self.mean_image.to(x.dtype), self.config.patch))
        lo, hi = self.config.logvar_clamp
        return self.ae.quant_conv_mu(h), self.ae.quant_conv_log_sigma(h).clamp(lo, hi)

    def reparameterize(self, mu: Tensor, logvar: Tensor) -> Tensor:
        return mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)

    def decode(self, z: Tensor) -> Tensor:
        out = unfold(self.ae.decode(z), self.config.patch)
        return out + self.mean_image.to(out.dtype)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        mu, logvar = self.encode(x)
        z = self.reparameterize(mu, logvar) if self.training else mu
        return self.decode(z), mu, logvar
