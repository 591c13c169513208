"""Config checks that run before any job: every problem, each naming its key and what is allowed.

The JSON schema catches types, ranges and unknown keys; `cross_checks` catches what a schema
cannot say (an experiment naming a missing dataset, ratios that do not sum to 1, ...).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

SCHEMA = Path(__file__).resolve().parents[1] / "schemas" / "config.schema.yaml"
PRESETS = Path(__file__).resolve().parents[2] / "presets"


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


def cross_checks(config: dict[str, Any]) -> list[str]:
    """Checks across keys, on a config that already passed the schema (defaults filled)."""
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
        if (
            exp["task"] == "sequence_classification"
            and not datasets[exp["dataset"]]["label_column"]
        ):
            problems.append(
                f"{where}.task: sequence_classification needs datasets."
                f"{exp['dataset']}.label_column to be set"
            )
        ratios = exp["split"]
        total = ratios["train"] + ratios["val"] + ratios["test"]
        if abs(total - 1.0) > 1e-6:
            problems.append(f"{where}.split: train + val + test must be 1, got {total:g}")
        model = exp["model"]
        if model["arch"] == "gpt2" and model["n_embd"] % model["n_head"]:
            problems.append(
                f"{where}.model.n_embd: {model['n_embd']} is not divisible by "
                f"model.n_head={model['n_head']}"
            )
        if model["init"] == "pretrained" and not model["name_or_path"]:
            problems.append(f"{where}.model.name_or_path: required when model.init is 'pretrained'")
        if model["arch"] == "lstm" and model["lora_rank"]:
            problems.append(f"{where}.model.lora_rank: LoRA needs model.arch 'gpt2', not 'lstm'")
        if exp["tokenizer"]["kind"] == "pretrained" and not exp["tokenizer"]["name_or_path"]:
            problems.append(
                f"{where}.tokenizer.name_or_path: required when tokenizer.kind is 'pretrained'"
            )
    return problems


def raise_if_invalid(problems: list[str], source: str) -> None:
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise ConfigError(f"invalid config ({source}):\n{lines}")
