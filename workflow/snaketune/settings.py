"""How settings are defined, checked and passed to a job; each stage's own are in its package.

A stage's settings module (`data/settings.py`, `tokenize/settings.py`, `train/settings.py`,
`evaluate/settings.py`, `track/settings.py`) holds a dataclass per config section it reads
(`CleanSettings` for an experiment's `clean:`, ...), each key defined once with `setting(default,
description=..., bounds or allowed values)`, and the builders that turn the validated config
into its rules' settings. snaketune.sections gathers the sections of an experiment entry;
snaketune.schema makes the JSON schema Snakemake validates against and the README's settings
reference from them (`make schema`), and a test keeps both current. The workflow passes a
rule's settings to its job as JSON (`to_json`); the CLI reads them back with `from_json`.

Each dataclass checks what it can check alone in `__post_init__` and raises a SettingsError that
names its fields; snaketune.config runs those checks for every experiment before any job and
prefixes each field with its key in config.yaml."""

from __future__ import annotations

import hashlib
import json
import types
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from snaketune.errors import SnaketuneError
from snaketune.names import TASKS

AUTO = "auto"


class SettingsError(SnaketuneError, ValueError):
    """Settings that cannot work: (field, what is wrong) pairs, every one at once."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__("; ".join(f"{key}: {text}" if key else text for key, text in problems))


def raise_problems(problems: list[tuple[str, str]]) -> None:
    if problems:
        raise SettingsError(problems)


def setting(
    default: Any = MISSING,
    *,
    description: str,
    factory: Any = None,
    schema_default: bool = True,
    **schema: Any,
) -> Any:
    """A config key, defined once: a dataclass field with its default (or `factory`), its
    description, and what the JSON schema says of it beyond the type its annotation gives
    (bounds, allowed values, a pattern, or a whole schema where the type is a union);
    snaketune.schema makes config.schema.yaml and the README's reference from them.
    `schema_default=False`: a default the schema leaves out (the key is optional and absent
    means the default)."""
    metadata = {"description": description, "schema": schema, "schema_default": schema_default}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def check_task(task: str) -> None:
    if task not in TASKS:
        raise SettingsError([("task", f"task {task!r} is not one of {TASKS}")])


def config_hash(config: dict[str, Any]) -> str:
    """A short digest of an experiment's resolved config: its identity in MLflow."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def to_json(settings: Any) -> str:
    return json.dumps(asdict(settings), sort_keys=True)


def from_dict(cls: type, data: Mapping[str, Any]) -> Any:
    """`cls` from a dict such as asdict(cls(...)) gives, nested dataclasses included; a value
    of the wrong type is refused, naming its key."""
    hints = get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise SettingsError([("", f"unknown key(s) {unknown}; allowed keys are {sorted(names)}")])
    values, problems = {}, []
    for name, value in data.items():
        if is_dataclass(hints[name]) and isinstance(value, dict):
            values[name] = from_dict(hints[name], value)
        elif not has_type(value, hints[name]):
            problems.append((name, f"{value!r} is not of type {type_name(hints[name])}"))
        else:
            values[name] = value
    missing = [
        f.name
        for f in fields(cls)
        if f.name not in data and f.default is MISSING and f.default_factory is MISSING
    ]
    problems += [(name, "is required and missing") for name in missing]
    raise_problems(problems)
    return cls(**values)


def has_type(value: Any, hint: Any) -> bool:
    """Whether a value read from JSON fits a field's annotation (an int for a float too)."""
    if isinstance(hint, types.UnionType):
        return any(has_type(value, option) for option in get_args(hint))
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if is_dataclass(hint):
        return isinstance(value, hint)
    origin = get_origin(hint) or hint
    if origin is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if origin is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list:
        (item,) = get_args(hint) or (Any,)
        return isinstance(value, list) and all(has_type(v, item) for v in value)
    return isinstance(value, origin)


def type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint)


def from_json(cls: type, text: str) -> Any:
    return from_dict(cls, json.loads(text))


@dataclass(frozen=True)
class ConfigView:
    """The validated config (defaults filled) as the settings builders read it."""

    config: dict[str, Any]
    base_dir: Path
    """Where relative dataset paths start: the directory of the Snakefile (the repository)."""

    def experiment(self, name: str) -> dict[str, Any]:
        return next(exp for exp in self.config["experiments"] if exp["name"] == name)

    def section(self, cls: type, experiment: str, key: str) -> Any:
        return from_dict(cls, self.experiment(experiment)[key])
