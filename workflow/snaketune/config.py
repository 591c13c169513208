"""Config checks that run before any job: every problem, each naming its key and what is allowed.

The JSON schema catches types, ranges and unknown keys; `cross_checks` catches what a schema
cannot say (an experiment naming a missing dataset, ratios that do not sum to 1, ...).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from snaketune.names import SEQUENCE_CLASSIFICATION
from snaketune.settings import SECTIONS, ConfigView, SettingsError

REPO = Path(__file__).resolve().parents[2]
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"
PRESETS = REPO / "presets"


class ConfigError(ValueError):
    """The config is invalid; the message lists every problem by key."""


def preset_names(presets_dir: Path = PRESETS) -> list[str]:
    return sorted(path.stem for path in Path(presets_dir).glob("*.yaml"))


def apply_preset(
    config: dict[str, Any], overrides: Mapping[str, Any], presets_dir: Path = PRESETS
) -> None:
    """With `preset: NAME` (e.g. `snakemake --config preset=sms-spam`), layer presets/NAME.yaml
    over the config as `--configfile presets/NAME.yaml` would, then the command line's --config
    values again, so that they keep the last word."""
    name = config.get("preset")
    if name is None:
        return
    names = preset_names(presets_dir)
    if name not in names:
        raise_if_invalid(
            [f"preset: {name!r} is not one of {names} (files in {presets_dir})"], "schema"
        )
    from snakemake.utils import update_config  # the merge --configfile and --config get

    update_config(config, yaml.safe_load((Path(presets_dir) / f"{name}.yaml").read_text()))
    update_config(config, overrides)


def key_path(parts) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def describe(error) -> str:
    where = key_path(error.absolute_path)
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        unknown = (
            sorted(set(error.instance) - set(allowed)) if isinstance(error.instance, dict) else []
        )
        return f"{where}: unknown key(s) {unknown}; allowed keys are {allowed}"
    if error.validator == "enum":
        allowed = error.validator_value
        return f"{where}: {error.instance!r} is not allowed; allowed values are {allowed}"
    return f"{where}: {error.message}"


def schema_problems(config: dict[str, Any], schema_path: Path = SCHEMA) -> list[str]:
    from jsonschema import Draft202012Validator

    schema = yaml.safe_load(Path(schema_path).read_text())
    validator = Draft202012Validator(schema)
    return [describe(e) for e in sorted(validator.iter_errors(config), key=lambda e: e.path)]


def cross_checks(config: dict[str, Any], base_dir: Path = REPO) -> list[str]:
    """Checks across keys, on a config that already passed the schema (defaults filled): every
    stage's settings of every experiment are built as the jobs will get them, so each check a
    settings dataclass makes runs here too, before any job."""
    problems = []
    datasets = config["datasets"]
    seen = set()
    for i, exp in enumerate(config["experiments"]):
        where = f"experiments[{i}]"
        if exp["name"] in seen:
            problems.append(f"{where}.name: {exp['name']!r} is used by two experiments")
        seen.add(exp["name"])
        if exp["dataset"] not in datasets:
            problems.append(
                f"{where}.dataset: {exp['dataset']!r} is not in datasets; "
                f"allowed values are {sorted(datasets)}"
            )
            continue
        if exp["task"] == SEQUENCE_CLASSIFICATION and not datasets[exp["dataset"]]["label_column"]:
            problems.append(
                f"{where}.task: sequence_classification needs datasets."
                f"{exp['dataset']}.label_column to be set"
            )
        problems += settings_problems(ConfigView(config, base_dir), exp["name"], where)
    return problems


def settings_problems(view: ConfigView, experiment: str, where: str) -> list[str]:
    """What each section's settings dataclass refuses, by key."""
    problems = []
    for section, cls in SECTIONS.items():
        try:
            view.section(cls, experiment, section)
        except SettingsError as err:
            for key, text in err.problems:
                problems.append(f"{where}.{section}{'.' + key if key else ''}: {text}")
    return problems


def validated(config: dict[str, Any], base_dir: Path = REPO) -> dict[str, Any]:
    """The config checked, every problem at once (the schema's, then the cross-checks), with
    the schema's defaults filled in, in place."""
    from snakemake.utils import validate  # fills the defaults, as the workflow needs them

    raise_if_invalid(schema_problems(config), "schema")
    validate(config, str(SCHEMA))
    raise_if_invalid(cross_checks(config, base_dir), "cross-checks")
    return config


def raise_if_invalid(problems: list[str], source: str) -> None:
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise ConfigError(f"invalid config ({source}):\n{lines}")
