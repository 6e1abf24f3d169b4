"""Time, peak memory and accuracy of brainvae preprocessing vs a Clinica t1-linear-style baseline.

Usage::

    .venv/bin/python benchmarks/bench_preprocess.py [--threads 2] [--scans all|NAME ...]
        [--demo-dir DIR] [--no-baseline] [--json out.json]

Each scan runs in its own subprocess so ``ru_maxrss`` is that scan's peak RSS. Per scan it reports
wall and CPU seconds of every step (conform, N4, level 1, level 2, resampling + normalisation; skull
stripping is replaced by the MNI152 mask pulled back through level 1 and is not timed), the
correlation with the template after level 1 / level 2, and for the baseline (ANTsPy N4 with its
default 4x50 iterations + ``antsRegistrationSyNQuick[a]`` of the whole head to the Colin27 head).

Accuracy: ``chris_t1`` is also run after a known random rigid move (+-15 deg, +-20 mm); the error is
the mean displacement over brain voxels between ``A_moved @ T`` and ``A_original`` (each pipeline
against itself). With ``--demo-dir`` (a cohort from ``brainvae demo-cohort``) the first subjects are
compared to their true native->MNI affine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REAL = REPO / "tests" / "data" / "real_t1w"
SCANS = {
    "ixi012": REAL / "ixi" / "IXI012-HH-1211-T1_ds.nii.gz",
    "ixi033": REAL / "ixi" / "IXI033-HH-1259-T1_ds.nii.gz",
    "ms01_partial": REAL / "open_ms" / "longitudinal_raw_patient01_study1_T1W.nii.gz",
    "ms03": REAL / "open_ms" / "longitudinal_raw_patient03_study2_T1W.nii.gz",
    "chris_0.88mm": REAL / "niivue" / "chris_t1.nii.gz",
    "brainchop_1mm": REAL / "brainchop" / "t1_crop.nii.gz",
}


def _child(path: str, threads: int, baseline: bool, move_seed: int | None,
           truth: str | None) -> dict:
    """Run one scan in this (fresh) process; return the figures."""
    from brainvae.bias import set_threads

    set_threads(threads)
    import nibabel as nib
    import numpy as np

    from brainvae import registration as reg
    from brainvae import templates
    from brainvae.bias import n4_bias_correct
    from brainvae.conform import conform_image
    from brainvae.preprocess import preprocess_image
    from brainvae.resample import Grid, resample_to_grid

    out: dict = {"scan": path, "steps": {}}

    def step(name, fn, *a, **k):
        t0, c0 = time.perf_counter(), time.process_time()
        r = fn(*a, **k)
        out["steps"][name] = {"wall_s": round(time.perf_counter() - t0, 2),
                              "cpu_s": round(time.process_time() - c0, 2)}
        return r

    img, _ = step("conform", conform_image, nib.load(path), source=path)
    img = nib.Nifti1Image(np.asarray(img.dataobj, np.float32), img.affine)
    truth_a = None
    if move_seed is not None:
        from scipy.spatial.transform import Rotation

        rng = np.random.default_rng(move_seed)
        t = np.eye(4)
        t[:3, :3] = Rotation.from_euler("xyz", rng.uniform(-15, 15, 3), degrees=True).as_matrix()
        t[:3, 3] = rng.uniform(-20, 20, 3)
        out["move"] = t.tolist()
        img = resample_to_grid(img, t, Grid.from_image(img), order=3)
    if truth is not None:
        truth_a = np.asarray(json.loads(Path(truth).read_text())["native_to_mni_affine"])
    out["shape"], out["zooms"] = list(img.shape), [round(float(z), 3) for z in img.header.get_zooms()]

    corrected, _, hmask = step("n4", n4_bias_correct, img)
    l1 = step("level1", reg.level1_affine, corrected, hmask)
    bmask = reg.brain_mask_from_template(corrected, l1.affine, dilate_mm=4.0)  # not timed
    l2 = step("level2", reg.level2_affine, corrected, bmask, l1.affine)
    step("resample_normalise", preprocess_image, corrected, bmask, l2.affine, "2mm",
         qc_grid="mni1mm")
    ours = sum(s["wall_s"] for k, s in out["steps"].items() if k != "conform")
    out["ours_total_wall_s"] = round(ours, 2)
    out["ours_total_cpu_s"] = round(sum(s["cpu_s"] for k, s in out["steps"].items()
                                        if k != "conform"), 2)
    out["r_level1"] = round(l1.correlation, 3)
    out["r_level2"] = round(l2.correlation, 3)
    out["affine_ours"] = l2.affine.tolist()
    out["rss_ours_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 0)

    if baseline:
        import ants

        def clinica_like():
            a = reg.to_ants(img)
            n4 = ants.n4_bias_field_correction(a, shrink_factor=4)  # default 4x50 iterations
            r = ants.registration(fixed=reg.to_ants(templates.colin27_head()), moving=n4,
                                  type_of_transform="antsRegistrationSyNQuick[a]")
            tx = ants.read_transform(r["fwdtransforms"][0], precision="double")
            return reg.itk_to_ras(reg.ants_transform_to_matrix(tx))

        a_base = step("baseline_total", clinica_like)
        out["affine_baseline"] = a_base.tolist()
        out["r_baseline"] = round(reg.template_correlation(corrected, a_base, templates.colin27_head()), 3)
        out["rss_with_baseline_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 0)

    # Brain voxel sample (world RAS) for displacement errors, from our level-2 mask pull-back.
    idx = np.argwhere(np.asarray(bmask.dataobj) > 0)[::20]
    out["brain_points"] = (idx @ corrected.affine[:3, :3].T + corrected.affine[:3, 3]).tolist()
    if truth_a is not None:
        pts = np.c_[np.asarray(out["brain_points"]), np.ones(len(idx))]
        for key in ("affine_ours", "affine_baseline"):
            if key in out:
                d = (pts @ np.asarray(out[key]).T - pts @ truth_a.T)[:, :3]
                out[f"err_vs_truth_{key.split('_')[1]}_mm"] = round(float(np.linalg.norm(d, axis=1).mean()), 3)
    return out


def _run(path: Path, args, move_seed=None, truth=None) -> dict:
    cmd = [sys.executable, __file__, "--child", str(path), "--threads", str(args.threads)]
    if args.no_baseline:
        cmd.append("--no-baseline")
    if move_seed is not None:
        cmd += ["--move-seed", str(move_seed)]
    if truth is not None:
        cmd += ["--truth", str(truth)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if res.returncode != 0:
        return {"scan": str(path), "error": res.stderr[-2000:]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def _consistency(orig: dict, moved: dict, key: str) -> float:
    import numpy as np

    pts = np.c_[np.asarray(orig["brain_points"]), np.ones(len(orig["brain_points"]))]
    t = np.asarray(moved["move"])
    d = (pts @ np.asarray(orig[key]).T - pts @ t.T @ np.asarray(moved[key]).T)[:, :3]
    return round(float(np.linalg.norm(d, axis=1).mean()), 3)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--scans", nargs="*", default=["all"])
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--moves", type=int, default=2, help="random moves of chris_t1 (accuracy)")
    p.add_argument("--demo-dir", type=Path, help="demo cohort root (with truth/) for accuracy")
    p.add_argument("--demo-n", type=int, default=2)
    p.add_argument("--json", type=Path)
    p.add_argument("--child")
    p.add_argument("--move-seed", type=int)
    p.add_argument("--truth")
    args = p.parse_args(argv)
    if args.child:
        r = _child(args.child, args.threads, not args.no_baseline, args.move_seed, args.truth)
        print(json.dumps(r))
        return 0

    names = list(SCANS) if args.scans == ["all"] else args.scans
    rows = []
    for n in names:
        r = _run(SCANS[n], args)
        r["name"] = n
        rows.append(r)
        _print_row(r)
    if "chris_0.88mm" in names:
        orig = next(r for r in rows if r["name"] == "chris_0.88mm")
        for seed in range(args.moves):
            r = _run(SCANS["chris_0.88mm"], args, move_seed=seed)
            r["name"] = f"chris_moved{seed}"
            if "error" not in r and "error" not in orig:
                r["consistency_ours_mm"] = _consistency(orig, r, "affine_ours")
                if "affine_baseline" in r:
                    r["consistency_baseline_mm"] = _consistency(orig, r, "affine_baseline")
            rows.append(r)
            _print_row(r)
    if args.demo_dir:
        for tj in sorted((args.demo_dir / "truth").rglob("*_truth.json"))[: args.demo_n]:
            truth = json.loads(tj.read_text())
            r = _run(args.demo_dir / truth["files"]["t1w"], args, truth=tj)
            r["name"] = f"demo_{truth['subject']}"
            rows.append(r)
            _print_row(r)
    if args.json:
        for r in rows:
            r.pop("brain_points", None)
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


def _print_row(r: dict) -> None:
    if "error" in r:
        print(f"{r['name']:>16}: ERROR {r['error'][-300:]}", flush=True)
        return
    s = r["steps"]
    parts = [f"{k}={v['wall_s']:.1f}s" for k, v in s.items()]
    extra = {k: v for k, v in r.items() if k.startswith(("r_", "rss", "ours_total", "err_", "consistency"))}
    print(f"{r['name']:>16}: " + " ".join(parts) + " | " + json.dumps(extra), flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
