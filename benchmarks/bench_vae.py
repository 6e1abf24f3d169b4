"""VAE training throughput (volumes/s) on CPU and, when available, CUDA.

Usage::

    .venv/bin/python benchmarks/bench_vae.py [--device cpu|cuda|auto] [--grids demo 96x112x96]
        [--architectures dense spatial] [--batch 4] [--steps 6] [--warmup 2] [--threads 2]
        [--layouts auto|both] [--config '{"model": {"latent_dim": 64}}'] [--json out.json]

Each grid and architecture is timed with the default training config of ``brainvae.vae.config``
(dense widths "auto": 3 levels at the demo grid, 4 at 2 mm and 96x112x96, 5 at 1 mm; spatial:
AutoencoderKL, downsample 4), real training steps (forward, masked-free MSE + KL, backward, AdamW,
LR schedule) fed by a DataLoader over a float16 memmap, as in ``train_vae``. Defaults: CPU grids ``demo`` and ``96x112x96``; on CUDA ``2mm`` and ``1mm``
with bf16 autocast and channels_last_3d. GPU busy fraction = GPU time of the steps (CUDA events
around each step's work) / wall time; ``nvml_util`` is ``torch.cuda.utilization()`` sampled after
the run when pynvml is installed. ``--layouts both`` times channels_last_3d and contiguous (NCDHW)
on every device; that comparison is why training uses channels_last_3d on CPU too (1.2-3x).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from brainvae.resample import GRIDS  # noqa: E402
from brainvae.vae.data import CohortDataset  # noqa: E402
from brainvae.vae.config import resolve_config  # noqa: E402
from brainvae.vae.nn import build_model, count_parameters  # noqa: E402
from brainvae.vae.nn.dense import to_channels_last_3d  # noqa: E402
from brainvae.vae.nn.losses import loss_terms  # noqa: E402
from brainvae.vae.optim import make_scheduler  # noqa: E402


def _shape(name: str) -> tuple[int, int, int]:
    if name in GRIDS:
        return tuple(int(s) for s in GRIDS[name].shape)  # type: ignore[return-value]
    return tuple(int(s) for s in name.split("x"))  # type: ignore[return-value]


def bench_grid(name: str, device: torch.device, *, batch: int, steps: int, warmup: int,
               channels_last: bool, amp: bool, overrides: dict, architecture: str = "dense") -> dict:
    shape = _shape(name)
    cfg = resolve_config({**overrides, "architecture": architecture}, shape)
    torch.manual_seed(0)
    model = build_model(cfg["model"]).to(device)
    if channels_last:
        model = to_channels_last_3d(model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    sched = make_scheduler(opt, cfg, steps + warmup)
    n_vol = batch * (steps + warmup)
    with tempfile.TemporaryDirectory(prefix="bench_vae_") as tmp:
        arr = np.lib.format.open_memmap(f"{tmp}/a.npy", mode="w+", dtype=np.float16, shape=(n_vol, *shape))
        rng = np.random.default_rng(0)
        for i in range(n_vol):
            arr[i] = rng.standard_normal(shape, dtype=np.float32)
        arr.flush()
        del arr
        ds = CohortDataset(f"{tmp}/a.npy", None, range(n_vol))
        workers = 4 if device.type == "cuda" else 0
        loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=False, num_workers=workers,
                                             pin_memory=device.type == "cuda")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        gpu_ms, wall = 0.0, 0.0
        t_start = time.perf_counter()
        for step, (x, _) in enumerate(loader):
            if step == warmup:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t_start = time.perf_counter()
            x = x.to(device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last_3d)
            if device.type == "cuda":
                ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                ev0.record()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                recon, mu, logvar = model(x)
                loss = loss_terms(recon, x, mu, logvar, beta=1.0)["total"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if device.type == "cuda":
                ev1.record()
                ev1.synchronize()
                if step >= warmup:
                    gpu_ms += ev0.elapsed_time(ev1)
            else:
                loss.item()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - t_start
    out = {
        "grid": name, "shape": "x".join(map(str, shape)), "device": str(device), "architecture": architecture,
        "widths": ",".join(map(str, cfg["model"].get("widths") or cfg["model"]["channels"])),
        "latent_dim": int(model.latent_dim), "params_M": count_parameters(model) / 1e6,
        "batch": batch, "layout": "channels_last_3d" if channels_last else "contiguous",
        "bf16": amp, "s_per_step": wall / steps, "volumes_per_s": batch * steps / wall,
    }
    if device.type == "cuda":
        out["gpu_busy"] = gpu_ms / 1000 / wall
        out["peak_mem_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
        try:
            out["nvml_util"] = torch.cuda.utilization(device)
        except Exception:  # pynvml missing
            out["nvml_util"] = None
    else:
        out["peak_rss_GiB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--grids", nargs="*", default=None)
    ap.add_argument("--architectures", nargs="*", default=["dense", "spatial"], choices=["dense", "spatial"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--layouts", default="auto", choices=["auto", "both"],
                    help="auto: channels_last_3d only (the training default); both: also contiguous")
    ap.add_argument("--config", default="{}", help="JSON overrides of the training config")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = []
    if args.device in ("auto", "cpu"):
        devices.append(torch.device("cpu"))
    if args.device in ("auto", "cuda") and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("CUDA not available")
    overrides = json.loads(args.config)
    results = []
    for dev in devices:
        grids = args.grids or (["demo", "96x112x96"] if dev.type == "cpu" else ["2mm", "1mm"])
        if dev.type == "cuda":
            torch.backends.cudnn.benchmark = True
        for grid in grids:
            layouts = [True, False] if args.layouts == "both" else [True]
            for arch in args.architectures:
                for cl in layouts:
                    r = bench_grid(grid, dev, batch=args.batch, steps=args.steps, warmup=args.warmup,
                                   channels_last=cl, amp=dev.type == "cuda", overrides=overrides,
                                   architecture=arch)
                    results.append(r)
                    print(json.dumps(r), file=sys.stderr, flush=True)
    keys = ["device", "grid", "shape", "architecture", "latent_dim", "widths", "params_M", "batch", "layout", "bf16",
            "s_per_step", "volumes_per_s", "gpu_busy", "peak_mem_GiB", "peak_rss_GiB"]
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(" | ".join(keys))
    for r in results:
        cells = []
        for k in keys:
            v = r.get(k, "")
            cells.append(f"{v:.3g}" if isinstance(v, float) and math.isfinite(v) else str(v))
        print(" | ".join(cells))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
