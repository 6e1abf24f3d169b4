"""Rule evaluate_vae: reconstruction metrics of a VAE, its PCA and mean-image baselines, and latent diagnostics."""

from pathlib import Path

from brainvae.workflow import job_logging

with job_logging(snakemake.log[0], snakemake.threads) as log:
    from brainvae.vae.evaluate import evaluate_vae, mean_metric

    i = snakemake.input
    result = evaluate_vae(Path(i.model).parent, i.array, i.mask, i.index, i.splits,
                          Path(snakemake.output.summary).parent, device=snakemake.params.device)
    summary = result["summary"]
    log.info("SSIM in the brain mask: VAE %.4f, PCA %.4f, mean image %.4f", mean_metric(summary, "vae", "ssim"),
             mean_metric(summary, "pca", "ssim"), mean_metric(summary, "mean_image", "ssim"))
    diag = result["diagnostics"]
    log.info("latent: %d of %d dimensions active, mean KL %.3g nats per dimension%s", diag["active_units"],
             diag["latent_dim"], diag["kl_per_dim_mean"], f"; WARNING {diag['warning']}" if diag["warning"] else "")
