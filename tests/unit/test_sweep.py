"""A sweep declared on one experiment entry expands, before validation, into one validated
experiment per point with a readable name; what is wrong with a sweep is named by key."""

from __future__ import annotations

import copy

import pytest

from snaketune.config import ConfigError, validated
from snaketune.sweep import expand_sweeps
from tests.support.repo import DEFAULT_CONFIG


def with_sweep(sweep) -> dict:
    config = copy.deepcopy(DEFAULT_CONFIG)
    config["experiments"][0]["sweep"] = sweep
    return config


def test_a_grid_and_points_expand_into_named_validated_experiments():
    config = with_sweep(
        {
            "grid": {"train.lr": [0.001, 0.003], "model.n_layer": [1, 2]},
            "points": [{"train.lr": 0.01, "train.batch_size": 4}],
        }
    )
    validated(config)
    names = [exp["name"] for exp in config["experiments"]]
    assert names == [
        "demo-lm.lr-0.001.n_layer-1",
        "demo-lm.lr-0.001.n_layer-2",
        "demo-lm.lr-0.003.n_layer-1",
        "demo-lm.lr-0.003.n_layer-2",
        "demo-lm.lr-0.01.batch_size-4",
        "demo-intent",
    ]
    last = config["experiments"][4]
    assert last["train"]["lr"] == 0.01 and last["train"]["batch_size"] == 4
    assert last["train"]["max_steps"] == DEFAULT_CONFIG["experiments"][0]["train"]["max_steps"]
    assert last["model"]["n_layer"] == 2  # the entry's own value where the point says nothing
    assert last["swept"] == {"of": "demo-lm", "point": {"train.lr": 0.01, "train.batch_size": 4}}
    assert "sweep" not in last and "swept" not in config["experiments"][5]


@pytest.mark.parametrize(
    ("sweep", "problem"),
    [
        ({"grid": {"train.learning_rate": [1]}}, "sweep.grid.train.learning_rate: train has no"),
        ({"grid": {"lr": [1]}}, "sweep.grid.lr: sweeps a key of a section"),
        ({"grid": {"train.lr": []}}, "sweep.grid.train.lr: must be a non-empty list"),
        ({"points": [{}]}, "sweep.points: must be a list of {dotted key: value} mappings"),
        ({"grid": {"train.lr": [1]}, "seed": 3}, "sweep: must be a mapping with `grid`"),
    ],
)
def test_a_wrong_sweep_is_named_by_key_before_any_job(sweep, problem):
    with pytest.raises(ConfigError, match="sweeps") as caught:
        validated(with_sweep(sweep))
    assert f"experiments[0].{problem}" in str(caught.value)


def test_a_point_whose_value_is_invalid_is_refused_as_the_experiment_it_becomes():
    with pytest.raises(ConfigError, match=r"experiments\[1\]\.train\.lr"):
        validated(with_sweep({"grid": {"train.lr": [0.001, -1.0]}}))


def test_swept_written_by_hand_is_refused():
    config = copy.deepcopy(DEFAULT_CONFIG)
    config["experiments"][0]["swept"] = {"of": "x", "point": {}}
    assert expand_sweeps(config) == [
        "experiments[0].swept: is set by the sweep expansion; declare a sweep with `sweep:` instead"
    ]
