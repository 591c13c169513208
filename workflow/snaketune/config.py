"""Config checks that run before any job: every problem, each naming its key and what is allowed.

The JSON schema catches types, ranges and unknown keys; `cross_checks` catches what a schema
cannot say (an experiment naming a missing dataset, ratios that do not sum to 1, ...).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from snaketune.checks import experiment_problems, instruction_problems
from snaketune.context import PACKAGE_REPOSITORY, environment_problems
from snaketune.data.settings import (
    DatasetSettings,
    TokenizerSettings,
    dataset_of,
    read_settings_for,
)
from snaketune.errors import ConfigError
from snaketune.names import name_problem, quote_problem
from snaketune.schema import SCHEMA_PATH, config_schema
from snaketune.sections import SECTIONS
from snaketune.settings import ConfigView, SettingsError
from snaketune.tasks import task_of
from snaketune.track.sweep import WRITTEN, as_written, expand_sweeps
from snaketune.track.tracking_uri import tracking_problems

REPO = PACKAGE_REPOSITORY
SCHEMA = REPO / SCHEMA_PATH
"""The committed copy of the schema, for editors and readers: the checks here use
config_schema(), made in the process."""
PRESETS = REPO / "presets"


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
    if isinstance(error.schema, dict) and "errorMessage" in error.schema:
        return f"{where}: {error.instance!r} {error.schema['errorMessage']}"
    return f"{where}: {error.message}"


def schema_problems(config: dict[str, Any]) -> list[str]:
    from jsonschema import Draft202012Validator

    validator = Draft202012Validator(config_schema())
    return [describe(e) for e in sorted(validator.iter_errors(config), key=lambda e: e.path)]


def cross_checks(
    config: dict[str, Any],
    base_dir: Path = REPO,
    given: dict[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> list[str]:
    """Checks across keys, on a config that already passed the schema (defaults filled): every
    dataset entry and every experiment's sections are built as the jobs will get them, so each
    check a settings dataclass makes runs here too, before any job; then the checks across
    sections (snaketune.checks). `given` is the config as written, before the defaults: with
    it, keys set that the run would ignore are refused too."""
    problems = dataset_problems(config["datasets"])
    problems += tracking_problems(config["mlflow"]["tracking_uri"])
    if problem := quote_problem(config["mlflow"]["experiment_name"], "MLflow experiment name"):
        problems.append(f"mlflow.experiment_name: {problem}")
    problems += environment_problems(environ or {})
    datasets = config["datasets"]
    view = ConfigView(config, base_dir)
    seen = set()
    for i, exp in enumerate(config["experiments"]):
        where = f"experiments[{i}]"
        if exp["name"] in seen:
            problems.append(f"{where}.name: {exp['name']!r} is used by two experiments")
        seen.add(exp["name"])
        if problem := name_problem(exp["name"], "experiment"):
            problems.append(f"{where}.name: {problem}")
        if problem := quote_problem(exp["registered_model_name"], "registered model name"):
            problems.append(f"{where}.registered_model_name: {problem}")
        if exp["dataset"] not in datasets:
            problems.append(
                f"{where}.dataset: {exp['dataset']!r} is not in datasets; "
                f"allowed values are {sorted(datasets)}"
            )
            continue
        if (
            not task_of(exp["task"]).predicts_tokens
            and not datasets[exp["dataset"]]["label_column"]
        ):
            problems.append(
                f"{where}.task: sequence_classification needs datasets."
                f"{exp['dataset']}.label_column to be set"
            )
        problems += read_problems(datasets[exp["dataset"]], exp, where)
        problems += settings_problems(view, exp["name"], where)
        raw = given["experiments"][i] if given else {}
        problems += experiment_problems(exp, raw, where)
        problems += [
            f"{where}.{key}: {text}"
            for key, text in instruction_problems(exp, raw, is_instruction(view, exp["name"]))
        ]
    return problems


def is_instruction(view: ConfigView, experiment: str) -> bool:
    """DatasetSettings.is_instruction of the experiment's dataset; a dataset that its settings
    refuse counts as instruction data here, so that only its own problems are reported."""
    try:
        return dataset_of(view, experiment).is_instruction
    except SettingsError:
        return True


def dataset_problems(datasets: dict[str, Any]) -> list[str]:
    problems = []
    for name, entry in datasets.items():
        try:
            DatasetSettings(**entry)
        except SettingsError as err:
            problems += [f"datasets.{name}.{key}: {text}" for key, text in err.problems]
    return problems


def read_problems(dataset: dict[str, Any], exp: dict[str, Any], where: str) -> list[str]:
    """How the experiment reads its dataset (e.g. an instruction template without the
    response), by the experiment's key; the dataset's own problems are dataset_problems'."""
    try:
        dataset_settings, tokenizer = (
            DatasetSettings(**dataset),
            TokenizerSettings(**exp["tokenizer"]),
        )
    except SettingsError:
        return []  # reported by dataset_problems and settings_problems
    try:
        read_settings_for(dataset_settings, exp["task"], exp["text_template"], tokenizer)
    except SettingsError as err:
        return [f"{where}.{key}: {text}" for key, text in err.problems]
    return []


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


def validated(
    config: dict[str, Any], base_dir: Path = REPO, environ: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The config checked, every problem at once (the schema's, then the cross-checks), with
    the schema's defaults filled in, in place; `environ`, the workflow's environment, with it
    (the variables its jobs read: snaketune.context)."""
    raise_if_invalid(expand_sweeps(config), "sweeps")  # then each point is checked as written
    written = {WRITTEN: config.pop(WRITTEN, None)}
    raise_if_invalid(as_written(schema_problems(config), written), "schema")
    given = copy.deepcopy(config)
    with_defaults(config, config_schema())
    whole_numbers(config, config_schema())
    raise_if_invalid(
        as_written(cross_checks(config, base_dir, given, environ), written), "cross-checks"
    )
    return config


def with_defaults(value: Any, schema: dict[str, Any]) -> None:
    """The schema's defaults filled in, in place, as Snakemake's validate fills them: each
    absent key of an object that has a default gets it, then the keys under it theirs, in
    every object, catalog entry and list item the config holds."""
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        for key, sub in properties.items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            sub = properties.get(key, extra if isinstance(extra, dict) else {})
            with_defaults(item, sub)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            with_defaults(item, schema["items"])


def whole_numbers(value: Any, schema: dict[str, Any]) -> Any:
    """Integer keys written as floats (`max_steps: 40.0`, which JSON Schema counts as an
    integer) become ints in place, so every job gets the integer the schema promised."""
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            sub = properties.get(key, extra if isinstance(extra, dict) else {})
            value[key] = whole_numbers(item, sub)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        value[:] = [whole_numbers(item, schema["items"]) for item in value]
    elif isinstance(value, float) and value.is_integer() and allows_integer(schema):
        return int(value)
    return value


def allows_integer(schema: dict[str, Any]) -> bool:
    kinds = schema.get("type")
    kinds = kinds if isinstance(kinds, list) else [kinds]
    alternatives = schema.get("oneOf", []) + schema.get("anyOf", [])
    return "integer" in kinds and "number" not in kinds or any(map(allows_integer, alternatives))


def raise_if_invalid(problems: list[str], source: str) -> None:
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise ConfigError(f"invalid config ({source}):\n{lines}")
