"""Every VAE training setting in one place: its default, its meaning, and how a config resolves.

The defaults have one owner, the workflow schema (``workflow/schemas/config.schema.yaml``,
``properties.training``): this module reads them from there (:data:`TRAINING_DEFAULTS`,
:data:`RUN_DEFAULTS`), Snakemake fills them from there, and ``docs/configuration.md`` is rendered
from there (``brainvae config-reference``), so the library, the workflow and the reference cannot
disagree. ``config/config.yaml`` holds only overrides. A model's settings are the defaults overlaid
with the config's ``training`` section and then the variant's ``models.<name>`` overrides; the
architecture sections (``model`` for the dense VAE, ``spatial`` for the spatial one) are merged key
by key.

Architectures (``architecture``):

* ``dense`` -- brainvae's 3D conv VAE with one latent vector per scan
  (:class:`brainvae.vae.nn.dense.VAE`), settings in ``model``.
* ``spatial`` -- MONAI's ``AutoencoderKL`` with a spatial latent (channels x grid / downsample),
  settings in ``spatial`` (:class:`brainvae.vae.nn.spatial.SpatialVAE`). ``spatial.downsample`` is
  the latent's downsampling factor relative to the training grid. The paper's 24^3, 12^3 and 3^3
  latents of 1 mm inputs are factors 8, 16 and 64 at 1 mm; at 2 mm those are 4, 8 and 32 and on the
  4 mm demo grid (40x48x40) 2, 4 and 8 (16 does not divide 40; 8 is the nearest that does).

Imported by the Snakefile when it builds the DAG, so it must not import torch.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "ARCHITECTURES",
    "DEFAULT_CONFIG",
    "MODEL_DEFAULTS",
    "NESTED_KEYS",
    "RUN_KEYS",
    "RUN_DEFAULTS",
    "TRAINING_DEFAULTS",
    "canonical_json",
    "check_startup",
    "config_sha256",
    "resolve_config",
    "spatial_factor_for",
    "widths_for_grid",
]

ARCHITECTURES = ("dense", "spatial")

#: Keys of the training section that say where and how a job runs (not part of what is trained; not
#: hashed into the model's provenance).
RUN_KEYS = ("device", "threads", "deterministic", "gpus", "nodes")
#: Config section of each architecture's settings.
NESTED_KEYS: dict[str, str] = {"dense": "model", "spatial": "spatial"}


def _schema_defaults(node: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, child in (node.get("properties") or {}).items():
        if "properties" in child:
            out[key] = _schema_defaults(child)
        elif "default" in child:
            out[key] = copy.deepcopy(child["default"])
    return out


def _load_defaults() -> tuple[dict[str, Any], dict[str, Any]]:
    from brainvae.config import SCHEMA_PATH, load_schema

    everything = _schema_defaults(load_schema(SCHEMA_PATH)["properties"]["training"])
    run = {k: everything.pop(k) for k in RUN_KEYS}
    return run, everything


#: Run options' defaults (``device``, ``threads``, ``deterministic``), from the schema.
#: What is trained and how (hashed into the model's provenance), with the architecture sections
#: ``model`` (dense) and ``spatial``, from the schema.
RUN_DEFAULTS, TRAINING_DEFAULTS = _load_defaults()
#: Architecture settings per architecture (the ``model`` and ``spatial`` sections' defaults).
MODEL_DEFAULTS: dict[str, dict[str, Any]] = {arch: TRAINING_DEFAULTS[key] for arch, key in NESTED_KEYS.items()}
#: Backwards-compatible name: the training defaults without the run options.
DEFAULT_CONFIG = TRAINING_DEFAULTS


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def config_sha256(config: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON (sorted keys, no spaces) of a resolved config."""
    return hashlib.sha256(canonical_json(config).encode()).hexdigest()


def widths_for_grid(in_shape: Sequence[int], base: int = 16, max_bottleneck: int = 8,
                    max_width: int = 256) -> tuple[int, ...]:
    """Dense VAE widths (doubling from ``base``) with just enough levels for a small bottleneck.

    Levels are added until the largest bottleneck dimension is <= ``max_bottleneck`` (while every
    dimension stays divisible): demo 40x48x40 -> 3 levels (5x6x5), 2 mm 80x96x80 -> 4 (5x6x5),
    1 mm 160x192x160 -> 5 (5x6x5), 96x112x96 -> 4 (6x7x6).
    """
    levels = 1
    while (max(in_shape) // 2 ** levels > max_bottleneck
           and all(int(s) % 2 ** (levels + 1) == 0 for s in in_shape)):
        levels += 1
    return tuple(min(base * 2 ** i, max_width) for i in range(levels))


def spatial_factor_for(in_shape: Sequence[int], factor_1mm: int, voxel_mm: float) -> int:
    """The power-of-2 downsampling on a grid of ``voxel_mm`` nearest to ``factor_1mm`` at 1 mm that
    divides every dimension of ``in_shape`` (the paper's 8, 16, 64 -> demo grid: 2, 4, 8)."""
    import math

    target = max(1.0, factor_1mm / voxel_mm)
    candidates = [2 ** k for k in range(0, 12) if all(int(s) % 2 ** k == 0 for s in in_shape)]
    return min(candidates, key=lambda f: (abs(math.log2(f) - math.log2(target)), -f))


