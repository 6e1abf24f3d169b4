"""The training loop of the VAE family, resumable after any kill.

:func:`train_vae` checkpoints after every epoch into ``checkpoint_dir`` (model, optimiser, scheduler,
the discriminator and its optimiser when the adversarial term is on, epoch, early-stopping state,
best weights, the log so far and every RNG state) with an atomic replace, and on start resumes from
it. The caller (the Snakemake rule) must put ``checkpoint_dir`` outside the rule's declared outputs:
Snakemake deletes the outputs of a failed job, and the checkpoint has to survive exactly that.

Resuming is exact on CPU: data order comes from a generator seeded by ``(seed, epoch)`` and all
other randomness (the reparameterisation noise) from the restored global RNG, so a killed and
resumed run ends with bitwise the same weights as an uninterrupted one (tests/test_vae_resume.py).
On CUDA that also holds with ``deterministic=True``.

One optimiser step is :meth:`Trainer.step` (loss terms, backward, clipping, the discriminator's
step): the place where mixed precision or a DDP wrapper would go.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader

from brainvae.io import atomic_path, atomic_write_json, atomic_write_text
from brainvae.runtime import seed_everything

from ..cohort import read_index, read_splits
from ..config import config_sha256, resolve_config
from ..data import CohortDataset, seed_worker
from ...runtime import resolve_device
from ..nn import build_model, count_parameters
from ..nn.dense import to_channels_last_3d
from ..nn.losses import (PerceptualLoss, build_discriminator, discriminator_loss, generator_adversarial_loss,
                         loss_terms)
from ..optim import beta_at, make_optimizer, make_scheduler
from .augment import augment
from .checkpoint import (CHECKPOINT_FORMAT, CHECKPOINT_NAME, load_checkpoint, rng_state, save_checkpoint,
                         set_rng_state)
from .outputs import LOG_COLUMNS, environment_report, plot_curves, write_log

__all__ = ["Trainer", "train_vae"]

log = logging.getLogger(__name__)


def _set_deterministic(deterministic: bool, device: torch.device) -> None:
    if deterministic:
        # cuBLAS needs this before its first use for deterministic GEMMs.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shape: autotuning pays off



def _rows_for(index: pd.DataFrame, splits: pd.DataFrame, split: str) -> list[int]:
    scans = set(splits.loc[splits["split"] == split, "scan"])
    return index.loc[index["scan"].isin(scans), "row"].astype(int).tolist()



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




class Trainer:
    """The networks, optimisers and loss settings of one training run, and one epoch of it."""

    def __init__(self, cfg: Mapping[str, Any], device: torch.device, *, steps_per_epoch: int,
                 mean_image: np.ndarray | None) -> None:
        self.cfg, self.device = cfg, device
        self.steps_per_epoch = steps_per_epoch
        # Built first: a perceptual term without usable weights fails here, before any epoch.
        self.perceptual = (PerceptualLoss(cfg["perceptual_weights"]).to(device)
                           if float(cfg["perceptual_weight"]) > 0 else None)
        model = build_model(cfg["model"])
        if mean_image is not None:
            model.set_mean_image(torch.from_numpy(mean_image))
        self.model = model.to(device)
        self.amp = device.type == "cuda" if cfg["amp"] == "auto" else bool(cfg["amp"]) and device.type == "cuda"
        self.channels_last = True if cfg["channels_last"] == "auto" else bool(cfg["channels_last"])
        if self.channels_last:
            self.model = to_channels_last_3d(self.model)
        self.opt = make_optimizer(self.model.parameters(), cfg["lr"], cfg["weight_decay"])
        self.sched = make_scheduler(self.opt, cfg, steps_per_epoch)
        self.discriminator: nn.Module | None = None
        self.opt_d: torch.optim.Optimizer | None = None
        if float(cfg["adversarial_weight"]) > 0:
            self.discriminator = build_discriminator(cfg["discriminator_channels"],
                                                     cfg["discriminator_layers"]).to(device)
            self.opt_d = make_optimizer(self.discriminator.parameters(), cfg["discriminator_lr"], 0.0)

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                 "scheduler": self.sched.state_dict()}
        if self.discriminator is not None and self.opt_d is not None:
            state["discriminator"] = self.discriminator.state_dict()
            state["optimizer_d"] = self.opt_d.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        if self.discriminator is not None and self.opt_d is not None:
            self.discriminator.load_state_dict(state["discriminator"])
            self.opt_d.load_state_dict(state["optimizer_d"])

    # -- one step ----------------------------------------------------------------------------
    def adversarial_on(self, epoch: int) -> bool:
        return self.discriminator is not None and epoch >= int(self.cfg["adversarial_start_epoch"])

    def step(self, x: torch.Tensor, m: torch.Tensor, *, beta: float, epoch: int) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            recon, mu, logvar = self.model(x)
            terms = loss_terms(recon, x, mu, logvar, beta=beta, kind=cfg["recon_loss"],
                               mask=m if cfg["recon_in_mask"] else None, free_bits=float(cfg["free_bits"]))
            loss = terms["total"]
            adv_on = self.adversarial_on(epoch)
            if adv_on:
                assert self.discriminator is not None
                terms["adv"] = generator_adversarial_loss(self.discriminator, recon)
                loss = loss + float(cfg["adversarial_weight"]) * terms["adv"]
            if self.perceptual is not None:
                terms["perceptual"] = self.perceptual(recon, x)
                loss = loss + float(cfg["perceptual_weight"]) * terms["perceptual"]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss ({loss.item()}); lower 'lr' "
                                     "or raise 'beta_warmup_epochs'")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg["grad_clip"]:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), float(cfg["grad_clip"]))
        self.opt.step()
        self.sched.step()
        if adv_on:
            assert self.discriminator is not None and self.opt_d is not None
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                terms["disc"] = discriminator_loss(self.discriminator, x, recon)
            self.opt_d.zero_grad(set_to_none=True)
            terms["disc"].backward()
            self.opt_d.step()
        terms["total"] = loss
        return {k: v.detach() for k, v in terms.items()}

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, m: torch.Tensor, *, beta: float) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            recon, mu, logvar = self.model(x)
            return loss_terms(recon, x, mu, logvar, beta=beta, kind=cfg["recon_loss"],
                              mask=m if cfg["recon_in_mask"] else None, free_bits=float(cfg["free_bits"]))

    def run_epoch(self, loader: DataLoader, *, epoch: int, train: bool, beta: float | None = None,
                  bar: Any = None, augment_generator: torch.Generator | None = None) -> dict[str, float]:
        """One pass; trains if ``train``. ``beta``: fixed KL weight (validation), else the warm-up
        schedule per step. Returns volume-weighted means (adv/disc/perceptual: NaN when off)."""
        self.model.train(train)
        if self.discriminator is not None:
            self.discriminator.train(train)
        keys = ("total", "recon", "kl", "adv", "disc", "perceptual")
        sums = dict.fromkeys(keys, 0.0)
        counts = dict.fromkeys(keys, 0)
        non_blocking = self.device.type == "cuda"
        for i, (x, m) in enumerate(loader):
            x = x.to(self.device, non_blocking=non_blocking)
            m = m.to(self.device, non_blocking=non_blocking)
            if train and augment_generator is not None:
                x, m = augment(x, m, self.cfg, augment_generator)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last_3d)
            if train:
                b_now = beta_at(epoch, self.cfg, i, self.steps_per_epoch) if beta is None else beta
                terms = self.step(x, m, beta=b_now, epoch=epoch)
            else:
                terms = self.evaluate(x, m, beta=float(self.cfg["beta"]) if beta is None else beta)
            b = x.shape[0]
            for k, v in terms.items():
                sums[k] += float(v.item()) * b
                counts[k] += b
            if bar is not None:
                bar.update(b)
                bar.set_postfix(loss=f"{float(terms['total']):.4g}")
        return {("loss" if k == "total" else k): (sums[k] / counts[k] if counts[k] else math.nan) for k in keys}


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
    """Train a VAE variant on the ``train`` split of a cohort array; early-stop on the ``val`` split.

    ``config``: overrides of :data:`brainvae.vae.config.TRAINING_DEFAULTS` (``architecture`` picks
    the network). ``index``: the index TSV (or DataFrame) of
    :func:`~brainvae.vae.cohort.build_cohort_array`; ``splits``: DataFrame/TSV (scan, split) --
    scans absent from it are not used. ``mask_path=None`` or ``recon_in_mask: false`` scores the
    whole volume. ``checkpoint_dir`` must lie outside the Snakemake rule's outputs. ``progress``:
    tqdm bar (None = only on a terminal). ``on_epoch_end(epoch, log_row)`` runs after each
    epoch's checkpoint is on disk.

    Writes ``out_dir/{model.pt, config.json, environment.txt, metrics.json, training_log.tsv,
    training_curves.png}`` (``model.pt``: state dict of the best-validation epoch) and returns the
    metrics dict. With ``keep_checkpoint`` the checkpoint is kept (a rerun of a finished training
    returns at once); without, it is deleted once the outputs are written. Process-global torch
    settings changed here (threads, deterministic algorithms, cuDNN flags) are restored on return.
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
    scans = index_df.set_index("row")["scan"]
    fingerprint = config_sha256({
        "config": cfg, "array_shape": [len(index_df), *train_ds.volume_shape],
        "train": [scans[r] for r in train_rows], "val": [scans[r] for r in val_rows]})

    seed_everything(seed)
    steps_per_epoch = math.ceil(len(train_rows) / int(cfg["batch_size"]))
    trainer = Trainer(cfg, dev, steps_per_epoch=steps_per_epoch,
                      mean_image=_mean_volume(array_path, train_rows) if cfg["center"] else None)
    model = trainer.model

    start_epoch, session, elapsed = 0, 1, 0.0
    rows: list[dict[str, Any]] = []
    early = {"best_val": math.inf, "best_epoch": 0, "bad_epochs": 0, "stopped": False}
    best_state: dict[str, torch.Tensor] | None = None
    if ckpt_path.exists() and resume:
        ckpt = load_checkpoint(ckpt_path)
        if ckpt.get("format") != CHECKPOINT_FORMAT or ckpt.get("fingerprint") != fingerprint:
            log.warning("checkpoint %s is from another config or cohort; starting afresh", ckpt_path)
        else:
            trainer.load_state_dict(ckpt)
            early = dict(ckpt["early_stopping"])
            best_state = ckpt["best_model"]
            rows = list(ckpt["log"])
            start_epoch, session = int(ckpt["epoch"]), int(ckpt["session"]) + 1
            elapsed = float(ckpt["elapsed"])
            set_rng_state(ckpt["rng"])
            log.info("resuming from epoch %d (%s)", start_epoch, ckpt_path)
    elif ckpt_path.exists():
        ckpt_path.unlink()

    n_epochs = int(cfg["epochs"])
    beta_final = float(cfg["beta"])
    for epoch in range(start_epoch + 1, n_epochs + 1):
        if early["stopped"]:
            break
        t0 = time.perf_counter()
        beta = beta_at(epoch, cfg, 0, steps_per_epoch)  # at the epoch's first step (0 in epoch 1)
        lr = trainer.opt.param_groups[0]["lr"]
        with tqdm(total=len(train_rows), desc=f"epoch {epoch}/{n_epochs}", unit="vol",
                  disable=None if progress is None else not progress, leave=False) as bar:
            # Seeded per (seed, epoch) like the batch order, so a resumed run augments identically.
            aug_gen = torch.Generator().manual_seed(seed * 100_003 + epoch + 7_919)
            tr = trainer.run_epoch(_loader(train_ds, cfg, dev, shuffle=True, seed=seed, epoch=epoch),
                                   epoch=epoch, train=True, bar=bar, augment_generator=aug_gen)
        train_seconds = time.perf_counter() - t0
        if val_rows:
            # Validation always uses the final beta, so the early-stopping criterion does not
            # drift upward during the KL warm-up.
            va = trainer.run_epoch(_loader(val_ds, cfg, dev, shuffle=False, seed=seed, epoch=epoch),
                                   epoch=epoch, train=False, beta=beta_final)
        else:
            va = {"loss": math.nan, "recon": math.nan, "kl": math.nan}
        seconds = time.perf_counter() - t0
        elapsed += seconds
        row = {"epoch": epoch, "session": session, "train_loss": tr["loss"],
               "train_recon": tr["recon"], "train_kl": tr["kl"], "beta": beta,
               "val_loss": va["loss"], "val_recon": va["recon"], "val_kl": va["kl"],
               "train_adv": tr["adv"], "train_disc": tr["disc"], "train_perceptual": tr["perceptual"],
               "lr": lr, "seconds": seconds, "volumes_per_s": len(train_rows) / train_seconds}
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
        save_checkpoint(ckpt_path, {
            "format": CHECKPOINT_FORMAT, "fingerprint": fingerprint, "epoch": epoch,
            "session": session, **trainer.state_dict(), "early_stopping": early, "best_model": best_state,
            "log": rows, "rng": rng_state(), "elapsed": elapsed})
        write_log(rows, ckpt_dir / "training_log.tsv")  # live progress for humans
        if on_epoch_end is not None:
            on_epoch_end(epoch, row)

    assert best_state is not None
    final = build_model(cfg["model"])
    final.load_state_dict(best_state)
    best_row = next(r for r in rows if r["epoch"] == early["best_epoch"])
    last = rows[-1]
    metrics = {
        "model_name": model_name,
        "architecture": cfg["model"]["architecture"],
        "latent_dim": int(final.latent_dim),
        "latent_shape": list(final.latent_shape),
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
        "amp_bf16": trainer.amp,
        "channels_last_3d": trainer.channels_last,
        "deterministic": deterministic,
    }
    metrics = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
               for k, v in metrics.items()}

    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "model.pt", suffix=".pt") as tmp:
        torch.save(final.state_dict(), tmp)
    atomic_write_json(cfg, out_dir / "config.json")
    atomic_write_json(metrics, out_dir / "metrics.json")
    atomic_write_text(environment_report(dev, {"deterministic": deterministic, "amp_bf16": trainer.amp,
                                               "channels_last_3d": trainer.channels_last}),
                      out_dir / "environment.txt")
    write_log(rows, out_dir / "training_log.tsv")
    plot_curves(rows, out_dir / "training_curves.png")
    if not keep_checkpoint:
        ckpt_path.unlink(missing_ok=True)
        (ckpt_dir / "training_log.tsv").unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # only if empty: never delete anything else in it
            ckpt_dir.rmdir()
    return metrics
