"""Shared stages are keyed by what they compute: a setting changes the key of its own stage and
of every stage after it, never of one before; experiments with the same upstream settings get
the same keys, whatever their training settings."""

from __future__ import annotations

import copy

from snaketune.config import validated
from snaketune.settings import ConfigView
from snaketune.sharing import Sharing, keys_of
from tests.support.repo import DEFAULT_CONFIG, REPO

STAGES = ["clean", "split", "tokenizer", "tokenize"]


def keys_with(section: str, **values) -> dict[str, str]:
    config = copy.deepcopy(DEFAULT_CONFIG)
    lm = config["experiments"][0]
    lm[section] = {**lm.get(section, {}), **values}
    return keys_of(ConfigView(validated(config, REPO), REPO), "demo-lm")


def test_a_setting_changes_the_key_of_its_stage_and_every_later_one_only():
    base = keys_with("train")
    for section, values, first in [
        ("clean", {"min_chars": 11}, "clean"),
        ("split", {"salt": "other"}, "split"),
        ("tokenizer", {"vocab_size": 900}, "tokenizer"),
        ("tokenize", {"block_size": 64}, "tokenize"),
    ]:
        changed = keys_with(section, **values)
        at = STAGES.index(first)
        assert all(changed[s] == base[s] for s in STAGES[:at]), section
        assert all(changed[s] != base[s] for s in STAGES[at:]), section
    assert keys_with("train", lr=0.01) == base == keys_with("model", n_layer=3)
    assert all(key.startswith("support-demo-") for key in base.values())


def test_the_first_experiment_that_uses_a_key_owns_it():
    config = copy.deepcopy(DEFAULT_CONFIG)
    lm = config["experiments"][0]
    config["experiments"].append({**copy.deepcopy(lm), "name": "lm-again"})
    sharing = Sharing.of(ConfigView(validated(config, REPO), REPO), ["demo-lm", "lm-again"])
    assert sharing.keys["demo-lm"] == sharing.keys["lm-again"]
    assert {sharing.owner(key) for key in sharing.keys["lm-again"].values()} == {"demo-lm"}
