"""A sweep declared on one experiment entry expands, before validation, into one validated
experiment per point with a readable name; what is wrong with a sweep is named by key."""

from __future__ import annotations

import copy

import pytest

from snaketune.config import ConfigError, validated
from snaketune.track.sweep import expand_sweeps
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


def test_a_point_whose_value_is_invalid_is_refused_where_the_user_wrote_it():
    """By the sweep's entry and the point, not by the place it took in the expanded list."""
    config = with_sweep({"grid": {"train.lr": [0.001, -1.0]}})
    config["experiments"].reverse()  # the sweep second: its points would be experiments[2..]
    with pytest.raises(ConfigError) as caught:
        validated(config)
    assert "  - experiments[1].sweep point {train.lr: -1.0}.train.lr: -1.0 is less" in str(
        caught.value
    )


def test_a_cross_check_of_a_point_is_named_by_the_point():
    config = with_sweep({"grid": {"train.lr": [0.001]}, "points": [{"model.name_or_path": "gpt2"}]})
    with pytest.raises(ConfigError, match="cross-checks") as caught:
        validated(config)
    assert "experiments[0].sweep point {model.name_or_path: 'gpt2'}.model" in str(caught.value)


def with_entries(*entries: dict) -> dict:
    config = copy.deepcopy(DEFAULT_CONFIG)
    lm = config["experiments"][0]
    config["experiments"] += [{**copy.deepcopy(lm), **entry} for entry in entries]
    return config


@pytest.mark.parametrize(
    ("entries", "problem"),
    [
        # A sweep's name becomes results/sweeps/<name>: it cannot climb out of results/.
        (
            [{"name": "../../outside", "sweep": {"grid": {"train.lr": [0.1]}}}],
            "experiments[2].name: '../../outside' is not a usable sweep name",
        ),
        # Two sweeps of one name would share one table, plot and MLflow run.
        (
            [
                {"name": "lm", "sweep": {"grid": {"train.lr": [0.1]}}},
                {"name": "lm", "sweep": {"grid": {"train.lr": [0.2]}}},
            ],
            "experiments[3].name: sweep 'lm' is declared by experiments[2] too",
        ),
        # A point given twice is named as the user wrote it, not "used by two experiments".
        (
            [{"name": "lm", "sweep": {"grid": {"train.lr": [0.1]}, "points": [{"train.lr": 0.1}]}}],
            "experiments[2].sweep point {train.lr: 0.1}: is given twice",
        ),
        # A point named as an experiment written by hand.
        (
            [
                {"name": "lm.lr-0.1"},
                {"name": "lm", "sweep": {"grid": {"train.lr": [0.1]}}},
            ],
            "experiments[3].sweep point {train.lr: 0.1}: is named 'lm.lr-0.1', as experiments[2]",
        ),
    ],
)
def test_names_that_would_escape_or_collide_are_refused_before_any_job(entries, problem):
    with pytest.raises(ConfigError, match="sweeps") as caught:
        validated(with_entries(*entries))
    assert problem in str(caught.value)


@pytest.mark.parametrize("name", ["shared", "datasets", "sweeps", "mlflow.db", "Shared"])
def test_an_experiment_may_not_take_a_name_the_results_layout_uses(name):
    with pytest.raises(ConfigError, match="cross-checks") as caught:
        validated(with_entries({"name": name}))
    assert f"experiments[2].name: {name!r} is a name results_dir uses for itself" in str(
        caught.value
    )


@pytest.mark.parametrize(
    ("key", "value"),
    [("mlflow.experiment_name", "team's runs"), ("experiments[2].registered_model_name", 'a"b')],
)
def test_a_name_mlflow_is_searched_by_holds_no_quote(key, value):
    config = with_entries({"name": "lm"})
    if key.startswith("mlflow"):
        config["mlflow"]["experiment_name"] = value
    else:
        config["experiments"][2]["registered_model_name"] = value
    with pytest.raises(ConfigError, match="cross-checks") as caught:
        validated(config)
    assert f"{key}: {value!r} has a quote" in str(caught.value)


def test_swept_written_by_hand_is_refused():
    config = copy.deepcopy(DEFAULT_CONFIG)
    config["experiments"][0]["swept"] = {"of": "x", "point": {}}
    assert expand_sweeps(config) == [
        "experiments[0].swept: is set by the sweep expansion; declare a sweep with `sweep:` instead"
    ]
