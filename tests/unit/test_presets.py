"""The real-dataset presets: every catalog entry is pinned (a commit in its URL, a sha256), each
presets/*.yaml makes a valid config when layered on config.yaml, and the preset key layers it as
--configfile would. What Snakemake plans for a preset is in tests/integration/test_dry_runs.py."""

from __future__ import annotations

import copy
import re

import pytest
import yaml
from snakemake.utils import validate

from snaketune.config import SCHEMA, ConfigError, apply_preset, cross_checks, schema_problems
from tests.support.repo import REPO
from tests.support.workflow import layered

CONFIG = yaml.safe_load((REPO / "config.yaml").read_text())
PRESETS = {name: entry for name, entry in CONFIG["datasets"].items() if name != "support-demo"}
PRESET_FILES = sorted((REPO / "presets").glob("*.yaml"))
COMMIT = re.compile(r"[0-9a-f]{40}")


def test_default_config_runs_only_the_offline_demo():
    assert {exp["dataset"] for exp in CONFIG["experiments"]} == {"support-demo"}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_each_preset_is_pinned(name):
    url = PRESETS[name]["url"]
    if url.startswith("https://raw.githubusercontent.com/"):
        assert COMMIT.fullmatch(url.split("/")[5]), "a raw GitHub URL must name a commit"
    elif url.startswith("hf://"):
        assert COMMIT.fullmatch(url.split("@")[1].split("/")[0]), "an hf:// URL must pin a commit"
    else:
        assert re.search(r"-v1\.zip$", url), "other hosts serve versioned archives only"
    assert re.fullmatch(r"[0-9a-f]{64}", PRESETS[name]["sha256"])


@pytest.mark.parametrize("preset_file", PRESET_FILES, ids=lambda p: p.stem)
def test_each_preset_file_layered_on_config_yaml_is_valid(preset_file):
    config = layered(preset_file)

    assert schema_problems(config) == [] and cross_checks(config) == []
    assert config["datasets"].keys() == CONFIG["datasets"].keys()  # the catalog is kept
    used = {exp["dataset"] for exp in config["experiments"]}
    assert used and used <= PRESETS.keys()


def test_every_real_dataset_family_has_a_preset_experiment():
    used = {exp["dataset"] for f in PRESET_FILES for exp in layered(f)["experiments"]}
    assert {"sst2", "ag-news", "sms-spam", "tiny-shakespeare", "wikitext-2"} <= used


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("hf://datasets/acme/tickets@main/train.csv", True),
        ("https://example.org/a.csv", True),
        ("file:///data/a.csv", True),
        ("data/a.csv", True),
        ("/data/a.csv", True),
        ("s3://bucket/a.csv", False),
        ("ftp://example.org/a.csv", False),
        ("gs://bucket/a.csv", False),
    ],
)
def test_schema_accepts_http_file_hf_and_paths_only(url, allowed):
    config = copy.deepcopy(CONFIG)
    config["datasets"]["support-demo"]["url"] = url
    problems = schema_problems(config)
    assert (problems == []) is allowed, problems


def test_preset_key_layers_the_file_as_a_configfile_would_and_config_values_still_win():
    config = copy.deepcopy(CONFIG)
    overrides = {"preset": "sms-spam", "mlflow": {"experiment_name": "mine"}}
    config.update(copy.deepcopy(overrides))  # what --config did before the Snakefile ran

    apply_preset(config, overrides)
    validate(config, str(SCHEMA))

    expected = copy.deepcopy(layered(REPO / "presets" / "sms-spam.yaml"))
    expected["mlflow"]["experiment_name"] = "mine"
    assert config == {**expected, "preset": "sms-spam"}


def test_unknown_preset_names_the_key_and_every_preset():
    config = {**copy.deepcopy(CONFIG), "preset": "imdb"}
    with pytest.raises(ConfigError) as caught:
        apply_preset(config, {"preset": "imdb"})
    message = str(caught.value)
    assert "preset: 'imdb' is not one of" in message
    assert all(f"'{path.stem}'" in message for path in PRESET_FILES)
