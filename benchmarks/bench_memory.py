"""Peak memory and time of the evaluation PCA baseline and the analysis voxel baseline on a large cohort.

Usage::

    .venv/bin/python benchmarks/bench_memory.py [--scans 1000] [--shape 80 96 80] [--train-fraction 0.7]
        [--components 32] [--test 50] [--threads 1] [--permutations 100] [--stages ...]
        [--json benchmarks/results/memory.json]

Writes a synthetic cohort of ``--scans`` volumes on the 2 mm grid (80 x 96 x 80, float32, as
``cohort.npy`` with a uint8 ``cohort_mask.npy`` and an index) to a temporary directory under /tmp,
deleted afterwards: each volume a random combination of 48 smooth fields with a decaying spectrum
plus a little white noise, zero outside its own ellipsoidal brain mask (random radii and offset).
Then runs each stage in a fresh Python subprocess and reads that process's peak resident set size
(``VmHWM`` of /proc/self/status, imports included; ``baseline_rss_mib`` is the resident size right
after the imports) and its wall time:

* ``evaluate_pca``: :class:`brainvae.vae.evaluate.PCABaseline` with ``--components`` components
  fitted on the first ``--train-fraction`` of the rows from the memory maps and a row list (what
  ``evaluate_vae`` does), then ``--test`` other rows reconstructed;
* ``evaluate_pca_before``: the implementation before issue 18 (``array[rows]`` and ``masks[rows]``
  copies, the in-support rows stacked, sklearn ``PCA``), for comparison;
* ``voxel_matrix``: :func:`brainvae.analysis.features.voxel_matrix_from_cohort` (rule
  ``analysis_voxels``: the scans x brain-voxels matrix of every scan);
* ``voxel_features``: ``load_voxel_matrix`` + ``align_rows`` + ``row_space`` on every scan (the
  ``voxels_pca`` feature set of rule ``analysis_tasks_baselines``);
* ``voxel_features_subset``: the same for a shuffled 90 % of the scans (``align_rows`` then makes
  the one reordered copy);
* ``voxel_pca_report``: ``fit_pca`` of the voxel matrix (the descriptive PCA of rule
  ``analysis_pca_voxels``, 20 components);
* ``normative_group_map``: :func:`brainvae.analysis.normative.group_map` with ``--permutations`` label
  permutations on the voxel matrix as the scans x brain-voxels z values (read through
  :class:`brainvae.memmaps.MatrixFile`, as rule ``normative_maps`` does), first half of the scans against the
  second;
* ``normative_group_map_before``: the implementation before (every z-map on the grid in memory, float64 copies
  of both groups, one Welch t per permutation), for comparison.

The cohort files are freshly written, so they are read from the page cache. The JSON (default
``benchmarks/results/memory.json``) holds the command, the sizes (cohort array, masks, voxel matrix)
and, per stage, ``peak_rss_mib``, ``baseline_rss_mib`` and ``wall_s``. Goal: each stage's peak well
below twice the cohort array.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
STAGES = ("evaluate_pca", "evaluate_pca_before", "voxel_matrix", "voxel_features", "voxel_features_subset",
          "voxel_pca_report", "normative_group_map", "normative_group_map_before")
N_BASIS = 48


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def write_cohort(out: Path, scans: int, shape: tuple[int, int, int], seed: int = 0,
                 dtype: str = "<f4") -> dict[str, int]:
    """``cohort.npy`` (``dtype``, float32 by default), ``cohort_mask.npy`` (uint8) and ``cohort_index.tsv`` (scans
    ``s00000``, ...), a volume at a time."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    sigma = max(1.0, min(shape) / 20)
    basis = np.empty((N_BASIS, int(np.prod(shape))), dtype=np.float32)
    for j in range(N_BASIS):
        field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
        basis[j] = (field / field.std()).ravel()
    scale = (1.0 / np.sqrt(np.arange(1, N_BASIS + 1))).astype(np.float32)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s, dtype=np.float32) for s in shape], indexing="ij"))
    header = {"fortran_order": False, "shape": (scans, *shape)}
    with open(out / "cohort.npy", "wb") as fa, open(out / "cohort_mask.npy", "wb") as fm:
        np.lib.format.write_array_header_1_0(fa, {**header, "descr": np.lib.format.dtype_to_descr(np.dtype(dtype))})
        np.lib.format.write_array_header_1_0(fm, {**header, "descr": np.lib.format.dtype_to_descr(np.dtype("u1"))})
        for _ in range(scans):
            radii = rng.uniform(0.72, 0.86, 3).astype(np.float32)[:, None, None, None]
            centre = rng.uniform(-0.04, 0.04, 3).astype(np.float32)[:, None, None, None]
            mask = (((grid - centre) / radii) ** 2).sum(0) < 1.0
            vol = 1.0 + (rng.standard_normal(N_BASIS).astype(np.float32) * scale) @ basis
            vol = vol.reshape(shape) + 0.1 * rng.standard_normal(shape, dtype=np.float32)
            fa.write(np.where(mask, vol, 0.0).astype(dtype).tobytes())
            fm.write(mask.astype(np.uint8).tobytes())
    (out / "cohort_index.tsv").write_text("row\tscan\n" + "".join(f"{i}\ts{i:05d}\n" for i in range(scans)))
    return {"cohort_array_bytes": (out / "cohort.npy").stat().st_size,
            "mask_array_bytes": (out / "cohort_mask.npy").stat().st_size}


