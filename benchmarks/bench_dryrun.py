"""Time planning the whole workflow on a large cohort, and a no-op rerun of a finished run.

    .venv/bin/python benchmarks/bench_dryrun.py --subjects 5000 --layout auto   # plan, default: goal <= 30 s
    .venv/bin/python benchmarks/bench_dryrun.py --subjects 0 --noop .     # no-op rerun of the demo: goal <= 10 s

Planning: builds a synthetic BIDS tree of ``--subjects`` subjects with empty T1w files (the tree of
bench_bids_index.py: every 10th subject has two sessions, plus a derivatives/ tree to ignore) in a temporary
folder and times ``snakemake --dry-run --quiet rules`` of ``rule all`` on it: one Snakemake start, BIDS indexing,
the whole DAG (7 per-scan rules per scan, or 1 with ``preprocess.one_job_per_scan``: ``--layout``; then the
cohort, VAE and analysis jobs), with the workstation profile or, ``--profile slurm``, the SLURM profile (which
also forms the group jobs of 10 scans).

No-op rerun: ``--noop DIR`` is the working folder of a finished run (``.`` for ``make demo``'s results/, with
``--configfile`` if it was not config/config.yaml). A dry run must first report nothing to do (otherwise the
benchmark stops: it never starts jobs); then the real run, ``snakemake --workflow-profile
workflow/profiles/default``, is timed, and must do nothing and leave every file under output_dir untouched.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from bench_bids_index import build_tree

REPO = Path(__file__).resolve().parents[1]
NOTHING_TO_DO = "Nothing to be done"


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def snakemake(workdir: Path, configfiles: list[Path], *args: str, profile: str = "default"
              ) -> tuple[float, float, subprocess.CompletedProcess]:
    """Run Snakemake once; return its wall time, its CPU time (user + system) and the completed process.

    Planning is single-threaded, so on a busy machine the CPU time is close to the wall time an idle core
    would give.
    """
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory",
               str(workdir), "--workflow-profile", str(REPO / "workflow" / "profiles" / profile),
               "--configfile", *map(str, configfiles), *args]
    cpu, start = children_cpu_seconds(), time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    elapsed, cpu = time.perf_counter() - start, children_cpu_seconds() - cpu
    if result.returncode != 0:
        raise SystemExit(f"snakemake failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return elapsed, cpu, result


def summary(walls: list[float], cpus: list[float]) -> str:
    return (f"wall median {statistics.median(walls):.1f} s (min {min(walls):.1f}), "
            f"CPU median {statistics.median(cpus):.1f} s over {len(walls)} run(s)")


def planned_job_count(output: str) -> int:
    """The 'total' line of Snakemake's job-stats table."""
    for line in output.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == "total" and parts[1].isdigit():
            return int(parts[1])
    raise SystemExit(f"no job-stats table in the dry run's output:\n{output[-2000:]}")


LAYOUTS = {"auto": "the default (preprocess.one_job_per_scan: auto)",
           "step": "one job per step (preprocess.one_job_per_scan: false)", "scan": "preprocess.one_job_per_scan: true"}
#: preprocess.one_job_per_scan of each layout.
ONE_JOB_PER_SCAN = {"auto": "auto", "step": False, "scan": True}


def bench_plan(n_subjects: int, repeats: int, cores: int, layouts: list[str], profile: str) -> None:
    cores_arg = ["--cores", str(cores)] if profile == "default" else []  # slurm: the profile's jobs
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "bids"
        start = time.perf_counter()
        n_scans = build_tree(root, n_subjects)
        print(f"built {n_subjects} subjects / {n_scans} scans in {time.perf_counter() - start:.1f} s")
        with open(REPO / "config" / "config.yaml") as handle:
            config = yaml.safe_load(handle)
        config["output_dir"] = str(Path(tmp) / "results")
        config["datasets"] = [{"name": "bench", "bids_dir": str(root), "role": "both", "label_column": "group",
                               "labels": ["euploid", "DS"], "covariates": ["age"]}]
        for layout in layouts:
            config["preprocess"]["one_job_per_scan"] = ONE_JOB_PER_SCAN[layout]
            configfile = Path(tmp) / f"config_{layout}.yaml"
            configfile.write_text(yaml.safe_dump(config))
            walls, cpus = [], []
            for _ in range(repeats):
                elapsed, cpu, result = snakemake(Path(tmp), [configfile], "--dry-run", "--quiet", "rules", *cores_arg,
                                                 profile=profile)
                walls.append(elapsed)
                cpus.append(cpu)
            jobs = planned_job_count(result.stdout + result.stderr)
            print(f"snakemake --dry-run, {profile} profile, {LAYOUTS[layout]}, {n_subjects} subjects / "
                  f"{n_scans} scans / {jobs} jobs: {summary(walls, cpus)} (goal <= 30 s)")


def output_files(folder: Path) -> dict[str, int]:
    """Every file under folder with its mtime (ns)."""
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def bench_noop(workdir: Path, configfiles: list[Path], repeats: int, cores: int, until: list[str]) -> None:
    configfiles = [path if path.is_absolute() else workdir / path for path in configfiles]
    config = {}
    for path in configfiles:
        with open(path) as handle:
            config.update(yaml.safe_load(handle) or {})
    outputs = workdir / config.get("output_dir", "results")
    targets = ["--until", *until] if until else []
    _, _, check = snakemake(workdir, configfiles, "--dry-run", "--cores", str(cores), *targets)
    if NOTHING_TO_DO not in check.stdout + check.stderr:
        raise SystemExit(f"{workdir}: the run is not finished (a dry run plans jobs); refusing to time a rerun "
                         f"that would start them:\n{check.stdout[-2000:]}")
    before = output_files(outputs)
    walls, cpus = [], []
    for _ in range(repeats):
        elapsed, cpu, result = snakemake(workdir, configfiles, "--cores", str(cores), *targets)
        if NOTHING_TO_DO not in result.stdout + result.stderr:
            raise SystemExit(f"the rerun did something:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
        walls.append(elapsed)
        cpus.append(cpu)
    changed = sorted(p for p, mtime in output_files(outputs).items() if before.get(p) != mtime)
    if changed:
        raise SystemExit(f"the no-op rerun touched {len(changed)} files under {outputs}, e.g. {changed[:5]}")
    print(f"no-op rerun of {outputs} ({len(before)} files): {summary(walls, cpus)} (goal <= 10 s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=5000, help="synthetic subjects to plan (0: skip)")
    parser.add_argument("--layout", nargs="+", choices=sorted(LAYOUTS), default=["auto", "step", "scan"],
                        help="preprocessing job layouts to plan: auto (the default), step (seven jobs per scan), scan (one job per scan)")
    parser.add_argument("--profile", choices=["default", "slurm"], default="default",
                        help="workflow profile to plan with: default (workstation) or slurm (grouped jobs)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--noop", type=Path, metavar="DIR", help="working folder of a finished run to rerun")
    parser.add_argument("--configfile", type=Path, nargs="+", default=[Path("config/config.yaml")],
                        help="config file(s) of that run, relative to DIR (default: config/config.yaml)")
    parser.add_argument("--until", nargs="+", metavar="RULE", help="the run stopped after these rules")
    args = parser.parse_args()
    if args.subjects:
        bench_plan(args.subjects, args.repeats, args.cores, args.layout, args.profile)
    if args.noop:
        bench_noop(args.noop.resolve(), args.configfile, args.repeats, args.cores, args.until)


if __name__ == "__main__":
    main()
