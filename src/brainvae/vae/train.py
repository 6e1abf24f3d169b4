"""Training a :class:`~brainvae.vae.model.VAE` on a cohort array, resumable after any kill.

:func:`train_vae` checkpoints after every epoch into ``checkpoint_dir`` (model, optimiser,
scheduler, epoch, early-stopping state, best weights, the log so far and every RNG state) with
an atomic replace, and on start resumes from it. The caller (the Snakemake rule) must put
``checkpoint_dir`` outside the rule's declared outputs: Snakemake deletes the outputs of a failed
job, and the checkpoint has to survive exactly that.

Resuming is exact on CPU: data order comes from a generator seeded by ``(seed, epoch)`` and all
other randomness (the reparameterisation noise) from the restored global RNG, so a killed and
resumed run ends with bitwise the same weights as an uninterrupted one (tests/test_vae_resume.py).
On CUDA that also holds with ``deterministic=True``.

The checkpoint holds only tensors and plain Python types so it loads with
``torch.load(weights_only=True)``, which executes no pickled code.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import platform
import random
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

import brainvae
from brainvae.io import atomic_path, atomic_write_json, atomic_write_text

from .cohort import read_index, read_splits
from .data import CohortDataset, seed_worker
from .model import VAE, VAEConfig, count_parameters, to_channels_last_3d, vae_loss, widths_for_grid

__all__ = [
    "CHECKPOINT_NAME",
    "DEFAULT_CONFIG",
    "LOG_COLUMNS",
    "config_sha256",
    "load_model",
    "resolve_config",
    "resolve_device",
    "train_vae",
]

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = 1

#: Defaults for the demo grid (40x48x40, ~20 training volumes) on 2 CPU cores, measured on a proxy
#: of the preprocessed demo cohort (README, "VAE"): widths "auto" (16, 32, 64 channels = 3 levels;
#: see model.widths_for_grid) and no residual blocks (a block at the first level made a step 4.5x
#: slower on CPU); a 32-d latent; deviations from the training mean image (``center``); beta 0.01,
#: about 2 sigma^2 for the per-voxel residual variance of registered brains (~0.005 on [0, 1]
#: intensities), i.e. close to the true ELBO weighting -- beta 1 made the KL outweigh every
#: reconstruction gain and the posterior collapsed; early stopping after 10 epochs without a better
#: validation loss (with ~20 training scans the validation loss starts rising after ~10 epochs).
DEFAULT_CONFIG: dict[str, Any] = {
    "model": {"latent_dim": 32, "widths": "auto", "blocks": 0, "norm": "group",
              "activation": "silu", "groups": 8, "logvar_clamp": [-10.0, 10.0]},
    "epochs": 40,
    "batch_size": 2,
    "lr": 2e-3,
    "weight_decay": 1e-4,
    "schedule": "cosine",        # cosine | onecycle (both per optimiser step)
    "warmup_epochs": 2,          # linear LR warm-up (cosine); pct_start for onecycle
    "min_lr_fraction": 0.02,     # cosine floor as a fraction of lr
    "beta": 0.01,                # KL weight after warm-up (see model.vae_loss for the scaling)
    "beta_warmup_epochs": 10,    # beta rises linearly from 0 over these epochs
    "recon_loss": "mse",         # mse | l1
    "recon_in_mask": False,      # True: score reconstruction inside the brain mask only
    "patience": 10,              # early stopping on validation loss
    "min_delta": 0.0,
    "grad_clip": 5.0,            # max global grad norm; 0 disables
    "center": True,              # model deviations from the training mean image (see model.VAE)
    "augment_flip": 0.0,         # probability of a left-right flip of a training volume
    "augment_shift": 0,          # random shift of a training volume, up to this many voxels per axis
    "augment_deform": 0.0,       # sd (voxels) of a smooth random displacement of a training volume
    "augment_bias": 0.0,         # sd of the log of a smooth random intensity field
    "num_workers": "auto",       # 0 on CPU (workers would compete for the cores), 4 on CUDA
    "seed": 0,
    "amp": "auto",               # bf16 autocast: auto = on CUDA only
    "channels_last": "auto",     # channels_last_3d: auto = on (CUDA, and CPU: 1.2-3x in bench_vae)
}

LOG_COLUMNS = ("epoch", "session", "train_loss", "train_recon", "train_kl", "beta", "val_loss",
               "val_recon", "val_kl", "lr", "seconds", "volumes_per_s")


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------

def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def config_sha256(config: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON (sorted keys, no spaces) of a resolved config."""
    return hashlib.sha256(canonical_json(config).encode()).hexdigest()


