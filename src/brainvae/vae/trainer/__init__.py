"""Training of the VAE family (after clinicadl's ``trainer``): the loop, checkpoints, outputs.

Evaluation and latent export do not import this package: they read a trained model with
:func:`brainvae.vae.nn.load_model`.
"""

from .checkpoint import CHECKPOINT_NAME
from .launch import train_vae_parallel
from .loop import Trainer, train_vae

__all__ = ["CHECKPOINT_NAME", "Trainer", "train_vae", "train_vae_parallel"]
