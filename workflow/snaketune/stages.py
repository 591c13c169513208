"""Every job the workflow runs, defined once: the paths it reads and writes, the settings it
takes, and the library function that runs it.

A job's paths are a frozen dataclass whose field names are the rule's `input:`, `output:` and
`params:` names. From these definitions come the rules' shell commands (`shell_command`), the
`snaketune` CLI (snaketune.cli), the command lines tests and benchmarks run (`command_line`),
and the paths and digests each manifest records (snaketune.manifest). The library function is
named after the rule and takes `(paths, settings)`, whoever calls it.

This module imports nothing heavy: the workflow reads it when it builds the DAG.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Iterator
from dataclasses import Field, dataclass, field, fields
from importlib import import_module
from pathlib import Path
from typing import Any

from snaketune.data.settings import (
    CleanJob,
    DownloadSettings,
    SplitSettings,
    TokenizerSettings,
    clean_job,
    download_settings,
    split_settings,
    tokenizer_settings,
)
from snaketune.evaluate.settings import EvalJob, eval_job
from snaketune.settings import to_json
from snaketune.tokenize.settings import PartitionJob, TokenizeJob, partition_job, tokenize_job
from snaketune.track.settings import SweepSettings, TrackSettings, sweep_settings, track_settings
from snaketune.train.settings import TrainJob, train_job

INPUT, OUTPUT, STATE = "input", "output", "params"
"""A path's role is the rule directive that holds it. STATE paths go through params: Snakemake
neither tracks nor deletes them (a checkpoint folder must outlive a failed job)."""


def input_path(doc: str, *, digest: bool = True) -> Any:
    """A path the job reads; its sha256 goes to the manifest unless digest is False (when a
    finer record exists, such as the partition manifests' per-shard digests)."""
    return field(metadata={"role": INPUT, "doc": doc, "digest": digest})


def output_path(doc: str, *, artifact: bool = False, digest: bool = True) -> Any:
    """A path the job writes; an artifact is mirrored to the stage's MLflow run."""
    return field(metadata={"role": OUTPUT, "doc": doc, "digest": digest, "artifact": artifact})


def page_path(doc: str, *, of: str) -> Any:
    """An HTML page of the output `of` for the Snakemake report, which shows HTML inline and
    other files only as links (snaketune.tables). A caller that names no path gets `of`'s with
    .html: pages come last, with a default, so calls that give the other paths stay as they are."""
    metadata = {"role": OUTPUT, "doc": f"{doc} (the Snakemake report)", "digest": True}
    return field(default=None, metadata={**metadata, "artifact": False, "beside": of})


def state_path(doc: str) -> Any:
    return field(metadata={"role": STATE, "doc": doc, "digest": False})


@dataclass(frozen=True)
class Paths:
    """Base of every job's paths: strings become Paths, lists of them lists of Paths."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and "beside" in f.metadata:
                value = Path(getattr(self, f.metadata["beside"])).with_suffix(".html")
            typed = [Path(v) for v in value] if isinstance(value, list | tuple) else Path(value)
            object.__setattr__(self, f.name, typed)


def path_fields(paths: type[Paths] | Paths, role: str | None = None) -> Iterator[Field]:
    return (f for f in fields(paths) if role is None or f.metadata["role"] == role)


def is_list(f: Field) -> bool:
    return str(f.type).startswith("list")


# --- the jobs' paths -----------------------------------------------------------------------------


@dataclass(frozen=True)
class DownloadPaths(Paths):
    files: Path = output_path("the verified, unpacked dataset files")
    manifest: Path = output_path("this job's manifest.json")


@dataclass(frozen=True)
class CleanPaths(Paths):
    raw: Path = input_path("the download's files folder")
    corpus: Path = output_path("cleaned documents: doc_id, text, label")
    report: Path = output_path("what each filter removed or changed", artifact=True)
    manifest: Path = output_path("this job's manifest.json")
    report_html: Path = page_path("the cleaning report as a table", of="report")


@dataclass(frozen=True)
class SplitPaths(Paths):
    corpus: Path = input_path("the cleaned corpus")
    train: Path = output_path("the train split")
    val: Path = output_path("the validation split")
    test: Path = output_path("the test split")
    manifest: Path = output_path("this job's manifest.json")


@dataclass(frozen=True)
class TokenizerPaths(Paths):
    train: Path = input_path("the train split (BPE training text)")
    tokenizer: Path = output_path("the tokenizer, Hugging Face format", artifact=True)
    manifest: Path = output_path("this job's manifest.json")


@dataclass(frozen=True)
class PlanPaths(Paths):
    train: Path = input_path("the train split")
    val: Path = input_path("the validation split")
    test: Path = input_path("the test split")
    tokenizer: Path = input_path("the tokenizer folder")
    plan: Path = output_path("row ranges of every partition, label names, tokenizer facts")
    encoder: Path = output_path("the Rust tokenizer every partition runs")


@dataclass(frozen=True)
class PartitionPaths(Paths):
    # Each partition reads only its rows of the split; the split's sha256 is in its manifest.
    split_file: Path = input_path("the split this partition reads rows of", digest=False)
    plan: Path = input_path("the tokenize plan")
    encoder: Path = input_path("the Rust tokenizer of the plan")
    shards: Path = output_path("this partition's Parquet shards", digest=False)
    manifest: Path = output_path("this partition's manifest (counts, per-shard sha256)")


@dataclass(frozen=True)
class GatherPaths(Paths):
    train: Path = input_path("the train split")
    val: Path = input_path("the validation split")
    test: Path = input_path("the test split")
    tokenizer: Path = input_path("the tokenizer folder")
    plan: Path = input_path("the tokenize plan (its ranges are in the manifest)", digest=False)
    part_shards: list[Path] = input_path("every partition's shard folder", digest=False)
    part_manifests: list[Path] = input_path("every partition's manifest", digest=False)
    shards: Path = output_path("shards/<split>/shard-NNNNN.parquet", digest=False)
    manifest: Path = output_path("this job's manifest.json: the tokenized data's contract")


@dataclass(frozen=True)
class TrainPaths(Paths):
    shards: Path = input_path("the token shards, one folder per split")
    tokenize_manifest: Path = input_path("the tokenize stage's manifest")
    tokenizer: Path = input_path("the tokenizer, copied into the model folder")
    model: Path = output_path("the trained model (safetensors + tokenizer)", artifact=True)
    # history and system metrics hold timings: their digests would differ on every run.
    history: Path = output_path("one JSON line per step", artifact=True, digest=False)
    loss_curve: Path = output_path("train and val loss by step", artifact=True)
    manifest: Path = output_path("this job's manifest.json")
    system_metrics: Path = output_path("CPU, memory, GPU samples", artifact=True, digest=False)
    state_dir: Path = state_path("resumable checkpoints, kept when the job fails")


@dataclass(frozen=True)
class EvaluatePaths(Paths):
    model: Path = input_path("the trained model")
    shards: Path = input_path("the token shards (the test folder is scored)", digest=False)
    tokenize_manifest: Path = input_path("the tokenize stage's manifest")
    train: Path = input_path("the train split (baselines)")
    test: Path = input_path("the test split (texts of the samples)")
    metrics: Path = output_path("metrics with their protocol", artifact=True)
    samples: Path = output_path(
        "the samples table: generations (with the scored test answers of instruction data) or "
        "predictions",
        artifact=True,
    )
    plot: Path = output_path("NLL by position or the confusion matrix", artifact=True)
    manifest: Path = output_path("this job's manifest.json")
    metrics_html: Path = page_path("the metrics as tables", of="metrics")
    samples_html: Path = page_path("the samples as a table", of="samples")


@dataclass(frozen=True)
class TrackPaths(Paths):
    download: Path = input_path("the download's manifest")
    clean: Path = input_path("the clean stage's manifest")
    split: Path = input_path("the split stage's manifest")
    tokenizer: Path = input_path("the tokenizer stage's manifest")
    tokenize: Path = input_path("the tokenize stage's manifest")
    train: Path = input_path("the train stage's manifest")
    evaluate: Path = input_path("the evaluate stage's manifest")
    runs: Path = output_path("the MLflow run ids")
    model_card: Path = output_path("the model card, the model's README.md in MLflow")
    store: Path = state_path("the default SQLite store (no tracking URI configured)")
    artifacts: Path = state_path("artifact folder of an experiment created in a local store")
    provenance: Path = state_path("provenance.json of the snakemake invocation")
    tracking: Path = state_path("the experiment's MLflow run ids, one file per run (live.RunIds)")


@dataclass(frozen=True)
class SweepPaths(Paths):
    # Each is digested, one by one, into the manifest (snaketune.track.sweep).
    metrics: list[Path] = input_path("every point's metrics.json, in sweep order", digest=False)
    runs: list[Path] = input_path("every point's runs.json (its MLflow runs)", digest=False)
    table: Path = output_path("one row per point: its swept values and metrics", artifact=True)
    plot: Path = output_path("each eval metric against the swept keys", artifact=True)
    manifest: Path = output_path("this job's manifest.json")
    store: Path = state_path("the default SQLite store (no tracking URI configured)")
    artifacts: Path = state_path("artifact folder of an experiment created in a local store")
    table_html: Path = page_path("the table as a page", of="table")


# --- the registry --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    command: str
    """`snaketune <command>`; also the results folder and MLflow run of the stage, but for the
    tokenize steps (`tokenize-<step>`, folder `tokenize`)."""
    rule: str
    """The Snakemake rule, and the name of the library function that runs it."""
    module: str
    paths: type[Paths]
    settings: type
    from_config: Callable[..., Any]
    """(ConfigView, **wildcards) -> settings: what the rule passes from config.yaml."""

    @property
    def folder(self) -> str:
        return self.command.split("-")[0]

    def entry(self) -> Callable[[Paths, Any], Any]:
        return getattr(import_module(self.module), self.rule)


STAGES = (
    Stage(
        "download",
        "download_dataset",
        "snaketune.data.download",
        DownloadPaths,
        DownloadSettings,
        download_settings,
    ),
    Stage("clean", "clean_corpus", "snaketune.data.clean", CleanPaths, CleanJob, clean_job),
    Stage(
        "split",
        "split_corpus",
        "snaketune.data.split",
        SplitPaths,
        SplitSettings,
        split_settings,
    ),
    Stage(
        "tokenizer",
        "prepare_tokenizer",
        "snaketune.data.tokenizer",
        TokenizerPaths,
        TokenizerSettings,
        tokenizer_settings,
    ),
    Stage(
        "tokenize-plan",
        "plan_partitions",
        "snaketune.tokenize.plan",
        PlanPaths,
        TokenizeJob,
        tokenize_job,
    ),
    Stage(
        "tokenize-partition",
        "tokenize_partition",
        "snaketune.tokenize.partition",
        PartitionPaths,
        PartitionJob,
        partition_job,
    ),
    Stage(
        "tokenize-gather",
        "gather_shards",
        "snaketune.tokenize.gather",
        GatherPaths,
        TokenizeJob,
        tokenize_job,
    ),
    Stage("train", "train_model", "snaketune.train.trainer", TrainPaths, TrainJob, train_job),
    Stage(
        "evaluate",
        "evaluate_model",
        "snaketune.evaluate.evaluation",
        EvaluatePaths,
        EvalJob,
        eval_job,
    ),
    Stage(
        "track",
        "track_experiment",
        "snaketune.track.reconcile",
        TrackPaths,
        TrackSettings,
        track_settings,
    ),
    Stage(
        "sweep",
        "summarize_sweep",
        "snaketune.track.sweep",
        SweepPaths,
        SweepSettings,
        sweep_settings,
    ),
)
BY_COMMAND = {stage.command: stage for stage in STAGES}
BY_RULE = {stage.rule: stage for stage in STAGES}
TRACKED = tuple(f.name for f in path_fields(TrackPaths, INPUT))
"""The stages mirrored to MLflow, in pipeline order: one child run each."""


def tracked_stage(folder: str) -> Stage:
    """The stage whose manifest is <folder>/manifest.json (for tokenize, the gather)."""
    return next(s for s in reversed(STAGES) if s.folder == folder)


# The download is shared by every experiment on its dataset, so it has no one parent run to live
# under: the track job creates its run, with the download's own times.
LIVE = tuple(tracked_stage(name).rule for name in TRACKED if name != "download")
"""The rules whose jobs track their stage's run live (snaketune.track.live): they take
params.tracking, the experiment's tracking folder."""


# --- command lines -------------------------------------------------------------------------------


def flag(f: Field) -> str:
    return "--" + f.name.replace("_", "-")


INTERPRETER_VARIABLE = "snaketune_python"
INTERPRETER = f'"${INTERPRETER_VARIABLE}"'
"""The workflow's own interpreter in a rule's command: a shell variable that the rules' shell
prefix sets (`interpreter_prefix`, common.smk). Whatever `snakemake` loaded the Snakefile can
then run its jobs, from a shell whose PATH lacks its environment; and the rules' text stays the
same wherever the checkout is (Snakemake reruns a job whose command text or params changed)."""
CLI = f"{INTERPRETER} -m snaketune.cli"


def interpreter_prefix(python: str) -> str:
    """Snakemake's shell prefix for every rule: its default strict mode, then INTERPRETER."""
    return f"set -euo pipefail; {INTERPRETER_VARIABLE}={shlex.quote(python)}; "


def shell_command(rule: str, launcher: str = CLI, env: str = "") -> str:
    """The rule's shell command: every path by its input/output/params name, the settings from
    params.settings, the output into the log; a failure's message on the console too
    (snaketune.joblog)."""
    stage = BY_RULE[rule]
    paths = " ".join(
        f"{flag(f)} {{{f.metadata['role']}.{f.name}:q}}" for f in path_fields(stage.paths)
    )
    if rule in LIVE:
        env = f"SNAKETUNE_TRACKING={{params.tracking:q}} {env}".strip()
    prefix = f"{env} " if env else ""
    return (
        f"{prefix}{launcher} {stage.command} {paths} --settings {{params.settings:q}}"
        f" > {{log:q}} 2>&1 || {INTERPRETER} -m snaketune.joblog {rule} {{log:q}} $?"
    )


def stage_of(paths: Paths) -> Stage:
    return next(s for s in STAGES if type(paths) is s.paths)


def train_launcher(processes: int, nodes: int = 1) -> str:
    """What the workflow's interpreter runs to start training (after INTERPRETER): the CLI itself,
    torchrun (DDP) on one node, or one torchrun agent per node (snaketune.train.launch)."""
    if nodes > 1:
        return f"-m snaketune.train.launch {nodes} {processes}"
    if processes == 1:
        return "-m snaketune.cli"
    return f"-m torch.distributed.run --standalone --nproc_per_node={processes} -m snaketune.cli"


SLURM_SHAPE = ("nodes", "tasks", "tasks_per_gpu", "mpi")
"""The train job's resources that give it its nodes under the SLURM profile (the SLURM
executor plugin's names)."""


def slurm_shape(nodes: int) -> dict[str, int | str | None]:
    """The SLURM_SHAPE resources for train.nodes: N nodes and a task on each, each task a
    torchrun agent that snaketune.train.launch starts with its own srun. `mpi` tells the plugin so
    (its job step then runs the command as it is, not inside `srun -n1`), and tasks_per_gpu 0
    keeps it from turning `tasks` into --ntasks-per-gpu on a GPU job. One node asks for none of
    them (None: Snakemake drops the resource), as every other job."""
    if nodes == 1:
        return dict.fromkeys(SLURM_SHAPE)
    return {"nodes": nodes, "tasks": nodes, "tasks_per_gpu": 0, "mpi": "srun"}


def threads_per_process(threads: int, processes: int) -> int:
    """A job's threads shared among its training processes."""
    return max(1, threads // processes)


def command_line(paths: Paths, settings: Any) -> list[str]:
    """`snaketune` arguments that run one job on these paths and settings."""
    stage = stage_of(paths)
    args = [stage.command]
    for f in path_fields(paths):
        value = getattr(paths, f.name)
        args += [flag(f), *(map(str, value) if is_list(f) else [str(value)])]
    return [*args, "--settings", to_json(settings)]
