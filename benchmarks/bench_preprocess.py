"""Time, peak memory and accuracy of brainvae preprocessing vs a Clinica t1-linear-style baseline.

Usage::

    .venv/bin/python benchmarks/bench_preprocess.py [--threads 2] [--demo-n 3] [--demo-dir DIR]
        [--real chris_0.88mm brainchop_1mm] [--no-baseline] [--markdown out.md] [--json out.json]

Scans: ``--demo-n`` demo-cohort scans (generated into a temporary folder unless ``--demo-dir`` holds
a cohort made by ``brainvae demo-cohort`` / :func:`brainvae.demo_cohort.generate_cohort`; their true
native->MNI affine is known) and the ``--real`` scans (1 mm-ish real heads; time and memory only).

Each pipeline runs per scan in its own fresh subprocess, so ``ru_maxrss`` is that pipeline's peak RSS
on that scan (models and templates loaded included) and nothing is cached between scans.

* **brainvae** (all steps, including deepbet): conform -> N4 in a head mask -> level-1 affine
  (head -> Colin27 head) + the head resampled onto the mni1mm grid -> deepbet skull strip there ->
  level-2 affine (brain -> MNI152 brain) -> mask carried back to native + one cubic resampling
  to the 2 mm training grid + percentile normalisation -> QC metrics on a linear 2 mm resampling (as the
  workflow's rules resample and qc_scan do).
* **baseline** (Clinica ``t1-linear``-style, ANTsPy): ``ants.n4_bias_field_correction`` with its
  default iterations (4 x 50, shrink 4) on the conformed head, then
  ``ants.registration(type_of_transform="antsRegistrationSyNQuick[a]")`` of the whole head to the
  Colin27 head in MNI space (the MNI template with skull this project ships; Clinica uses
  MNI152NLin2009cSym with skull), then one resampling (``ants.apply_transforms``) onto the template.

Error (demo scans): mean |A x - A_true x| over the true native brain mask, ``A_true`` = the demo's
``native_to_mni_affine`` (least-squares affine of the exact map over the brain).

Python imports are done before either pipeline's clock starts (both import ANTsPy; brainvae also torch,
deepbet and nilearn); reading templates and the deepbet weights is timed.

Times are wall and CPU (user + system of the whole process, all threads) seconds; the machine may be
shared, so CPU time is the steadier number.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REAL = REPO / "tests" / "data" / "real_t1w"
REAL_SCANS = {
    "chris_0.88mm": REAL / "niivue" / "chris_t1.nii.gz",
    "brainchop_1mm": REAL / "brainchop" / "t1_crop.nii.gz",
    "ixi012_2mm": REAL / "ixi" / "IXI012-HH-1211-T1_ds.nii.gz",
    "ms03_3mm_slices": REAL / "open_ms" / "longitudinal_raw_patient03_study2_T1W.nii.gz",
}
STEPS = ("conform", "n4", "level1", "skullstrip", "level2", "resample", "qc")


# ----------------------------------------------------------------------------- child processes
def _timer(out: dict):
    def step(name, fn, *a, **k):
        t0, c0 = time.perf_counter(), time.process_time()
        r = fn(*a, **k)
        out["steps"][name] = {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}
        return r
    return step


def _error(affine, truth_json: str | None, truth_mask: str | None) -> float | None:
    if not truth_json:
        return None
    import nibabel as nib
    import numpy as np

    truth = np.asarray(json.loads(Path(truth_json).read_text())["native_to_mni_affine"])
    m = nib.load(truth_mask)
    idx = np.argwhere(np.asarray(m.dataobj)[::2, ::2, ::2] > 0) * 2
    pts = np.c_[idx @ m.affine[:3, :3].T + m.affine[:3, 3], np.ones(len(idx))]
    return float(np.linalg.norm((pts @ np.asarray(affine).T - pts @ truth.T)[:, :3], axis=1).mean())


def _conformed(path: str):
    """The conformed (RAS, float32) image both pipelines start from."""
    import nibabel as nib
    import numpy as np

    from brainvae.conform import conform_image

    img, _ = conform_image(nib.load(path), source=path)
    return nib.Nifti1Image(np.asarray(img.dataobj, np.float32), img.affine)


def child_ours(path: str, threads: int, truth_json: str | None, truth_mask: str | None) -> dict:
    from brainvae.bias import set_threads

    set_threads(threads)
    import nibabel as nib
    import numpy as np

    from brainvae import qc
    from brainvae import registration as reg
    from brainvae.bias import n4_bias_correct
    from brainvae.preprocess import preprocess_image
    from brainvae.resample import resample_to_grids
    from brainvae.skullstrip import skullstrip

    # Import, before the clock starts, the modules the steps import lazily (ANTsPy ~2.5 s, torch and
    # deepbet ~2 s, nilearn.datasets ~1.5 s here): the baseline imports ANTsPy before its clock starts
    # too, so both are timed on the same footing: the work on the scan, templates and models read included.
    import ants  # noqa: F401
    import deepbet.bet  # noqa: F401
    import nilearn.datasets  # noqa: F401
    import torch  # noqa: F401

    out: dict = {"steps": {}}
    step = _timer(out)
    t0, c0 = time.perf_counter(), time.process_time()

    img = step("conform", _conformed, path)
    corrected, _, head = step("n4", n4_bias_correct, img)

    def level1():
        l1 = reg.level1_affine(corrected, head)
        (aligned,) = resample_to_grids(corrected, l1.affine, ["mni1mm"], order=1)
        return l1.affine, aligned

    l1, aligned = step("level1", level1)
    mask_l1 = step("skullstrip", skullstrip, aligned, "deepbet", threads)
    l2 = step("level2", reg.level2_affine, corrected, mask_l1, l1, mask_space="level1").affine

    def resample():
        m = reg.mask_to_native(mask_l1, corrected, "level1", l1)
        mask_native = nib.Nifti1Image(m.astype(np.uint8), corrected.affine)
        return (mask_native, *preprocess_image(corrected, mask_native, l2, "2mm", method="percentile"))

    mask_native, _, _, _ = step("resample", resample)

    def qc_metrics():  # as brainvae.steps.qc_file: its own linear resampling onto the 2 mm grid
        image, mask, _ = preprocess_image(corrected, mask_native, l2, "2mm", order=1, method="percentile")
        return qc.qc_metrics(image, mask, mask_native, corrected)

    metrics = step("qc", qc_metrics)
    out["total_wall_s"] = time.perf_counter() - t0
    out["total_cpu_s"] = time.process_time() - c0
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["shape"] = list(img.shape)
    out["zooms"] = [round(float(z), 3) for z in img.header.get_zooms()[:3]]
    out["brain_volume_ml"] = metrics["brain_volume_ml"]
    out["qc_flags"] = qc.qc_flags(metrics)
    out["affine"] = l2.tolist()
    out["error_mm"] = _error(l2, truth_json, truth_mask)
    return out


def child_baseline(path: str, threads: int, truth_json: str | None, truth_mask: str | None) -> dict:
    from brainvae.bias import set_threads

    set_threads(threads)
    import ants

    from brainvae import registration as reg
    from brainvae import templates

    out: dict = {"steps": {}}
    step = _timer(out)
    t0, c0 = time.perf_counter(), time.process_time()

    img = step("conform", _conformed, path)
    n4 = step("n4", ants.n4_bias_field_correction, reg.to_ants(img))  # defaults: 4 x 50, shrink 4
    fixed = reg.to_ants(templates.colin27_head())
    r = step("registration", ants.registration, fixed=fixed, moving=n4,
             type_of_transform="antsRegistrationSyNQuick[a]")
    step("resample", ants.apply_transforms, fixed=fixed, moving=n4,
         transformlist=r["fwdtransforms"], interpolator="bSpline")
    tx = ants.read_transform(r["fwdtransforms"][0], precision="double")
    a = reg.itk_to_ras(reg.ants_transform_to_matrix(tx))
    out["total_wall_s"] = time.perf_counter() - t0
    out["total_cpu_s"] = time.process_time() - c0
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["affine"] = a.tolist()
    out["error_mm"] = _error(a, truth_json, truth_mask)
    return out


# ----------------------------------------------------------------------------- driver
def _run(kind: str, path: Path, threads: int, truth: tuple[Path, Path] | None) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, str(path), "--threads", str(threads)]
    if truth is not None:
        cmd += ["--truth", str(truth[0]), str(truth[1])]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if res.returncode != 0:
        return {"error": res.stderr[-1500:]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def _demo_scans(demo_dir: Path | None, n: int, keep: list) -> list[tuple[str, Path, tuple[Path, Path]]]:
    from brainvae.demo_cohort import generate_cohort, truth_paths

    if demo_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="brainvae_bench_demo_")
        keep.append(tmp)
        demo_dir = Path(tmp.name)
        records = generate_cohort(demo_dir, n, seed=0, session_fraction=0.0)
    else:
        records = json.loads((demo_dir / "truth" / "cohort.json").read_text())["scans"]
    scans = []
    for r in records[:n]:
        tp = truth_paths(r)
        name = f"demo_{r['subject']}" + (f"_ses-{r['session']}" if r.get("session") else "")
        scans.append((name, demo_dir / r["path"], (demo_dir / tp["truth"], demo_dir / tp["brain_mask"])))
    return scans


def _fmt(v, nd=1) -> str:
    return "n/a" if v is None else f"{v:.{nd}f}"


def markdown(rows: list[dict], threads: int) -> str:
    head = (["scan", "voxels (mm)"] + [f"{s} s" for s in STEPS]
            + ["total wall s", "total CPU s", "peak RSS MB", "error mm", "flags",
               "baseline wall s", "baseline CPU s", "baseline RSS MB", "baseline error mm",
               "speed-up (wall)", "speed-up (CPU)"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        o, b = r.get("ours", {}), r.get("baseline", {})
        if "error" in o:
            lines.append(f"| {r['name']} | ERROR: {o['error'].splitlines()[-1][:120]} |")
            continue
        cells = [r["name"], "x".join(f"{z:g}" for z in o["zooms"])]
        cells += [f"{o['steps'][s]['wall_s']:.1f} ({o['steps'][s]['cpu_s']:.1f})" for s in STEPS]
        cells += [_fmt(o["total_wall_s"]), _fmt(o["total_cpu_s"]), _fmt(o["peak_rss_mb"], 0),
                  _fmt(o["error_mm"], 2), ",".join(o["qc_flags"]) or "-"]
        if b and "error" not in b:
            cells += [_fmt(b["total_wall_s"]), _fmt(b["total_cpu_s"]), _fmt(b["peak_rss_mb"], 0),
                      _fmt(b["error_mm"], 2), f"{b['total_wall_s'] / o['total_wall_s']:.1f}x",
                      f"{b['total_cpu_s'] / o['total_cpu_s']:.1f}x"]
        else:
            cells += ["n/a"] * 6 if not b else ["ERROR"] + ["n/a"] * 5
        lines.append("| " + " | ".join(cells) + " |")
    ok = [r for r in rows if "error" not in r.get("ours", {"error": 1})]
    if ok:
        n = len(ok)
        mean = lambda f: sum(f(r) for r in ok) / n  # noqa: E731
        lines.append("")
        lines.append(f"Mean over {n} scans ({threads} threads): brainvae "
                     f"{mean(lambda r: r['ours']['total_wall_s']):.1f} s wall / "
                     f"{mean(lambda r: r['ours']['total_cpu_s']):.1f} s CPU, peak RSS max "
                     f"{max(r['ours']['peak_rss_mb'] for r in ok):.0f} MB.")
        withb = [r for r in ok if r.get("baseline") and "error" not in r["baseline"]]
        if withb:
            sw = sum(r["baseline"]["total_wall_s"] for r in withb) / sum(r["ours"]["total_wall_s"] for r in withb)
            sc = sum(r["baseline"]["total_cpu_s"] for r in withb) / sum(r["ours"]["total_cpu_s"] for r in withb)
            lines.append(f"Baseline on {len(withb)} scans: speed-up {sw:.1f}x wall, {sc:.1f}x CPU (sum of times).")
    lines.append("")
    lines.append("Step cells: wall s (CPU s). Error: mean displacement vs the true affine over the true "
                 "brain mask (demo scans only).")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--demo-n", type=int, default=3, help="number of demo scans (0: none)")
    p.add_argument("--demo-dir", type=Path, help="existing demo cohort (default: generate one)")
    p.add_argument("--real", nargs="*", default=["chris_0.88mm", "brainchop_1mm"],
                   choices=sorted(REAL_SCANS))
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--markdown", type=Path, help="also write the Markdown table here")
    p.add_argument("--json", type=Path)
    p.add_argument("--child", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    p.add_argument("--truth", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        kind, path = args.child
        fn = child_ours if kind == "ours" else child_baseline
        t = args.truth or (None, None)
        print(json.dumps(fn(path, args.threads, t[0], t[1])))
        return 0

    keep: list = []
    scans = _demo_scans(args.demo_dir, args.demo_n, keep) if args.demo_n > 0 else []
    scans += [(n, REAL_SCANS[n], None) for n in args.real]
    rows = []
    for name, path, truth in scans:
        row = {"name": name, "ours": _run("ours", path, args.threads, truth)}
        if not args.no_baseline:
            row["baseline"] = _run("baseline", path, args.threads, truth)
        rows.append(row)
        o, b = row["ours"], row.get("baseline", {})
        print(f"{name}: ours {_fmt(o.get('total_wall_s'))} s wall / {_fmt(o.get('total_cpu_s'))} s CPU, "
              f"error {_fmt(o.get('error_mm'), 2)} mm | baseline {_fmt(b.get('total_wall_s'))} s wall, "
              f"error {_fmt(b.get('error_mm'), 2)} mm" + (" | ERROR" if "error" in o or "error" in b else ""),
              file=sys.stderr, flush=True)
    table = markdown(rows, args.threads)
    print(table)
    if args.markdown:
        args.markdown.write_text(table)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
