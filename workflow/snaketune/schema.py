"""The config's JSON schema and its settings reference, made from the settings dataclasses.

Each config key is defined once, as a field of its section's dataclass in the settings module
of the stage that reads it (`train/settings.py` for `train:`, ...; snaketune.sections lists the
sections): its Python type, its default, and (through snaketune.settings.setting) its
description and what the schema says beyond its type (bounds, allowed values, patterns). This
module turns them into the
schema snaketune.config validates a config against (config_schema, made in the process), its
committed copy `workflow/schemas/config.schema.yaml` (for editors and readers), and the settings
reference in README.md; a test fails when either committed copy differs from what this module
makes. After changing a setting:

    .venv/bin/python -m snaketune.schema      (or `make schema`)

The layout around the sections (the datasets catalog, the list of experiments, which keys are
required) is written here, once.
"""

from __future__ import annotations

import functools
import json
import re
import sys
import types
from dataclasses import MISSING, Field, fields, is_dataclass
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from snaketune.context import PACKAGE_REPOSITORY
from snaketune.data.settings import DatasetSettings
from snaketune.sections import SECTIONS, ConfigKeys, ExperimentKeys
from snaketune.track.settings import MlflowSettings

SCHEMA_PATH = Path("workflow") / "schemas" / "config.schema.yaml"
README = Path("README.md")
REFERENCE_BEGIN = "<!-- settings reference: made by `make schema`, do not edit -->"
REFERENCE_END = "<!-- end of the settings reference -->"
HEADER = (
    "# Made by `python -m snaketune.schema` from the settings dataclasses in\n"
    "# workflow/snaketune/<stage>/settings.py: edit those, then run `make schema`.\n"
)
NAME_PATTERN = "^[A-Za-z0-9][A-Za-z0-9_.-]*$"
JSON_TYPES = {int: "integer", float: "number", bool: "boolean", str: "string", dict: "object"}


def plain(value: Any) -> Any:
    """Tuples as lists, for YAML and JSON."""
    if isinstance(value, tuple | list):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def type_schema(hint: Any) -> dict[str, Any]:
    """The JSON type of a field's Python type: int, float, bool, str, dict, list[str], and
    any of them or None."""
    if get_origin(hint) in (Union, types.UnionType):
        options = [type_schema(arg) for arg in get_args(hint) if arg is not type(None)]
        (only,) = options  # X | None; other unions say their schema themselves
        nullable = type(None) in get_args(hint)
        return {**only, "type": [only["type"], "null"] if nullable else only["type"]}
    if get_origin(hint) is list:
        (item,) = get_args(hint)
        return {"type": "array", "items": type_schema(item)}
    return {"type": JSON_TYPES[hint]}


