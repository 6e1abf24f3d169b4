"""Time the synthetic cohort generator: seconds per scan (one process), or a whole template-space cohort.

    .venv/bin/python benchmarks/bench_demo_cohort.py --sites IXI=4 ABCDS=4        # raw (native) scans
    .venv/bin/python benchmarks/bench_demo_cohort.py --sites SantPau=20:0.5       # template-space scans
    .venv/bin/python benchmarks/bench_demo_cohort.py --sites HCP=500 SantPau=500:0.5 --jobs 2 --cohort
        # the 1,000-subject template-space benchmark cohort, written with generate_cohort (goal: minutes)

Per-scan mode generates the planned scans one after the other into a temporary directory that is removed
afterwards and prints the one-off set-up time (templates, regions, site contrasts) and the time per scan
(wall and CPU) with its breakdown. ``--cohort`` times ``generate_cohort`` with ``--jobs`` processes and
writes ``benchmarks/results/demo_cohort.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

# One thread, as in the per-scan budget (must be set before numpy is imported).
for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from brainvae import demo_cohort  # noqa: E402
from brainvae.cli import _site_setting  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "demo_cohort.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", nargs="+", type=_site_setting, default=[_site_setting("IXI=5"),
                                                                            _site_setting("SantPau=5:0.5")])
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--ds-strength", type=float, default=1.0)
    parser.add_argument("--cohort", action="store_true", help="time generate_cohort as a whole")
    parser.add_argument("--jobs", type=int, default=1)
    args = parser.parse_args(argv)
    sites = dict(args.sites)

    plan = demo_cohort.plan_cohort(None, args.seed, sites=sites, session_fraction=0.0, ds_strength=args.ds_strength)
    start = time.perf_counter()
    demo_cohort.reference()
    for site in sites:
        demo_cohort._site_head(site)
    setup = time.perf_counter() - start
    if args.cohort:
        with tempfile.TemporaryDirectory(prefix="bench_demo_") as tmp:
            start = time.perf_counter()
            demo_cohort.generate_cohort(tmp, None, args.seed, ds_strength=args.ds_strength, sites=sites,
                                        n_jobs=args.jobs, session_fraction=0.0)
            elapsed = time.perf_counter() - start
        result = {"benchmark": "generate_cohort", "command": "python benchmarks/bench_demo_cohort.py " + " ".join(sys.argv[1:]),
                  "sites": sites, "scans": len(plan), "jobs": args.jobs, "seconds": round(elapsed, 1),
                  "seconds_per_scan_per_job": round(elapsed * args.jobs / len(plan), 3),
                  "setup_seconds": round(setup, 1), "cpu_count": os.cpu_count()}
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        return 0

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
