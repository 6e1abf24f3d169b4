"""Rule normative_maps: residual and z-maps, regional summary, group map, latent traversal, interpolation and
deviation scores of one model (brainvae.analysis.normative_steps)."""

from pathlib import Path

from brainvae.workflow import job_logging

with job_logging(snakemake.log[0], snakemake.threads) as log:
    from brainvae.analysis.normative_steps import normative_step, summary_lines
    from brainvae.analysis.steps import read_scan_table
    from brainvae.analysis.task_steps import select_scans
    from brainvae.latents_table import read_latents
    from brainvae.resample import GRIDS

    i, p = snakemake.input, snakemake.params
    # The scans the prediction tasks analyse: this model's own split of every scan, from its latents table.
    latents = read_latents(i.latents)[0]
    scans = select_scans(read_scan_table(i.scans), [latents[["scan", "split"]]], p.splits)
    log.info("%d analysed scans: %s", len(scans), scans["label"].value_counts().to_dict())
    paths = normative_step(Path(i.model).parent, scans, i.array, i.mask, i.index, i.splits, latents,
                           Path(snakemake.output.deviation).parent, affine=GRIDS[p.grid].affine,
                           positive=p.positive, normative_labels=p.normative_labels,
                           n_permutations=p.n_permutations, traversal_permutations=p.traversal_permutations,
                           alpha=p.alpha, traversal_steps=p.traversal_steps,
                           interpolation_steps=p.interpolation_steps, ds_strength=p.ds_strength,
                           device=p.device, seed=p.seed)
    for line in summary_lines(paths):
        log.info("%s", line)
