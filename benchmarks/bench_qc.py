"""Time :func:`brainvae.qc.qc_figure` on a real scan aligned to MNI (the QC picture of one scan).

    .venv/bin/python benchmarks/bench_qc.py --repeats 10

Uses the scan of ``tests/test_qc.py`` (IXI014, 2 mm in-plane, with its DLMUSE brain mask): aligns it
to the 2 mm MNI152 brain grid by a moments-initialised rigid registration, z-scores it in the mask
(what the workflow's preprocessed image looks like), warms the caches with one call (template load,
Canny edges), then times ``--repeats`` calls that draw the figure over the 1 mm MNI152 T1 edges.
Prints the median and minimum seconds and writes them to ``--json``
(default ``benchmarks/results/qc.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from brainvae import qc
from brainvae import skullstrip as ss
from brainvae.templates import mni152_brain

REPO = Path(__file__).resolve().parents[1]
IXI = REPO / "tests" / "data" / "real_t1w" / "ixi"
SCAN = IXI / "IXI014-HH-1236-T1_ds.nii.gz"
MASK = IXI / "dlmuse" / "IXI014-HH-1236-T1_ds_DLMUSE.nii.gz"


def preprocessed_scan() -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
    """The scan and its mask on the 2 mm MNI grid, z-scored in the mask, as in tests/test_qc.py."""
    import SimpleITK as sitk

    native = nib.load(SCAN)
    data = ss._volume(native)
    mask = (np.asarray(nib.load(MASK).dataobj) > 0).astype(np.float32)
    transform = ss._register_template(native, data, 1, "moments", True).GetInverse()
    grid = mni152_brain(2)
    ref = ss._to_sitk(np.zeros(grid.shape, np.float32), grid.affine)

    def warp(vol: np.ndarray, interp: int) -> np.ndarray:
        src = ss._to_sitk(vol.astype(np.float32), native.affine)
        return ss._from_sitk(sitk.Resample(src, ref, transform, interp, 0.0))

    x = warp(data, sitk.sitkLinear)
    m = warp(mask, sitk.sitkNearestNeighbor) > 0.5
    inside = x[m]
    x = np.where(m, (x - inside.mean()) / inside.std(), 0.0).astype(np.float32)
    return nib.Nifti1Image(x, grid.affine), nib.Nifti1Image(m.astype(np.uint8), grid.affine)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "qc.json")
    args = parser.parse_args()

    t0 = time.perf_counter()
    image, mask = preprocessed_scan()
    print(f"aligned and z-scored {SCAN.name} in {time.perf_counter() - t0:.1f} s")
    edges_from = mni152_brain(1)
    title = "sub-IXI014  benchmark"
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        qc.qc_figure(image, mask, edges_from, Path(tmp) / "warm.png", title)
        first = time.perf_counter() - t0
        times = []
        for i in range(args.repeats):
            t0 = time.perf_counter()
            qc.qc_figure(image, mask, edges_from, Path(tmp) / f"qc{i}.png", title)
            times.append(time.perf_counter() - t0)
    result = {"benchmark": "qc_figure", "command": f"python benchmarks/bench_qc.py --repeats {args.repeats}",
              "scan": SCAN.name, "repeats": args.repeats,
              "first_call_s": round(first, 4), "median_s": round(statistics.median(times), 4),
              "min_s": round(min(times), 4), "max_s": round(max(times), 4),
              "cpu_count": os.cpu_count(), "python": platform.python_version(),
              "machine": platform.machine()}
    print(f"qc_figure: first (cold) call {first:.3f} s; warm: median {result['median_s']:.3f} s, "
          f"min {result['min_s']:.3f} s, max {result['max_s']:.3f} s over {args.repeats} runs")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
