"""Rule train_vae: train one VAE variant; resumes from its checkpoint after a kill or timeout."""

from pathlib import Path

from brainvae.workflow import job_logging

with job_logging(snakemake.log[0], snakemake.threads) as log:
    from brainvae.vae.cohort import model_splits, write_splits
    from brainvae.vae.trainer import train_vae

    i, p, model = snakemake.input, snakemake.params, snakemake.wildcards.model
    splits = model_splits(i.splits, i.index, p.train_labels, model=model)
    write_splits(splits, snakemake.output.splits)
    log.info("%s learns from labels %s: %s", model, p.train_labels or "all", splits["split"].value_counts().to_dict())
    metrics = train_vae(p.config, i.array, i.mask, i.index, splits, Path(snakemake.output.model).parent,
                        checkpoint_dir=p.checkpoint_dir, device=p.device, deterministic=p.deterministic,
                        threads=snakemake.threads, progress=False, model_name=model,
                        keep_checkpoint=False)
    log.info("%s: best epoch %s of %s, val loss %.4g, %.0f s on %s", model,
             metrics["best_epoch"], metrics["epochs_run"], metrics["best_val_loss"] or float("nan"),
             metrics["seconds"], metrics["device"])
