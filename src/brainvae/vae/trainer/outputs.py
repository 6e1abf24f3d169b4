"""What a training run writes besides the weights: log table, curves, environment report."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

import brainvae
from brainvae.io import atomic_path, atomic_write_text

__all__ = ["LOG_COLUMNS", "environment_report", "plot_curves", "write_log"]

LOG_COLUMNS = ("epoch", "session", "train_loss", "train_recon", "train_kl", "beta", "val_loss",
               "val_recon", "val_kl", "train_adv", "train_disc", "train_perceptual", "lr", "seconds",
               "volumes_per_s", "loader_wait_fraction")


def write_log(rows: list[dict[str, Any]], path: Path) -> None:
    df = pd.DataFrame(rows, columns=list(LOG_COLUMNS))
    atomic_write_text(df.to_csv(sep="\t", index=False, float_format="%.6g"), path)


def plot_curves(rows: list[dict[str, Any]], path: Path) -> None:
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
                 "nibabel", "matplotlib", "tqdm", "snakemake", "monai"):
        try:
            lines.append(f"  {name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            lines.append(f"  {name}: not installed")
    return "\n".join(lines) + "\n"


