"""Model variants of the workflow configuration: shared ``training`` settings overlaid per model.

The config has one ``training`` section (keys of :data:`brainvae.vae.config.TRAINING_DEFAULTS` plus
the run options :data:`RUN_KEYS`) and ``models: {name: overrides}``. A variant's settings are the
shared ones with its overrides on top; the architecture sections (``model`` for the dense VAE,
``spatial`` for the spatial one) are merged key by key, so ``{model: {latent_dim: 16}}`` keeps the
shared widths. Defaults are not filled in here: :func:`brainvae.vae.config.resolve_config` does
that for the training config, :data:`brainvae.vae.config.RUN_DEFAULTS` for the run options
(:func:`run_options`).

Imported by the Snakefile when it builds the DAG, so it must not import torch.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..runtime import uses_cuda
from .config import RUN_DEFAULTS

__all__ = ["NESTED", "RUN_KEYS", "cohort_split_labels", "gpus_per_node", "run_options", "run_problems",
           "split_run_options", "split_train_labels", "training_processes", "uses_cuda", "variant_settings"]

#: Settings about where and how a job runs, not what is trained (not part of the model's config).
RUN_KEYS = tuple(RUN_DEFAULTS)
#: Sections merged key by key.
NESTED = ("model", "spatial")


def variant_settings(training: Mapping[str, Any] | None, overrides: Mapping[str, Any] | None
                     ) -> dict[str, Any]:
    """``training`` with ``overrides`` on top; the nested ``model`` mapping merged key by key."""
    merged = copy.deepcopy(dict(training or {}))
    for key, value in (overrides or {}).items():
        if key in NESTED:
            merged[key] = {**dict(merged.get(key) or {}), **copy.deepcopy(dict(value or {}))}
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def split_run_options(settings: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(training config, run options)``: the run options are the :data:`RUN_KEYS` present."""
    config = {k: copy.deepcopy(v) for k, v in settings.items() if k not in RUN_KEYS}
    run = {k: settings[k] for k in RUN_KEYS if k in settings}
    return config, run


def run_options(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The run options of a variant's settings with :data:`~brainvae.vae.config.RUN_DEFAULTS` filled in."""
    return {**RUN_DEFAULTS, **split_run_options(settings)[1]}


def split_train_labels(overrides: Mapping[str, Any] | None, default: Sequence[str] | None
                       ) -> tuple[dict[str, Any], list[str] | None]:
    """``(overrides without train_labels, labels the variant learns from)``.

    ``train_labels`` is a per-variant choice of *which scans* are learnt from, not a training
    setting, so it is not part of the model's config; absent, the variant takes ``default``
    (``cohort.train_labels``). ``None``: every label.
    """
    overrides = dict(overrides or {})
    labels = overrides.pop("train_labels") if "train_labels" in overrides else default
    return overrides, (None if labels is None else [str(v) for v in labels])


def cohort_split_labels(per_variant: Iterable[Sequence[str] | None]) -> list[str] | None:
    """Labels the cohort splits must cover so that every variant finds its scans there (``None``: all)."""
    union: set[str] = set()
    for labels in per_variant:
        if labels is None:
            return None
        union.update(str(v) for v in labels)
    return sorted(union)


def gpus_per_node(run: Mapping[str, Any]) -> int:
    """GPUs per node a variant's jobs ask for: ``gpus``, where ``auto`` is 1 with device ``cuda``, else 0."""
    gpus = run.get("gpus", "auto")
    if gpus == "auto":
        return 1 if uses_cuda(run.get("device", "auto")) else 0
    return int(gpus)


def training_processes(run: Mapping[str, Any]) -> tuple[int, int]:
    """``(processes per node, nodes)`` of a variant's training: one per GPU (at least one) on each node."""
    return max(1, gpus_per_node(run)), int(run.get("nodes", 1))


def run_problems(run: Mapping[str, Any]) -> list[str]:
    """Run options that contradict each other (checked when the workflow starts)."""
    device, gpus, nodes = str(run.get("device", "auto")), gpus_per_node(run), int(run.get("nodes", 1))
    problems = []
    if device == "cpu" and gpus > 0:
        problems.append(f"gpus is {gpus} but device is cpu: set device: auto or cuda to train on GPUs")
    if nodes > 1 and gpus == 0:
        problems.append(f"nodes is {nodes} but no GPUs are asked for: set gpus (per node) >= 1")
    if ":" in device and gpus * nodes > 1:
        problems.append(f"device {device} names one GPU but gpus x nodes is {gpus * nodes}: use device cuda")
    return problems
