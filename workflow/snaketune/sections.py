"""The config's keys, section by section: the top-level keys, an experiment entry's own, and
the settings class of each of its sections (owned by the stage that reads it).

snaketune.schema makes the JSON schema from these; snaketune.config checks a config with it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from snaketune.data.settings import CleanSettings, SplitSettings, TokenizerSettings
from snaketune.evaluate.settings import EvalSettings
from snaketune.names import TASKS
from snaketune.settings import setting
from snaketune.tokenize.settings import TokenizeSettings
from snaketune.train.settings import ModelSettings, TrainSettings


@dataclass(frozen=True, kw_only=True)
class ExperimentKeys:
    """The keys of an experiment entry besides its sections (read from the config as a dict;
    defined here for the schema)."""

    SECTION: ClassVar[str] = (
        "One entry per model to train; outputs go to <results_dir>/<name>/<stage>/."
    )

    name: str = setting(
        pattern="^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        errorMessage=(
            "is not a usable experiment name: it becomes a folder under results_dir, so use "
            "letters, digits, '_', '.' and '-', starting with a letter or digit"
        ),
        description="Experiment name; used in output paths and as the MLflow parent run's name.",
    )
    sweep: dict | None = setting(
        None,
        schema_default=False,
        type="object",
        description=(
            "Run this entry once per point (track/sweep.py): `grid` maps dotted keys such as "
            "train.lr or model.n_layer to lists of values (every combination is a point), "
            "`points` lists more points as {dotted key: value}. Each point becomes an "
            "experiment named <name>.<setting>-<value>..., validated like any other; "
            "results/sweeps/<name>/ gets a comparison table and plot, in the report and in "
            "MLflow. Expanded before the rest of the config is checked, so it never reaches a "
            "job."
        ),
    )
    swept: dict | None = setting(
        None,
        schema_default=False,
        type="object",
        properties={"of": {"type": "string"}, "point": {"type": "object"}},
        description=(
            "Set by the sweep expansion on each point (of, the sweep's name; point, its "
            "values); not written by hand."
        ),
    )
    registered_model_name: str = setting(
        "",
        description=(
            "Model Registry name the trained model is registered under "
            '(mlflow.register_models). Empty means "<mlflow.experiment_name>.<name>". Set it '
            "to collect versions from several configs under one name."
        ),
    )
    dataset: str = setting(description="A key of the datasets catalog.")
    task: str = setting(
        enum=TASKS,
        description="What the model learns. Classification needs the dataset's label_column.",
    )
    text_template: str | None = setting(
        None,
        description=(
            "Optional str.format template over the record's columns that builds each document, "
            'e.g. "Customer: {question}\\nAgent: {answer}". Empty uses the dataset\'s '
            "text_column. For instruction data (the dataset's response_column) the response's "
            "placeholder starts the response; the whitespace before it belongs to the response. "
            "Empty, for instruction data: a pretrained tokenizer's chat template when it has one, "
            'else "Question: {prompt}\\nAnswer: {response}".'
        ),
    )


@dataclass(frozen=True, kw_only=True)
class ConfigKeys:
    """The config's top-level keys besides its sections (defined here for the schema)."""

    SECTION: ClassVar[str] = (
        "snaketune configuration: a catalog of datasets, a list of experiments that use them, "
        "and where MLflow records the runs. Every key has a description and a default."
    )

    preset: str | None = setting(
        None,
        schema_default=False,
        type="string",
        description=(
            "A file of presets/ (its name without .yaml) layered over this config as "
            "`--configfile presets/<name>.yaml` would be, e.g. `snakemake --cores 2 --config "
            "preset=sms-spam`; other --config values still override it."
        ),
    )
    results_dir: str = setting(
        "results",
        description="Directory (relative to the working directory) that holds every output.",
    )
    local_gpus: list[int | str] = setting(
        factory=list,
        type="array",
        items={"type": ["integer", "string"]},
        description=(
            "This machine's GPU ids for local runs (snaketune.gpus): with `--resources gpu=N`, "
            "each running train job that asks for k GPUs (`--set-resources "
            "train_model:gpu=k`) gets k of these to itself as CUDA_VISIBLE_DEVICES. Empty: the "
            "CUDA_VISIBLE_DEVICES snakemake was started with, else the GPUs nvidia-smi lists. "
            "Inside a SLURM job, SLURM decides."
        ),
    )


SECTIONS = {
    "clean": CleanSettings,
    "split": SplitSettings,
    "tokenizer": TokenizerSettings,
    "tokenize": TokenizeSettings,
    "model": ModelSettings,
    "train": TrainSettings,
    "evaluate": EvalSettings,
}
"""The settings dataclass of each section of an experiment entry."""
