"""Time :func:`brainvae.demo_cohort.generate_scan`: seconds per synthetic scan, one process.

    .venv/bin/python benchmarks/bench_demo_cohort.py --subjects 10

Generates the planned scans of ``--subjects`` subjects (both sites, default DS fraction) one after
the other into a temporary directory that is removed afterwards, and prints the one-off set-up time
(templates, regions, site contrasts, DS field) and the time per scan (wall and CPU) with its breakdown.
"""

from __future__ import annotations

import argparse
import os

# One thread, as in the per-scan budget (must be set before numpy is imported).
for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

from brainvae import demo_cohort  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=10)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--ds-strength", type=float, default=1.0)
    args = parser.parse_args(argv)

    plan = demo_cohort.plan_cohort(args.subjects, args.seed)
    start = time.perf_counter()
    for site in sorted({r["dataset"] for r in plan}):
        demo_cohort._site_head(site)
    if args.ds_strength and any(r["group"] == "DS" for r in plan):
        demo_cohort._ds_field(float(args.ds_strength))
    setup = time.perf_counter() - start

    timings: dict[str, float] = {}
    per_scan, cpu = [], []
    with tempfile.TemporaryDirectory(prefix="bench_demo_") as tmp:
        for record in plan:
            start, start_cpu = time.perf_counter(), time.process_time()
            demo_cohort.generate_scan(record, tmp, args.seed, args.ds_strength, timings=timings)
            per_scan.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
            print(f"{record['path']}: {per_scan[-1]:.2f} s (cpu {cpu[-1]:.2f} s)")
    n = len(per_scan)
    print(f"set-up (once per process): {setup:.1f} s")
    print(f"{n} scans: {statistics.mean(per_scan):.2f} s per scan (median {statistics.median(per_scan):.2f}, "
          f"max {max(per_scan):.2f}); cpu {statistics.mean(cpu):.2f} s per scan "
          "(wall > cpu means other processes shared the cores)")
    print("per scan: " + ", ".join(f"{k} {v / n:.2f} s" for k, v in timings.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
