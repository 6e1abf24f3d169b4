"""The VAE family on preprocessed T1w volumes: cohort arrays, models, training, evaluation, latents.

Layout (after clinicadl's ``nn/``, ``optim/``, ``trainer/``):

* :mod:`.config` -- every training setting and its default (read from the workflow schema), and
  :func:`~.config.resolve_config`; torch-free (the Snakefile imports it).
* :mod:`.nn` -- the networks (:mod:`.nn.dense`: one latent vector per scan; :mod:`.nn.spatial`:
  MONAI ``AutoencoderKL`` with a latent grid) and their losses (:mod:`.nn.losses`: reconstruction,
  KL with free bits, PatchGAN adversarial, perceptual); :func:`~.nn.load_model`.
* :mod:`.optim` -- optimisers, learning-rate schedule, KL warm-up.
* :mod:`.trainer` -- the resumable training loop, checkpoints, logs and curves.
* :mod:`.evaluate`, :mod:`.diagnostics`, :mod:`.latents` -- scoring against PCA and the mean image,
  latent-space diagnostics, Parquet latents; they read a trained model through :mod:`.nn` only and
  never import the trainer.

Typical use (what the Snakemake rules call)::

    from brainvae.vae import cohort, evaluate, latents, trainer
    cohort.build_cohort_array(samples, images, masks, "cohort.npy", "cohort_index.tsv")
    splits = cohort.make_splits(cohort.select_training(samples), seed=0)
    trainer.train_vae({"architecture": "spatial"}, "cohort.npy", "cohort_mask.npy", "cohort_index.tsv",
                      splits, "model/", checkpoint_dir="checkpoints/vae")
    evaluate.evaluate_vae("model/", "cohort.npy", "cohort_mask.npy", "cohort_index.tsv", splits, "eval/")
    latents.export_latents("model/", "cohort.npy", "cohort_mask.npy", "cohort_index.tsv", splits,
                           "latents.parquet")

``brainvae.vae.train`` keeps the old entry points' names. Submodules are imported lazily by the
caller so that ``import brainvae.vae.cohort`` does not pull in torch.
"""
