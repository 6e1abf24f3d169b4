"""Model variants of the workflow config and the schema's training defaults."""

from __future__ import annotations

import pytest
import yaml

from brainvae.config import load_config
from brainvae.vae.config import RUN_DEFAULTS, TRAINING_DEFAULTS, resolve_config, spatial_factor_for
from brainvae.vae.variants import (RUN_KEYS, cohort_split_labels, run_options, split_run_options, split_train_labels,
                                   uses_cuda, variant_settings)


def test_variant_overrides_merge_the_model_key_by_key() -> None:
    shared = {"lr": 0.002, "device": "auto", "model": {"latent_dim": 32, "widths": "auto"}}
    merged = variant_settings(shared, {"lr": 0.001, "model": {"latent_dim": 16}})
    assert merged == {"lr": 0.001, "device": "auto", "model": {"latent_dim": 16, "widths": "auto"}}
    assert shared["model"]["latent_dim"] == 32  # the shared settings are not modified
    assert variant_settings(shared, {}) == shared and variant_settings(None, None) == {}
    spatial = variant_settings({"spatial": {"downsample": 4, "latent_channels": 2}}, {"spatial": {"downsample": 8}})
    assert spatial == {"spatial": {"downsample": 8, "latent_channels": 2}}


def test_run_options_are_split_from_the_training_config() -> None:
    settings = {"device": "cuda", "threads": 4, "deterministic": True, "gpus": 2, "nodes": 1, "lr": 0.1}
    config, run = split_run_options(settings)
    assert config == {"lr": 0.1} and run == {k: v for k, v in settings.items() if k != "lr"}
    assert set(RUN_KEYS) == set(run)


@pytest.mark.parametrize(("device", "expected"), [("cuda", True), ("cuda:1", True), ("auto", False),
                                                  ("cpu", False)])
def test_uses_cuda(device: str, expected: bool) -> None:
    assert uses_cuda(device) is expected


def test_training_defaults_live_in_one_place(repo_root, tmp_path) -> None:
    # The schema owns every training default; brainvae.vae.config reads them from it, so a workflow config
    # without a training section trains exactly what the library trains by default.
    schema = yaml.safe_load((repo_root / "workflow" / "schemas" / "config.schema.yaml").read_text())
    types = schema["$defs"]["training_settings"]["properties"]
    defaults = schema["properties"]["training"]["properties"]
    assert set(types) - {"train_labels"} == set(defaults) == set(TRAINING_DEFAULTS) | set(RUN_DEFAULTS)
    for section in ("model", "spatial"):  # every architecture setting has a type and a default
        assert set(types[section]["properties"]) == set(defaults[section]["properties"]) == set(TRAINING_DEFAULTS[section])
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"datasets": [{"name": "a", "bids_dir": "/x", "role": "train",
                                                  "label_column": "group"}]}))
    config = load_config(path, repo_root / "workflow" / "schemas" / "config.schema.yaml")
    training, run = split_run_options(config["training"])
    assert training == TRAINING_DEFAULTS
    assert run == RUN_DEFAULTS == run_options({}) == {"device": "auto", "threads": 2, "deterministic": False,
                                                      "gpus": "auto", "nodes": 1}


def test_resolved_config_has_one_architecture_section() -> None:
    dense = resolve_config({}, (40, 48, 40))
    assert dense["model"]["architecture"] == "dense" and "spatial" not in dense
    assert dense["model"]["widths"] == [16, 32, 64]
    spatial = resolve_config({"architecture": "spatial", "spatial": {"downsample": 8}}, (40, 48, 40))
    assert spatial["model"]["architecture"] == "spatial" and spatial["model"]["channels"] == [16, 32, 64]
    with pytest.raises(ValueError, match="does not divide"):
        resolve_config({"architecture": "spatial", "spatial": {"downsample": 16}}, (40, 48, 40))
    with pytest.raises(ValueError, match="unknown spatial"):
        resolve_config({"architecture": "spatial", "spatial": {"latent_dim": 3}}, (40, 48, 40))
    with pytest.raises(ValueError, match="unknown training config keys"):
        resolve_config({"device": "cpu"}, (40, 48, 40))


@pytest.mark.parametrize(("shape", "factor_1mm", "voxel", "expected"), [
    ((160, 192, 160), 8, 1.0, 8), ((160, 192, 160), 64, 1.0, 32),  # 160 = 32 * 5: 64 does not divide
    ((80, 96, 80), 16, 2.0, 8), ((40, 48, 40), 8, 4.0, 2), ((40, 48, 40), 16, 4.0, 4), ((40, 48, 40), 64, 4.0, 8)])
def test_paper_latent_sizes_map_to_a_factor_that_divides_the_grid(shape, factor_1mm, voxel, expected) -> None:
    assert spatial_factor_for(shape, factor_1mm, voxel) == expected


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

