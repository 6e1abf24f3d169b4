"""Rule train_vae: train one VAE variant; resumes from its checkpoint after a kill or timeout."""

from pathlib import Path

from brainvae.workflow import job_logging

with job_logging(snakemake.log[0], snakemake.threads) as log:
    from brainvae.vae.train import train_vae

    i, p = snakemake.input, snakemake.params
    metrics = train_vae(p.config, i.array, i.mask, i.index, i.splits, Path(snakemake.output.model).parent,
                        checkpoint_dir=p.checkpoint_dir, device=p.device, deterministic=p.deterministic,
                        threads=snakemake.threads, progress=False, model_name=snakemake.wildcards.model,
                        keep_checkpoint=False)
    log.info("%s: best epoch %s of %s, val loss %.4g, %.0f s on %s", snakemake.wildcards.model,
             metrics["best_epoch"], metrics["epochs_run"], metrics["best_val_loss"] or float("nan"),
             metrics["seconds"], metrics["device"])
