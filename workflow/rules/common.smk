# Config validation, wildcard constraints and the get_<thing>(wildcards) helpers the rules use.
import json
import os
import re
import sys
from dataclasses import asdict
from urllib.parse import urlparse

from snakemake.utils import validate

from snaketune.clean import read_settings_for
from snaketune.config import (
    SCHEMA,
    apply_preset,
    cross_checks,
    raise_if_invalid,
    schema_problems,
)
from snaketune.partitions import (
    fixed_partition_counts,
    partition_names,
    planned_partition_counts,
)
from snaketune.provenance import write_invocation
from snaketune.registry import registered_model_name
from snaketune.track import configured_tracking_uri, effective_tracking_uri, redact

apply_preset(config, workflow.config_settings.config)  # the --config values
# Readable problems first (every key at once), then snakemake's validate fills the defaults.
raise_if_invalid(schema_problems(config), "schema")
validate(config, SCHEMA)
raise_if_invalid(cross_checks(config), "cross-checks")

R = config["results_dir"]
EXPERIMENTS = {exp["name"]: exp for exp in config["experiments"]}
# The environment's MLFLOW_TRACKING_URI is read by the track job itself, never put on a command
# line, where a credential in it would end up in Snakemake's logs.
TRACKING_URI = configured_tracking_uri(config["mlflow"]["tracking_uri"], R)


wildcard_constraints:
    experiment="|".join(re.escape(name) for name in EXPERIMENTS),
    dataset="|".join(re.escape(name) for name in config["datasets"]),
    split="train|val|test",
    part=r"\d{5}",


def get_final_outputs():
    return [f"{R}/{name}/track/runs.json" for name in EXPERIMENTS]


def dataset_of(wildcards):
    return config["datasets"][EXPERIMENTS[wildcards.experiment]["dataset"]]


def resolve_url(url):
    """Relative paths are relative to the repository, wherever snakemake runs."""
    if urlparse(url).scheme in ("http", "https", "file", "hf"):
        return url
    return url if os.path.isabs(url) else os.path.join(workflow.basedir, url)


def get_raw_dir(wildcards):
    return f"{R}/datasets/{EXPERIMENTS[wildcards.experiment]['dataset']}/download/files"


def get_download_settings(wildcards):
    ds = config["datasets"][wildcards.dataset]
    return json.dumps(
        {
            "url": resolve_url(ds["url"]),
            "sha256": ds["sha256"],
            "max_unpacked_bytes": ds["max_unpacked_bytes"],
        }
    )


def get_clean_settings(wildcards):
    exp, ds = EXPERIMENTS[wildcards.experiment], dataset_of(wildcards)
    read = asdict(read_settings_for(ds, exp["task"], exp["text_template"]))
    return json.dumps({"read": read, "clean": exp["clean"], "member": ds["member"]})


def _section(name):
    def get_settings(wildcards):
        return json.dumps(EXPERIMENTS[wildcards.experiment][name])

    return get_settings


get_split_settings = _section("split")
get_tokenizer_settings = _section("tokenizer")


def get_tokenize_settings(wildcards):
    exp = EXPERIMENTS[wildcards.experiment]
    return json.dumps({"task": exp["task"], **exp["tokenize"]})


def get_partition_settings(wildcards):
    exp = EXPERIMENTS[wildcards.experiment]
    part = {"split": wildcards.split, "part": int(wildcards.part)}
    return json.dumps({"task": exp["task"], **exp["tokenize"], **part})


def get_tokenize_parts_dir(wildcards):
    return f"{R}/{wildcards.experiment}/tokenize/parts"


def get_tokenize_partitions(wildcards):
    """Every tokenize_partition job's outputs. With tokenize.partitions: auto their number
    depends on the splits' sizes, known once the plan_partitions checkpoint has run."""
    partitions = EXPERIMENTS[wildcards.experiment]["tokenize"]["partitions"]
    counts = fixed_partition_counts(partitions)
    if counts is None:
        plan = checkpoints.plan_partitions.get(experiment=wildcards.experiment).output.plan
        counts = planned_partition_counts(plan)
    splits, parts = zip(*partition_names(counts))
    jobs = {"split": splits, "part": parts, "experiment": [wildcards.experiment] * len(parts)}
    outputs = rules.tokenize_partition.output
    return {
        "part_shards": expand(outputs.shards, zip, **jobs),
        "part_manifests": expand(outputs.manifest, zip, **jobs),
    }


def get_train_settings(wildcards):
    exp = EXPERIMENTS[wildcards.experiment]
    return json.dumps({"task": exp["task"], "model": exp["model"], "train": exp["train"]})


def get_train_launcher(wildcards):
    """One process runs the CLI; several are started by torchrun (DDP), one node."""
    processes = EXPERIMENTS[wildcards.experiment]["train"]["processes"]
    if processes == 1:
        return "snaketune"
    return f"torchrun --standalone --nproc_per_node={processes} -m snaketune.cli"


def get_train_threads(wildcards, threads):
    """Threads per training process: the rule's threads shared among its processes."""
    processes = EXPERIMENTS[wildcards.experiment]["train"]["processes"]
    return max(1, threads // processes)


def get_evaluate_settings(wildcards):
    exp = EXPERIMENTS[wildcards.experiment]
    return json.dumps({"task": exp["task"], "evaluate": exp["evaluate"]})


def get_track_settings(wildcards):
    artifacts = f"file://{os.path.abspath(R)}/mlartifacts"
    return json.dumps(
        {
            "experiment": wildcards.experiment,
            "mlflow_experiment": config["mlflow"]["experiment_name"],
            "tracking_uri": TRACKING_URI,
            "artifact_location": artifacts,
            "config": EXPERIMENTS[wildcards.experiment],
            "provenance": f"{R}/provenance.json",
            "registered_model_name": registered_model_name(
                config["mlflow"], EXPERIMENTS[wildcards.experiment]
            ),
        }
    )


def record_invocation():
    write_invocation(R, sys.argv, config)


def print_summary():
    ui = redact(effective_tracking_uri(TRACKING_URI))
    if ui.startswith("sqlite:///"):
        ui = f"mlflow ui --backend-store-uri {ui} --host 127.0.0.1 --port 5000"
    else:
        ui = f"open {ui} in a browser"
    print(f"\nsnaketune: results are under {os.path.abspath(R)}/<experiment>/<stage>/")
    for name in EXPERIMENTS:
        print(f"  {name}: {R}/{name}/evaluate/metrics.json")
    print(f"Browse the runs: {ui}\n")


def get_download_manifest(wildcards):
    return f"{R}/datasets/{EXPERIMENTS[wildcards.experiment]['dataset']}/download/manifest.json"
