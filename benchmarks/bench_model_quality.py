"""Held-out reconstruction quality of the VAE variants against PCA and the mean image.

Usage::

    .venv/bin/python benchmarks/bench_model_quality.py [--hcp 500] [--santpau 100] [--n-train 400]
        [--epochs-dense 30] [--epochs-spatial 8] [--cache /tmp/brainvae_model_quality]
        [--json benchmarks/results/model_quality.json]

1. A template-space synthetic cohort (``brainvae.demo_cohort.generate_cohort``: an HCP-like site at
   the generator's default DS fraction (0.4) and a Sant Pau-like site with half DS, ds_strength 0.85,
   no second sessions) written on the
   2 mm MNI grid, then brought onto the demo 4 mm grid (40x48x40) the way rule
   ``preprocess_template_scan`` does (``brainvae.steps.template_scan_files``): brain mask = filled
   largest component of the non-zero support, one resampling (``preprocess.preprocess_image``, cubic)
   and the workflow's default normalisation (``percentile`` 1/99 inside the mask). Cached in
   ``--cache``.
2. Splits (:func:`make_splits`): ``--train-labels`` scans (default ``euploid``, as the workflow's
   VAEs learn from; ``all``: every label) in random order (seed 0), the first ``--n-train`` of
   them fitted (5 % of ``--n-train`` held back for validation, i.e. early stopping), every other
   scan held out for the test. No test scan is trained or validated on. With the default cohort
   (HCP 500 subjects at the generator's default DS fraction 0.4, Sant Pau 100 at 0.5) there are
   350 euploid scans: all are fitted (329 train, 21 validation) and the test set is the 250 DS
   scans, i.e. the models are scored on brains from outside their training distribution.
3. Every variant is trained with :func:`brainvae.vae.trainer.train_vae` (the workflow's training),
   PCA with as many components as the variant's latent dimension (capped at the training scans)
   and the training mean image are fitted on the same training scans; all are scored on the test
   scans with :func:`brainvae.vae.evaluate.scan_metrics` (MSE, PSNR, SSIM inside the brain mask;
   bootstrap 95 % CI of the mean SSIM).
4. Throughput: CPU training volumes/s of each variant on the demo grid, from its training log.

Writes a JSON list of rows ``{model, grid, n_train, n_test, latent_dim, mse, psnr, ssim,
ssim_ci_low, ssim_ci_high}`` (VAE rows also ``architecture``, ``latent_shape``, ``epochs``,
``train_seconds``, ``volumes_per_s`` (CPU training throughput), ``active_units``,
``posterior_collapse``; PCA rows ``compared_with``).

Measured (benchmarks/results/model_quality.json; 2 CPU cores shared with other jobs, load ~8-10):
the two trainings ran as two processes, ``--n-train 422 --epochs-dense 10 --epochs-spatial 3
--variants dense`` and ``... --variants spatial``, then ``--n-train 422 --epochs-dense 10
--epochs-spatial 3`` (both trainings reused from their checkpoints) scored them and wrote the file.
329 train / 21 validation euploid scans, 250 held-out DS scans, SSIM inside the mask [95 % CI]:
dense (32-d) 0.918 [0.917, 0.920] vs PCA-32 0.934 [0.932, 0.935]; spatial (2x10x12x10, 3 epochs)
0.911 [0.909, 0.914] vs PCA-329 (capped at the training scans) 0.961 [0.960, 0.962]; mean image
0.904 [0.902, 0.907]. Both VAEs beat the mean image but not PCA of equal dimension; the spatial
VAE misses SSIM 0.95 (it was still improving: 3 epochs were all the CPU time allowed). Training
throughput under that load: dense 2.0, spatial 1.1 volumes/s (on an idle 2-core machine
bench_vae.py measured ~10 and ~4 volumes/s at batch 4).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

GRID = "demo"


def build_cohort(cache: Path, n_hcp: int, n_santpau: int, seed: int, n_jobs: int) -> pd.DataFrame:
    """Generate (once) and stack the cohort on the demo grid: ``cache/{array,mask}.npy``, index."""
    import nibabel as nib
    from scipy import ndimage

    from brainvae.bias import largest_component
    from brainvae.demo_cohort import generate_cohort
    from brainvae.preprocess import preprocess_image

    index_path = cache / "index.tsv"
    if index_path.exists():
        return pd.read_csv(index_path, sep="\t", dtype={"scan": str})
    raw = cache / "raw"
    t0 = time.perf_counter()
    plan = generate_cohort(raw, None, seed, ds_strength=0.85,
                           sites={"HCP": {"subjects": n_hcp},
                                  "SantPau": {"subjects": n_santpau, "ds_fraction": 0.5}},
                           n_jobs=n_jobs, session_fraction=0.0)
    print(f"cohort: {len(plan)} scans generated in {time.perf_counter() - t0:.0f} s", flush=True)
    t0 = time.perf_counter()
    volumes, masks, rows = [], [], []
    for i, rec in enumerate(plan):
        img = nib.load(raw / rec["path"])
        data = np.asarray(img.dataobj, dtype=np.float32)
        support = np.isfinite(data) & (data > 0)
        brain = ndimage.binary_fill_holes(largest_component(support))
        mask_img = nib.Nifti1Image(brain.astype(np.uint8), img.affine)
        # World coordinates already are template millimetres: the transform is the identity.
        norm, gmask, _ = preprocess_image(img, mask_img, np.eye(4), GRID, order=3, method="percentile",
                                          percentiles=(1.0, 99.0), background=0.0)
        volumes.append(np.asarray(norm.dataobj, dtype=np.float32))
        masks.append(np.asarray(gmask.dataobj, dtype=np.uint8))
        rows.append({"row": i, "scan": f"{rec['dataset']}_{rec['subject']}", "dataset": rec["dataset"],
                     "subject": rec["subject"], "label": "DS" if rec["group"] == "DS" else "euploid",
                     "age": rec["age"], "sex": rec["sex"]})
    np.save(cache / "array.npy", np.stack(volumes))
    np.save(cache / "mask.npy", np.stack(masks))
    index = pd.DataFrame(rows)
    index.to_csv(index_path, sep="\t", index=False)
    print(f"cohort: resampled to {GRID} in {time.perf_counter() - t0:.0f} s", flush=True)
    return index


#: The variants benchmarked: the workflow's defaults (config.TRAINING_DEFAULTS) with a batch of 4 and
#: the KL warm-up over 2 epochs (an epoch here has 100 steps, not the demo's ~25).
VARIANTS = {
    "dense": {"architecture": "dense", "batch_size": 4, "beta_warmup_epochs": 2, "warmup_epochs": 1},
    "spatial": {"architecture": "spatial", "batch_size": 4, "beta_warmup_epochs": 2, "warmup_epochs": 1},
}


def make_splits(index: pd.DataFrame, n_train: int, seed: int, labels: str = "euploid") -> pd.DataFrame:
    """Up to ``n_train`` random scans of ``labels`` (``all``: any) fitted (5 % of ``n_train`` for
    validation), every other scan for the test."""
    rng = np.random.default_rng(seed)
    pool = index if labels == "all" else index.loc[index["label"] == labels]
    order = rng.permutation(pool["scan"].to_numpy())
    fit = order[:n_train]
    n_val = max(1, int(round(0.05 * n_train)))
    split = {s: "val" for s in fit[:n_val]} | {s: "train" for s in fit[n_val:]}
    return pd.DataFrame({"scan": index["scan"], "split": [split.get(s, "test") for s in index["scan"]]})


def _row(model: str, n_train: int, latent_dim: int, per_scan: pd.DataFrame, method: str,
         **extra: object) -> dict[str, object]:
    from brainvae.vae.evaluate import bootstrap_ci

    df = per_scan[per_scan["method"] == method]
    lo, hi = bootstrap_ci(df["ssim_mask"].to_numpy(), n_boot=2000, seed=0)
    return {"model": model, "grid": GRID, "n_train": n_train, "n_test": int(len(df)), "latent_dim": int(latent_dim),
            "mse": float(df["mse_mask"].mean()), "psnr": float(df["psnr_mask"].mean()),
            "ssim": float(df["ssim_mask"].mean()), "ssim_ci_low": lo, "ssim_ci_high": hi, **extra}


def run_models(args: argparse.Namespace, index: pd.DataFrame) -> int:
    import torch

    from brainvae.vae.evaluate import evaluate_vae
    from brainvae.vae.trainer import train_vae

    torch.set_num_threads(args.threads)
    splits = make_splits(index, args.n_train, args.seed, args.train_labels)
    n_train = int((splits["split"] == "train").sum())
    rows: list[dict[str, object]] = []
    pca_done: set[int] = set()
    epochs = {"dense": args.epochs_dense, "spatial": args.epochs_spatial}
    for name, cfg in VARIANTS.items():
        if name not in args.variants:
            continue
        out = args.cache / "models" / name
        t0 = time.perf_counter()
        metrics = train_vae({**cfg, "epochs": epochs[name], "seed": args.seed}, args.cache / "array.npy",
                            args.cache / "mask.npy", index, splits, out, checkpoint_dir=args.cache / "ck" / name,
                            device="cpu", threads=args.threads, progress=False, model_name=name)
        print(f"{name}: trained {metrics['epochs_run']} epochs in {time.perf_counter() - t0:.0f} s "
              f"({metrics['volumes_per_s']:.2f} volumes/s), best epoch {metrics['best_epoch']}", flush=True)
        result = evaluate_vae(out, args.cache / "array.npy", args.cache / "mask.npy", index, splits,
                              out / "evaluation", device="cpu", n_boot=200, seed=args.seed)
        per_scan, diag = result["per_scan"], result["diagnostics"]
        d = int(metrics["latent_dim"])
        rows.append(_row(name, n_train, d, per_scan, "vae", architecture=metrics["architecture"],
                         latent_shape=metrics["latent_shape"], epochs=metrics["epochs_run"],
                         train_seconds=round(metrics["seconds"], 1),
                         volumes_per_s=round(metrics["volumes_per_s"], 2),
                         active_units=diag["active_units"], posterior_collapse=diag["posterior_collapse"]))
        k = int(per_scan.loc[per_scan["method"] == "pca", "n_components"].iloc[0])
        if k not in pca_done:
            pca_done.add(k)
            rows.append(_row("pca", n_train, k, per_scan, "pca", compared_with=name))
        if not any(r["model"] == "mean_image" for r in rows):
            rows.append(_row("mean_image", n_train, 0, per_scan, "mean_image"))
        print(json.dumps(rows[-3:], indent=None), flush=True)
    meta = {"command": "benchmarks/bench_model_quality.py " + " ".join(sys.argv[1:]), "cpu_count": os.cpu_count(),
            "torch_threads": args.threads, "cohort": {"HCP": args.hcp, "SantPau": args.santpau, "seed": args.seed,
                                                       "ds_strength": 0.85},
            "train_labels": args.train_labels, "test": "every scan not trained on or validated on",
            "metrics": "inside the brain mask; SSIM Gaussian window 7, sigma 1.5 (MONAI); 95 % bootstrap CI"}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    print("meta:", json.dumps(meta), flush=True)
    args.json.write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hcp", type=int, default=500)
    ap.add_argument("--santpau", type=int, default=100)
    ap.add_argument("--n-train", type=int, default=400, help="scans fitted (train + validation), at most")
    ap.add_argument("--train-labels", default="euploid", choices=["euploid", "all"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--epochs-dense", type=int, default=30)
    ap.add_argument("--epochs-spatial", type=int, default=8)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/brainvae_model_quality"))
    ap.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "model_quality.json")
    ap.add_argument("--cohort-only", action="store_true", help="build the cached cohort and stop")
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS),
                    help="train and score only these (e.g. one per process; a finished training is reused "
                         "from its checkpoint in --cache, so a later run with every variant only scores)")
    args = ap.parse_args(argv)
    args.cache.mkdir(parents=True, exist_ok=True)
    index = build_cohort(args.cache, args.hcp, args.santpau, args.seed, args.jobs)
    if args.cohort_only:
        return 0
    return run_models(args, index)


if __name__ == "__main__":
    raise SystemExit(main())
