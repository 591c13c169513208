# Config validation, wildcard constraints and the get_<thing>(wildcards) helpers the rules use.
# Every rule's shell command and settings come from its job definition in snaketune.stages:
# shell_command("split_corpus") is `snaketune split --corpus {input.corpus:q} ... --settings
# {params.settings:q} > {log:q} 2>&1`, one option per path the job takes, by its rule name.
import os
import re
import sys

from snaketune.config import apply_preset, raise_if_invalid, validated
from snaketune import resume
from snaketune.names import SPLITS
from snaketune.provenance import write_invocation
from snaketune.settings import ConfigView, download_settings, mlflow_settings, to_json
from snaketune.sources import changed_sources
from snaketune.stages import BY_RULE, shell_command, threads_per_process, train_launcher
from snaketune.tokenize.plan import (
    fixed_partition_counts,
    partition_names,
    planned_partition_counts,
)
from snaketune.tracking_uri import effective_tracking_uri, redact, store_uri

apply_preset(config, workflow.config_settings.config)  # the --config values
validated(config, workflow.basedir)  # every problem by key, before any job; defaults filled

R = config["results_dir"]
EXPERIMENTS = {exp["name"]: exp for exp in config["experiments"]}
CONFIG = ConfigView(config, workflow.basedir)
MLFLOW_STORE = f"{R}/mlflow.db"  # the SQLite store when no tracking URI is configured


wildcard_constraints:
    experiment="|".join(re.escape(name) for name in EXPERIMENTS),
    dataset="|".join(re.escape(name) for name in config["datasets"]),
    split="|".join(SPLITS),
    part=r"\d{5}",


def settings_for(rule):
    """The rule's settings from config.yaml, as the JSON its command takes."""

    def get_settings(wildcards):
        return to_json(BY_RULE[rule].from_config(CONFIG, **dict(wildcards.items())))

    return get_settings


def get_final_outputs():
    return [f"{R}/{name}/track/runs.json" for name in EXPERIMENTS]


def dataset_folder(wildcards):
    return f"{R}/datasets/{EXPERIMENTS[wildcards.experiment]['dataset']}/download"


def get_raw_dir(wildcards):
    return f"{dataset_folder(wildcards)}/files"


def get_download_manifest(wildcards):
    return f"{dataset_folder(wildcards)}/manifest.json"


def tokenize_partitions(wildcards, output):
    """One output of every tokenize_partition job. With tokenize.partitions: auto their number
    depends on the splits' sizes, known once the plan_partitions checkpoint has run."""
    partitions = EXPERIMENTS[wildcards.experiment]["tokenize"]["partitions"]
    counts = fixed_partition_counts(partitions)
    planned = counts is None
    if planned:
        plan = checkpoints.plan_partitions.get(experiment=wildcards.experiment).output.plan
        counts = planned_partition_counts(plan)
    splits, parts = zip(*partition_names(counts))
    jobs = {"split": splits, "part": parts, "experiment": [wildcards.experiment] * len(parts)}
    if planned:
        outputs = rules.tokenize_partition.output
        check_incomplete([*expand(outputs.shards, zip, **jobs), *expand(outputs.manifest, zip, **jobs)])
    return expand(output, zip, **jobs)


def check_incomplete(files):
    """Snakemake looks for outputs of killed jobs (its incomplete markers) only among the jobs it
    knows before a checkpoint is resolved; the partition jobs of `partitions: auto` appear after
    plan_partitions, so their markers are looked at here, with Snakemake's own rule: refuse, or
    under --rerun-incomplete run those jobs again."""
    from snakemake.exceptions import IncompleteFilesException

    marked = workflow.persistence._filter_incomplete_keys(files)
    stale = [f for f in files if f in marked and os.path.exists(f)]
    if not stale:
        return
    if not workflow.dag_settings.force_incomplete:
        raise IncompleteFilesException(stale)
    workflow.dag.forcefiles.update(stale)


def get_part_shards(wildcards):
    return tokenize_partitions(wildcards, rules.tokenize_partition.output.shards)


def get_part_manifests(wildcards):
    return tokenize_partitions(wildcards, rules.tokenize_partition.output.manifest)


def train_processes(wildcards):
    return EXPERIMENTS[wildcards.experiment]["train"]["processes"]


def get_train_launcher(wildcards):
    return train_launcher(train_processes(wildcards))


def get_train_threads(wildcards, threads):
    return threads_per_process(threads, train_processes(wildcards))


def check_local_sources():
    """Before any job: no local dataset file changed in place since it was verified."""
    manifest = rules.download_dataset.output.manifest
    sources = {}
    for name in {exp["dataset"] for exp in EXPERIMENTS.values()}:
        download = download_settings(CONFIG, name)
        sources[name] = (download.url, download.sha256, manifest.format(dataset=name))
    raise_if_invalid(changed_sources(sources), "a dataset file changed")


def say_how_training_continues():
    """Before any job, on the console: an experiment whose checkpoint will go on to a new
    max_steps, or whose changed settings start it again from step 0 (what the train job then
    does, and its log says too)."""
    state_dir = rules.train_model.params.state_dir
    for name in EXPERIMENTS:
        state = state_dir.format(experiment=name)
        job = BY_RULE["train_model"].from_config(CONFIG, experiment=name)
        plan = resume.plan(resume.read_record(state), job, None)
        if plan.message:
            print(f"snaketune: {name}: training {plan.message} ({state})", file=sys.stderr)


def record_invocation():
    write_invocation(R, sys.argv, config)


def print_summary():
    configured = mlflow_settings(CONFIG).tracking_uri
    ui = redact(effective_tracking_uri(store_uri(configured, MLFLOW_STORE)))
    if ui.startswith("sqlite:///"):
        ui = f"mlflow ui --backend-store-uri {ui} --host 127.0.0.1 --port 5000"
    else:
        ui = f"open {ui} in a browser"
    print(f"\nsnaketune: results are under {os.path.abspath(R)}/<experiment>/<stage>/")
    for name in EXPERIMENTS:
        print(f"  {name}: {R}/{name}/evaluate/metrics.json")
    print(f"Browse the runs: {ui}\n")
