"""The final model in MLflow's Model Registry: logged from the train stage's output as a pyfunc
model that checks its requests and answers as evaluation does (snaketune.track.serving), and
registered as a version that carries the evaluation metrics and names the train and evaluate
runs it came from.

The logged model is named after the experiment and holds its own copy of the model folder,
beside the train run's raw `model` artifact folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

# What `mlflow models serve` needs to load the model. Given explicitly: mlflow's inference of
# requirements imports optional packages (torchvision) that are not installed.
SERVING_PACKAGES = ("mlflow", "torch", "transformers", "tokenizers", "safetensors")
TRACKING_URI_VARIABLE = "MLFLOW_TRACKING_URI"
MAX_DESCRIPTION = 5000  # the SQL stores' limit on a model version's description
MODEL_TAG = "snaketune.model"
"""Parent run tag holding the registered version, so a rerun reuses it instead of registering."""


@dataclass(frozen=True)
class RegisteredModel:
    name: str
    version: str
    model_id: str
    """The MLflow logged model (models:/<model_id>) the version points to."""

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    def as_dict(self) -> dict[str, str]:
        return {**asdict(self), "uri": self.uri}


def pip_requirements() -> list[str]:
    """The installed versions, without local tags such as '+cpu' (not on PyPI)."""
    return [f"{name}=={metadata.version(name).split('+')[0]}" for name in SERVING_PACKAGES]


def is_lstm(model_dir: Path) -> bool:
    from snaketune.train.models import LSTM_CONFIG

    return (Path(model_dir) / LSTM_CONFIG).exists()


def servable(model_dir: Path) -> bool:
    """A transformers model, an adapter with its base's identity, or the LSTM baseline (all
    served by snaketune.track.serving)."""
    from snaketune.train.models import BASE_MODEL

    model_dir = Path(model_dir)
    return (
        is_lstm(model_dir)
        or (model_dir / "config.json").exists()
        or (model_dir / BASE_MODEL).exists()
    )


@contextlib.contextmanager
def process_tracking_uri(uri: str) -> Iterator[None]:
    """mlflow's log_model, and the registry's check of a version's models:/ source, use the
    process-wide tracking URI, not the client's."""
    import mlflow

    previous_env = os.environ.get(TRACKING_URI_VARIABLE)
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        # Unset again (the track job sets none), and put back the environment variable, which
        # set_tracking_uri overwrote and which would otherwise outrank the configured store.
        mlflow.set_tracking_uri(None)
        if previous_env is None:
            os.environ.pop(TRACKING_URI_VARIABLE, None)
        else:
            os.environ[TRACKING_URI_VARIABLE] = previous_env


def log_model(
    uri: str,
    run_id: str,
    model_dir: Path,
    task: str,
    evaluate: dict[str, Any],
    prompt_template: str | None = None,
    context: int = 0,
    *,
    name: str,
):
    """Log the model folder as the run's logged model `name` (the experiment's), a pyfunc model
    that checks each request and answers it as evaluation does (snaketune.track.serving); returns
    mlflow's ModelInfo (model_id, model_uri). Requests are decoded as the evaluation decodes
    (`evaluate`). With a prompt_template (instruction data) a request is a question the model
    answers: the template around it, and only the generated answer back. `context` is the
    training rows' length, which prompts and texts are cut to."""
    import mlflow

    from snaketune.track.serving import log_served, serving_config

    config = serving_config(task, evaluate, prompt_template, context)
    # The active run puts the logged model in the run's experiment (else: the default one).
    with process_tracking_uri(uri), mlflow.start_run(run_id=run_id):
        return log_served(model_dir, config, logged_model_name(name), pip_requirements())


def logged_model_name(experiment: str) -> str:
    """The experiment's name as MLflow allows a logged model's (no '.', as a sweep's points
    have: `lm.lr-0.001` is logged as `lm-lr-0.001`)."""
    return re.sub(r"[/:.%\"']", "-", experiment)


