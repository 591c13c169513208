"""Tracking: the config's `mlflow:` section, the track and sweep rules' settings."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from snaketune.settings import ConfigView, from_dict, setting


@dataclass(frozen=True)
class MlflowSettings:
    """The config's `mlflow:` section."""

    SECTION: ClassVar[str] = "Where runs are tracked."

    tracking_uri: str = setting(
        "",
        description=(
            "MLflow tracking URI. Empty means an embedded SQLite store at "
            "<results_dir>/mlflow.db. The MLFLOW_TRACKING_URI environment variable, when set, "
            "takes precedence."
        ),
    )
    experiment_name: str = setting(
        "snaketune",
        minLength=1,
        description="The MLflow experiment that holds this config's runs (one per config).",
    )
    register_models: bool = setting(
        True,
        description=(
            "Log each experiment's trained model with MLflow's transformers flavour (servable "
            "with `mlflow models serve`) and register it as a new version in the Model "
            "Registry, with the eval metrics as version tags. The track job loads the weights "
            "to do so and the store keeps a second copy of them; turn off for models too large "
            "for that. LSTM models are never registered."
        ),
    )


@dataclass(frozen=True)
class TrackSettings:
    experiment: str
    """The experiment entry's name (the parent run's name)."""
    mlflow_experiment: str
    tracking_uri: str = ""
    """The configured store (empty: SQLite in the results folder); MLFLOW_TRACKING_URI, read
    at run time, takes precedence (so a credential in it never lands in a job's command line or
    in Snakemake's logs)."""
    config: dict[str, Any] = field(default_factory=dict)
    """The experiment's resolved config, logged as flattened params."""
    registered_model_name: str | None = None
    """Log the final model and register a version under this name; None logs no model."""


SWEPT = "swept"
"""The key the sweep expansion (snaketune.track.sweep) sets on each point's experiment entry:
{"of": the sweep's name, "point": {dotted key: value}}."""


@dataclass(frozen=True)
class SweepSettings:
    name: str
    """The sweep: the name of the experiment entry that declared it."""
    experiments: list[str]
    """The points' experiment names, in config order (the order of the job's input lists)."""
    values: dict[str, dict[str, Any]]
    """Each point's experiment name -> its swept values by dotted key."""
    mlflow_experiment: str
    tracking_uri: str = ""


def sweep_points(config: dict[str, Any], sweep: str) -> dict[str, dict[str, Any]]:
    return {
        exp["name"]: exp[SWEPT]["point"]
        for exp in config["experiments"]
        if exp.get(SWEPT, {}).get("of") == sweep
    }


def sweep_names(config: dict[str, Any]) -> list[str]:
    names = [exp[SWEPT]["of"] for exp in config["experiments"] if exp.get(SWEPT)]
    return list(dict.fromkeys(names))


def sweep_settings(view: ConfigView, sweep: str) -> SweepSettings:
    mlflow, points = mlflow_settings(view), sweep_points(view.config, sweep)
    return SweepSettings(
        name=sweep,
        experiments=list(points),
        values=points,
        mlflow_experiment=mlflow.experiment_name,
        tracking_uri=mlflow.tracking_uri,
    )


def mlflow_settings(view: ConfigView) -> MlflowSettings:
    return from_dict(MlflowSettings, view.config["mlflow"])


def registered_model_name(mlflow: MlflowSettings, experiment: Mapping[str, Any]) -> str | None:
    """The experiment's registry name, or None when the config turns registration off."""
    if not mlflow.register_models:
        return None
    return experiment["registered_model_name"] or f"{mlflow.experiment_name}.{experiment['name']}"


def track_settings(view: ConfigView, experiment: str) -> TrackSettings:
    mlflow, exp = mlflow_settings(view), view.experiment(experiment)
    return TrackSettings(
        experiment=experiment,
        mlflow_experiment=mlflow.experiment_name,
        tracking_uri=mlflow.tracking_uri,
        config=exp,
        registered_model_name=registered_model_name(mlflow, exp),
    )
