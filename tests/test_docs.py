"""The documentation stays true to the code: the configuration reference is the rendering of the current schema,
every key with a default is in it with that default, and the README's links point at files that exist."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

from brainvae import cli, config_reference
from brainvae.config import SCHEMA_PATH, load_schema

ROOT = SCHEMA_PATH.parents[2]
REFERENCE = ROOT / "docs" / "configuration.md"
README = ROOT / "README.md"


@pytest.fixture(scope="module")
def schema() -> dict:
    return load_schema(SCHEMA_PATH)


@pytest.fixture(scope="module")
def rendered(schema) -> str:
    return config_reference.render_reference(schema)


def _table_rows(text: str) -> dict[str, list[str]]:
    """``key -> [type, default, description]`` of every table row whose first cell is a `key`."""
    rows = {}
    for line in text.splitlines():
        match = re.match(r"^\| `([^`]+)` \| (.*) \|$", line)
        if match:
            cells = re.split(r"(?<!\\)\| ", match.group(2) + " ")
            rows[match.group(1)] = [c.strip() for c in cells]
    return rows


def _defaults(node: dict, path: str, schema: dict):
    """Every (dotted path, default) in the schema, walked independently of brainvae.config_reference:
    arrays of objects as ``key[]``, maps' keys as a ``<...>`` placeholder, local $ref followed."""
    if "$ref" in node:
        target = schema
        for part in node["$ref"][2:].split("/"):
            target = target[part]
        # The referencing node's own properties (the defaults of `training`) are the ones it uses.
        if "properties" not in node:
            yield from _defaults({**target, **{k: v for k, v in node.items() if k != "$ref"}}, path, schema)
            return
    if "default" in node and path:
        yield path, node["default"]
    for name, child in (node.get("properties") or {}).items():
        yield from _defaults(child, f"{path}.{name}" if path else name, schema)
    items = node.get("items")
    if isinstance(items, dict) and items.get("properties"):
        yield from _defaults(items, f"{path}[]", schema)
    extra = node.get("additionalProperties")
    if isinstance(extra, dict):
        yield from _defaults(extra, f"{path}.<*>", schema)


def test_committed_reference_is_the_rendering_of_the_current_schema(rendered):
    assert REFERENCE.exists(), (f"{REFERENCE.relative_to(ROOT)} is missing: generate it with "
                                f"`{config_reference.REGENERATE_COMMAND}`")
    assert REFERENCE.read_text(encoding="utf-8") == rendered, (
        f"{REFERENCE.relative_to(ROOT)} is stale: the schema ({SCHEMA_PATH.relative_to(ROOT)}) or the QC "
        f"thresholds changed. Regenerate it with `{config_reference.REGENERATE_COMMAND}` and commit it.")


def test_every_key_with_a_default_is_in_the_reference_with_that_default(schema, rendered):
    rows = _table_rows(rendered)
    blocks = dict(re.findall(r"Default of `([^`]+)`:\n\n```yaml\n(.*?)\n```", rendered, flags=re.S))
    found = 0
    for path, default in _defaults(schema, "", schema):
        if "." not in path and "[" not in path:  # a section: its heading and summary line
            assert f"\n## {path}\n" in rendered, path
            continue
        pattern = re.compile("^" + re.escape(path).replace(re.escape("<*>"), "<[a-z]+>") + "$")
        keys = [key for key in rows if pattern.match(key)]
        assert len(keys) == 1, f"{path}: not in the reference (or more than once): {keys}"
        cell = rows[keys[0]][1]
        if cell == "see below":
            assert yaml.safe_load(blocks[keys[0]]) == {keys[0].split(".")[-1]: default}, path
        else:
            assert re.fullmatch(r"`[^`]*`", cell), f"{path}: default cell {cell!r}"
            assert yaml.safe_load(cell.strip("`")) == default, f"{path}: {cell} != {default!r}"
        found += 1
    assert found > 80  # the walk reached every section, training and the task maps included


def test_reference_renders_nested_maps_and_shared_definitions(rendered):
    rows = _table_rows(rendered)
    for key in ("preprocess.n4.shrink_factor", "datasets[].role", "demo.sites.<site>.subjects",
                "analysis.tasks.<name>.kind", "training.model.latent_dim", "models.<name>.train_labels",
                "qc.thresholds.max_anisotropy"):
        assert key in rows, key
    assert rows["datasets[].name"][1] == "required"
    assert rows["datasets[].labels"][1] == "–"
    assert rows["training.schedule"][0] == "one of `cosine`, `onecycle`"
    # train_labels is refused under `training`: listed only under models.<name>, which points back to training.
    assert "training.train_labels" not in rows
    assert "every key of `training`" in rows["models.<name>"][2]
    assert "`brainvae.qc.DEFAULT_THRESHOLDS`" in rows["qc.thresholds.max_anisotropy"][1]


def test_a_schema_change_makes_the_reference_stale(schema, tmp_path, capsys):
    output = tmp_path / "configuration.md"
    assert cli.main(["config-reference", "--output", str(output)]) == 0
    assert cli.main(["config-reference", "--output", str(output), "--check"]) == 0
    changed = copy.deepcopy(schema)
    changed["properties"]["analysis"]["properties"]["outer_folds"]["default"] = 7
    assert config_reference.render_reference(changed) != output.read_text(encoding="utf-8")
    output.write_text(config_reference.render_reference(changed), encoding="utf-8")
    capsys.readouterr()
    assert cli.main(["config-reference", "--output", str(output), "--check"]) == 1
    message = capsys.readouterr().err
    assert "out of date" in message and config_reference.REGENERATE_COMMAND in message
    output.unlink()
    assert cli.main(["config-reference", "--output", str(output), "--check"]) == 1
    assert config_reference.REGENERATE_COMMAND in capsys.readouterr().err


def test_readme_is_a_short_manual_whose_links_exist():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 260
    assert not re.search(r"\bcommit [0-9a-f]{7,40}\b", text)
    documents = [README, *sorted((ROOT / "docs").glob("*.md"))]
    for document in documents:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", document.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+://", target) or target.startswith("mailto:"):
                continue
            assert (document.parent / target).exists(), f"{document.relative_to(ROOT)}: broken link {target}"
    assert "docs/configuration.md" in text
