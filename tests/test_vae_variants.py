"""Model variants of the workflow config and the schema's training defaults."""

from __future__ import annotations

import pytest
import yaml

from brainvae.config import load_config
from brainvae.vae.train import DEFAULT_CONFIG, resolve_config
from brainvae.vae.variants import (RUN_KEYS, cohort_split_labels, split_run_options, split_train_labels, uses_cuda,
                                   variant_settings)


def test_variant_overrides_merge_the_model_key_by_key() -> None:
    shared = {"lr": 0.002, "device": "auto", "model": {"latent_dim": 32, "widths": "auto"}}
    merged = variant_settings(shared, {"lr": 0.001, "model": {"latent_dim": 16}})
    assert merged == {"lr": 0.001, "device": "auto", "model": {"latent_dim": 16, "widths": "auto"}}
    assert shared["model"]["latent_dim"] == 32  # the shared settings are not modified
    assert variant_settings(shared, {}) == shared and variant_settings(None, None) == {}


def test_run_options_are_split_from_the_training_config() -> None:
    config, run = split_run_options({"device": "cuda", "threads": 4, "deterministic": True, "lr": 0.1})
    assert config == {"lr": 0.1} and run == {"device": "cuda", "threads": 4, "deterministic": True}
    assert set(RUN_KEYS) == set(run)


@pytest.mark.parametrize(("device", "expected"), [("cuda", True), ("cuda:1", True), ("auto", False),
                                                  ("cpu", False)])
def test_uses_cuda(device: str, expected: bool) -> None:
    assert uses_cuda(device) is expected


def test_schema_training_defaults_match_the_library(repo_root, tmp_path) -> None:
    # Two places hold the training defaults (schema for the workflow, DEFAULT_CONFIG for the
    # library); they must not drift apart.
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"datasets": [{"name": "a", "bids_dir": "/x", "role": "train",
                                                  "label_column": "group"}]}))
    config = load_config(path, repo_root / "workflow" / "schemas" / "config.schema.yaml")
    training, run = split_run_options(config["training"])
    assert training == DEFAULT_CONFIG
    assert run == {"device": "auto", "threads": 2, "deterministic": False}


def test_every_configured_model_resolves(repo_root) -> None:
    config = load_config(repo_root / "config" / "config.yaml",
                         repo_root / "workflow" / "schemas" / "config.schema.yaml")
    assert config["models"]
    for overrides in config["models"].values():
        overrides, _ = split_train_labels(overrides, config["cohort"]["train_labels"])
        training, _ = split_run_options(variant_settings(config["training"], overrides))
        resolved = resolve_config(training, (40, 48, 40))
        assert resolved["model"]["in_shape"] == [40, 48, 40]


def test_train_labels_are_per_variant_with_the_cohort_default() -> None:
    default = ["euploid"]
    assert split_train_labels({"lr": 0.1}, default) == ({"lr": 0.1}, ["euploid"])
    assert split_train_labels({"lr": 0.1, "train_labels": None}, default) == ({"lr": 0.1}, None)
    assert split_train_labels({"train_labels": ["DS", "euploid"]}, default) == ({}, ["DS", "euploid"])
    assert split_train_labels(None, None) == ({}, None)
    overrides = {"train_labels": None}
    split_train_labels(overrides, default)
    assert overrides == {"train_labels": None}  # the config is not modified


def test_cohort_splits_cover_every_variants_labels() -> None:
    assert cohort_split_labels([["euploid"], ["euploid"]]) == ["euploid"]
    assert cohort_split_labels([["euploid"], ["DS"]]) == ["DS", "euploid"]
    assert cohort_split_labels([["euploid"], None]) is None

