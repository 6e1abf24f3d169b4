"""The synthetic cohort's building blocks: the MNI-space reference and its regions (``reference``), a
subject's individual anatomy (``anatomy``) and template-space scans (``template_space``). Native scans and
the BIDS writing live in :mod:`brainvae.demo_cohort`, which uses these."""
