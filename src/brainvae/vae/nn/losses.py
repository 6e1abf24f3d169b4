"""Loss terms of the VAE family: reconstruction, KL, adversarial and perceptual.

``total = recon + beta * KL / n_voxels [+ adversarial_weight * adv] [+ perceptual_weight * perc]``.
Dividing the KL (nats per volume) by the number of scored voxels makes ``beta = 1`` the usual ELBO
weighting of a summed reconstruction error, independent of grid size, while keeping the loss O(1).

Free bits (``free_bits`` nats per latent dimension): the penalised KL is
``sum_d max(free_bits, mean_batch KL_d)``, so no dimension is pushed below ``free_bits`` (a guard
against posterior collapse); the logged KL is always the plain one. :func:`kl_per_dimension` gives
the KL of each latent dimension, which the diagnostics report.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["PerceptualLoss", "build_discriminator", "generator_adversarial_loss", "discriminator_loss",
           "kl_divergence", "kl_per_dimension", "loss_terms", "reconstruction_error",
           "vae_loss"]

RECON_LOSSES = ("mse", "l1")


def reconstruction_error(recon: Tensor, x: Tensor, *, kind: str = "mse", mask: Tensor | None = None
                         ) -> tuple[Tensor, Tensor]:
    """``(per-volume mean error, per-volume number of scored voxels)``, both shape ``(B,)``."""
    if kind not in RECON_LOSSES:
        raise ValueError(f"recon loss must be one of {RECON_LOSSES}, got {kind!r}")
    diff = recon.float() - x.float()
    err = diff.pow(2) if kind == "mse" else diff.abs()
    dims = tuple(range(1, err.ndim))
    if mask is None:
        n_vox = torch.full((err.shape[0],), float(math.prod(err.shape[1:])), device=err.device)
        per_vol = err.sum(dim=dims)
    else:
        m = mask.to(err.dtype)
        n_vox = m.sum(dim=dims).clamp_min(1.0)
        per_vol = (err * m).sum(dim=dims)
    return per_vol / n_vox, n_vox


def kl_per_dimension(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(q(z_d|x) || N(0, 1)) per sample and flattened latent dimension (nats), shape ``(B, D)``."""
    mu, logvar = mu.float().flatten(1), logvar.float().flatten(1)
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)


def loss_terms(recon: Tensor, x: Tensor, mu: Tensor, logvar: Tensor, *, beta: float, kind: str = "mse",
               mask: Tensor | None = None, free_bits: float = 0.0) -> dict[str, Tensor]:
    """``{"total", "recon", "kl"}`` averaged over the batch (``kl``: plain KL, nats per volume)."""
    rec, n_vox = reconstruction_error(recon, x, kind=kind, mask=mask)
    kl_d = kl_per_dimension(mu, logvar)
    kl = kl_d.sum(dim=1)
    if free_bits > 0:
        penalised = kl_d.mean(dim=0).clamp_min(float(free_bits)).sum()
        total = rec.mean() + beta * penalised / n_vox.mean()
    else:
        total = (rec + beta * kl / n_vox).mean()
    return {"total": total, "recon": rec.mean(), "kl": kl.mean()}


def kl_divergence(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(q(z|x) || N(0, I)) per sample, summed over latent dimensions (nats). Shape (B,).

    Works for dense ``(B, d)`` and spatial ``(B, C, x, y, z)`` latents alike.
    """
    return kl_per_dimension(mu, logvar).sum(dim=1)


def vae_loss(recon: Tensor, x: Tensor, mu: Tensor, logvar: Tensor, *, beta: float,
             kind: str = "mse", mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(total, recon, kl), each averaged over the batch: :func:`loss_terms` without free bits, as a tuple.

    ``recon`` is the mean voxel error (inside ``mask`` if given), ``kl`` the per-volume KL in nats.
    """
    terms = loss_terms(recon, x, mu, logvar, beta=beta, kind=kind, mask=mask)
    return terms["total"], terms["recon"], terms["kl"]


def build_discriminator(channels: int = 8, layers: int = 2) -> nn.Module:
    """MONAI ``PatchDiscriminator`` on 1-channel volumes (instance norm: batches are tiny)."""
    from monai.networks.nets import PatchDiscriminator

    return PatchDiscriminator(spatial_dims=3, channels=int(channels), in_channels=1, out_channels=1,
                              num_layers_d=int(layers), norm="INSTANCE")


def _adv_loss() -> Any:
    from monai.losses import PatchAdversarialLoss

    return PatchAdversarialLoss(criterion="least_squares")


def generator_adversarial_loss(discriminator: nn.Module, recon: Tensor) -> Tensor:
    """Least-squares generator term: the discriminator should call the reconstruction real."""
    return _adv_loss()(discriminator(recon.float())[-1], target_is_real=True, for_discriminator=False)


def discriminator_loss(discriminator: nn.Module, real: Tensor, fake: Tensor) -> Tensor:
    """Least-squares discriminator loss on real volumes and (detached) reconstructions."""
    loss = _adv_loss()
    return 0.5 * (loss(discriminator(fake.detach().float())[-1], target_is_real=False, for_discriminator=True)
                  + loss(discriminator(real.float())[-1], target_is_real=True, for_discriminator=True))


class PerceptualLoss(nn.Module):
    """Feature distance in a frozen 3D ResNet-10 (MONAI ``resnet10``, MedicalNet layout) loaded from a
    local file. Never downloads: ``weights`` must be a path (a state dict, optionally under
    ``state_dict`` with ``module.`` prefixes, as MedicalNet ships it).
    """

    def __init__(self, weights: str | os.PathLike[str]) -> None:
        from monai.networks.nets import resnet10

        super().__init__()
        if not weights or not os.path.isfile(weights):
            raise ValueError(f"perceptual_weights: {weights!r} is not a file (brainvae never downloads weights)")
        net = resnet10(spatial_dims=3, n_input_channels=1, feed_forward=False, shortcut_type="B",
                       bias_downsample=False, conv1_t_stride=2)
        state = torch.load(weights, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        state = {k.removeprefix("module."): v for k, v in state.items()}
        missing, unexpected = net.load_state_dict(state, strict=False)
        if missing:
            raise ValueError(f"perceptual_weights {weights}: not a 3D ResNet-10 state dict "
                             f"(missing {sorted(missing)[:3]}...)")
        net.eval()
        for p in net.parameters():
            p.requires_grad_(False)
        self.net = net

    def train(self, mode: bool = True) -> PerceptualLoss:  # the network stays frozen in eval mode
        super().train(mode)
        self.net.eval()
        return self

    def _features(self, x: Tensor) -> list[Tensor]:
        n = self.net
        h = n.act(n.bn1(n.conv1(x)))
        if not n.no_max_pool:
            h = n.maxpool(h)
        feats = []
        for layer in (n.layer1, n.layer2, n.layer3):
            h = layer(h)
            feats.append(h)
        return feats

    def forward(self, recon: Tensor, x: Tensor) -> Tensor:
        total = recon.new_zeros(())
        for fr, fx in zip(self._features(recon.float()), self._features(x.float()), strict=True):
            # Channel-normalised features (LPIPS style), mean squared distance.
            fr = fr / (fr.pow(2).sum(1, keepdim=True).sqrt() + 1e-8)
            fx = fx / (fx.pow(2).sum(1, keepdim=True).sqrt() + 1e-8)
            total = total + (fr - fx).pow(2).sum(1).mean()
        return total
