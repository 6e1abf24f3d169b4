"""File-level step of the normative stage (rule ``normative_maps``): one trained VAE, its cohort and latents in;
reference statistics, residual and z-maps, regional summaries, a DS-minus-euploid group map, a latent traversal
(with its agreement with the true DS field on the synthetic demo), an interpolation strip and per-scan deviation
scores out. The numerics are :mod:`brainvae.analysis.normative`; this module reads the files, runs the model
and writes the outputs, so it is tested without Snakemake (tests/test_normative_steps.py).

Which scans play which part:

- **normative population**: the scans whose label is one the model learnt from (``normative_labels``, the model's
  ``train_labels``; euploid by default); **positive**: the label compared with it (``analysis.normative.positive``).
- **reference** (the voxel-wise mean and sd of the residuals): the model's ``val`` and ``test`` splits (its own
  ``splits.tsv``): drawn from its normative population and held out of the fit, so their residuals are what the
  model does on unseen typical brains. Fewer than :data:`MIN_REFERENCE` is a :class:`NormativeError`.
- **analysed scans** (maps, regional summary, group map, traversal, deviation scores): the scans the caller
  selected (in the workflow: :func:`brainvae.analysis.task_steps.select_scans`, as for the prediction tasks).
- **deviation scores**: the latents table's columns (:func:`brainvae.vae.latents.deviation_columns`), not
  recomputed here.

Traversal agreement with the true DS deformation (``traversal_agreement.json``, synthetic demo only): the decoded
change (the traversal's last step minus its first) is correlated, inside the brain, with the intensity change the
synthetic DS deformation itself makes to the analysed normative scans' mean image (:func:`expected_ds_change`: that
image pulled back through :func:`brainvae.synth.anatomy.ds_displacement`). Positive r means the traversal changes
the image the way DS changes it (larger ventricles, smaller cerebellum and frontal lobe). A smooth decoder makes
any change spatially coherent, so r is judged against label shuffles (its p-value), not against 0. The pattern is
the DS effect's at ``ds_strength`` 1, whatever the cohort's strength: on a cohort with ``ds_strength: 0`` the labels
carry no DS effect and the traversal must not agree (tests/test_normative_control.py).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd

from brainvae.analysis.errors import AnalysisError
from brainvae.analysis.normative import (
    ReferenceStats,
    class_traversal,
    field_agreement,
    group_map,
    regional_summary,
    residual,
    traversal_agreement,
    zmap,
)
from brainvae.io import atomic_path, atomic_write_text
from brainvae.latents_table import DEVIATION_COLUMNS
from brainvae.memmaps import MatrixFile

__all__ = ["DEVIATION_SCORES", "MIN_REFERENCE", "REGION_NAMES", "NormativeError", "expected_ds_change",
           "grid_regions", "normative_step", "resample_to_grid", "summary_lines"]

#: Fewest euploid held-out scans the reference statistics are fitted on.
MIN_REFERENCE = 3
#: Columns of deviation_scores.tsv besides scan and label: the latents table's reconstruction error and deviation
#: scores.
DEVIATION_SCORES = ("mse_mask", *DEVIATION_COLUMNS)
#: Region labels on the cohort grid (MNI-space regions of the synthetic reference, brainvae.synth.reference).
REGION_NAMES = {1: "rest_of_brain", 2: "ventricles", 3: "cerebellum", 4: "frontal"}
#: brainvae.synth.reference.REGION_LABELS value -> REGION_NAMES value (the control region is brain like the rest).
_REFERENCE_TO_REGION = {1: 1, 2: 2, 3: 3, 4: 4, 5: 1}


class NormativeError(AnalysisError):
    """The normative stage cannot run on these scans (e.g. too few euploid held-out scans)."""


def resample_to_grid(data: np.ndarray, source_affine: np.ndarray, shape: Sequence[int], affine: np.ndarray, *,
                     order: int, cval: float = 0.0) -> np.ndarray:
    """``data`` (voxel grid ``source_affine``) sampled at the voxel centres of the grid (``shape``, ``affine``)."""
    from scipy import ndimage

    target_to_source = np.linalg.inv(np.asarray(source_affine, float)) @ np.asarray(affine, float)
    return ndimage.affine_transform(np.asarray(data, np.float32), target_to_source[:3, :3],
                                    offset=target_to_source[:3, 3], output_shape=tuple(int(s) for s in shape),
                                    order=order, cval=cval)


def grid_regions(shape: Sequence[int], affine: np.ndarray) -> np.ndarray:
    """Integer region labels (:data:`REGION_NAMES`; 0 outside the brain) on a grid in MNI space: the synthetic
    reference's MNI152 regions, nearest-neighbour sampled (they are template regions, so they apply to any data
    on an MNI grid)."""
    from brainvae.synth.reference import reference

    ref = reference()
    lookup = np.zeros(256, np.uint8)
    for value, region in _REFERENCE_TO_REGION.items():
        lookup[value] = region
    labels = resample_to_grid(ref.labels, ref.affine, shape, affine, order=0).round().astype(np.uint8)
    return lookup[labels]


def expected_ds_change(image: np.ndarray, affine: np.ndarray, ds_strength: float = 1.0) -> np.ndarray:
    """The intensity change the synthetic DS deformation makes to ``image`` (a volume on an MNI grid, voxel ->
    mm ``affine``): ``image(x + u(x)) - image(x)``, with ``u`` the DS pull-back displacement
    (:func:`brainvae.synth.anatomy.ds_displacement`; a DS brain at ``x`` shows the typical brain at ``x + u``).
    0 where the deformation is 0."""
    from scipy import ndimage

    from brainvae.synth.anatomy import ds_displacement

    image = np.asarray(image, np.float64)
    field = ds_displacement(ds_strength)
    u = np.moveaxis(np.asarray(field.dataobj, np.float64), -1, 0)
    u_on_grid = np.stack([resample_to_grid(u[c], field.affine, image.shape, affine, order=1) for c in range(3)])
    voxels = np.indices(image.shape, dtype=np.float64)
    to_mm = np.asarray(affine, np.float64)
    mm = np.einsum("rc,c...->r...", to_mm[:3, :3], voxels) + to_mm[:3, 3].reshape(3, 1, 1, 1)
    to_voxel = np.linalg.inv(to_mm)
    target = mm + u_on_grid
    sample_at = np.einsum("rc,c...->r...", to_voxel[:3, :3], target) + to_voxel[:3, 3].reshape(3, 1, 1, 1)
    return (ndimage.map_coordinates(image, sample_at, order=1, mode="nearest") - image).astype(np.float32)


def _nifti(data: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".nii.gz") as tmp:
        nib.save(nib.Nifti1Image(np.asarray(data, np.float32), affine), tmp)
    return path


def _tsv(table: pd.DataFrame, path: Path) -> Path:
    atomic_write_text(table.to_csv(sep="\t", index=False, na_rep="n/a", float_format="%.6g"), path)
    return path


def _plot_group_map(t: np.ndarray, background: np.ndarray, threshold: float, title: str, path: Path) -> Path:
    from brainvae.vae.evaluate import mid_slices, save_png  # torch: only when drawing

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    limit = float(max(np.abs(t).max(), threshold if np.isfinite(threshold) else 0.0, 1e-6))
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.4))
    lo, hi = np.percentile(background, [1, 99.5])
    for ax, bg, tt in zip(axes, mid_slices(background), mid_slices(t), strict=True):
        ax.imshow(bg, origin="lower", cmap="gray", vmin=lo, vmax=hi)
        ax.imshow(np.ma.masked_where(tt == 0, tt), origin="lower", cmap="RdBu_r", vmin=-limit, vmax=limit,
                  alpha=0.8)
        if np.isfinite(threshold):
            ax.contour(np.abs(tt) > threshold, levels=[0.5], colors="yellow", linewidths=0.8)
        ax.set_axis_off()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_png(fig, path, dpi=90)


def _plot_strip(volumes: np.ndarray, labels: Sequence[str], title: str, path: Path) -> Path:
    from brainvae.vae.evaluate import mid_slices, save_png  # torch: only when drawing

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lo, hi = np.percentile(volumes, [1, 99.5])
    fig, axes = plt.subplots(len(volumes), 3, figsize=(6, 2.0 * len(volumes)), squeeze=False)
    for i, (vol, label) in enumerate(zip(volumes, labels, strict=True)):
        for k, sl in enumerate(mid_slices(vol)):
            axes[i, k].imshow(sl, origin="lower", cmap="gray", vmin=lo, vmax=hi)
            axes[i, k].set_axis_off()
        axes[i, 0].text(-0.1, 0.5, label, transform=axes[i, 0].transAxes, rotation=90, va="center", ha="right",
                        fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_png(fig, path, dpi=90)


def _finite_or_none(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def normative_step(
    model_dir: str | os.PathLike[str],
    scans: pd.DataFrame,
    array_path: str | os.PathLike[str],
    mask_path: str | os.PathLike[str],
    index: str | os.PathLike[str] | pd.DataFrame,
    splits: str | os.PathLike[str] | pd.DataFrame,
    latents: str | os.PathLike[str] | pd.DataFrame,
    out_dir: str | os.PathLike[str],
    *,
    affine: np.ndarray,
    positive: str = "DS",
    normative_labels: Sequence[str] = ("euploid",),
    n_permutations: int = 1000,
    traversal_permutations: int = 200,
    alpha: float = 0.05,
    traversal_steps: Sequence[float] = (-1.0, 0.0, 1.0, 2.0, 3.0),
    interpolation_steps: int = 5,
    ds_strength: float | None = None,
    no_truth_reason: str = "no known DS field: not the synthetic demo cohort",
    device: str = "cpu",
    batch_size: int = 4,
    seed: int = 0,
) -> dict[str, Path]:
    """Every output of the normative stage of the model in ``model_dir``, under ``out_dir``.

    ``scans``: the analysed scans (``scan``, ``label``). ``latents``: the model's latents table (a path or the
    table :func:`brainvae.latents_table.read_latents` returned). ``affine``: the cohort grid's (voxel -> MNI
    mm). ``positive``: the label compared with the normative population, the scans whose label is one of
    ``normative_labels`` (the labels the model learnt from). ``traversal_steps``: multiples of the distance
    between the two groups' latent means, from the normative mean. ``ds_strength``: the synthetic demo's,
    ``None`` when no truth is known. Returns the paths written, by name.
    """
    from brainvae.analysis.features import latent_columns
    from brainvae.latents_table import read_latents
    from brainvae.runtime import resolve_device
    from brainvae.vae.cohort import read_index, read_splits
    from brainvae.vae.evaluate import decode_latents, reconstruct
    from brainvae.vae.nn import load_model

    out = Path(out_dir)
    maps_dir = out / "maps"
    out.mkdir(parents=True, exist_ok=True)
    normative_labels = [str(label) for label in normative_labels]
    if positive in normative_labels:
        raise NormativeError("analysis.normative.positive",
                             f"{positive!r} is one of the labels the model learnt from ({normative_labels}): it "
                             "cannot be compared with its own normative population")
    normative_name = "/".join(normative_labels)
    index_df = index.copy() if isinstance(index, pd.DataFrame) else read_index(index)
    row_of = dict(zip(index_df["scan"].astype(str), index_df["row"].astype(int)))
    split_table = read_splits(splits)
    split_of = dict(zip(split_table["scan"].astype(str), split_table["split"].astype(str)))
    # The model's held-out scans: drawn from the scans it learns from (its normative population), never fitted.
    reference_scans = sorted(s for s, sp in split_of.items() if sp in ("val", "test") and s in row_of)
    if len(reference_scans) < MIN_REFERENCE:
        raise NormativeError(
            "normative reference",
            f"{len(reference_scans)} scan(s) in the model's val/test splits; the voxel-wise reference needs "
            f"{MIN_REFERENCE} or more (more {normative_name} subjects in datasets with role train/both, or larger "
            "cohort.split_fractions for val and test)")
    scans = scans.reset_index(drop=True)
    analysed = scans["scan"].astype(str).tolist()
    missing = [s for s in analysed if s not in row_of]
    if missing:
        raise NormativeError("analysed scans", f"{len(missing)} not in the cohort index, e.g. {missing[0]}")
    labels = scans["label"].astype(str).to_numpy()
    is_pos, is_neg = labels == positive, np.isin(labels, normative_labels)
    if is_pos.sum() < 2 or is_neg.sum() < 2:
        raise NormativeError("group map", f"needs two or more analysed scans labelled {positive!r} and two or more "
                                          f"labelled {normative_name} (got {int(is_pos.sum())} and "
                                          f"{int(is_neg.sum())})")
    # The two groups by name, for the traversal: positive, the normative population, or neither ("").
    groups = np.where(is_pos, positive, np.where(is_neg, normative_name, ""))

    dev = resolve_device(device)
    model = load_model(Path(model_dir), dev)
    array = np.load(array_path, mmap_mode="r")
    masks = np.load(mask_path, mmap_mode="r")
    shape = tuple(array.shape[1:])

    # Reference: residuals of the held-out scans (kept: a few volumes on the demo grid).
    ref_rows = [row_of[s] for s in reference_scans]
    ref_resid, ref_masks, ref_mse = [], [], []
    for r, x, y in reconstruct(model, array, ref_rows, device=dev, batch_size=batch_size):
        m = np.asarray(masks[r]) > 0
        ref_resid.append(residual(x, y, m))
        ref_masks.append(m)
        ref_mse.append(float(np.mean((x[m] - y[m]) ** 2)))
    reference = ReferenceStats.fit(ref_resid, ref_masks)
    del ref_resid, ref_masks
    inside = reference.mask
    paths: dict[str, Path] = {}
    paths["reference_mean"] = _nifti(reference.mean, affine, out / "reference_residual_mean.nii.gz")
    paths["reference_sd"] = _nifti(reference.sd, affine, out / "reference_residual_sd.nii.gz")
    paths["reference_scans"] = _tsv(pd.DataFrame({"scan": reference_scans,
                                                  "split": [split_of[s] for s in reference_scans],
                                                  "mse_mask": ref_mse}), out / "reference_scans.tsv")

    # Analysed scans: residual and z-maps, regional summary. The z values inside the reference mask go to a
    # scans x voxels file on disk, which the group map reads a block of voxels at a time.
    regions = grid_regions(shape, affine)
    rows = [row_of[s] for s in analysed]
    scan_of_row = dict(zip(rows, analysed))
    position = {s: i for i, s in enumerate(analysed)}
    mean_image = np.zeros(shape, np.float64)
    group_sums = {positive: np.zeros(shape, np.float64), normative_name: np.zeros(shape, np.float64)}
    summaries = []
    with tempfile.TemporaryDirectory(dir=out, prefix=".zmaps-") as scratch:
        zvalues = MatrixFile(Path(scratch) / "z.npy", (len(rows), int(inside.sum())), np.float32)
        for r, x, y in reconstruct(model, array, rows, device=dev, batch_size=batch_size):
            scan = scan_of_row[r]
            i = position[scan]
            m = np.asarray(masks[r]) > 0
            resid = residual(x, y, m)
            z = zmap(resid, reference, m)
            zvalues.write_row(i, z[inside])
            mean_image += x
            if groups[i]:
                group_sums[groups[i]] += x
            _nifti(resid, affine, maps_dir / f"{scan}_desc-residual_T1w.nii.gz")
            _nifti(z, affine, maps_dir / f"{scan}_desc-zmap_T1w.nii.gz")
            summaries.append(regional_summary(z, regions, REGION_NAMES).assign(scan=scan, label=labels[i]))
        # Group map: mean z of positive minus the normative population, Welch t, FWE threshold.
        group = group_map(zvalues, is_pos, inside, in_b=is_neg, n_permutations=n_permutations, alpha=alpha,
                          seed=seed)
        zvalues.close()
    mean_image /= max(len(rows), 1)
    paths["maps"] = maps_dir
    regional = pd.concat(summaries, ignore_index=True)
    regional = regional[["scan", "label", "region", "voxels", "mean_z", "mean_abs_z", "fraction_abs_z_over_2"]]
    regional = regional.sort_values("scan", key=lambda c: c.map(position), kind="stable")
    paths["regional"] = _tsv(regional, out / "regional_summary.tsv")
    paths["regions"] = _nifti(regions, affine, out / "regions.nii.gz")
    paths["group_difference"] = _nifti(group.difference, affine, out / "group_difference_z.nii.gz")
    paths["group_t"] = _nifti(group.t, affine, out / "group_t.nii.gz")
    title = (f"Welch t, mean z {positive} - {normative_name} ({int(is_pos.sum())} vs {int(is_neg.sum())} scans); "
             f"FWE {alpha:g} |t| > {group.threshold:.2f} ({n_permutations} permutations, "
             f"{int(group.significant.sum())} voxels)")
    paths["group_png"] = _plot_group_map(group.t, mean_image, group.threshold, title, out / "group_map.png")
    atomic_write_text(json.dumps({"positive": positive, "negative": normative_name, "n_positive": int(is_pos.sum()),
                                  "n_negative": int(is_neg.sum()), "threshold": group.threshold, "alpha": alpha,
                                  "n_permutations": n_permutations,
                                  "significant_voxels": int(group.significant.sum()),
                                  "max_abs_t": float(np.abs(group.t).max())}, indent=2) + "\n",
                      out / "group_map.json")
    paths["group_json"] = out / "group_map.json"

    # Latents and deviation scores: the latents table's own columns (one definition,
    # brainvae.vae.latents.deviation_columns), for the analysed scans.
    table = latents.copy() if isinstance(latents, pd.DataFrame) else read_latents(latents)[0]
    by_scan = table.set_index(table["scan"].astype(str))
    missing = [s for s in analysed if s not in by_scan.index]
    if missing:
        raise NormativeError("latents table", f"{len(missing)} analysed scan(s) have no latents, e.g. {missing[0]}")
    mu = by_scan.loc[analysed, latent_columns(table)].to_numpy(np.float64)
    deviation = pd.DataFrame({"scan": analysed, "label": labels,
                              **{c: by_scan.loc[analysed, c].to_numpy(np.float64) for c in DEVIATION_SCORES}})
    paths["deviation"] = _tsv(deviation, out / "deviation_scores.tsv")

    # Traversal from the normative mean towards the positive mean, in multiples of their distance.
    def decode(codes: np.ndarray) -> np.ndarray:
        return decode_latents(model, codes, dev)

    steps = [float(s) for s in traversal_steps]
    codes, distance_means = class_traversal(mu, groups, positive, normative_name, steps)
    decoded = decode(codes)
    paths["traversal_nifti"] = _nifti(np.moveaxis(decoded, 0, -1), affine, out / "traversal.nii.gz")
    paths["traversal_png"] = _plot_strip(
        decoded, [f"{s:+g} d" for s in steps],
        f"traversal {normative_name} mean -> {positive} mean (d = {distance_means:.3g} latent units)",
        out / "traversal.png")
    change = decoded[-1] - decoded[0]
    paths["traversal_change"] = _nifti(change, affine, out / "traversal_change.nii.gz")
    agreement: dict[str, Any] = {
        "steps": steps, "distance": distance_means,
        "decoded_change": f"step {steps[-1]:+g} d minus step {steps[0]:+g} d",
        "pattern": "intensity change the synthetic DS deformation (ds_strength 1) makes to the analysed "
                   f"{normative_name} scans' mean image",
        "sign": "positive: the decoded change goes the way the true DS deformation changes the image"}
    if ds_strength is None:
        agreement.update(ds_strength=None, reason=no_truth_reason, voxels=None, correlation=None, p_value=None,
                         alpha=alpha, agrees=None, n_permutations=0, observed_correlation=None)
    else:
        pattern = expected_ds_change(group_sums[normative_name] / is_neg.sum(), affine)
        observed = group_sums[positive] / is_pos.sum() - group_sums[normative_name] / is_neg.sum()
        result = traversal_agreement(change, mu, groups, positive, normative_name, steps[0], steps[-1], decode,
                                     pattern, inside, n_permutations=traversal_permutations, seed=seed)
        agreement.update(ds_strength=float(ds_strength), reason=None, voxels=int(inside.sum()),
                         correlation=_finite_or_none(result.correlation),
                         p_value=_finite_or_none(result.p_value), alpha=alpha, agrees=result.agrees(alpha),
                         null="the same correlation with the labels shuffled over the two groups' scans",
                         null_quantiles=result.null_quantiles, n_permutations=result.n_permutations,
                         observed_correlation=_finite_or_none(field_agreement(observed, pattern, inside)),
                         observed=f"the correlation of the analysed scans' mean image, {positive} minus "
                                  f"{normative_name} (what the data show), with the same pattern")
        if agreement["correlation"] is None:
            agreement.update(reason="undefined: no variation of the decoded change or the pattern")
    atomic_write_text(json.dumps(agreement, indent=2) + "\n", out / "traversal_agreement.json")
    paths["agreement"] = out / "traversal_agreement.json"

    # Interpolation between one analysed normative and one positive scan (the first of each, in scan order).
    first_neg = int(np.flatnonzero(is_neg)[0])
    first_pos = int(np.flatnonzero(is_pos)[0])
    weights = np.linspace(0.0, 1.0, max(2, int(interpolation_steps)))
    codes = (1 - weights)[:, None] * mu[first_neg][None, :] + weights[:, None] * mu[first_pos][None, :]
    paths["interpolation_png"] = _plot_strip(
        decode(codes), [f"{w:.2f}" for w in weights],
        f"interpolation {analysed[first_neg].split('/')[-1]} ({labels[first_neg]}) -> "
        f"{analysed[first_pos].split('/')[-1]} ({positive})", out / "interpolation.png")
    return paths


def summary_lines(paths: Mapping[str, Path]) -> list[str]:
    """Log lines of a finished step: the group map's threshold and the traversal agreement."""
    group = json.loads(Path(paths["group_json"]).read_text(encoding="utf-8"))
    agreement = json.loads(Path(paths["agreement"]).read_text(encoding="utf-8"))
    corr = agreement.get("correlation")
    return [f"group map: {group['significant_voxels']} voxels with |t| > {group['threshold']:.2f} (FWE "
            f"{group['alpha']:g}, {group['n_permutations']} permutations)",
            "traversal agreement with the DS deformation: "
            + (f"r = {corr:.3f}, p = {agreement['p_value']:.3g} ({agreement['n_permutations']} label shuffles) "
               f"over {agreement['voxels']} voxels" if corr is not None else str(agreement["reason"]))]
