"""brainvae: T1w brain MRI -> preprocessing -> 3D VAE -> latent vectors -> analysis."""

__version__ = "0.1.0"