def default_of(f: Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


def key_schema(f: Field, hint: Any) -> dict[str, Any]:
    """One key: its type (unless the setting says its schema itself), what the setting adds,
    its default and its description."""
    meta = f.metadata
    default = default_of(f)
    if is_dataclass(default):  # a nested section
        return section_schema(type(default))
    given = plain(meta.get("schema", {}))
    out = {} if {"type", "oneOf", "anyOf", "const"} & set(given) else type_schema(hint)
    out.update(given)
    if default is not MISSING and meta.get("schema_default", True):
        out["default"] = plain(default)
    out["description"] = meta["description"]
    return out


def properties(cls: type) -> dict[str, Any]:
    """The schema of each config key of `cls`: its settings, and its nested sections."""
    hints = get_type_hints(cls)
    undefined = [
        f.name
        for f in fields(cls)
        if "description" not in f.metadata and not is_dataclass(default_of(f))
    ]
    if undefined:
        raise TypeError(
            f"{cls.__name__}: {undefined} are config keys without a description: define each "
            "with snaketune.settings.setting(default, description=...)"
        )
    return {f.name: key_schema(f, hints[f.name]) for f in fields(cls)}


def required(cls: type) -> list[str]:
    return [f.name for f in fields(cls) if default_of(f) is MISSING]


def section_schema(cls: type) -> dict[str, Any]:
    """A section of settings: an object of exactly its keys, each with its default ({} for the
    whole section)."""
    return {
        "type": "object",
        "default": {},
        "additionalProperties": False,
        "description": cls.SECTION,
        "properties": properties(cls),
    }


@functools.cache
def config_schema() -> dict[str, Any]:
    """The whole config's schema (made once per process; not to be changed)."""
    experiment = {
        "type": "object",
        "additionalProperties": False,
        "required": required(ExperimentKeys),
        "properties": {
            **properties(ExperimentKeys),
            **{name: section_schema(cls) for name, cls in SECTIONS.items()},
        },
    }
    dataset = {
        "type": "object",
        "additionalProperties": False,
        "required": required(DatasetSettings),
        "properties": properties(DatasetSettings),
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "description": ConfigKeys.SECTION,
        "type": "object",
        "additionalProperties": False,
        "required": ["datasets", "experiments"],
        "properties": {
            **properties(ConfigKeys),
            "mlflow": section_schema(MlflowSettings),
            "datasets": {
                "type": "object",
                "description": DatasetSettings.SECTION,
                "minProperties": 1,
                "propertyNames": {
                    "pattern": NAME_PATTERN,
                    "errorMessage": (
                        "is not a usable dataset name: it becomes a folder under results_dir, so "
                        "use letters, digits, '_', '.' and '-', starting with a letter or digit"
                    ),
                },
                "additionalProperties": dataset,
            },
            "experiments": {
                "type": "array",
                "minItems": 1,
                "description": ExperimentKeys.SECTION,
                "items": experiment,
            },
        },
    }


def schema_text() -> str:
    return HEADER + yaml.safe_dump(config_schema(), sort_keys=False, width=96, allow_unicode=True)


# --- the settings reference in README.md ----------------------------------------------------------


def reference_rows(prefix: str, schema: dict[str, Any]) -> list[str]:
    """One row per key of an object's schema (a nested section's keys under its name)."""
    rows, required = [], set(schema.get("required", ()))
    for name, key in schema.get("properties", {}).items():
        path = f"{prefix}{name}"
        if key.get("type") == "object" and key.get("additionalProperties") is False:
            rows += reference_rows(f"{path}.", key)
            continue
        rows.append(
            f"| `{path}` | {allowed(key)} | {shown_default(key, name in required)} | "
            f"{one_line(key)} |"
        )
    return rows


def allowed(key: dict[str, Any]) -> str:
    if "enum" in key:
        return " \\| ".join(f"`{v}`" for v in key["enum"])
    if "oneOf" in key or "anyOf" in key:
        return " or ".join(allowed(option) for option in key.get("oneOf") or key["anyOf"])
    if "const" in key:
        return f"`{key['const']}`"
    kind = key.get("type", "")
    kind = " or ".join(kind) if isinstance(kind, list) else kind
    bounds = [
        f"{sign} {key[bound]}"
        for bound, sign in (
            ("minimum", ">="),
            ("exclusiveMinimum", ">"),
            ("maximum", "<="),
            ("exclusiveMaximum", "<"),
        )
        if bound in key
    ]
    return kind + (f" ({', '.join(bounds)})" if bounds else "")


def shown_default(key: dict[str, Any], is_required: bool) -> str:
    if "default" in key:
        return f"`{json.dumps(key['default'])}`"
    return "required" if is_required else "(none)"


def one_line(key: dict[str, Any]) -> str:
    return re.sub(r"\s+", " ", key["description"]).replace("|", "\\|").strip()


def reference() -> str:
    """The settings reference: one row per key, a table per part of the config."""
    top = config_schema()["properties"]
    parts = [
        ("Top level", {k: v for k, v in top.items() if k not in ("datasets", "experiments")}),
        ("A dataset (`datasets.<name>`)", top["datasets"]["additionalProperties"]),
        ("An experiment (`experiments[]`)", top["experiments"]["items"]),
    ]
    out = [REFERENCE_BEGIN]
    for title, part in parts:
        keys = part if "properties" in part else {"properties": part}
        out += ["", f"**{title}**", "", "| key | allowed | default | what it does |"]
        out += ["| --- | --- | --- | --- |", *reference_rows("", keys)]
    return "\n".join([*out, "", REFERENCE_END])


def readme_with_reference(readme: str) -> str:
    """README.md's text with its settings reference made anew."""
    begin, end = readme.index(REFERENCE_BEGIN), readme.index(REFERENCE_END) + len(REFERENCE_END)
    return readme[:begin] + reference() + readme[end:]


def main(argv: list[str] | None = None) -> None:
    root = Path(argv[0]) if argv else PACKAGE_REPOSITORY
    (root / SCHEMA_PATH).write_text(schema_text())
    readme = root / README
    readme.write_text(readme_with_reference(readme.read_text()))
    print(f"wrote {root / SCHEMA_PATH} and the settings reference in {readme}")


if __name__ == "__main__":
    main(sys.argv[1:])
