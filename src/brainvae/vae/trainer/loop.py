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

One optimiser step is :meth:`Trainer.step` (loss terms, backward, clipping, the discriminator's step),
under mixed precision (``amp``: bf16 autocast, or fp16 with a gradient scaler) and, with several processes,
DistributedDataParallel (:mod:`.distributed`; started by :mod:`.launch`). The GPU never waits for the host
inside an epoch: loss terms are summed on the device and read once per epoch; batches come from one tensor
on the device when the training scans fit (``cache_on_device``), else from a DataLoader with pinned memory
and persistent workers. ``accumulate_steps`` batches make one optimiser step.

Exact resume holds for one process; with several, each rank's noise stream restarts from the seed, the
epoch and its rank.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from brainvae.io import atomic_path, atomic_write_json, atomic_write_text
from brainvae.memmaps import mean_of_rows
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
from .distributed import DistributedContext, GlobalBatchSampler, world_from_env
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



def precision(setting: Any, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """``(autocast dtype or None, whether a gradient scaler is needed)`` of an ``amp`` setting.

    ``auto``: on CUDA bf16 where the GPU has it (Ampere and later), else fp16 with a gradient scaler; off on
    CPU. ``true``: the same on CUDA, bf16 autocast on CPU. ``bfloat16`` / ``float16``: that type (fp16 always
    with a scaler). ``false``: float32 throughout.
    """
    if setting is False:
        return None, False
    if setting in ("auto", True):
        if device.type != "cuda":
            return (torch.bfloat16, False) if setting is True else (None, False)
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    elif setting in ("bfloat16", "float16"):
        dtype = getattr(torch, setting)
    else:
        raise ValueError(f"amp must be auto, true, false, bfloat16 or float16, got {setting!r}")
    return dtype, dtype == torch.float16


def _cache_fits(ds: CohortDataset, device: torch.device) -> bool:
    """Whether volumes (float32) and masks (uint8) of ``ds`` take at most half of the GPU's free memory."""
    if device.type != "cuda":
        return False
    free, _total = torch.cuda.mem_get_info(device)
    return len(ds) * math.prod(ds.volume_shape) * 5 <= free // 2


class CachedBatches:
    """The volumes of a dataset held in one tensor (on the GPU, or in RAM), served in a sampler's batches.

    Replaces a DataLoader when everything fits: no host-to-device copy per step, no worker processes.
    Masks are held as uint8 (a quarter of the memory) and served as float32 like the DataLoader's.
    """

    def __init__(self, ds: CohortDataset, sampler: GlobalBatchSampler, device: torch.device) -> None:
        self.sampler = sampler
        n, shape = len(ds), ds.volume_shape
        self.x = torch.empty((n, 1, *shape), dtype=torch.float32, device=device)
        self.m = torch.empty((n, 1, *shape), dtype=torch.uint8, device=device)
        for i in range(n):  # one volume at a time: never a second full copy in host memory
            x, m = ds[i]
            self.x[i].copy_(x)
            self.m[i].copy_(m > 0)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in self.sampler:
            index = torch.as_tensor(batch, device=self.x.device)
            yield self.x.index_select(0, index), self.m.index_select(0, index).float()


def make_batches(ds: CohortDataset, cfg: Mapping[str, Any], device: torch.device, *, shuffle: bool, seed: int,
                 ctx: DistributedContext) -> tuple[GlobalBatchSampler, Any]:
    """This rank's batches of ``ds`` (call ``sampler.set_epoch`` before each pass): cached in one tensor when
    ``cache_on_device`` says so, else a DataLoader reading the memory-mapped cohort array (pinned memory and
    persistent workers on CUDA)."""
    sampler = GlobalBatchSampler(len(ds), int(cfg["batch_size"]), shuffle=shuffle, seed=seed, rank=ctx.rank,
                                 world_size=ctx.world_size)
    cache = cfg["cache_on_device"]
    if cache is True or (cache == "auto" and _cache_fits(ds, device)):
        return sampler, CachedBatches(ds, sampler, device)
    workers = cfg["num_workers"]
    if workers == "auto":
        workers = min(4, os.cpu_count() or 1) if device.type == "cuda" else 0
    # The loader's own generator (not the global RNG) seeds its workers, so starting workers never shifts the
    # random stream of the reparameterisation noise: a resumed run draws exactly what an uninterrupted one does.
    loader = DataLoader(ds, batch_sampler=sampler, num_workers=int(workers), pin_memory=device.type == "cuda",
                        worker_init_fn=seed_worker, persistent_workers=int(workers) > 0,
                        generator=torch.Generator().manual_seed(seed))
    return sampler, loader


#: Loss terms averaged over an epoch (adv, disc, perceptual: NaN when off).
EPOCH_TERMS = ("total", "recon", "kl", "adv", "disc", "perceptual")


class Trainer:
    """The networks, optimisers and loss settings of one training run, and one epoch of it.

    ``ctx``: this process's place in a data-parallel job (one process by default); the networks are
    wrapped in DistributedDataParallel when there are several.
    """

    def __init__(self, cfg: Mapping[str, Any], device: torch.device, *, steps_per_epoch: int,
                 mean_image: np.ndarray | None, ctx: DistributedContext | None = None) -> None:
        self.cfg, self.device = cfg, device
        self.ctx = ctx or DistributedContext()
        self.steps_per_epoch = steps_per_epoch  # optimiser steps (after gradient accumulation)
        self.accumulate = int(cfg["accumulate_steps"])
        # Built first: a perceptual term without usable weights fails here, before any epoch.
        self.perceptual = (PerceptualLoss(cfg["perceptual_weights"]).to(device)
                           if float(cfg["perceptual_weight"]) > 0 else None)
        model = build_model(cfg["model"])
        if mean_image is not None:
            model.set_mean_image(torch.from_numpy(mean_image))
        self.model = model.to(device)
        self.amp_dtype, scaler = precision(cfg["amp"], device)
        self.amp = self.amp_dtype is not None
        self.scaler = torch.amp.GradScaler(device.type, enabled=scaler)
        self.channels_last = True if cfg["channels_last"] == "auto" else bool(cfg["channels_last"])
        if self.channels_last:
            self.model = to_channels_last_3d(self.model)
        self.opt = make_optimizer(self.model.parameters(), cfg["lr"], cfg["weight_decay"])
        self.sched = make_scheduler(self.opt, cfg, steps_per_epoch)
        self.discriminator: nn.Module | None = None
        self.opt_d: torch.optim.Optimizer | None = None
        self.scaler_d = torch.amp.GradScaler(device.type, enabled=scaler)
        if float(cfg["adversarial_weight"]) > 0:
            self.discriminator = build_discriminator(cfg["discriminator_channels"],
                                                     cfg["discriminator_layers"]).to(device)
            self.opt_d = make_optimizer(self.discriminator.parameters(), cfg["discriminator_lr"], 0.0)
        # What the steps call: the DDP wrappers (gradients averaged over the ranks), compiled if asked.
        self.forward_model: nn.Module = self.model
        self.forward_discriminator = self.discriminator
        if self.ctx.enabled:
            ids = [device.index] if device.type == "cuda" else None
            # No buffer broadcast per step: the only buffer, the mean image, is computed alike on every rank
            # from the same training scans and never changes.
            self.forward_model = DistributedDataParallel(self.model, device_ids=ids, broadcast_buffers=False)
            if self.discriminator is not None:
                self.forward_discriminator = DistributedDataParallel(self.discriminator, device_ids=ids,
                                                                     broadcast_buffers=False)
        if cfg["compile"]:
            self.forward_model = torch.compile(self.forward_model)
        self.loader_wait = 0.0  # seconds the last epoch waited for its batches

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                 "scheduler": self.sched.state_dict(), "scaler": self.scaler.state_dict()}
        if self.discriminator is not None and self.opt_d is not None:
            state["discriminator"] = self.discriminator.state_dict()
            state["optimizer_d"] = self.opt_d.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.discriminator is not None and self.opt_d is not None:
            self.discriminator.load_state_dict(state["discriminator"])
            self.opt_d.load_state_dict(state["optimizer_d"])

    # -- one step ----------------------------------------------------------------------------
    def adversarial_on(self, epoch: int) -> bool:
        return self.discriminator is not None and epoch >= int(self.cfg["adversarial_start_epoch"])

    def _autocast(self) -> Any:
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp)

    def _no_sync(self, module: nn.Module | None, sync: bool) -> Any:
        if sync or not isinstance(module, DistributedDataParallel):
            return contextlib.nullcontext()
        return module.no_sync()

    def step(self, x: torch.Tensor, m: torch.Tensor, *, beta: float, epoch: int, weight: float = 1.0,
             update: bool = True) -> dict[str, torch.Tensor]:
        """Forward and backward of one (micro-)batch; with ``update``, the optimiser step that ends an
        accumulation group. ``weight``: this batch's share of the group's mean loss (see :meth:`run_epoch`).
        Returns the detached loss terms; nothing here waits for the device."""
        cfg = self.cfg
        adv_on = self.adversarial_on(epoch)
        with self._no_sync(self.forward_model, update):
            with self._autocast():
                recon, mu, logvar = self.forward_model(x)
                terms = loss_terms(recon, x, mu, logvar, beta=beta, kind=cfg["recon_loss"],
                                   mask=m if cfg["recon_in_mask"] else None, free_bits=float(cfg["free_bits"]))
                loss = terms["total"]
                if adv_on:
                    assert self.discriminator is not None
                    # The discriminator is frozen for the generator's term: its gradients come only from
                    # its own loss below (they would otherwise pile up over an accumulation group).
                    self.discriminator.requires_grad_(False)
                    terms["adv"] = generator_adversarial_loss(self.discriminator, recon)
                    self.discriminator.requires_grad_(True)
                    loss = loss + float(cfg["adversarial_weight"]) * terms["adv"]
                if self.perceptual is not None:
                    terms["perceptual"] = self.perceptual(recon, x)
                    loss = loss + float(cfg["perceptual_weight"]) * terms["perceptual"]
            self.scaler.scale(loss * weight).backward()
        if update:
            if cfg["grad_clip"]:
                self.scaler.unscale_(self.opt)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), float(cfg["grad_clip"]))
            self.scaler.step(self.opt)
            self.scaler.update()
            self.opt.zero_grad(set_to_none=True)
            self.sched.step()
        if adv_on:
            assert self.forward_discriminator is not None and self.opt_d is not None
            with self._no_sync(self.forward_discriminator, update):
                with self._autocast():
                    terms["disc"] = discriminator_loss(self.forward_discriminator, x, recon)
                self.scaler_d.scale(terms["disc"] * weight).backward()
            if update:
                self.scaler_d.step(self.opt_d)
                self.scaler_d.update()
                self.opt_d.zero_grad(set_to_none=True)
        terms["total"] = loss
        return {k: v.detach() for k, v in terms.items()}

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, m: torch.Tensor, *, beta: float) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        with self._autocast():
            recon, mu, logvar = self.model(x)
            return loss_terms(recon, x, mu, logvar, beta=beta, kind=cfg["recon_loss"],
                              mask=m if cfg["recon_in_mask"] else None, free_bits=float(cfg["free_bits"]))

    def run_epoch(self, batches: Any, *, epoch: int, train: bool, beta: float | None = None,
                  bar: Any = None, augment_generator: torch.Generator | None = None,
                  global_sizes: Sequence[int] | None = None) -> dict[str, float]:
        """One pass over this rank's ``batches``; trains if ``train``. ``beta``: fixed KL weight
        (validation), else the warm-up schedule per optimiser step. ``global_sizes``: the size of each
        global batch (all ranks together; default: this rank's batches are the global ones).

        Every ``accumulate_steps`` batches make one optimiser step; each batch's mean loss is weighted by its
        share of the scans of its group on all ranks, so the step follows the group's mean loss whatever the
        number of ranks and the split of the last, smaller batches. Returns volume-weighted means over all
        ranks (adv/disc/perceptual: NaN when off), read from the device once, at the end.
        """
        self.model.train(train)
        if self.discriminator is not None:
            self.discriminator.train(train)
        sums = torch.zeros(len(EPOCH_TERMS), dtype=torch.float64, device=self.device)
        counts = torch.zeros(len(EPOCH_TERMS), dtype=torch.float64, device=self.device)
        non_blocking = self.device.type == "cuda"
        groups: list[int] = []
        if train:
            sizes = list(global_sizes) if global_sizes is not None else None
            n = len(sizes) if sizes is not None else len(batches)
            groups = [min(self.accumulate, n - start) for start in range(0, n, self.accumulate)]
        show = bar is not None and not getattr(bar, "disable", True)
        self.loader_wait = 0.0
        iterator = iter(batches)
        i = 0
        while True:
            t0 = time.perf_counter()
            try:
                x, m = next(iterator)
            except StopIteration:
                break
            self.loader_wait += time.perf_counter() - t0
            x = x.to(self.device, non_blocking=non_blocking)
            m = m.to(self.device, non_blocking=non_blocking)
            b = x.shape[0]
            if train and augment_generator is not None:
                x, m = augment(x, m, self.cfg, augment_generator)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last_3d)
            if train:
                group, offset = divmod(i, self.accumulate)
                first = group * self.accumulate
                group_sizes = (sizes[first: first + groups[group]] if sizes is not None else None)
                total = sum(group_sizes) if group_sizes is not None else b * groups[group]
                update = offset == groups[group] - 1
                b_now = beta_at(epoch, self.cfg, group, self.steps_per_epoch) if beta is None else beta
                terms = self.step(x, m, beta=b_now, epoch=epoch, weight=b * self.ctx.world_size / total,
                                  update=update)
            else:
                terms = self.evaluate(x, m, beta=float(self.cfg["beta"]) if beta is None else beta)
            for k, v in terms.items():
                j = EPOCH_TERMS.index(k)
                sums[j] += v.double() * b
                counts[j] += b
            if bar is not None:
                bar.update(b * self.ctx.world_size)
                if show and i % 10 == 0:  # a host sync: only when someone watches the bar
                    bar.set_postfix(loss=f"{float(terms['total']):.4g}")
            i += 1
        totals = self.ctx.sum(torch.cat([sums, counts])).cpu().tolist()
        out = {("loss" if k == "total" else k): (totals[j] / totals[j + len(EPOCH_TERMS)]
                                                 if totals[j + len(EPOCH_TERMS)] else math.nan)
               for j, k in enumerate(EPOCH_TERMS)}
        if train and not math.isfinite(out["loss"]):
            raise FloatingPointError(f"non-finite training loss ({out['loss']}) in epoch {epoch}; lower 'lr' "
                                     "or raise 'beta_warmup_epochs'")
        return out


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
    out_dir = Path(out_dir)
    ckpt_dir = Path(checkpoint_dir)
    ckpt_path = ckpt_dir / CHECKPOINT_NAME
    ctx = world_from_env()
    dev = ctx.device(resolve_device(device))
    if threads is not None:
        torch.set_num_threads(int(threads))
    _set_deterministic(deterministic, dev)
    joined = ctx.enabled and not torch.distributed.is_initialized()
    ctx.init(dev)
    try:
        return _train_in_group(ctx, dev, config, array_path, mask_path, index, splits, out_dir,
                               ckpt_path=ckpt_path, resume=resume, deterministic=deterministic,
                               max_epochs=max_epochs, progress=progress, model_name=model_name,
                               on_epoch_end=on_epoch_end, keep_checkpoint=keep_checkpoint)
    finally:
        if joined:
            ctx.close()


