"""The conda environments (snakemake --sdm conda) pin the same versions as the pip install."""

from __future__ import annotations

import re

import pytest
import yaml

from tests.support.repo import REPO

ENV_FILES = sorted((REPO / "envs").glob("*.yaml"))


def constraints() -> dict[str, str]:
    pins = {}
    for line in (REPO / "envs" / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version.strip()
    return pins


def test_every_rule_group_has_an_environment():
    assert [p.stem for p in ENV_FILES] == ["data", "track", "train"]
    rules = (REPO / "workflow" / "rules").glob("*.smk")
    referenced = {m for r in rules for m in re.findall(r"envs/(\w+)\.yaml", r.read_text())}
    assert referenced == {"data", "track", "train"}


@pytest.mark.parametrize("env_file", ENV_FILES, ids=lambda p: p.stem)
def test_conda_pins_match_the_constraints_file(env_file):
    pins = constraints()
    spec = yaml.safe_load(env_file.read_text())
    pip_section = next(d["pip"] for d in spec["dependencies"] if isinstance(d, dict))
    pinned = [line for line in pip_section if "==" in line]
    assert pinned, f"{env_file.name} pins nothing"
    for line in pinned:
        name, version = line.split("==", 1)
        name = name.split("[")[0]  # mlflow[auth]: the extra's packages are pinned on their own
        name = name.split("[")[0]  # mlflow[auth]: the extra's packages are pinned on their own
        key = re.sub(r"[-_.]+", "-", name).lower()
        assert pins.get(key) == version, f"{env_file.name}: {line} vs constraints {pins.get(key)}"
