"""Optimisers, learning-rate and KL-weight schedules of VAE training (after clinicadl's ``optim``)."""

from .schedules import beta_at, make_optimizer, make_scheduler

__all__ = ["beta_at", "make_optimizer", "make_scheduler"]