def run_stage(stage: str, cohort: Path, args: argparse.Namespace) -> dict:
    """One stage, in this (fresh) process: its own figures; the parent adds the peak RSS."""
    import pandas as pd

    n = int(np.load(cohort / "cohort.npy", mmap_mode="r").shape[0])
    n_train = max(2, int(round(args.train_fraction * n)))
    train_rows = list(range(n_train))
    test_rows = list(range(n_train, min(n, n_train + args.test)))
    out: dict = {}
    if stage in ("evaluate_pca", "evaluate_pca_before"):
        from brainvae.memmaps import release_pages
        from brainvae.vae.evaluate import PCABaseline  # noqa: F401  (imports torch, as evaluate_vae does)

        array = np.load(cohort / "cohort.npy", mmap_mode="r")
        masks = np.load(cohort / "cohort_mask.npy", mmap_mode="r")
        out["baseline_rss_mib"] = _status_kb("VmRSS") / 1024
        t0 = time.perf_counter()
        if stage == "evaluate_pca":
            pca = PCABaseline(args.components).fit(array, masks, train_rows)
            support, rank = pca.support, pca.rank
            recon = pca.reconstruct
        else:
            from sklearn.decomposition import PCA

            vols, ms = array[train_rows], masks[train_rows]  # the code before issue 18
            support = (np.asarray(ms) > 0).any(axis=0)
            data = np.stack([np.asarray(v, dtype=np.float32)[support] for v in vols])
            k = min(args.components, *data.shape)
            model = PCA(n_components=k, svd_solver="auto", random_state=0).fit(data)
            rank = k

            def recon(volume: np.ndarray) -> np.ndarray:
                result = np.zeros(support.shape, dtype=np.float32)
                code = model.transform(np.asarray(volume, np.float32)[support][None])
                result[support] = model.inverse_transform(code)[0]
                return result
        out["fit_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        errors = []
        for r in test_rows:  # one test scan in memory at a time, as evaluate_vae's loop
            x = np.array(array[r], dtype=np.float32)
            release_pages(array)
            errors.append(float(np.mean((recon(x) - x)[support] ** 2)))
        out.update(reconstruct_s=time.perf_counter() - t0, wall_s=out["fit_s"] + time.perf_counter() - t0,
                   train_rows=n_train, test_rows=len(test_rows), components=int(rank),
                   support_voxels=int(support.sum()), mean_test_mse=float(np.mean(errors)) if errors else None)
    elif stage == "voxel_matrix":
        from brainvae.analysis.features import voxel_matrix_from_cohort

        out["baseline_rss_mib"] = _status_kb("VmRSS") / 1024
        t0 = time.perf_counter()
        X = voxel_matrix_from_cohort(cohort / "cohort.npy", cohort / "cohort_mask.npy", cohort / "voxels.npy")
        out.update(wall_s=time.perf_counter() - t0, scans=int(X.shape[0]), voxels=int(X.shape[1]),
                   voxel_matrix_bytes=(cohort / "voxels.npy").stat().st_size)
    elif stage in ("voxel_features", "voxel_features_subset", "voxel_pca_report"):
        from brainvae.analysis.features import align_rows, load_voxel_matrix, row_space
        from brainvae.analysis.pca import fit_pca

        scans = pd.read_csv(cohort / "cohort_index.tsv", sep="\t", dtype=str)[["scan"]]
        if stage == "voxel_features_subset":
            rng = np.random.default_rng(0)
            scans = scans.iloc[rng.permutation(len(scans))[: max(2, int(0.9 * len(scans)))]].reset_index(drop=True)
        out["baseline_rss_mib"] = _status_kb("VmRSS") / 1024
        t0 = time.perf_counter()
        X, index = load_voxel_matrix(cohort / "voxels.npy", cohort / "cohort_index.tsv")
        aligned = align_rows(scans, index, X, what="voxels")
        if stage == "voxel_pca_report":
            result = fit_pca(aligned, 20)
            out["components"] = result.n_components
        else:
            V = row_space(aligned)
            out["row_space_shape"] = list(V.shape)
        out.update(wall_s=time.perf_counter() - t0, scans=int(aligned.shape[0]), voxels=int(aligned.shape[1]),
                   copied=not isinstance(aligned, np.memmap))
    elif stage in ("normative_group_map", "normative_group_map_before"):
        from brainvae.memmaps import MatrixFile

        values = MatrixFile(cohort / "voxels.npy") if stage == "normative_group_map" else np.load(
            cohort / "voxels.npy", mmap_mode="r")
        n_scans = values.shape[0]
        in_a = np.arange(n_scans) < n_scans // 2
        out["baseline_rss_mib"] = _status_kb("VmRSS") / 1024
        t0 = time.perf_counter()
        if stage == "normative_group_map":
            from brainvae.analysis.normative import group_map

            result = group_map(values, in_a, np.ones(values.shape[1], bool), n_permutations=args.permutations)
            threshold = result.threshold
        else:
            # The code before: the z-maps of every analysed scan on the grid in memory, float64 copies of each
            # group inside the mask, one Welch t over the pooled copy per permutation.
            mask = np.asarray(np.load(cohort / "cohort_mask.npy", mmap_mode="r")[0]) >= 0  # the whole grid
            inside = np.zeros(mask.shape, bool)
            inside.reshape(-1)[: values.shape[1]] = True
            zmaps = np.zeros((n_scans, *mask.shape), np.float32)
            for i in range(n_scans):
                zmaps[i][inside] = values[i]

            def welch(a: np.ndarray, b: np.ndarray) -> np.ndarray:
                va, vb = a.var(axis=0, ddof=1), b.var(axis=0, ddof=1)
                se = np.sqrt(va / len(a) + vb / len(b))
                return np.divide(a.mean(axis=0) - b.mean(axis=0), se, out=np.zeros(se.shape), where=se > 0)

            a = np.asarray(zmaps[in_a], np.float64)[:, inside]
            b = np.asarray(zmaps[~in_a], np.float64)[:, inside]
            pooled = np.concatenate([a, b])
            welch(a, b)
            rng = np.random.default_rng(0)
            maxima = np.empty(args.permutations)
            for i in range(args.permutations):
                order = rng.permutation(len(pooled))
                maxima[i] = np.abs(welch(pooled[order[: len(a)]], pooled[order[len(a):]])).max()
            threshold = float(np.quantile(maxima, 0.95))
        out.update(wall_s=time.perf_counter() - t0, scans=int(n_scans), voxels=int(values.shape[1]),
                   permutations=args.permutations, threshold=float(threshold))
    else:
        raise SystemExit(f"unknown stage {stage!r}")
    return out


def measure(stage: str, cohort: Path, args: argparse.Namespace) -> dict:
    """Run ``stage`` in a fresh subprocess; its result with ``peak_rss_mib`` (the child's VmHWM)."""
    env = {**os.environ, **{v: str(args.threads) for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                            "MKL_NUM_THREADS")}}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
    command = [sys.executable, __file__, "--child", stage, "--cohort", str(cohort),
               "--train-fraction", str(args.train_fraction), "--components", str(args.components),
               "--test", str(args.test), "--permutations", str(args.permutations)]
    t0 = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"stage {stage} failed:\n{done.stdout}\n{done.stderr}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_s"] = elapsed
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scans", type=int, default=1000)
    parser.add_argument("--shape", type=int, nargs=3, default=(80, 96, 80), metavar=("X", "Y", "Z"),
                        help="the grid (default the 2 mm grid 80 96 80)")
    parser.add_argument("--train-fraction", type=float, default=0.7)
    parser.add_argument("--components", type=int, default=32)
    parser.add_argument("--test", type=int, default=50, help="test rows reconstructed by the PCA baseline")
    parser.add_argument("--threads", type=int, default=1, help="BLAS threads of each stage")
    parser.add_argument("--permutations", type=int, default=100,
                        help="label permutations of the normative group map stages (time grows with them, memory not)")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--tmp", type=Path, default=Path("/tmp"), help="where the temporary cohort is written")
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "memory.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--cohort", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        result = run_stage(args.child, args.cohort, args)
        result["peak_rss_mib"] = _status_kb("VmHWM") / 1024
        print(json.dumps(result))
        return

    shape = tuple(args.shape)
    stages = [s for s in STAGES if s in args.stages]
    if (any((s.startswith("voxel_") and s != "voxel_matrix") or s.startswith("normative_") for s in stages)
            and "voxel_matrix" not in stages):
        stages.insert(0, "voxel_matrix")  # the voxel stages read its matrix
    workdir = Path(tempfile.mkdtemp(prefix="bench_memory_", dir=args.tmp))
    try:
        t0 = time.perf_counter()
        sizes = write_cohort(workdir, args.scans, shape)
        generate_s = time.perf_counter() - t0
        print(f"wrote {args.scans} scans of {shape} ({sizes['cohort_array_bytes'] / 1e9:.2f} GB) in {generate_s:.1f} s")
        results = {}
        for stage in sorted(stages, key=lambda s: s != "voxel_matrix"):
            results[stage] = measure(stage, workdir, args)
            r = results[stage]
            print(f"{stage:24s} peak RSS {r['peak_rss_mib']:8.1f} MiB (after imports {r['baseline_rss_mib']:6.1f} MiB), "
                  f"{r['wall_s']:7.1f} s")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    array_mb = sizes["cohort_array_bytes"] / 2**20
    voxel_bytes = results.get("voxel_matrix", {}).get("voxel_matrix_bytes")
    summary = {
        "benchmark": "memory",
        "command": " ".join(["python benchmarks/bench_memory.py", *sys.argv[1:]]),
        "scans": args.scans, "shape": list(shape), "dtype": "float32", "train_fraction": args.train_fraction,
        "components": args.components, "test_rows": args.test, "threads": args.threads,
        "cohort_array_bytes": sizes["cohort_array_bytes"], "cohort_array_mib": round(array_mb, 1),
        "cohort_array_gb": round(sizes["cohort_array_bytes"] / 1e9, 3),
        "mask_array_bytes": sizes["mask_array_bytes"], "voxel_matrix_bytes": voxel_bytes,
        "goal": "each stage's peak RSS well below 2 x the cohort array",
        "goal_mib": round(2 * array_mb, 1), "generate_s": round(generate_s, 2),
        "stages": {s: {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}
                   for s, r in results.items()},
        "peak_over_array": {s: round(r["peak_rss_mib"] / array_mb, 3) for s, r in results.items()},
        "cpu_count": os.cpu_count(), "python": platform.python_version(), "machine": platform.machine(),
        "numpy": np.__version__,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"cohort array {array_mb:.0f} MiB; goal: peaks well below {2 * array_mb:.0f} MiB; wrote {args.json}")


if __name__ == "__main__":
    main()
