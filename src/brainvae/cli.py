"""The ``brainvae`` command: tools that are useful outside the workflow too."""

from __future__ import annotations

import argparse
import sys
import time

from . import __version__
from .errors import BrainvaeError


def _site_setting(text: str) -> tuple[str, dict[str, float]]:
    """``SantPau=40:0.5`` -> ``("SantPau", {"subjects": 40, "ds_fraction": 0.5})``."""
    name, _, counts = text.partition("=")
    subjects, _, fraction = counts.partition(":")
    try:
        return name, {"subjects": int(subjects), "ds_fraction": float(fraction or 0.0)}
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected SITE=SUBJECTS[:DS_FRACTION], e.g. SantPau=40:0.5")


def _demo_cohort(args: argparse.Namespace) -> int:
    from .config import schema_default
    from .demo_cohort import generate_cohort

    sites = dict(args.sites) if args.sites else schema_default("demo", "sites")
    ds_strength = schema_default("demo", "ds_strength") if args.ds_strength is None else args.ds_strength
    start = time.perf_counter()
    scans = generate_cohort(args.out, None, args.seed, ds_strength=ds_strength, sites=sites, n_jobs=args.jobs,
                            session_fraction=args.session_fraction)
    elapsed = time.perf_counter() - start
    print(f"wrote {len(scans)} scans of {sum(s['subjects'] for s in sites.values())} subjects to {args.out} "
          f"in {elapsed:.1f} s ({elapsed / max(len(scans), 1):.2f} s per scan)")
    return 0


def _conform(args: argparse.Namespace) -> int:
    from .conform import conform_scan

    conform_scan(args.input, args.output, args.sidecar, volume_index=args.volume_index,
                 min_voxel_mm=args.min_voxel_mm, max_voxel_mm=args.max_voxel_mm,
                 max_anisotropy=args.max_anisotropy)
    print(f"wrote {args.output} and {args.sidecar}")
    return 0


def _import(args: argparse.Namespace) -> int:
    from . import importers

    if args.command == "import-ixi":
        dataset = importers.ixi_dataset(args.src, args.demographics)
    elif args.command == "import-hcp":
        dataset = importers.hcp_dataset(args.src, args.behavioral, layout=args.layout)
    else:
        dataset = importers.table_dataset(args.csv, args.path_column, args.subject_column,
                                          args.session_column, args.columns)
    out = importers.write_dataset(dataset, args.out, copy=not args.symlink, force=args.force)
    for where, reason in dataset.skipped:
        print(f"skipped {where}: {reason}")
    for note in dataset.notes:
        print(f"note: {note}")
    print(f"wrote {len(dataset.scans)} T1w images of {len(dataset.participants)} participants to {out}"
          + (f"; {len(dataset.skipped)} skipped (listed above and in {out}/README)" if dataset.skipped else ""))
    return 0


