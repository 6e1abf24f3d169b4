"""Rule train_vae: train one VAE variant (on several GPUs or nodes when asked); resumes from its checkpoint
after a kill or timeout."""

from pathlib import Path

from brainvae.workflow import job_logging

with job_logging(snakemake.log[0], snakemake.threads) as log:
    from brainvae.runtime import resolve_device
    from brainvae.vae.cohort import model_splits, write_splits
    from brainvae.vae.trainer import train_vae_parallel

    i, p, model = snakemake.input, snakemake.params, snakemake.wildcards.model
    resolve_device(p.device)  # a GPU asked for and missing: fail now, naming it, before any data is read
    splits = model_splits(i.splits, i.index, p.train_labels, model=model)
    write_splits(splits, snakemake.output.splits)
    log.info("%s learns from labels %s: %s", model, p.train_labels or "all", splits["split"].value_counts().to_dict())
    per_node, nodes = p.processes
    if per_node * nodes > 1:
        log.info("%s trains on %d node(s) x %d process(es) (DistributedDataParallel)", model, nodes, per_node)
    metrics = train_vae_parallel(p.config, i.array, i.mask, i.index, snakemake.output.splits,
                                 Path(snakemake.output.model).parent, checkpoint_dir=p.checkpoint_dir,
                                 processes_per_node=per_node, nodes=nodes, device=p.device,
                                 deterministic=p.deterministic, threads=p.threads_per_process, progress=False,
                                 model_name=model, keep_checkpoint=False)
    log.info("%s: best epoch %s of %s, val loss %.4g, %.0f s on %s", model,
             metrics["best_epoch"], metrics["epochs_run"], metrics["best_val_loss"] or float("nan"),
             metrics["seconds"], metrics["device"])