def resolve_config(config: Mapping[str, Any] | None, in_shape: tuple[int, int, int],
                   max_epochs: int | None = None) -> dict[str, Any]:
    """Defaults overlaid with ``config`` (``model`` merged key by key), plus ``model.in_shape``.

    Unknown keys raise ValueError: a typo must not silently train with a default. The model part
    is validated by building a :class:`VAEConfig`.
    """
    config = dict(config or {})
    unknown = set(config) - set(DEFAULT_CONFIG)
    if unknown:
        raise ValueError(f"unknown training config keys: {sorted(unknown)}")
    out = copy.deepcopy(DEFAULT_CONFIG)
    out.update({k: v for k, v in config.items() if k != "model"})
    out["model"].update(dict(config.get("model") or {}))
    out["model"]["in_shape"] = [int(s) for s in in_shape]
    if out["model"]["widths"] == "auto":
        out["model"]["widths"] = list(widths_for_grid(in_shape))
    if max_epochs is not None:
        out["epochs"] = int(max_epochs)
    out["model"] = VAEConfig.from_dict(out["model"]).to_dict()
    if out["schedule"] not in ("cosine", "onecycle"):
        raise ValueError(f"schedule must be cosine or onecycle, got {out['schedule']!r}")
    if out["recon_loss"] not in ("mse", "l1"):
        raise ValueError(f"recon_loss must be mse or l1, got {out['recon_loss']!r}")
    if int(out["epochs"]) < 1 or int(out["batch_size"]) < 1:
        raise ValueError("epochs and batch_size must be >= 1")
    return json.loads(canonical_json(out))  # plain JSON types only (tuples -> lists)