def _train_in_group(ctx: DistributedContext, dev: torch.device, config: Mapping[str, Any] | None,
                    array_path: str | os.PathLike[str], mask_path: str | os.PathLike[str] | None,
                    index: str | os.PathLike[str] | pd.DataFrame, splits: str | os.PathLike[str] | pd.DataFrame,
                    out_dir: Path, *, ckpt_path: Path, resume: bool, deterministic: bool, max_epochs: int | None,
                    progress: bool | None, model_name: str,
                    on_epoch_end: Callable[[int, dict[str, Any]], None] | None,
                    keep_checkpoint: bool) -> dict[str, Any]:
    from tqdm.auto import tqdm

    ckpt_dir = ckpt_path.parent

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
    if ctx.rank:  # each rank its own stream of reparameterisation noise
        torch.manual_seed(seed + 1_000_003 * ctx.rank)
    train_sampler, train_batches = make_batches(train_ds, cfg, dev, shuffle=True, seed=seed, ctx=ctx)
    if val_rows:
        val_sampler, val_batches = make_batches(val_ds, cfg, dev, shuffle=False, seed=seed, ctx=ctx)
    steps_per_epoch = math.ceil(len(train_sampler) / int(cfg["accumulate_steps"]))
    trainer = Trainer(cfg, dev, steps_per_epoch=steps_per_epoch,
                      mean_image=(mean_of_rows(np.load(array_path, mmap_mode="r"), train_rows)
                                  if cfg["center"] else None), ctx=ctx)
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
            if ctx.rank:
                torch.manual_seed(seed + 1_000_003 * ctx.rank + start_epoch)
            log.info("resuming from epoch %d (%s)", start_epoch, ckpt_path)
    elif ckpt_path.exists() and ctx.is_main:
        ckpt_path.unlink()
    ctx.barrier()

    n_epochs = int(cfg["epochs"])
    beta_final = float(cfg["beta"])
    for epoch in range(start_epoch + 1, n_epochs + 1):
        if early["stopped"]:
            break
        t0 = time.perf_counter()
        beta = beta_at(epoch, cfg, 0, steps_per_epoch)  # at the epoch's first step (0 in epoch 1)
        lr = trainer.opt.param_groups[0]["lr"]
        show = (None if progress is None else progress) if ctx.is_main else False
        with tqdm(total=len(train_rows), desc=f"epoch {epoch}/{n_epochs}", unit="vol",
                  disable=None if show is None else not show, leave=False) as bar:
            # Seeded per (seed, epoch) like the batch order, so a resumed run augments identically.
            aug_gen = torch.Generator().manual_seed(seed * 100_003 + epoch + 7_919 + 104_729 * ctx.rank)
            train_sampler.set_epoch(epoch)
            tr = trainer.run_epoch(train_batches, epoch=epoch, train=True, bar=bar, augment_generator=aug_gen,
                                   global_sizes=train_sampler.global_sizes())
        train_seconds = time.perf_counter() - t0
        loader_wait = trainer.loader_wait
        if val_rows:
            # Validation always uses the final beta, so the early-stopping criterion does not
            # drift upward during the KL warm-up.
            val_sampler.set_epoch(epoch)
            va = trainer.run_epoch(val_batches, epoch=epoch, train=False, beta=beta_final)
        else:
            va = {"loss": math.nan, "recon": math.nan, "kl": math.nan}
        seconds = time.perf_counter() - t0
        elapsed += seconds
        row = {"epoch": epoch, "session": session, "train_loss": tr["loss"],
               "train_recon": tr["recon"], "train_kl": tr["kl"], "beta": beta,
               "val_loss": va["loss"], "val_recon": va["recon"], "val_kl": va["kl"],
               "train_adv": tr["adv"], "train_disc": tr["disc"], "train_perceptual": tr["perceptual"],
               "lr": lr, "seconds": seconds,
               # Volumes this epoch trained on (with several processes a last batch smaller than their
               # number is left out).
               "volumes_per_s": sum(train_sampler.global_sizes()) / train_seconds,
               "loader_wait_fraction": loader_wait / train_seconds}
        rows.append(row)
        log.info("epoch %d: train %.4g val %.4g (%.1fs)", epoch, tr["loss"], va["loss"], seconds)

        criterion = va["loss"] if val_rows else tr["loss"]
        if criterion < early["best_val"] - float(cfg["min_delta"]):
            early.update(best_val=criterion, best_epoch=epoch, bad_epochs=0)
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        else:
            early["bad_epochs"] += 1
            early["stopped"] = early["bad_epochs"] >= int(cfg["patience"])

        if ctx.is_main:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            save_checkpoint(ckpt_path, {
                "format": CHECKPOINT_FORMAT, "fingerprint": fingerprint, "epoch": epoch,
                "session": session, **trainer.state_dict(), "early_stopping": early, "best_model": best_state,
                "log": rows, "rng": rng_state(), "elapsed": elapsed})
            write_log(rows, ckpt_dir / "training_log.tsv")  # live progress for humans
        ctx.barrier()
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
        "amp_bf16": trainer.amp_dtype == torch.bfloat16,
        "amp_dtype": None if trainer.amp_dtype is None else str(trainer.amp_dtype).removeprefix("torch."),
        "channels_last_3d": trainer.channels_last,
        "cache_on_device": isinstance(train_batches, CachedBatches),
        "compiled": bool(cfg["compile"]),
        "processes": ctx.world_size,
        "peak_device_memory_mb": (torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None),
        "loader_wait_fraction": float(np.mean([r["loader_wait_fraction"] for r in rows])),
        "deterministic": deterministic,
    }
    metrics = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
               for k, v in metrics.items()}

    if not ctx.is_main:  # rank 0 writes the outputs
        ctx.barrier()
        return metrics
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "model.pt", suffix=".pt") as tmp:
        torch.save(final.state_dict(), tmp)
    atomic_write_json(cfg, out_dir / "config.json")
    atomic_write_json(metrics, out_dir / "metrics.json")
    atomic_write_text(environment_report(dev, {"deterministic": deterministic, "amp": metrics["amp_dtype"],
                                               "channels_last_3d": trainer.channels_last,
                                               "processes": ctx.world_size}),
                      out_dir / "environment.txt")
    write_log(rows, out_dir / "training_log.tsv")
    plot_curves(rows, out_dir / "training_curves.png")
    if not keep_checkpoint:
        ckpt_path.unlink(missing_ok=True)
        (ckpt_dir / "training_log.tsv").unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # only if empty: never delete anything else in it
            ckpt_dir.rmdir()
    ctx.barrier()
    return metrics