@dataclass(frozen=True)
class VersionRecord:
    """What a model version says about where it came from."""

    experiment: str
    config: dict[str, Any]
    config_hash: str
    eval_metrics: dict[str, Any]
    run_ids: dict[str, str]
    """'parent', 'train' and 'evaluate' at least."""
    card: str = ""
    """The model card (snaketune.track.model_card), after the one-line summary."""

    def tags(self) -> dict[str, str]:
        """The headline (top-level, numeric) eval metrics, then the runs it came from."""
        scores = {
            f"eval.{key}": str(value)
            for key, value in self.eval_metrics.items()
            if isinstance(value, int | float) and not isinstance(value, bool)
        }
        links = {
            f"snaketune.{name}_run_id": self.run_ids[name]
            for name in ("parent", "train", "evaluate")
        }
        return {
            **scores,
            "snaketune.experiment": self.experiment,
            "snaketune.task": self.config["task"],
            "snaketune.config_hash": self.config_hash,
            **links,
        }

    def description(self) -> str:
        summary = (
            f"{self.experiment}: {self.config['task']} on {self.config.get('dataset', '?')}, "
            f"trained in run {self.run_ids['train']}, evaluated in run "
            f"{self.run_ids['evaluate']}. Evaluation protocol: "
            f"{self.eval_metrics.get('protocol', 'n/a')}"
        )
        text = f"{summary}\n\n{self.card}" if self.card else summary
        return text[:MAX_DESCRIPTION]


def register(client, name: str, info, record: VersionRecord) -> RegisteredModel:
    """A new version of `name` for the logged model, linked to the train run that made it."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

    about = (
        f"`{record.config['task']}` models of experiment `{record.experiment}`, trained by "
        f"snaketune on `{record.config.get('dataset', record.experiment)}`. Each version's "
        "description is its model card: what it is, its test metrics beside the baselines, how "
        "they were measured; its tags hold the headline metrics and the runs it came from."
    )
    try:
        client.create_registered_model(name, description=about)
    except MlflowException as err:  # registered by an earlier run: add a version to it
        if err.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
        if not client.get_registered_model(name).description:
            client.update_registered_model(name, description=about)
    # The card first: the version page shows the description's opening, which should say what
    # the model is (the card's title and summary), not how it was measured.
    runs = f"Trained in run {record.run_ids['train']}, evaluated in {record.run_ids['evaluate']}."
    description = f"{record.card}\n{runs}\n" if record.card else record.description()
    with process_tracking_uri(client.tracking_uri):
        version = client.create_model_version(
            name,
            info.model_uri,
            run_id=record.run_ids["train"],
            tags=record.tags(),
            description=description[:MAX_DESCRIPTION],
            model_id=info.model_id,
        )
    return RegisteredModel(name, str(version.version), info.model_id)


def linked_metrics(metrics: list, model_id: str | None, split) -> list:
    """The eval metrics tied to the logged model and to the test split they were measured on
    (a lineage.SplitDataset or None), so the model's page in MLflow shows them."""
    from mlflow.entities import Metric

    if model_id is None:
        return metrics
    dataset = {"dataset_name": split.name, "dataset_digest": split.digest} if split else {}
    return [
        Metric(m.key, m.value, m.timestamp, m.step, model_id=model_id, **dataset) for m in metrics
    ]


@dataclass(frozen=True)
class LoggedModel:
    """A model an earlier upload logged (what register needs of mlflow's ModelInfo)."""

    model_id: str

    @property
    def model_uri(self) -> str:
        return f"models:/{self.model_id}"


def logged_model_of(client, experiment_id: str, run_id: str) -> LoggedModel | None:
    """The model logged on the run, if an earlier upload logged one."""
    models = client.search_logged_models(
        [experiment_id], filter_string=f"source_run_id = '{run_id}'"
    )
    return LoggedModel(models[0].model_id) if models else None


def version_of(client, name: str, run_id: str) -> RegisteredModel | None:
    """The version of `name` registered from the run, if an earlier upload registered one."""
    for version in client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"):
        return RegisteredModel(name, str(version.version), version.model_id)
    return None


def recorded(tags: dict[str, str]) -> dict[str, str] | None:
    return json.loads(tags.get(MODEL_TAG, "null"))
