"""The job definitions are the one contract of every stage: each names a library function that
takes exactly its paths and settings, a command line made from them parses back to the same job,
and settings survive the JSON they travel in."""

from __future__ import annotations

import copy
import inspect
from dataclasses import fields
from pathlib import Path
from typing import get_type_hints

import pytest

from snaketune.cli import parse
from snaketune.config import validated
from snaketune.context import IN_PROCESS, JobContext
from snaketune.paths import OUTPUT, is_list, output_name, path_fields
from snaketune.settings import ConfigView, from_json, to_json
from snaketune.stages import STAGES, Stage, command_line
from tests.support.repo import DEFAULT_CONFIG, REPO

WILDCARDS = {
    "dataset": "support-demo",
    "experiment": "demo-lm",
    "split": "train",
    "part": "00003",
    "sweep": "lm",
}


def with_a_sweep() -> dict:
    """The demo config and a sweep named lm over its causal LM's learning rate."""
    config = copy.deepcopy(DEFAULT_CONFIG)
    lm = {**copy.deepcopy(config["experiments"][0]), "name": "lm"}
    config["experiments"].append({**lm, "sweep": {"grid": {"train.lr": [0.001, 0.002]}}})
    return config


VIEW = ConfigView(validated(with_a_sweep()), REPO)


def settings_of(stage: Stage):
    """The stage's settings for the demo's causal LM, as the workflow would pass them."""
    wanted = inspect.signature(stage.from_config).parameters
    return stage.from_config(VIEW, **{k: v for k, v in WILDCARDS.items() if k in wanted})


def paths_of(stage: Stage):
    values = {
        f.name: [Path(f"/data/{f.name}-{i}") for i in range(3)] if is_list(f) else f"r/{f.name}"
        for f in path_fields(stage.paths)
    }
    return stage.paths(**values)


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.rule)
def test_each_stage_runs_a_function_named_after_its_rule_taking_its_paths_and_settings(stage):
    """(paths, settings, context): the context (what the CLI read from the environment) is
    optional, an in-process call gets the defaults."""
    entry = stage.entry()
    assert entry.__name__ == stage.rule
    hints = get_type_hints(entry)
    parameters = inspect.signature(entry).parameters
    assert len(parameters) == 3
    paths, settings, context = parameters.values()
    assert (hints[paths.name], hints[settings.name]) == (stage.paths, stage.settings)
    assert hints[context.name] is JobContext and context.default is IN_PROCESS


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.rule)
def test_a_command_line_parses_back_to_the_same_job(stage):
    paths, settings = paths_of(stage), settings_of(stage)
    parsed, parsed_paths, text = parse(command_line(paths, settings))
    assert parsed == stage
    assert parsed_paths == paths
    assert from_json(stage.settings, text) == settings


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.rule)
def test_settings_survive_their_json(stage):
    settings = settings_of(stage)
    assert isinstance(settings, stage.settings)
    assert from_json(stage.settings, to_json(settings)) == settings


def test_every_path_has_a_role_and_a_description():
    for stage in STAGES:
        for f in fields(stage.paths):
            assert f.metadata["role"] in ("input", "output", "params"), (stage.rule, f.name)
            assert f.metadata["doc"], (stage.rule, f.name)


def test_unknown_settings_keys_are_named():
    stage = next(s for s in STAGES if s.rule == "split_corpus")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['ratio'\]"):
        from_json(stage.settings, '{"ratio": 0.5}')


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.rule)
def test_under_a_folder_every_output_is_at_its_name_and_the_rest_as_given(stage):
    given = {
        f.name: [Path(f"/in/{f.name}")] if is_list(f) else Path(f"/in/{f.name}")
        for f in path_fields(stage.paths)
        if f.metadata["role"] != OUTPUT
    }
    paths = stage.paths.under("/out", **given, part="00003")
    for f in path_fields(paths, OUTPUT):
        assert getattr(paths, f.name).parent == Path("/out"), f.name
        assert getattr(paths, f.name).name == output_name(stage.paths, f).format(part="00003")
    for name, value in given.items():
        assert getattr(paths, name) == value
    for f in path_fields(paths, OUTPUT):  # what a reader of results/ opens is what was written
        assert stage.paths.output_in("/out", f.name, part="00003") == getattr(paths, f.name)
    names = [output_name(stage.paths, f) for f in path_fields(paths, OUTPUT)]
    assert len(set(names)) == len(names)


def test_an_output_given_to_under_stays_where_it_was_given():
    stage = next(s for s in STAGES if s.rule == "split_corpus")
    paths = stage.paths.under("/out", corpus="/in/corpus.parquet", test="/elsewhere/t.parquet")
    assert paths.test == Path("/elsewhere/t.parquet")
    assert paths.train == Path("/out/train.parquet")
