"""How separable the synthetic DS and euploid brains are, by ``ds_strength``, and whether the population looks
like a real one: the measurement behind the demo's default ``demo.ds_strength``.

    .venv/bin/python benchmarks/calibrate_ds_strength.py --subjects 80 --strengths 0 0.5 1.0 --jobs 2

For each strength, a Sant Pau-like template-space cohort (half DS, ages 20-65 in both groups, the same
subjects at every strength: the generator's draws do not depend on it) is simulated in memory, brought to
the demo grid (4 mm block means of the 2 mm images, percentile-normalised in the brain, as the workflow
does), and classified DS vs euploid by voxel PCA (10 components, fitted inside each fold) + logistic
regression, and by each confound (age, sex, intracranial volume), with 5-fold stratified CV repeated 4
times: mean AUC. Population figures of an IXI-like euploid cohort (ages 20-86): intracranial volume CV,
5th-95th percentile ratio of ventricle volume, brain volume change per year after 40.

Target (issue 16): voxel-PCA AUC 0.75-0.9 at the default strength, confounds near chance except the
intracranial volume (DS heads are smaller: a real, expected signal). Writes
``benchmarks/results/ds_strength.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import RepeatedStratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from brainvae import demo_cohort as dc
from brainvae.synth.template_space import simulate_template_scan

RESULTS = Path(__file__).resolve().parent / "results" / "ds_strength.json"


def _scan(args: tuple[dict, int, float]) -> tuple[np.ndarray, dict]:
    record, seed, strength = args
    site = dc.SITES[record["dataset"]]
    result = simulate_template_scan(record, seed, strength, dc._resampled_site_head(site.name), site.noise,
                                    site.wm_counts)
    image = result["t1w"].astype(np.float32)
    shape = [n // 2 * 2 for n in image.shape]
    image = image[: shape[0], : shape[1], : shape[2]]
    image = image.reshape(shape[0] // 2, 2, shape[1] // 2, 2, shape[2] // 2, 2).mean(axis=(1, 3, 5))
    brain = image > 0
    low, high = np.percentile(image[brain], [1, 99])
    image = np.where(brain, (image - low) / (high - low), 0.0)
    return image.ravel().astype(np.float32), result["truth"]


def _simulate(plan: list[dict], seed: int, strength: float, jobs: int) -> tuple[np.ndarray, list[dict]]:
    args = [(r, seed, strength) for r in plan]
    if jobs > 1:
        with ProcessPoolExecutor(jobs) as pool:
            out = list(pool.map(_scan, args, chunksize=4))
    else:
        out = [_scan(a) for a in args]
    return np.stack([x for x, _ in out]), [t for _, t in out]


def _cv_auc(features: np.ndarray, y: np.ndarray, pca: int | None, seed: int) -> float:
    folds = RepeatedStratifiedKFold(n_splits=5, n_repeats=4, random_state=seed)
    aucs = []
    for train, test in folds.split(features, y):
        steps = [StandardScaler()] + ([PCA(pca, random_state=seed)] if pca else []) + [LogisticRegression(max_iter=2000)]
        model = make_pipeline(*steps).fit(features[train], y[train])
        aucs.append(roc_auc_score(y[test], model.predict_proba(features[test])[:, 1]))
    return float(np.mean(aucs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subjects", type=int, default=80)
    parser.add_argument("--population", type=int, default=60, help="subjects of the IXI-like population check")
    parser.add_argument("--strengths", type=float, nargs="+", default=[0.0, 0.5, 0.75, 1.0])
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", type=Path, default=RESULTS)
    args = parser.parse_args()
    dc.reference()  # built once, inherited by the workers
    dc._resampled_site_head("SantPau")
    dc._resampled_site_head("HCP")
    start = time.perf_counter()

    plan = dc.plan_cohort(None, args.seed, sites={"SantPau": {"subjects": args.subjects, "ds_fraction": 0.5}},
                          session_fraction=0)
    y = np.array([r["group"] == "DS" for r in plan], int)
    rows = []
    for strength in args.strengths:
        plan_s = dc.plan_cohort(None, args.seed, sites={"SantPau": {"subjects": args.subjects, "ds_fraction": 0.5}},
                                session_fraction=0, ds_strength=strength)
        voxels, truths = _simulate(plan_s, args.seed, strength, args.jobs)
        keep = voxels.std(axis=0) > 0
        confounds = {"age": np.array([[r["age"]] for r in plan_s], float),
                     "sex": np.array([[r["sex"] == "M"] for r in plan_s], float),
                     "icv": np.array([[r["icv_ml"]] for r in plan_s], float)}
        row = {"ds_strength": strength, "n": len(plan_s), "n_ds": int(y.sum()),
               "auc_voxels_pca10": round(_cv_auc(voxels[:, keep], y, 10, args.seed), 3)}
        for name, x in confounds.items():
            row[f"auc_{name}"] = round(_cv_auc(x, y, None, args.seed), 3)
        vent = np.array([t["region_volumes_ml"]["ventricles"] for t in truths])
        row["ventricles_ml_ds_vs_euploid"] = [round(float(vent[y == 1].mean()), 1), round(float(vent[y == 0].mean()), 1)]
        rows.append(row)
        print(json.dumps(row), flush=True)

    # Population check on an IXI-like euploid cohort spread over adult life (template space: local shape only).
    population = dc.plan_cohort(None, args.seed, sites={"HCP": {"subjects": args.population, "ds_fraction": 0.0}},
                                session_fraction=0)
    population = [{**r, "age": round(20 + 66 * i / max(len(population) - 1, 1), 1)} for i, r in enumerate(population)]
    _, truths = _simulate(population, args.seed, 1.0, args.jobs)
    icv = np.array([t["icv_ml"] for t in truths])
    vent = np.array([t["region_volumes_ml"]["ventricles"] for t in truths])
    brain = np.array([t["region_volumes_ml"]["brain"] - t["region_volumes_ml"]["ventricles"] for t in truths])
    age = np.array([r["age"] for r in population])
    old = age >= 40
    slope = np.polyfit(age[old], brain[old] / icv[old], 1)[0] / np.mean(brain[old] / icv[old])
    summary = {
        "icv_cv": round(float(icv.std() / icv.mean()), 3),
        "icv_male_over_female": round(float(np.mean([t["icv_ml"] for t, r in zip(truths, population) if r["sex"] == "M"])
                                            / np.mean([t["icv_ml"] for t, r in zip(truths, population) if r["sex"] == "F"])), 3),
        "ventricles_ml_p5_p95": [round(float(v), 1) for v in np.percentile(vent, [5, 95])],
        "ventricles_p95_over_p5": round(float(np.percentile(vent, 95) / np.percentile(vent, 5)), 2),
        "brain_tissue_change_per_year_after_40": round(float(slope), 5),
    }
    print(json.dumps(summary), flush=True)
    result = {"benchmark": "calibrate_ds_strength",
              "command": f"python benchmarks/calibrate_ds_strength.py --subjects {args.subjects} --population "
                         f"{args.population} --strengths {' '.join(map(str, args.strengths))} --seed {args.seed}",
              "classification": rows, "population": summary,
              "seconds": round(time.perf_counter() - start, 1), "cpu_count": os.cpu_count()}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
