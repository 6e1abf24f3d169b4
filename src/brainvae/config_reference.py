"""The configuration reference (``docs/configuration.md``), rendered from the workflow's JSON schema.

``workflow/schemas/config.schema.yaml`` is the one place where every key, type, default and description is
written down (:data:`brainvae.config.SCHEMA_PATH`); this module turns it into Markdown, one table per top-level
section, so the reference cannot drift from what the workflow validates. ``brainvae config-reference`` writes
the file, and ``brainvae config-reference --check`` (and ``tests/test_docs.py``) fails when the committed file
differs from the rendering of the current schema.

Keys are written as dotted paths: ``preprocess.n4.shrink_factor``; ``datasets[].role`` for the entries of an
array of objects; ``demo.sites.<site>.subjects`` or ``analysis.tasks.<name>.kind`` for maps whose keys the user
chooses (``additionalProperties``). A ``$ref`` is resolved; where a node adds its own ``properties`` to a
``$ref`` (``training``: the defaults over ``$defs/training_settings``) the keys listed there are the ones
rendered, and a later use of the same definition (``models.<name>``) renders only the keys not shown before
and points to the earlier section for the rest.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml

from .config import SCHEMA_PATH, load_schema

__all__ = [
    "DEFAULT_OUTPUT",
    "REGENERATE_COMMAND",
    "Row",
    "check_reference",
    "iter_rows",
    "render_reference",
    "write_reference",
]

#: Where the reference is committed (the repository's docs/ folder, beside workflow/).
DEFAULT_OUTPUT = SCHEMA_PATH.parents[2] / "docs" / "configuration.md"
#: What to run when the committed reference is stale.
REGENERATE_COMMAND = "brainvae config-reference --output docs/configuration.md"

#: Defaults too long for a table cell are written as a YAML block under the section's table.
_MAX_INLINE_DEFAULT = 48
_NO_DEFAULT = "–"


class Row(dict):
    """One key of the reference: ``key``, ``type``, ``default`` (text), ``description``, ``block`` (a long
    default as YAML, or None) and ``has_default``."""


def _resolve(node: dict, schema: dict) -> tuple[dict, str | None]:
    """``node`` with a local ``$ref`` merged in (the node's own keys win, ``properties`` merged key by key),
    and the name of the reference (None without one)."""
    ref = node.get("$ref")
    if not ref:
        return node, None
    if not ref.startswith("#/"):
        raise ValueError(f"only local $ref are supported, not {ref!r}")
    target: Any = schema
    for part in ref[2:].split("/"):
        target = target[part]
    target, _ = _resolve(target, schema)
    merged = copy.deepcopy(target)
    for key, value in node.items():
        if key == "$ref":
            continue
        if key == "properties":
            properties = {}
            # The referencing node lists the keys it uses (in the definition's order), each merged.
            for name, definition in target.get("properties", {}).items():
                if name in value:
                    properties[name] = _merge(definition, value[name])
            for name, extra in value.items():
                if name not in properties:
                    properties[name] = extra
            merged["properties"] = properties
        else:
            merged[key] = value
    return merged, ref


def _merge(base: dict, overlay: dict) -> dict:
    """``overlay`` over ``base``; nested ``properties`` merged key by key (a key only in ``base`` kept)."""
    merged = copy.deepcopy(base)
    for key, value in overlay.items():
        if key == "properties" and isinstance(merged.get("properties"), dict):
            properties = dict(merged["properties"])
            for name, sub in value.items():
                properties[name] = _merge(properties.get(name, {}), sub)
            merged["properties"] = properties
        else:
            merged[key] = value
    return merged


def _number(value: Any) -> str:
    """``8.0`` -> ``8``, ``1e-06`` -> ``1.0e-6`` (the form YAML reads as a number)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    text = repr(value)
    if isinstance(value, float) and "e" in text:
        mantissa, exponent = text.split("e")
        mantissa = mantissa if "." in mantissa else mantissa + ".0"
        text = f"{mantissa}e{int(exponent)}"
    return text


def _bounds(node: dict) -> str:
    """``≥ 1``, ``0–3``, ``> 0``: the numeric limits of a number or integer."""
    low, high = node.get("minimum"), node.get("maximum")
    xlow, xhigh = node.get("exclusiveMinimum"), node.get("exclusiveMaximum")
    if low is not None and high is not None:
        return f"{_number(low)}–{_number(high)}"
    parts = []
    if low is not None:
        parts.append(f"≥ {_number(low)}")
    if xlow is not None:
        parts.append(f"> {_number(xlow)}")
    if high is not None:
        parts.append(f"≤ {_number(high)}")
    if xhigh is not None:
        parts.append(f"< {_number(xhigh)}")
    return ", ".join(parts)


def _code(value: Any) -> str:
    """A value as inline YAML in backticks (``null``, ``true``, ``[1, 99]``)."""
    return f"`{_flow(value)}`"


def _flow(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return _number(value)
    if isinstance(value, str):
        text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
        return text.removesuffix("\n...").removesuffix("...").strip()
    if isinstance(value, list):
        return "[" + ", ".join(_flow(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_flow(v)}" for k, v in value.items()) + "}"
    return str(value)


def _type(node: dict, schema: dict) -> str:
    """A short description of what a key accepts: ``integer ≥ 1``, ``one of `cosine`, `onecycle```."""
    node, _ = _resolve(node, schema)
    if "const" in node:
        return _code(node["const"])
    if "enum" in node:
        return "one of " + ", ".join(_code(v) for v in node["enum"])
    if "anyOf" in node or "oneOf" in node:
        return " or ".join(_type(option, schema) for option in node.get("anyOf", node.get("oneOf")))
    kinds = node.get("type")
    if isinstance(kinds, list):
        kinds_list = kinds
    elif kinds is None:
        kinds_list = ["object"] if "properties" in node or "additionalProperties" in node else []
    else:
        kinds_list = [kinds]
    texts = []
    for kind in kinds_list:
        if kind in ("number", "integer"):
            bounds = _bounds(node)
            texts.append(f"{kind} {bounds}" if bounds else kind)
        elif kind == "string":
            if "pattern" in node:
                texts.append(f"string matching `{node['pattern']}`")
            else:
                texts.append("string")
        elif kind == "array":
            items = node.get("items")
            text = "array"
            if items:
                text += " of " + _type(items, schema)
            counts = node.get("minItems"), node.get("maxItems")
            if counts[0] is not None and counts[0] == counts[1]:
                text += f" ({counts[0]} items)"
            elif counts[0] and counts[1]:
                text += f" ({counts[0]}–{counts[1]} items)"
            elif counts[0]:
                text += f" (≥ {counts[0]} item{'s' if counts[0] > 1 else ''})"
            elif counts[1]:
                text += f" (≤ {counts[1]} items)"
            if node.get("uniqueItems"):
                text += ", unique"
            texts.append(text)
        elif kind == "object":
            extra = node.get("additionalProperties")
            if isinstance(extra, dict) and "properties" not in node:
                texts.append("map")
            else:
                texts.append("object")
        else:
            texts.append(str(kind))
    return " or ".join(texts) if texts else "any"


def _description(node: dict) -> str:
    """The node's description on one line, ``<`` escaped outside code spans (Markdown would read
    ``models.<name>`` as an HTML tag)."""
    return _escape(" ".join(str(node.get("description", "")).split()))


def _escape(text: str) -> str:
    parts = text.split("`")
    return "`".join(part if i % 2 else part.replace("<", "&lt;") for i, part in enumerate(parts))


def _map_key_name(path: str) -> str:
    """The placeholder for a map's keys: ``<site>`` under ``demo.sites``, ``<name>`` elsewhere."""
    parts = re.split(r"[.\[]", path)
    if len(parts) > 1 and parts[-2] == "grids":
        return "<parameter>"
    last = parts[-1]
    special = {"sites": "<site>", "grids": "<estimator>", "where": "<column>", "thresholds": "<metric>"}
    if last in special:
        return special[last]
    return "<name>"


class _Walker:
    def __init__(self, schema: dict, extra_defaults: dict[str, Any] | None = None):
        self.schema = schema
        self.extra_defaults = extra_defaults or {}
        self.rendered: dict[str, tuple[str, set[str]]] = {}  # $ref -> (where, keys rendered there)

    def rows(self, path: str, node: dict, required: bool) -> list[Row]:
        node, ref = _resolve(node, self.schema)
        rows = [self._row(path, node, required)]
        head = rows[0]
        properties = node.get("properties") or {}
        if ref is not None and properties and "properties" in self._definition(ref):
            if ref in self.rendered:
                where, shown = self.rendered[ref]
                rows[0]["description"] = (rows[0]["description"] + " " if rows[0]["description"] else "") + (
                    f"Takes every key of `{where}` (see there); the keys below only here.")
                properties = {k: v for k, v in properties.items() if k not in shown}
            else:
                self.rendered.setdefault(ref, (path, set(properties)))
        needed = set(node.get("required", []))
        for name, child in properties.items():
            rows += self.rows(f"{path}.{name}", child, name in needed)
        items = node.get("items")
        if node.get("type") == "array" and isinstance(items, dict):
            resolved_items, _ = _resolve(items, self.schema)
            if resolved_items.get("properties"):
                needed_items = set(resolved_items.get("required", []))
                for name, child in resolved_items["properties"].items():
                    rows += self.rows(f"{path}[].{name}", child, name in needed_items)
        extra = node.get("additionalProperties")
        if isinstance(extra, dict):
            resolved_extra, _ = _resolve(extra, self.schema)
            if resolved_extra.get("properties") or resolved_extra.get("$ref") or extra.get("$ref"):
                rows += self.rows(f"{path}.{_map_key_name(path)}", extra, False)
        if len(rows) > 1 and not (head["description"] or head["has_default"] or required):
            rows = rows[1:]  # a map's entry (demo.sites.<site>) says nothing its keys do not
        return rows

    def _definition(self, ref: str) -> dict:
        target: Any = self.schema
        for part in ref[2:].split("/"):
            target = target[part]
        return target

    def _row(self, path: str, node: dict, required: bool) -> Row:
        description = _description(node)
        block = None
        if "default" in node:
            value = node["default"]
            text = _code(value)
            if len(text) > _MAX_INLINE_DEFAULT:
                block = yaml.safe_dump({path.split(".")[-1]: value}, default_flow_style=None,
                                       sort_keys=False, width=100).rstrip()
                text = "see below"
            has_default = True
        elif path in self.extra_defaults:
            source, value = self.extra_defaults[path]
            text = f"{_code(value)} ({source})"
            has_default = True
        else:
            text = "required" if required else _NO_DEFAULT
            has_default = False
        extra = node.get("additionalProperties")
        kind = _type(node, self.schema)
        if kind == "map" and isinstance(extra, dict):
            key = _map_key_name(path)
            names = node.get("propertyNames", {}).get("pattern")
            kind = f"map `{key}` → " + ("settings" if _resolve(extra, self.schema)[0].get("properties")
                                      else _type(extra, self.schema))
            if names:
                kind += f" (`{key}` matching `{names}`)"
        return Row(key=path, type=kind, default=text, description=description, block=block,
                   has_default=has_default)


def _extra_defaults() -> dict[str, tuple[str, Any]]:
    """Defaults that live in code rather than the schema, keyed by dotted path (QC thresholds)."""
    try:
        from .qc import DEFAULT_THRESHOLDS
    except ImportError:  # pragma: no cover - the reference is rendered inside brainvae's environment
        return {}
    return {f"qc.thresholds.{name}": ("`brainvae.qc.DEFAULT_THRESHOLDS`", value)
            for name, value in DEFAULT_THRESHOLDS.items()}


def iter_rows(schema: dict | None = None, extra_defaults: dict | None = None) -> dict[str, list[Row]]:
    """Section name -> its rows (the section's own row first), in the schema's order."""
    schema = load_schema(SCHEMA_PATH) if schema is None else schema
    extra_defaults = _extra_defaults() if extra_defaults is None else extra_defaults
    walker = _Walker(schema, extra_defaults)
    needed = set(schema.get("required", []))
    return {name: walker.rows(name, node, name in needed) for name, node in schema.get("properties", {}).items()}


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_reference(schema: dict | None = None, extra_defaults: dict | None = None,
                     schema_label: str = "workflow/schemas/config.schema.yaml") -> str:
    """The whole reference as Markdown."""
    schema = load_schema(SCHEMA_PATH) if schema is None else schema
    sections = iter_rows(schema, extra_defaults)
    lines = [
        "<!-- Generated from " + schema_label + " by `" + REGENERATE_COMMAND + "`. Do not edit by hand: "
        "change the schema and regenerate (tests/test_docs.py fails while this file is stale). -->",
        "",
        "# Configuration reference",
        "",
        f"Every key of the workflow configuration, from `{schema_label}`, the one place where the defaults are "
        "set. The configuration is validated against it when the workflow starts; a key you leave out takes "
        "the default shown here, and a misspelt key is an error naming it. `config/config.yaml` (the demo) "
        "sets most keys explicitly; copy it for your own data and pass it with `--configfile`.",
        "",
        "Keys are dotted paths: `datasets[].role` is the `role` of each entry of the list `datasets`; "
        "`<name>`, `<site>`, `<estimator>` and `<column>` stand for keys you choose (e.g. "
        "`models.vae_l16.model.latent_dim`). \"–\" means no default: the key is optional and has no value "
        "unless set.",
        "",
    ]
    description = _description(schema)
    if description:
        lines += [description, ""]
    lines += ["Sections: " + ", ".join(f"[`{name}`](#{_anchor(name)})" for name in sections) + ".", ""]
    for name, rows in sections.items():
        head, rest = rows[0], rows[1:]
        lines += [f"## {name}", ""]
        kind = head["type"]
        summary = f"Type: {kind}. Default: {head['default']}."
        if head["description"]:
            lines += [head["description"], ""]
        lines += [summary, ""]
        blocks = [(head["key"], head["block"])] if head["block"] else []
        if rest:
            lines += ["| key | type | default | description |", "|---|---|---|---|"]
            for row in rest:
                lines.append(f"| `{_cell(row['key'])}` | {_cell(row['type'])} | {_cell(row['default'])} | "
                             f"{_cell(row['description'])} |")
                if row["block"]:
                    blocks.append((row["key"], row["block"]))
            lines.append("")
        for key, block in blocks:
            lines += [f"Default of `{key}`:", "", "```yaml", block, "```", ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def _anchor(title: str) -> str:
    """GitHub's anchor for a heading: lower case, spaces to '-', punctuation but '-' and '_' dropped."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def write_reference(output: str | Path = DEFAULT_OUTPUT) -> Path:
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(render_reference(), encoding="utf-8")
    return output


def check_reference(output: str | Path = DEFAULT_OUTPUT) -> str | None:
    """None when ``output`` equals the rendering of the current schema, else a message saying how to fix it."""
    output = Path(output)
    expected = render_reference()
    if not output.exists():
        return f"{output}: missing; generate it with `{REGENERATE_COMMAND}`"
    if output.read_text(encoding="utf-8") != expected:
        return (f"{output} is out of date with workflow/schemas/config.schema.yaml (or "
                f"brainvae.qc.DEFAULT_THRESHOLDS); regenerate it with `{REGENERATE_COMMAND}` and commit it")
    return None