def _merge(base: Mapping[str, Any], over: Mapping[str, Any] | None) -> dict[str, Any]:
    out = copy.deepcopy(dict(base))
    for key, value in (over or {}).items():
        if key in ("model", "spatial") and isinstance(value, Mapping):
            out[key] = {**dict(out.get(key) or {}), **copy.deepcopy(dict(value))}
        else:
            out[key] = copy.deepcopy(value)
    return out


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


def _resolve_spatial(spec: Mapping[str, Any], in_shape: Sequence[int]) -> dict[str, Any]:
    unknown = set(spec) - set(MODEL_DEFAULTS["spatial"])
    if unknown:
        raise ValueError(f"unknown spatial model config keys: {sorted(unknown)}")
    out = {**copy.deepcopy(MODEL_DEFAULTS["spatial"]), **dict(spec)}
    down, patch = int(out["downsample"]), int(out["patch"])
    if not _is_power_of_two(down) or not _is_power_of_two(patch) or down % patch:
        raise ValueError(f"spatial.downsample ({down}) and spatial.patch ({patch}) must be powers of 2 "
                         "and patch must divide downsample")
    if any(int(s) % down for s in in_shape):
        raise ValueError(f"spatial.downsample {down} does not divide the grid {tuple(in_shape)}; use a "
                         "factor that does (see brainvae.vae.config.spatial_factor_for)")
    levels = (down // patch).bit_length()  # one level, plus one per halving inside AutoencoderKL
    if out["channels"] == "auto":
        out["channels"] = [min(16 * 2 ** i, 256) for i in range(levels)]
    out["channels"] = [int(c) for c in out["channels"]]
    if len(out["channels"]) != levels:
        raise ValueError(f"spatial.channels needs {levels} levels for downsample {down} with patch {patch}, "
                         f"got {out['channels']}")
    if any(c % int(out["norm_groups"]) for c in out["channels"]):
        raise ValueError(f"spatial.norm_groups {out['norm_groups']} must divide every channel count "
                         f"{out['channels']}")
    if int(out["latent_channels"]) < 1 or int(out["res_blocks"]) < 0:
        raise ValueError("spatial.latent_channels must be >= 1 and spatial.res_blocks >= 0")
    out["logvar_clamp"] = [float(v) for v in out["logvar_clamp"]]
    out["architecture"] = "spatial"
    out["in_shape"] = [int(s) for s in in_shape]
    return out


def resolve_config(config: Mapping[str, Any] | None, in_shape: Sequence[int],
                   max_epochs: int | None = None) -> dict[str, Any]:
    """Defaults overlaid with ``config`` (architecture sections merged key by key), validated.

    The result holds the training keys and one ``model`` section: the chosen architecture's settings
    with ``architecture`` and ``in_shape`` (what :func:`brainvae.vae.nn.build_model` needs); the
    other architecture's section is dropped. Unknown keys raise ValueError (a typo must not silently
    train with a default). Run options (:data:`RUN_DEFAULTS`) are not accepted here.
    """
    config = dict(config or {})
    unknown = set(config) - set(TRAINING_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown training config keys: {sorted(unknown)}")
    out = _merge(TRAINING_DEFAULTS, config)
    arch = out["architecture"]
    if arch not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {arch!r}")
    in_shape = [int(s) for s in in_shape]
    if arch == "dense":
        model = dict(out["model"])
        model.pop("architecture", None)
        if model.get("widths", "auto") == "auto":
            model["widths"] = list(widths_for_grid(in_shape))
        model["in_shape"] = in_shape
        unknown = set(model) - set(MODEL_DEFAULTS["dense"]) - {"in_shape"}
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        model = {**MODEL_DEFAULTS["dense"], **model, "architecture": "dense"}
    else:
        spec = {k: v for k, v in dict(out["spatial"]).items() if k not in ("architecture", "in_shape")}
        model = _resolve_spatial(spec, in_shape)
    out["model"] = model
    out.pop("spatial")
    if max_epochs is not None:
        out["epochs"] = int(max_epochs)
    if out["schedule"] not in ("cosine", "onecycle"):
        raise ValueError(f"schedule must be cosine or onecycle, got {out['schedule']!r}")
    if out["recon_loss"] not in ("mse", "l1"):
        raise ValueError(f"recon_loss must be mse or l1, got {out['recon_loss']!r}")
    if int(out["epochs"]) < 1 or int(out["batch_size"]) < 1:
        raise ValueError("epochs and batch_size must be >= 1")
    if float(out["free_bits"]) < 0 or float(out["adversarial_weight"]) < 0 or float(out["perceptual_weight"]) < 0:
        raise ValueError("free_bits, adversarial_weight and perceptual_weight must be >= 0")
    check_startup(out)
    return json.loads(canonical_json(out))  # plain JSON types only (tuples -> lists)


def check_startup(cfg: Mapping[str, Any]) -> None:
    """Fail before any data is read for settings that cannot run here (no download ever happens)."""
    import os

    if float(cfg.get("perceptual_weight") or 0.0) > 0:
        path = cfg.get("perceptual_weights")
        if not path:
            raise ValueError(
                "perceptual_weight > 0 needs perceptual_weights: the local path of a 3D ResNet-10 state dict "
                "(e.g. MedicalNet's resnet_10_23dataset.pth, downloaded by you beforehand); brainvae never "
                "downloads weights at run time. Set perceptual_weights or perceptual_weight: 0.")
        if not os.path.isfile(path):
            raise ValueError(f"perceptual_weights: {path} is not a file (brainvae never downloads weights)")
