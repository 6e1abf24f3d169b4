"""3D convolutional VAE with a dense latent vector.

Encoder: per level a stride-2 convolution (kernel 4, halves every dimension) followed by ``blocks``
residual blocks; the first level reads the 1-channel input directly. The bottleneck feature map is flattened and two
linear layers give ``mu`` and ``logvar``. The decoder mirrors it: a linear layer back to the
bottleneck map, per level residual blocks and a stride-2 transposed convolution (kernel 4), the
last one straight to one output channel with no norm or activation (the inputs are intensity-normalised, with
negative values, and 0 outside the brain).

A dense latent (rather than a spatial one) is what the downstream analysis needs: one vector per
scan. Any grid whose dimensions are divisible by ``2 ** len(widths)`` works, e.g. the demo grid
40x48x40 with 3 levels (bottleneck 5x6x5) or 2 mm 80x96x80 with 4 levels.

No convolution runs on multi-channel feature maps at full resolution: on CPU those few layers
(1->8 stem, 8->1 head) took over a third of a training step at the demo grid, because oneDNN is
inefficient for tiny channel counts; reading/writing full resolution with the strided kernel-4
(transposed) convolutions costs a fraction of that.

The model works on deviations from a mean image (buffer ``mean_image``, zeros until
:meth:`VAE.set_mean_image` fills it, as training does with the mean of the training volumes): the
encoder sees ``x - mean_image`` and the decoder's output is added to it, the last layer starting at
zero. Like PCA's centring, this starts the VAE at the mean brain instead of at zero; registered
brains differ from their mean by a few percent, which is what the latent code has to carry.

Transposed convolutions are used for upsampling (not trilinear interpolation) because the CUDA
backward of trilinear upsampling is non-deterministic and would fail under
``torch.use_deterministic_algorithms(True)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..config import widths_for_grid
from .architecture import ArchitectureConfig
from .losses import RECON_LOSSES, kl_divergence, vae_loss  # noqa: F401  (re-exported: older imports)

__all__ = ["VAE", "VAEConfig", "build_model", "check_input_shape", "count_parameters", "kl_divergence", "vae_loss",
           "to_channels_last_3d", "widths_for_grid"]

NORMS = ("group", "batch", "instance", "none")
ACTIVATIONS = ("silu", "relu", "leaky_relu", "gelu")


@dataclass(frozen=True)
class VAEConfig(ArchitectureConfig):
    """Architecture of :class:`VAE`. ``in_shape`` is the volume shape (X, Y, Z) without channels."""

    architecture: ClassVar[str] = "dense"

    in_shape: tuple[int, int, int] = (40, 48, 40)
    latent_dim: int = 64
    widths: tuple[int, ...] = (16, 32, 64)
    blocks: int = 1
    norm: str = "group"
    activation: str = "silu"
    groups: int = 8  # GroupNorm groups (capped at the channel count)
    logvar_clamp: tuple[float, float] = field(default=(-10.0, 10.0))

    def __post_init__(self) -> None:
        # Coerce lists from JSON/YAML to tuples so configs round-trip and hash identically.
        object.__setattr__(self, "in_shape", tuple(int(s) for s in self.in_shape))
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        object.__setattr__(self, "logvar_clamp", tuple(float(v) for v in self.logvar_clamp))
        if len(self.in_shape) != 3:
            raise ValueError(f"in_shape must have 3 dimensions, got {self.in_shape}")
        if not self.widths:
            raise ValueError("widths must name at least one level")
        if self.latent_dim < 1 or self.blocks < 0:
            raise ValueError("latent_dim must be >= 1 and blocks >= 0")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        factor = 2 ** self.levels
        if any(s % factor for s in self.in_shape):
            raise ValueError(f"in_shape {self.in_shape} is not divisible by 2**levels = {factor} "
                             f"({self.levels} levels from widths {self.widths}); use fewer levels "
                             "or a grid whose dimensions are multiples of it")

    @property
    def levels(self) -> int:
        return len(self.widths)

    @property
    def bottleneck_shape(self) -> tuple[int, int, int]:
        factor = 2 ** self.levels
        return tuple(s // factor for s in self.in_shape)  # type: ignore[return-value]


def _norm(kind: str, channels: int, groups: int) -> nn.Module:
    if kind == "group":
        g = math.gcd(channels, groups)  # GroupNorm needs groups | channels
        return nn.GroupNorm(g, channels)
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    if kind == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    return nn.Identity()


def _act(kind: str) -> nn.Module:
    return {"silu": nn.SiLU, "relu": nn.ReLU, "leaky_relu": lambda: nn.LeakyReLU(0.2),
            "gelu": nn.GELU}[kind]()


class _ConvNormAct(nn.Sequential):
    def __init__(self, cin: int, cout: int, cfg: VAEConfig, *, stride: int = 1,
                 transpose: bool = False) -> None:
        if transpose:
            # k=4, s=2, p=1 doubles exactly; overlapping kernels avoid k=2 checkerboards.
            conv: nn.Module = nn.ConvTranspose3d(cin, cout, kernel_size=4, stride=2, padding=1,
                                                 bias=cfg.norm == "none")
        else:
            k = 4 if stride == 2 else 3  # k=4, s=2, p=1 halves exactly and covers every voxel
            conv = nn.Conv3d(cin, cout, kernel_size=k, stride=stride, padding=1,
                             bias=cfg.norm == "none")
        super().__init__(conv, _norm(cfg.norm, cout, cfg.groups), _act(cfg.activation))


class _ResBlock(nn.Module):
    def __init__(self, channels: int, cfg: VAEConfig) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _ConvNormAct(channels, channels, cfg),
            nn.Conv3d(channels, channels, 3, padding=1, bias=cfg.norm == "none"),
            _norm(cfg.norm, channels, cfg.groups),
        )
        self.act = _act(cfg.activation)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(x + self.body(x))


class VAE(nn.Module):
    """3D conv VAE. ``forward`` samples ``z`` in training mode and uses ``mu`` in eval mode."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        w = config.widths
        enc: list[nn.Module] = []
        prev = 1
        for width in w:
            enc.append(_ConvNormAct(prev, width, config, stride=2))
            enc.extend(_ResBlock(width, config) for _ in range(config.blocks))
            prev = width
        self.encoder = nn.Sequential(*enc)
        flat = w[-1] * math.prod(config.bottleneck_shape)
        self.fc_mu = nn.Linear(flat, config.latent_dim)
        self.fc_logvar = nn.Linear(flat, config.latent_dim)
        # Start with a small posterior variance (sd ~0.05): with unit variance the decoder first
        # sees codes drowned in noise and learns to ignore them (posterior collapse), since the
        # deviations from the mean image it should encode are small.
        nn.init.constant_(self.fc_logvar.bias, -6.0)
        self.fc_dec = nn.Linear(config.latent_dim, flat)

        dec: list[nn.Module] = []
        prev = w[-1]
        for width in w[-2::-1]:  # widths after each upsampling step but the last
            dec.extend(_ResBlock(prev, config) for _ in range(config.blocks))
            dec.append(_ConvNormAct(prev, width, config, transpose=True))
            prev = width
        dec.extend(_ResBlock(prev, config) for _ in range(config.blocks))
        head = nn.ConvTranspose3d(prev, 1, kernel_size=4, stride=2, padding=1)
        nn.init.zeros_(head.weight)  # start by reconstructing the mean image exactly
        nn.init.zeros_(head.bias)
        dec.append(head)
        self.decoder = nn.Sequential(*dec)
        self.register_buffer("mean_image", torch.zeros(1, 1, *config.in_shape))

    @torch.no_grad()
    def set_mean_image(self, mean: Tensor) -> None:
        """Set the image the model encodes deviations from (shape ``in_shape``)."""
        self.mean_image.copy_(mean.reshape(self.mean_image.shape).to(self.mean_image))

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.encoder(x - self.mean_image.to(x.dtype)).flatten(1)
        lo, hi = self.config.logvar_clamp
        # Clamping keeps exp(logvar) finite in bf16/early training; gradients vanish only at the
        # bounds, far outside the useful range.
        return self.fc_mu(h), self.fc_logvar(h).clamp(lo, hi)

    def reparameterize(self, mu: Tensor, logvar: Tensor) -> Tensor:
        return mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)

    def decode(self, z: Tensor) -> Tensor:
        h = self.fc_dec(z).view(z.shape[0], self.config.widths[-1], *self.config.bottleneck_shape)
        if self._channels_last():
            h = h.contiguous(memory_format=torch.channels_last_3d)
        out = self.decoder(h)
        return out + self.mean_image.to(out.dtype)

    def _channels_last(self) -> bool:
        weight = self.encoder[0][0].weight
        return weight.is_contiguous(memory_format=torch.channels_last_3d) and not weight.is_contiguous()

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return (self.config.latent_dim,)

    @property
    def latent_dim(self) -> int:
        return self.config.latent_dim

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        mu, logvar = self.encode(x)
        z = self.reparameterize(mu, logvar) if self.training else mu
        return self.decode(z), mu, logvar


def to_channels_last_3d(model: nn.Module) -> nn.Module:
    """Convert conv weights to channels_last_3d (NDHWC): faster cuDNN kernels on recent GPUs."""
    return model.to(memory_format=torch.channels_last_3d)


def build_model(config: VAEConfig | Mapping[str, Any]) -> VAE:
    """A :class:`VAE` from a config object or its dict form."""
    cfg = config if isinstance(config, VAEConfig) else VAEConfig.from_dict(config)
    return VAE(cfg)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def check_input_shape(shape: Sequence[int], levels: int) -> None:
    """Raise ValueError unless every dimension of ``shape`` is divisible by ``2**levels``."""
    factor = 2 ** levels
    if len(shape) != 3 or any(int(s) % factor for s in shape):
        raise ValueError(f"volume shape {tuple(shape)} is not 3D or not divisible by {factor}")
