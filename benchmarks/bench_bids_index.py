"""Time :func:`brainvae.inputs.collect_samples` on a synthetic BIDS tree.

    .venv/bin/python benchmarks/bench_bids_index.py --subjects 5000

Builds ``--subjects`` subjects with empty T1w files (every 10th subject has two sessions), plus
a derivatives/ tree of the same size that must be ignored, in a temporary directory, then prints
the indexing time in seconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from brainvae.inputs import collect_samples


def build_tree(root: Path, n_subjects: int) -> int:
    """Create the tree; return the number of T1w scans in it."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(
        json.dumps({"Name": "bench", "BIDSVersion": "1.9.0"}))
    lines = ["participant_id\tgroup\tage"]
    n_scans = 0
    for i in range(n_subjects):
        sub = f"{i:05d}"
        lines.append(f"sub-{sub}\t{'DS' if i % 3 == 0 else 'euploid'}\t{20 + i % 50}")
        # 10% of subjects have two sessions, the rest none (a flat sub-*/anat layout).
        sessions = ["1", "2"] if i % 10 == 0 else [None]
        for ses in sessions:
            rel = f"sub-{sub}/ses-{ses}/anat" if ses else f"sub-{sub}/anat"
            name = f"sub-{sub}_ses-{ses}_T1w.nii.gz" if ses else f"sub-{sub}_T1w.nii.gz"
            for top in (root, root / "derivatives" / "pipe"):
                (top / rel).mkdir(parents=True, exist_ok=True)
                (top / rel / name).touch()
                (top / rel / name.replace(".nii.gz", ".json")).write_text("{}")
            n_scans += 1
    (root / "participants.tsv").write_text("\n".join(lines) + "\n")
    return n_scans


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "bench"
        t0 = time.perf_counter()
        n_scans = build_tree(root, args.subjects)
        print(f"built {args.subjects} subjects / {n_scans} scans in "
              f"{time.perf_counter() - t0:.1f} s")
        config = [{"name": "bench", "bids_dir": str(root), "role": "both",
                   "label_column": "group", "labels": ["euploid", "DS"], "covariates": ["age"]}]
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            table = collect_samples(config)
            times.append(time.perf_counter() - t0)
        assert len(table) == n_scans, (len(table), n_scans)
        print(f"collect_samples: {args.subjects} subjects / {n_scans} scans: "
              f"median {statistics.median(times):.2f} s, min {min(times):.2f} s "
              f"over {args.repeats} runs")


if __name__ == "__main__":
    main()
