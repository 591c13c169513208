"""Every job the workflow runs, defined once: the paths it reads and writes, the settings it
takes, and the library function that runs it.

A job's paths are a frozen dataclass whose field names are the rule's `input:`, `output:` and
`params:` names, declared in its stage package's paths.py (snaketune.paths), with each output's
file name; the rules' `output:` are made from them (`outputs`, common.smk). Its settings are a
dataclass of its stage package's settings.py. From these definitions come the rules' shell
commands (`shell_command`), the `snaketune` CLI (snaketune.cli), the command lines tests and
benchmarks run (`command_line`), and the paths and digests each manifest records
(snaketune.manifest). The library function is named after the rule and takes `(paths, settings,
context)`, whoever calls it; the context (snaketune.context) is optional in-process.

This module imports nothing heavy: the workflow reads it when it builds the DAG.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import Field, dataclass
from importlib import import_module
from typing import Any

from snaketune.context import TRACKING_VARIABLE
from snaketune.data.paths import CleanPaths, DownloadPaths, SplitPaths, TokenizerPaths
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
from snaketune.evaluate.paths import EvaluatePaths
from snaketune.evaluate.settings import EvalJob, eval_job
from snaketune.paths import INPUT, Paths, is_list, path_fields
from snaketune.settings import to_json
from snaketune.tokenize.paths import GatherPaths, PartitionPaths, PlanPaths
from snaketune.tokenize.settings import PartitionJob, TokenizeJob, partition_job, tokenize_job
from snaketune.track.paths import SweepPaths, TrackPaths
from snaketune.track.settings import SweepSettings, TrackSettings, sweep_settings, track_settings
from snaketune.train.paths import TrainPaths
from snaketune.train.settings import TrainJob, train_job

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
        env = f"{TRACKING_VARIABLE}={{params.tracking:q}} {env}".strip()
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
