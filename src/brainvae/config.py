"""Load and validate the workflow configuration against its JSON schema.

Errors name the offending key as a path (``datasets[1].role``) so that users can find it in their YAML.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from .errors import ConfigError


def _with_defaults(validator_class):
    """A validator that fills in ``default`` values of missing properties (as Snakemake's validate does)."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, subschema in properties.items():
                if "default" in subschema and name not in instance:
                    instance[name] = copy.deepcopy(subschema["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


def key_path(path) -> str:
    """``deque(['datasets', 1, 'role'])`` -> ``'datasets[1].role'``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<top level>"


#: The workflow's configuration schema: the one place every default is set (brainvae is installed from its
#: repository, so the schema sits beside the package).
SCHEMA_PATH = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"


def schema_default(*keys: str) -> Any:
    """The schema's default of a nested key, e.g. ``schema_default("demo", "ds_strength")``."""
    node = load_schema(SCHEMA_PATH)
    for key in keys:
        node = node["properties"][key]
    return copy.deepcopy(node["default"])


def load_schema(schema_path: str | Path) -> dict:
    with open(schema_path) as handle:
        return yaml.safe_load(handle)


#: Keys of earlier versions, by dotted path: what replaces them (named in the error instead of "unknown key").
REMOVED_KEYS = {
    "analysis.normative.negative": "removed: a model's normative population is the labels it learns from "
                                   "(cohort.train_labels, or models.<name>.train_labels)",
}


def validate_config(config: dict[str, Any], schema: dict | str | Path) -> dict[str, Any]:
    """Validate ``config`` in place, fill defaults and return it; raise ConfigError naming every bad key."""
    if not isinstance(schema, dict):
        schema = load_schema(schema)
    if not isinstance(config, dict):
        raise ConfigError("the configuration must be a mapping of keys to values")
    validator_class = _with_defaults(jsonschema.validators.validator_for(schema))
    validator = validator_class(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: [str(p) for p in e.absolute_path])
    if errors:
        lines = []
        for error in errors:
            where = key_path(error.absolute_path)
            if error.validator == "additionalProperties":
                # jsonschema reports the parent; name the unknown key(s) themselves.
                extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
                for key in (f"{where}.{k}" if where != "<top level>" else k for k in extra):
                    lines.append(f"config key {key}: {REMOVED_KEYS.get(key, 'unknown key (typo?)')}")
            else:
                lines.append(f"config key {where}: {error.message}")
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines))
    _check_semantics(config)
    return config


def _check_semantics(config: dict[str, Any]) -> None:
    """Rules a JSON schema cannot express."""
    problems = []
    names = [d["name"] for d in config["datasets"]]
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"config key datasets: dataset name {name!r} is used more than once")
    for i, dataset in enumerate(config["datasets"]):
        labels = dataset.get("labels")
        if labels is not None and len(labels) < 1:
            problems.append(f"config key datasets[{i}].labels: give at least one label or omit the key")
    conform = config.get("conform", {})
    if conform.get("min_voxel_mm", 0) >= conform.get("max_voxel_mm", float("inf")):
        problems.append("config key conform.min_voxel_mm: must be smaller than conform.max_voxel_mm")
    fractions = config.get("cohort", {}).get("split_fractions")
    if fractions is not None and not math.isclose(sum(fractions), 1.0):
        problems.append(f"config key cohort.split_fractions: must sum to 1, got {fractions}")
    if "train_labels" in config.get("training", {}):
        problems.append("config key training.train_labels: set cohort.train_labels (every model) or "
                        "models.<name>.train_labels (one model)")
    problems += _model_problems(config)
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))


def _model_problems(config: dict[str, Any]) -> list[str]:
    """Model variants whose settings cannot run here (e.g. a perceptual term without local weights)."""
    from .vae.config import check_startup
    from .vae.variants import run_options, run_problems, split_run_options, split_train_labels, variant_settings

    problems = []
    for name, overrides in (config.get("models") or {}).items():
        try:
            settings = variant_settings(config.get("training", {}), split_train_labels(overrides, None)[0])
            config_part, _run = split_run_options(settings)
            check_startup(config_part)
            problems += [f"config key models.{name}: {p}" for p in run_problems(run_options(settings))]
        except ValueError as error:
            problems.append(f"config key models.{name}: {error}")
    return problems


def load_config(path: str | Path, schema: dict | str | Path) -> dict[str, Any]:
    with open(path) as handle:
        config = yaml.safe_load(handle) or {}
    return validate_config(config, schema)
