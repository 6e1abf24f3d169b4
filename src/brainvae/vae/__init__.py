"""3D VAE on preprocessed T1w volumes: cohort arrays, model, training, evaluation and latents.

Typical use (what the Snakemake rules call)::

    from brainvae.vae import cohort, train, evaluate, latents
    cohort.build_cohort_array(samples, images, masks, "cohort.npy", "cohort_index.tsv")
    splits = cohort.make_splits(cohort.select_training(samples), seed=0)
    train.train_vae(cfg, "cohort.npy", "cohort_mask.npy", "cohort_index.tsv", splits, "model/",
                    checkpoint_dir="checkpoints/vae")
    evaluate.evaluate_vae("model/", "cohort.npy", "cohort_mask.npy", "cohort_index.tsv", splits, "eval/")
    latents.export_latents("model/", "cohort.npy", "cohort_mask.npy", "cohort_index.tsv", splits,
                           "latents.parquet")

Submodules are imported lazily by the caller so that ``import brainvae.vae.cohort`` does not
pull in torch.
"""
