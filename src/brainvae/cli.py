"""The ``brainvae`` command: tools that are useful outside the workflow too."""

from __future__ import annotations

import argparse
import sys
import time

from . import __version__
from .errors import BrainvaeError


def _demo_cohort(args: argparse.Namespace) -> int:
    from .demo_cohort import generate_cohort

    start = time.perf_counter()
    scans = generate_cohort(args.out, args.subjects, args.seed, ds_strength=args.ds_strength,
                            ds_fraction=args.ds_fraction, sites=tuple(args.sites), n_jobs=args.jobs)
    elapsed = time.perf_counter() - start
    print(f"wrote {len(scans)} scans of {args.subjects} subjects to {args.out} "
          f"in {elapsed:.1f} s ({elapsed / max(len(scans), 1):.2f} s per scan)")
    return 0


def _conform(args: argparse.Namespace) -> int:
    from .conform import conform_scan

    conform_scan(args.input, args.output, args.sidecar, volume_index=args.volume_index,
                 min_voxel_mm=args.min_voxel_mm, max_voxel_mm=args.max_voxel_mm,
                 max_anisotropy=args.max_anisotropy)
    print(f"wrote {args.output} and {args.sidecar}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="brainvae", description=__doc__)
    parser.add_argument("--version", action="version", version=f"brainvae {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo-cohort", help="generate the synthetic BIDS demo cohort with ground truth",
        description="Generate synthetic T1w BIDS datasets (one per site) from the MNI152 template: euploid and "
                    "DS-like morphology, per-subject variability, head pose, bias field and Rician noise, "
                    "with ground truth (native->MNI affine, bias field, brain mask) under OUT/truth.")
    demo.add_argument("out", help="output folder (one BIDS root per site is created inside)")
    demo.add_argument("--subjects", type=int, default=40, help="number of subjects over all sites (default 40)")
    demo.add_argument("--seed", type=int, default=2026, help="random seed (default 2026)")
    demo.add_argument("--ds-strength", type=float, default=1.0,
                      help="strength of the DS-like morphology, 0 = no group difference (default 1.0)")
    demo.add_argument("--ds-fraction", type=float, default=0.4, help="fraction of DS-like subjects (default 0.4)")
    demo.add_argument("--sites", nargs="+", default=["IXI", "HCP"], help="sites to generate (default IXI HCP)")
    demo.add_argument("--jobs", type=int, default=1, help="parallel processes (default 1)")
    demo.set_defaults(func=_demo_cohort)

    conform = commands.add_parser("conform", help="validate one T1w scan and reorient it to RAS")
    conform.add_argument("input")
    conform.add_argument("output", help="conformed .nii.gz")
    conform.add_argument("sidecar", help="JSON sidecar")
    conform.add_argument("--volume-index", type=int, default=None, help="volume to take from a 4D series")
    conform.add_argument("--min-voxel-mm", type=float, default=0.2, help="smallest allowed voxel size (0.2)")
    conform.add_argument("--max-voxel-mm", type=float, default=8.0, help="largest allowed voxel size (8)")
    conform.add_argument("--max-anisotropy", type=float, default=20.0,
                         help="largest allowed ratio of largest to smallest voxel size (20)")
    conform.set_defaults(func=_conform)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BrainvaeError as error:
        print(f"brainvae: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