def _config_reference(args: argparse.Namespace) -> int:
    from . import config_reference

    if args.output == "-":
        if args.check:
            raise BrainvaeError("--check compares a file: give --output PATH, not -")
        sys.stdout.write(config_reference.render_reference())
        return 0
    output = config_reference.DEFAULT_OUTPUT if args.output is None else args.output
    if args.check:
        problem = config_reference.check_reference(output)
        if problem:
            print(f"brainvae: error: {problem}", file=sys.stderr)
            return 1
        print(f"{output} is up to date with the schema")
        return 0
    print(f"wrote {config_reference.write_reference(output)}")
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
    demo.add_argument("--sites", nargs="+", type=_site_setting, metavar="SITE=SUBJECTS[:DS_FRACTION]",
                      help="sites to generate (IXI, ABCDS: raw scans; HCP, SantPau: template space), e.g. "
                           "IXI=6 HCP=60 SantPau=40:0.5 (default: the workflow's demo.sites)")
    demo.add_argument("--seed", type=int, default=2026, help="random seed (default 2026)")
    demo.add_argument("--ds-strength", type=float, default=None,
                      help="size of the DS effects, 0 = no group difference (default: the workflow's "
                           "demo.ds_strength)")
    demo.add_argument("--session-fraction", type=float, default=0.0,
                      help="share of subjects scanned twice (default 0)")
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

    common = argparse.ArgumentParser(add_help=False)
    placing = common.add_mutually_exclusive_group()
    placing.add_argument("--copy", dest="symlink", action="store_false",
                         help="copy the source images (the default: symlinks break when the source folder "
                              "moves or is unmounted)")
    placing.add_argument("--symlink", action="store_true",
                         help="link to the source images (absolute links) instead of copying them")
    common.set_defaults(symlink=False)
    common.add_argument("--force", action="store_true",
                        help="replace OUT when it holds an earlier brainvae import (never another folder)")
    out_help = "BIDS folder to create (must be missing or empty)"
    after = ("Writes sub-<label>/anat/sub-<label>_T1w.nii.gz with JSON sidecars, participants.tsv/.json, "
             "dataset_description.json and a README; every file or row left out is listed with the reason.")

    ixi = commands.add_parser(
        "import-ixi", parents=[common], help="IXI's flat folder of T1 images -> BIDS",
        description="Turn IXI's IXI###-<Site>-####-T1.nii.gz files into BIDS (sub-IXI002, ...), with the "
                    "site's scanner in each sidecar and age/sex from the demographics sheet. " + after)
    ixi.add_argument("src", help="folder with the IXI-T1 files")
    ixi.add_argument("out", help=out_help)
    ixi.add_argument("--demographics", help="IXI.xls saved as CSV (IXI_ID, SEX_ID 1=male 2=female, AGE); "
                                            ".xls/.xlsx only where pandas can read them")
    ixi.set_defaults(func=_import)

    hcp = commands.add_parser(
        "import-hcp", parents=[common], help="HCP subject folders -> BIDS",
        description="Turn HCP subject folders into BIDS (sub-100307, ...). " + after)
    hcp.add_argument("src", help="folder with one folder per HCP subject")
    hcp.add_argument("out", help=out_help)
    hcp.add_argument("--behavioral", help="HCP behavioural CSV (Subject, Gender M/F, Age as a range such as "
                                          "26-30: age is its midpoint, age_range keeps the range)")
    hcp.add_argument("--layout", choices=("auto", "unprocessed", "preprocessed"), default="auto",
                     help="unprocessed: <subject>/unprocessed/3T/T1w_MPR1/<subject>_3T_T1w_MPR1.nii.gz (MPR2 "
                          "as run 2); preprocessed: <subject>/T1w/T1w_acpc_dc_restore.nii.gz; auto (default): "
                          "unprocessed where a subject has it, else preprocessed (each sidecar's HCPLayout says)")
    hcp.set_defaults(func=_import)

    table = commands.add_parser(
        "import-table", parents=[common], help="a CSV of image paths and subjects -> BIDS",
        description="Turn any layout into BIDS from a table with one row per T1w image (.nii, .nii.gz; "
                    ".mgz/.mgh are converted to .nii.gz). Relative paths are relative to the table's folder. "
                    + after)
    table.add_argument("csv", help="CSV (or TSV) with one row per image")
    table.add_argument("out", help=out_help)
    table.add_argument("--path-column", default="path", help="column with the image path (default path)")
    table.add_argument("--subject-column", default="subject", help="column with the subject (default subject)")
    table.add_argument("--session-column", help="column with the session, if any")
    table.add_argument("--columns", nargs="+", default=[], metavar="COLUMN",
                       help="columns copied into participants.tsv (e.g. age sex group)")
    table.set_defaults(func=_import)

    reference = commands.add_parser(
        "config-reference", help="write the configuration reference (docs/configuration.md) from the schema",
        description="Render workflow/schemas/config.schema.yaml (every key, type, default and description) as "
                    "Markdown. --check fails when the file differs from the rendering of the current schema.")
    reference.add_argument("--output", default=None, metavar="PATH",
                           help="file to write or check (default: docs/configuration.md of the repository; "
                                "- writes to standard output)")
    reference.add_argument("--check", action="store_true",
                           help="write nothing; exit 1 with a message when PATH is missing or stale")
    reference.set_defaults(func=_config_reference)
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
