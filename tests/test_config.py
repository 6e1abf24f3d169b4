import copy

import pytest
import yaml

from brainvae.config import key_path, load_config, validate_config
from brainvae.errors import ConfigError


@pytest.fixture()
def schema(repo_root):
    return repo_root / "workflow" / "schemas" / "config.schema.yaml"


@pytest.fixture()
def default_config(repo_root):
    with open(repo_root / "config" / "config.yaml") as handle:
        return yaml.safe_load(handle)


def test_default_config_is_valid_and_runs_the_demo(repo_root, schema):
    config = load_config(repo_root / "config" / "config.yaml", schema)
    assert [d["name"] for d in config["datasets"]] == ["IXI", "HCP", "SantPau", "ABCDS"]
    # The paper's roles: the VAE learns from euploid-only datasets and is analysed on datasets it never sees.
    assert {d["name"]: d["role"] for d in config["datasets"]} == {"IXI": "train", "HCP": "train",
                                                                  "SantPau": "analyse", "ABCDS": "analyse"}
    assert all(config["demo"]["sites"][d["name"]]["ds_fraction"] == 0 for d in config["datasets"] if d["role"] == "train")
    assert all(d["bids_dir"].startswith(config["demo"]["output_dir"]) for d in config["datasets"])


def test_defaults_are_filled(schema):
    config = validate_config({"datasets": [{"name": "a", "bids_dir": "/x", "role": "train",
                                             "label_column": "group"}]}, schema)
    assert config["output_dir"] == "results"
    assert config["datasets"][0]["include"] == [] and config["datasets"][0]["exclude"] == []
    assert config["conform"]["volume_index"] is None
    assert config["demo"]["sites"]["SantPau"] == {"subjects": 48, "ds_fraction": 0.5}


@pytest.mark.parametrize("mutate, expected", [
    (lambda c: c["datasets"][1].__setitem__("role", "trian"), "datasets[1].role"),
    (lambda c: c["datasets"][0].__setitem__("colour", "red"), "datasets[0].colour: unknown key"),
    (lambda c: c.__setitem__("ouput_dir", "x"), "ouput_dir: unknown key"),
    (lambda c: c["demo"]["sites"]["IXI"].__setitem__("subjects", "many"), "demo.sites.IXI.subjects"),
    (lambda c: c["demo"]["sites"]["IXI"].__setitem__("people", 3), "demo.sites.IXI.people: unknown key"),
    (lambda c: c["datasets"][0].pop("label_column"), "'label_column' is a required property"),
    (lambda c: c["datasets"][0].__setitem__("name", "a/b"), "datasets[0].name"),
    (lambda c: c["conform"].__setitem__("volume_index", -1), "conform.volume_index"),
    (lambda c: c["datasets"][1].__setitem__("name", "IXI"), "dataset name 'IXI' is used more than once"),
    (lambda c: c["conform"].__setitem__("min_voxel_mm", 9.0), "conform.min_voxel_mm"),
    (lambda c: c["analysis"]["normative"].__setitem__("negative", "euploid"),
     "analysis.normative.negative: removed: a model's normative population is the labels it learns from"),
])
def test_errors_name_the_bad_key(default_config, schema, mutate, expected):
    config = copy.deepcopy(default_config)
    mutate(config)
    with pytest.raises(ConfigError, match="invalid configuration") as info:
        validate_config(config, schema)
    assert expected in str(info.value)


def test_every_error_is_reported_at_once(default_config, schema):
    config = copy.deepcopy(default_config)
    config["datasets"][0]["role"] = "x"
    config["demo"]["seed"] = -1
    with pytest.raises(ConfigError) as info:
        validate_config(config, schema)
    assert "datasets[0].role" in str(info.value) and "demo.seed" in str(info.value)


def test_key_path():
    assert key_path(["datasets", 1, "role"]) == "datasets[1].role"
    assert key_path([]) == "<top level>"
