"""Training speed of the real training path (``brainvae.vae.trainer``) on a GPU, on all visible GPUs with DDP, or
on CPU: volumes/s, GPU utilisation, peak GPU memory, and the fraction of time spent waiting for data.

    # one H100 (what benchmarks/results/train_gpu.json holds), then DDP on every visible GPU:
    .venv/bin/python benchmarks/bench_train_gpu.py --device cuda --grids 4mm 2mm 1mm --processes 1 all
    # CPU mode (what CI runs, tiny grid; DDP over gloo with 2 processes):
    .venv/bin/python benchmarks/bench_train_gpu.py --device cpu --shape 16 16 16 --scans 8 --processes 1 2 \
        --json /tmp/train_cpu.json

For each grid (``4mm`` 40x48x40, ``2mm`` 80x96x80, ``1mm`` 160x192x160, or ``--shape``) a synthetic cohort of
``--scans`` smooth random volumes (float16 memmap with masks, as ``cohort_array`` writes it) is written to a
temporary folder, and each variant (``dense``: the default dense VAE; ``spatial``: the default spatial VAE;
``spatial_small``: the paper's smallest latent, 3^3 at 1 mm, i.e. the largest downsampling that divides the
grid) is trained by ``train_vae_parallel`` for ``--epochs`` epochs with the workflow's defaults (bf16 autocast
on CUDA, channels_last_3d, the cohort cached on the GPU when it fits) plus ``--config``. The first epoch (cuDNN
autotuning, compilation, cache fill) is left out of the figures:

- ``volumes_per_s``: training volumes per second (all processes together), mean of the other epochs;
- ``gpu_util``: mean NVML utilisation of the GPUs in use, sampled every 0.2 s during training (needs
  ``nvidia-ml-py``; null without it);
- ``peak_gpu_memory_mb``: ``torch.cuda.max_memory_allocated`` of rank 0;
- ``loader_wait_fraction``: share of a training epoch spent waiting for the next batch;
- ``scaling_efficiency`` (DDP rows): volumes/s on N processes / (N x volumes/s on one).

Goals on one H100 (issue 18): >= 1,000 volumes/s at 2 mm and >= 150 at 1 mm for the dense and the smallest
spatial model, GPU busy >= 90 %, DDP scaling efficiency >= 85 %.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from bench_memory import write_cohort as write_memmap_cohort  # noqa: E402
from brainvae.resample import GRIDS  # noqa: E402
from brainvae.vae.config import spatial_factor_for  # noqa: E402
from brainvae.vae.trainer import train_vae_parallel  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "train_gpu.json"
GRID_NAMES = {"4mm": "demo", "2mm": "2mm", "1mm": "1mm"}
VOXEL_MM = {"4mm": 4.0, "2mm": 2.0, "1mm": 1.0}


def grid_shape(name: str) -> tuple[int, int, int]:
    return tuple(int(s) for s in GRIDS[GRID_NAMES.get(name, name)].shape)  # type: ignore[return-value]


def write_cohort(folder: Path, n: int, shape: tuple[int, int, int], seed: int = 0) -> dict[str, Path]:
    """``n`` smooth random volumes in ellipsoidal masks (float16, as ``cohort_array`` writes them; the writer of
    bench_memory.py), and splits: one in eight scans for validation, the rest for training."""
    write_memmap_cohort(folder, n, shape, seed, dtype="<f2")
    scans = pd.read_csv(folder / "cohort_index.tsv", sep="\t")["scan"].tolist()
    n_val = max(1, n // 8)
    split = ["train"] * (n - n_val) + ["val"] * n_val
    pd.DataFrame({"scan": scans, "split": split}).to_csv(folder / "splits.tsv", sep="\t", index=False)
    return {name: folder / name for name in ("cohort.npy", "cohort_mask.npy", "cohort_index.tsv", "splits.tsv")}


def variant_config(variant: str, shape: tuple[int, int, int], voxel_mm: float) -> dict[str, Any]:
    if variant == "dense":
        return {"architecture": "dense"}
    if variant == "spatial":
        return {"architecture": "spatial"}
    if variant == "spatial_small":  # the paper's 3^3 latent of 1 mm inputs: downsampling 64 at 1 mm
        return {"architecture": "spatial", "spatial": {"downsample": spatial_factor_for(shape, 64, voxel_mm)}}
    raise SystemExit(f"unknown variant {variant!r}")


class UtilisationSampler:
    """Mean NVML utilisation of some GPUs, sampled in a thread (None without nvidia-ml-py or a GPU)."""

    def __init__(self, devices: list[int], every_s: float = 0.2) -> None:
        self.devices, self.every_s, self.samples = devices, every_s, []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in devices]
            self._nvml = pynvml
        except Exception:  # no NVML: no figure, not a failure
            self._nvml = None

    def __enter__(self) -> UtilisationSampler:
        if self._nvml is not None and self.devices:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.samples.append(np.mean([self._nvml.nvmlDeviceGetUtilizationRates(h).gpu for h in self._handles]))

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def mean(self, skip_first_s: float) -> float | None:
        skip = int(skip_first_s / self.every_s)
        kept = self.samples[skip:] or self.samples
        return float(np.mean(kept)) / 100 if kept else None


def run_one(files: dict[str, Path], work: Path, config: dict[str, Any], *, device: str, processes: int,
            threads: int) -> dict[str, Any]:
    out = work / f"model_{processes}"
    gpus = list(range(processes)) if device == "cuda" else []
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    with UtilisationSampler(gpus) as sampler:
        metrics = train_vae_parallel(config, files["cohort.npy"], files["cohort_mask.npy"], files["cohort_index.tsv"],
                                     files["splits.tsv"], out, checkpoint_dir=work / f"ckpt_{processes}",
                                     processes_per_node=processes, device=device, threads=threads,
                                     progress=False, keep_checkpoint=False, model_name="bench")
    wall = time.perf_counter() - started
    log = pd.read_csv(out / "training_log.tsv", sep="\t")
    timed = log.iloc[1:] if len(log) > 1 else log
    first_epoch_s = float(log["seconds"].iloc[0])
    return {
        "processes": processes,
        "volumes_per_s": float(timed["volumes_per_s"].mean()),
        "loader_wait_fraction": float(timed["loader_wait_fraction"].mean()),
        "gpu_util": sampler.mean(skip_first_s=first_epoch_s),
        "peak_gpu_memory_mb": metrics.get("peak_device_memory_mb"),
        "first_epoch_s": first_epoch_s,
        "wall_s": wall,
        "amp": metrics.get("amp_dtype"),
        "cache_on_device": metrics.get("cache_on_device"),
        "compiled": metrics.get("compiled"),
        "parameters": metrics.get("parameters"),
        "n_train": metrics.get("n_train"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--grids", nargs="+", default=["4mm", "2mm", "1mm"], choices=sorted(GRID_NAMES))
    ap.add_argument("--shape", nargs=3, type=int, help="one grid of this shape instead of --grids (tests)")
    ap.add_argument("--variants", nargs="+", default=["dense", "spatial_small", "spatial"])
    ap.add_argument("--scans", type=int, default=None, help="default: 512 (1 mm: 128) on CUDA, 16 on CPU")
    ap.add_argument("--epochs", type=int, default=3, help="the first is left out of the figures")
    ap.add_argument("--batch", type=int, default=None, help="global batch; default 32 (1 mm: 8) on CUDA, 4 on CPU")
    ap.add_argument("--processes", nargs="+", default=["1"], help="process counts; 'all' = every visible GPU")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads per process")
    ap.add_argument("--compile", action="store_true", help="also time each variant with torch.compile")
    ap.add_argument("--config", default="{}", help="JSON training overrides for every run")
    ap.add_argument("--json", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU here; use --device cpu")
    visible = torch.cuda.device_count() if args.device == "cuda" else 2
    counts = sorted({visible if p == "all" else int(p) for p in args.processes})
    if args.device == "cuda" and max(counts) > visible:
        raise SystemExit(f"--processes {max(counts)}: only {visible} GPU(s) visible")
    grids = [("custom", tuple(args.shape), 4.0)] if args.shape else [
        (g, grid_shape(g), VOXEL_MM[g]) for g in args.grids]
    overrides = json.loads(args.config)
    rows: list[dict[str, Any]] = []
    for grid, shape, voxel_mm in grids:
        cuda = args.device == "cuda"
        scans = args.scans or ((128 if grid == "1mm" else 512) if cuda else 16)
        batch = args.batch or ((8 if grid == "1mm" else 32) if cuda else 4)
        with tempfile.TemporaryDirectory(prefix="bench_train_gpu_") as tmp:
            files = write_cohort(Path(tmp), scans, shape)
            for variant in args.variants:
                for compiled in ([False, True] if args.compile else [False]):
                    single: float | None = None
                    for processes in counts:
                        config = {**variant_config(variant, shape, voxel_mm), "epochs": args.epochs,
                                  "batch_size": max(batch, processes), "patience": 1000, "compile": compiled,
                                  **overrides}
                        work = Path(tmp) / f"{variant}_{compiled}_{processes}"
                        row = {"grid": grid, "shape": list(shape), "variant": variant, "batch_size":
                               config["batch_size"], **run_one(files, work, config, device=args.device,
                                                               processes=processes, threads=args.threads)}
                        if processes == 1:
                            single = row["volumes_per_s"]
                        row["scaling_efficiency"] = (row["volumes_per_s"] / (processes * single)
                                                     if single and processes > 1 else None)
                        print(json.dumps(row), flush=True)
                        rows.append(row)
    device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else platform.processor() or "cpu"
    result = {"benchmark": "bench_train_gpu", "command": "python " + shlex.join(sys.argv),
              "device": args.device, "device_name": device_name, "visible_gpus": visible if args.device == "cuda" else 0,
              "torch": torch.__version__, "cpu_count": os.cpu_count(), "rows": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