def resolve_device(device: str = "auto") -> torch.device:
    """``auto``: CUDA if available, else CPU. An unavailable CUDA request falls back to CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        log.warning("CUDA requested but not available; training on CPU")
        dev = torch.device("cpu")
    return dev


def _set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _set_deterministic(deterministic: bool, device: torch.device) -> None:
    if deterministic:
        # cuBLAS needs this before its first use for deterministic GEMMs.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shape: autotuning pays off


# --------------------------------------------------------------------------------------------
# RNG state <-> weights_only-loadable types
# --------------------------------------------------------------------------------------------

def _rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64),
                   "gauss": gauss},
        "numpy": {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    npst = state["numpy"]
    np.random.set_state((npst["name"], npst["keys"].numpy().astype(np.uint32), npst["pos"],
                         npst["has_gauss"], npst["cached"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------

def beta_at(epoch: int, cfg: Mapping[str, Any]) -> float:
    """KL weight for 1-based ``epoch``: linear from beta/warmup to beta, then constant."""
    warm = int(cfg["beta_warmup_epochs"])
    if warm <= 0:
        return float(cfg["beta"])
    return float(cfg["beta"]) * min(1.0, epoch / warm)


def _make_scheduler(opt: torch.optim.Optimizer, cfg: Mapping[str, Any], steps_per_epoch: int
                    ) -> torch.optim.lr_scheduler.LRScheduler:
    total = int(cfg["epochs"]) * steps_per_epoch
    warm = min(int(cfg["warmup_epochs"]) * steps_per_epoch, max(total - 1, 0))
    if cfg["schedule"] == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=float(cfg["lr"]), total_steps=max(total, 2),
            pct_start=max(warm / max(total, 1), 0.01))
    floor = float(cfg["min_lr_fraction"])

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(total - warm, 1)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


# --------------------------------------------------------------------------------------------
# Checkpoints and outputs
# --------------------------------------------------------------------------------------------

def _save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(payload, tmp)


def _load_checkpoint(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def _write_log(rows: list[dict[str, Any]], path: Path) -> None:
    df = pd.DataFrame(rows, columns=list(LOG_COLUMNS))
    atomic_write_text(df.to_csv(sep="\t", index=False, float_format="%.6g"), path)


def _plot_curves(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = pd.DataFrame(rows, columns=list(LOG_COLUMNS))
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    axes[0].plot(df.epoch, df.train_loss, label="train")
    axes[0].plot(df.epoch, df.val_loss, label="val (full beta)")
    axes[0].set_title("loss")
    axes[1].plot(df.epoch, df.train_recon, label="train")
    axes[1].plot(df.epoch, df.val_recon, label="val")
    axes[1].set_title("reconstruction error")
    axes[2].plot(df.epoch, df.train_kl, label="train")
    axes[2].plot(df.epoch, df.val_kl, label="val")
    axes[2].set_title("KL (nats / volume)")
    axes[3].plot(df.epoch, df.beta, color="tab:orange", label="beta")
    lr_ax = axes[3].twinx()  # lr is ~1e-3, beta ~1: separate scales
    lr_ax.plot(df.epoch, df.lr, color="tab:blue", label="lr")
    lr_ax.set_ylabel("lr", color="tab:blue")
    axes[3].set_ylabel("beta", color="tab:orange")
    axes[3].set_title("lr, beta")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
    for ax in axes[:2]:
        if (df[["train_loss", "val_loss", "train_recon"]].to_numpy() > 0).all():
            ax.set_yscale("log")
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def environment_report(device: torch.device, extra: Mapping[str, Any] | None = None) -> str:
    """Plain-text description of the software and hardware a model was trained with."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    lines = [
        f"python: {sys.version.split()[0]} ({platform.python_implementation()})",
        f"platform: {platform.platform()}",
        f"brainvae: {brainvae.__version__}",
        f"torch: {torch.__version__}",
        f"numpy: {np.__version__}",
        f"device: {device}",
        f"cpu: {cpu}",
        f"cpu_count: {os.cpu_count()}",
        f"torch_threads: {torch.get_num_threads()}",
        f"cuda_available: {torch.cuda.is_available()}",
        f"cuda_version: {torch.version.cuda}",
        f"cudnn_version: {torch.backends.cudnn.version() if torch.cuda.is_available() else None}",
    ]
    if device.type == "cuda":
        lines.append(f"gpu: {torch.cuda.get_device_name(device)}")
    for key, value in (extra or {}).items():
        lines.append(f"{key}: {value}")
    lines.append("packages:")
    for name in ("torch", "numpy", "scipy", "pandas", "pyarrow", "scikit-learn", "scikit-image",
                 "nibabel", "matplotlib", "tqdm", "snakemake"):
        try:
            lines.append(f"  {name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            lines.append(f"  {name}: not installed")
    return "\n".join(lines) + "\n"


def load_model(model_dir: str | os.PathLike[str], device: str | torch.device = "cpu") -> VAE:
    """The trained VAE in ``model_dir`` (``config.json`` + ``model.pt``), in eval mode."""
    model_dir = Path(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    model = VAE(VAEConfig.from_dict(cfg["model"]))
    state = torch.load(model_dir / "model.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.to(device).eval()


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------

def _rows_for(index: pd.DataFrame, splits: pd.DataFrame, split: str) -> list[int]:
    scans = set(splits.loc[splits["split"] == split, "scan"])
    return index.loc[index["scan"].isin(scans), "row"].astype(int).tolist()


def augment(x: torch.Tensor, m: torch.Tensor, cfg: Mapping[str, Any], generator: torch.Generator
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Random left-right flips, shifts, smooth deformations and smooth intensity fields of a batch.

    ``x``, ``m``: ``(B, 1, X, Y, Z)`` volumes and masks on any device; X is the left-right axis (RAS
    grids). ``augment_shift`` rolls by whole voxels (the field of view has zero background at its
    borders); ``augment_deform`` is the sd (voxels) of a displacement drawn on a 4x4x4 control grid
    and interpolated smoothly; ``augment_bias`` the sd of the log of a smooth multiplicative
    intensity field, like a residual MRI bias field. Every random number comes from ``generator``
    (CPU), so runs are reproducible and a resumed run augments exactly as an uninterrupted one.
    """
    flip_p, max_shift = float(cfg["augment_flip"]), int(cfg["augment_shift"])
    deform, bias = float(cfg["augment_deform"]), float(cfg["augment_bias"])
    if flip_p <= 0 and max_shift <= 0 and deform <= 0 and bias <= 0:
        return x, m
    b, shape = x.shape[0], x.shape[2:]
    flips = torch.rand(b, generator=generator) < flip_p
    shifts = torch.randint(-max_shift, max_shift + 1, (b, 3), generator=generator)
    xs, ms = [], []
    for i in range(b):
        xi, mi = x[i], m[i]
        if flips[i]:
            xi, mi = xi.flip(1), mi.flip(1)
        if max_shift > 0:
            shift = shifts[i].tolist()
            xi, mi = xi.roll(shift, dims=(1, 2, 3)), mi.roll(shift, dims=(1, 2, 3))
        xs.append(xi)
        ms.append(mi)
    x, m = torch.stack(xs), torch.stack(ms)
    if deform > 0:
        # grid_sample's last grid axis is (W, H, D) = (Z, Y, X); one voxel is 2 / (size - 1).
        voxel = torch.tensor([2.0 / (shape[2] - 1), 2.0 / (shape[1] - 1), 2.0 / (shape[0] - 1)])
        coarse = torch.randn(b, 3, 4, 4, 4, generator=generator) * deform * voxel.view(1, 3, 1, 1, 1)
        disp = torch.nn.functional.interpolate(coarse.to(x.device), size=tuple(shape), mode="trilinear",
                                               align_corners=True)
        identity = torch.eye(3, 4, device=x.device).expand(b, 3, 4)
        grid = torch.nn.functional.affine_grid(identity, [b, 1, *shape], align_corners=True)
        grid = grid + disp.permute(0, 2, 3, 4, 1)
        x = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="zeros",
                                            align_corners=True)
        m = (torch.nn.functional.grid_sample(m, grid, mode="bilinear", padding_mode="zeros",
                                             align_corners=True) > 0.5).to(m.dtype)
    if bias > 0:
        coarse = torch.randn(b, 1, 4, 4, 4, generator=generator) * bias
        field = torch.nn.functional.interpolate(coarse.to(x.device), size=tuple(shape), mode="trilinear",
                                                align_corners=True)
        x = x * field.exp()
    return x.contiguous(), m.contiguous()


def _run_epoch(model: VAE, loader: DataLoader, *, device: torch.device, cfg: Mapping[str, Any],
               beta: float, opt: torch.optim.Optimizer | None,
               sched: torch.optim.lr_scheduler.LRScheduler | None, amp: bool,
               channels_last: bool, bar: Any = None,
               augment_generator: torch.Generator | None = None) -> dict[str, float]:
    """One pass over ``loader``; trains if ``opt`` is given. Returns volume-weighted means.

    ``augment_generator``: augment training batches (see :func:`augment`) with it.
    """
    training = opt is not None
    model.train(training)
    sums = {"loss": 0.0, "recon": 0.0, "kl": 0.0}
    n = 0
    non_blocking = device.type == "cuda"
    for x, m in loader:
        x = x.to(device, non_blocking=non_blocking)
        m = m.to(device, non_blocking=non_blocking)
        if training and augment_generator is not None:
            x, m = augment(x, m, cfg, augment_generator)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        with torch.set_grad_enabled(training), \
                torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            recon, mu, logvar = model(x)
            loss, rec, kl = vae_loss(recon, x, mu, logvar, beta=beta, kind=cfg["recon_loss"],
                                     mask=m if cfg["recon_in_mask"] else None)
        if training:
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite training loss ({loss.item()}); lower 'lr' "
                                         "or raise 'beta_warmup_epochs'")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg["grad_clip"]:
                torch.nn.utils.clip_grad_norm_(model.parameters(), float(cfg["grad_clip"]))
            opt.step()
            assert sched is not None
            sched.step()
        b = x.shape[0]
        n += b
        sums["loss"] += loss.item() * b
        sums["recon"] += rec.item() * b
        sums["kl"] += kl.item() * b
        if bar is not None:
            bar.update(b)
            bar.set_postfix(loss=f"{loss.item():.4g}")
    return {k: v / max(n, 1) for k, v in sums.items()}


def _mean_volume(array_path: str | os.PathLike[str], rows: list[int]) -> np.ndarray:
    """Voxel-wise mean of the given rows of a cohort array (float64 sum, one volume at a time)."""
    array = np.load(array_path, mmap_mode="r")
    total = np.zeros(array.shape[1:], dtype=np.float64)
    for row in rows:
        total += array[row]
    return (total / max(len(rows), 1)).astype(np.float32)


def _loader(ds: CohortDataset, cfg: Mapping[str, Any], device: torch.device, *, shuffle: bool,
            seed: int, epoch: int) -> DataLoader:
    workers = cfg["num_workers"]
    if workers == "auto":
        workers = min(4, os.cpu_count() or 1) if device.type == "cuda" else 0
    # A fresh generator per (seed, epoch) gives the same batch order whether or not the run was
    # interrupted, without having to checkpoint DataLoader internals.
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return DataLoader(ds, batch_size=int(cfg["batch_size"]), shuffle=shuffle, generator=gen,
                      num_workers=int(workers), pin_memory=device.type == "cuda",
                      worker_init_fn=seed_worker, persistent_workers=False)


def train_vae(
    config: Mapping[str, Any] | None,
    array_path: str | os.PathLike[str],
    mask_path: str | os.PathLike[str] | None,
    index: str | os.PathLike[str] | pd.DataFrame,
    splits: str | os.PathLike[str] | pd.DataFrame,
    out_dir: str | os.PathLike[str],
    *,
    checkpoint_dir: str | os.PathLike[str],
    device: str = "auto",
    resume: bool = True,
    deterministic: bool = False,
    max_epochs: int | None = None,
    threads: int | None = None,
    progress: bool | None = None,
    model_name: str = "vae",
    on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
    keep_checkpoint: bool = True,
) -> dict[str, Any]:
    """Train a VAE on the ``train`` split of a cohort array; early-stop on the ``val`` split.

    ``config``: overrides of :data:`DEFAULT_CONFIG`. ``index``: the index TSV (or DataFrame) of
    :func:`~brainvae.vae.cohort.build_cohort_array`; ``splits``: DataFrame/TSV (scan, split) —
    scans absent from it are not used. ``mask_path=None`` or ``recon_in_mask: false`` scores the
    whole volume. ``checkpoint_dir`` must lie outside the Snakemake rule's outputs. ``progress``:
    tqdm bar (None = only on a terminal). ``on_epoch_end(epoch, log_row)`` runs after each
    epoch's checkpoint is on disk.

    Writes ``out_dir/{model.pt, config.json, environment.txt, metrics.json, training_log.tsv,
    training_curves.png}`` (``model.pt``: state dict of the best-validation epoch) and returns the
    metrics dict. With ``keep_checkpoint`` the checkpoint is kept (a rerun of a finished training
    returns at once); without, it is deleted once the outputs are written, so that a later rerun
    (e.g. forced after a code change that the config fingerprint cannot see) trains afresh.
    Process-global torch settings changed here (threads, deterministic algorithms, cuDNN flags)
    are restored on return.
    """
    saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
             torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    try:
        return _train(config, array_path, mask_path, index, splits, out_dir,
                      checkpoint_dir=checkpoint_dir, device=device, resume=resume,
                      deterministic=deterministic, max_epochs=max_epochs, threads=threads,
                      progress=progress, model_name=model_name, on_epoch_end=on_epoch_end,
                      keep_checkpoint=keep_checkpoint)
    finally:
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[2], saved[3]


def _train(config: Mapping[str, Any] | None, array_path: str | os.PathLike[str],
           mask_path: str | os.PathLike[str] | None, index: str | os.PathLike[str] | pd.DataFrame,
           splits: str | os.PathLike[str] | pd.DataFrame, out_dir: str | os.PathLike[str], *,
           checkpoint_dir: str | os.PathLike[str], device: str, resume: bool, deterministic: bool,
           max_epochs: int | None, threads: int | None, progress: bool | None, model_name: str,
           on_epoch_end: Callable[[int, dict[str, Any]], None] | None,
           keep_checkpoint: bool) -> dict[str, Any]:
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    ckpt_dir = Path(checkpoint_dir)
    ckpt_path = ckpt_dir / CHECKPOINT_NAME
    dev = resolve_device(device)
    if threads is not None:
        torch.set_num_threads(int(threads))
    _set_deterministic(deterministic, dev)

    index_df = index.copy() if isinstance(index, pd.DataFrame) else read_index(index)
    splits_df = read_splits(splits)
    train_rows = _rows_for(index_df, splits_df, "train")
    val_rows = _rows_for(index_df, splits_df, "val")
    if not train_rows:
        raise ValueError("no scans in the 'train' split")
    if not val_rows:
        log.warning("no scans in the 'val' split: early stopping uses the training loss")
    train_ds = CohortDataset(array_path, mask_path, train_rows)
    val_ds = CohortDataset(array_path, mask_path, val_rows)
    cfg = resolve_config(config, train_ds.volume_shape, max_epochs)
    seed = int(cfg["seed"])
    amp = dev.type == "cuda" if cfg["amp"] == "auto" else bool(cfg["amp"]) and dev.type == "cuda"
    channels_last = True if cfg["channels_last"] == "auto" else bool(cfg["channels_last"])
    scans = index_df.set_index("row")["scan"]
    fingerprint = config_sha256({
        "config": cfg, "array_shape": [len(index_df), *train_ds.volume_shape],
        "train": [scans[r] for r in train_rows], "val": [scans[r] for r in val_rows]})

    _set_seed(seed)
    model = VAE(VAEConfig.from_dict(cfg["model"]))
    if cfg["center"]:
        model.set_mean_image(torch.from_numpy(_mean_volume(array_path, train_rows)))
    model = model.to(dev)
    if channels_last:
        model = to_channels_last_3d(model)
    opt = torch.optim.AdamW(model.parameters(), lr=float(cfg["lr"]),
                            weight_decay=float(cfg["weight_decay"]))
    steps_per_epoch = math.ceil(len(train_rows) / int(cfg["batch_size"]))
    sched = _make_scheduler(opt, cfg, steps_per_epoch)

    start_epoch, session, elapsed = 0, 1, 0.0
    rows: list[dict[str, Any]] = []
    early = {"best_val": math.inf, "best_epoch": 0, "bad_epochs": 0, "stopped": False}
    best_state: dict[str, torch.Tensor] | None = None
    if ckpt_path.exists() and resume:
        ckpt = _load_checkpoint(ckpt_path)
        if ckpt.get("format") != CHECKPOINT_FORMAT or ckpt.get("fingerprint") != fingerprint:
            log.warning("checkpoint %s is from another config or cohort; starting afresh", ckpt_path)
        else:
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            sched.load_state_dict(ckpt["scheduler"])
            early = dict(ckpt["early_stopping"])
            best_state = ckpt["best_model"]
            rows = list(ckpt["log"])
            start_epoch, session = int(ckpt["epoch"]), int(ckpt["session"]) + 1
            elapsed = float(ckpt["elapsed"])
            _set_rng_state(ckpt["rng"])
            log.info("resuming from epoch %d (%s)", start_epoch, ckpt_path)
    elif ckpt_path.exists():
        ckpt_path.unlink()

    n_epochs = int(cfg["epochs"])
    beta_final = float(cfg["beta"])
    epoch = start_epoch
    for epoch in range(start_epoch + 1, n_epochs + 1):
        if early["stopped"]:
            break
        t0 = time.perf_counter()
        beta = beta_at(epoch, cfg)
        lr = opt.param_groups[0]["lr"]
        with tqdm(total=len(train_rows), desc=f"epoch {epoch}/{n_epochs}", unit="vol",
                  disable=None if progress is None else not progress, leave=False) as bar:
            # Seeded per (seed, epoch) like the batch order, so a resumed run augments identically.
            aug_gen = torch.Generator().manual_seed(seed * 100_003 + epoch + 7_919)
            tr = _run_epoch(model, _loader(train_ds, cfg, dev, shuffle=True, seed=seed, epoch=epoch),
                            device=dev, cfg=cfg, beta=beta, opt=opt, sched=sched, amp=amp,
                            channels_last=channels_last, bar=bar, augment_generator=aug_gen)
        train_seconds = time.perf_counter() - t0
        if val_rows:
            # Validation always uses the final beta, so the early-stopping criterion does not
            # drift upward during the KL warm-up.
            va = _run_epoch(model, _loader(val_ds, cfg, dev, shuffle=False, seed=seed, epoch=epoch),
                            device=dev, cfg=cfg, beta=beta_final, opt=None, sched=None, amp=amp,
                            channels_last=channels_last)
        else:
            va = {"loss": math.nan, "recon": math.nan, "kl": math.nan}
        seconds = time.perf_counter() - t0
        elapsed += seconds
        row = {"epoch": epoch, "session": session, "train_loss": tr["loss"],
               "train_recon": tr["recon"], "train_kl": tr["kl"], "beta": beta,
               "val_loss": va["loss"], "val_recon": va["recon"], "val_kl": va["kl"], "lr": lr,
               "seconds": seconds, "volumes_per_s": len(train_rows) / train_seconds}
        rows.append(row)
        log.info("epoch %d: train %.4g val %.4g (%.1fs)", epoch, tr["loss"], va["loss"], seconds)

        criterion = va["loss"] if val_rows else tr["loss"]
        if criterion < early["best_val"] - float(cfg["min_delta"]):
            early.update(best_val=criterion, best_epoch=epoch, bad_epochs=0)
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        else:
            early["bad_epochs"] += 1
            early["stopped"] = early["bad_epochs"] >= int(cfg["patience"])

        ckpt_dir.mkdir(parents=True, exist_ok=True)
        _save_checkpoint(ckpt_path, {
            "format": CHECKPOINT_FORMAT, "fingerprint": fingerprint, "epoch": epoch,
            "session": session, "model": model.state_dict(), "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(), "early_stopping": early, "best_model": best_state,
            "log": rows, "rng": _rng_state(), "elapsed": elapsed})
        _write_log(rows, ckpt_dir / "training_log.tsv")  # live progress for humans
        if on_epoch_end is not None:
            on_epoch_end(epoch, row)

    assert best_state is not None
    final = VAE(VAEConfig.from_dict(cfg["model"]))
    final.load_state_dict(best_state)
    best_row = next(r for r in rows if r["epoch"] == early["best_epoch"])
    last = rows[-1]
    metrics = {
        "model_name": model_name,
        "config_sha256": config_sha256(cfg),
        "best_epoch": early["best_epoch"],
        "best_val_loss": early["best_val"],
        "best_val_recon": best_row["val_recon"],
        "epochs_run": last["epoch"],
        "stopped_early": bool(early["stopped"]),
        "final_train_loss": last["train_loss"],
        "final_train_recon": last["train_recon"],
        "final_train_kl": last["train_kl"],
        "n_train": len(train_rows),
        "n_val": len(val_rows),
        "parameters": count_parameters(final),
        "seconds": elapsed,
        "volumes_per_s": float(np.mean([r["volumes_per_s"] for r in rows])),
        "sessions": int(max(r["session"] for r in rows)),
        "device": str(dev),
        "amp_bf16": amp,
        "channels_last_3d": channels_last,
        "deterministic": deterministic,
    }
    metrics = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
               for k, v in metrics.items()}

    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "model.pt", suffix=".pt") as tmp:
        torch.save(final.state_dict(), tmp)
    atomic_write_json(cfg, out_dir / "config.json")
    atomic_write_json(metrics, out_dir / "metrics.json")
    atomic_write_text(environment_report(dev, {"deterministic": deterministic, "amp_bf16": amp,
                                               "channels_last_3d": channels_last}),
                      out_dir / "environment.txt")
    _write_log(rows, out_dir / "training_log.tsv")
    _plot_curves(rows, out_dir / "training_curves.png")
    if not keep_checkpoint:
        ckpt_path.unlink(missing_ok=True)
        (ckpt_dir / "training_log.tsv").unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # only if empty: never delete anything else in it
            ckpt_dir.rmdir()
    return metrics
