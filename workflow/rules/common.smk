# Config validation, wildcard constraints and the get_<thing>(wildcards) helpers the rules use.
# Every rule's shell command and settings come from its job definition in snaketune.stages:
# shell_command("split_corpus") is `"$snaketune_python" -m snaketune.cli split --corpus
# {input.corpus:q} ... --settings {params.settings:q} > {log:q} 2>&1 || ...`: one option per path
# the job takes, by its rule name, and a failed job's message on the console (snaketune.joblog).
import json
import os
import re
import shlex
import sys
from pathlib import Path

from snakemake.settings.types import DeploymentMethod

from snaketune import joblog
from snaketune.train.compile_cache import CACHE_VARIABLE, workflow_folder
from snaketune.config import apply_preset, raise_if_invalid, validated
from snaketune.gpus import (
    DEVICES_VARIABLE,
    gpus_without_bf16,
    machine_devices,
    smallest_gpu_memory,
)
from snaketune.train import memory_plan
from snaketune.train import resume
from snaketune.track.stage_log import Target, runs_table_url
from snaketune.names import SPLITS
from snaketune.provenance import write_invocation
from snaketune.sharing import SHARED_FOLDER, TRACKING_LINK, Sharing, link_all
from snaketune.context import ATTEMPT_VARIABLE, REPOSITORY_VARIABLE
from snaketune.settings import ConfigView, to_json
from snaketune.data.settings import download_settings, resolve_url
from snaketune.track.settings import mlflow_settings, sweep_names, sweep_points
from snaketune.data.sources import (
    FolderDigests,
    changed_sources,
    folder_sources,
    model_source_digest,
)
from snaketune.stages import (
    BY_RULE,
    INTERPRETER,
    interpreter_prefix,
    shell_command,
    slurm_shape,
    threads_per_process,
    tracked_stage,
    train_launcher,
)
from snaketune.tokenize.plan import (
    fixed_partition_counts,
    partition_names,
    partition_threads,
    planned_partition_counts,
)
from snaketune.track.tracking_uri import effective_tracking_uri, redact, store_uri

# The --config values, and the presets of this workflow (the Snakefile's), wherever snaketune is.
apply_preset(config, workflow.config_settings.config, Path(workflow.basedir) / "presets")
validated(config, workflow.basedir, os.environ)  # every problem by key, before any job; defaults filled

os.environ[REPOSITORY_VARIABLE] = str(workflow.basedir)  # the jobs' relative dataset paths
# torch.compile's graphs, shared by the jobs (snaketune.train.compile_cache); the user's folder wins.
os.environ.setdefault(CACHE_VARIABLE, str(workflow_folder(config["results_dir"])))
if config["local_gpus"]:  # the devices snaketune.gpus hands out to local jobs
    os.environ[DEVICES_VARIABLE] = ",".join(str(device) for device in config["local_gpus"])
# The interpreter of every job's command (snaketune.stages.INTERPRETER): this one, which loaded
# the Snakefile and so has snaketune, whatever PATH the shell has; a conda environment's own
# python where the rules run in their conda environments or containers (whose paths are not this
# machine's). (Snakemake formats the prefix: braces
# are doubled.)
IN_ENVIRONMENT = {DeploymentMethod.CONDA, DeploymentMethod.APPTAINER} & set(
    workflow.deployment_settings.deployment_method
)
PYTHON = "python" if IN_ENVIRONMENT else sys.executable
shell.prefix(interpreter_prefix(PYTHON).replace("{", "{{").replace("}", "}}"))
R = config["results_dir"]
EXPERIMENTS = {exp["name"]: exp for exp in config["experiments"]}
CONFIG = ConfigView(config, workflow.basedir)
MLFLOW_STORE = f"{R}/mlflow.db"  # the SQLite store when no tracking URI is configured
MLFLOW_ARTIFACTS = f"{R}/mlartifacts"  # the SQLite store's artifacts
TRACKING = f"{R}/{{experiment}}/tracking"  # where the experiment's MLflow run ids are kept
SHARED = f"{R}/{SHARED_FOLDER}"  # shared stages: {SHARED}/<stage>/{data}/, data a stage key
SHARING = Sharing.of(CONFIG, EXPERIMENTS)
# The store the track job uploads to (a relative path for the default one, so that a move of
# the checkout is not a new store).
UPLOADS_TO = redact(
    effective_tracking_uri(mlflow_settings(CONFIG).tracking_uri or f"sqlite:///{MLFLOW_STORE}")
)


wildcard_constraints:
    experiment="|".join(re.escape(name) for name in EXPERIMENTS),
    dataset="|".join(re.escape(name) for name in config["datasets"]),
    split="|".join(SPLITS),
    part=r"\d{5}",
    data="|".join(re.escape(key) for key in sorted(SHARING.all_keys())),
    sweep="|".join(re.escape(name) for name in sweep_names(config)) or "(?!)",


def settings_for(rule):
    """The rule's settings from config.yaml, as the JSON its command takes."""

    def get_settings(wildcards):
        given = dict(wildcards.items())
        if "data" in given:  # a shared job takes its owner's settings
            given["experiment"] = SHARING.owner(given.pop("data"))
        return to_json(BY_RULE[rule].from_config(CONFIG, **given))

    return get_settings


FOLDERS = FolderDigests()  # the local folders' file digests, kept across invocations


def sources_for(rule):
    """The content digests of the local model and tokenizer folders the rule's settings name
    (snaketune.data.sources): a param, so that an edit in place reruns the job and what follows."""
    get_settings = settings_for(rule)

    def get_sources(wildcards):
        found = folder_sources(get_settings(wildcards), FOLDERS)
        FOLDERS.save()
        return found

    return get_sources


def owner(wildcards):
    """The experiment whose settings a job takes: its own, or for a shared job (wildcard data)
    the first experiment that uses it (every user has the same settings for it)."""
    if "data" in wildcards.keys():
        return SHARING.owner(wildcards.data)
    return wildcards.experiment


def outputs(rule, folder, temporary=(), **reports):
    """The rule's `output:`: each output of its job (snaketune.paths) in folder under its name;
    a directory as directory(), those in `temporary` as temp(), and each one named in `reports`
    in the Snakemake report with report()'s caption, category and labels."""
    named = {}
    for name, (path, is_folder) in BY_RULE[rule].paths.output_files(folder).items():
        value = directory(path) if is_folder else path
        value = temp(value) if name in temporary else value
        named[name] = report(value, **reports[name]) if name in reports else value
    return named


def shared(stage, pattern):
    """Input function: `pattern`, an output of a shared stage, at the key this job's experiment
    has for that stage."""

    def get_shared(wildcards):
        return pattern.format(**{**dict(wildcards.items()), "data": SHARING.keys[owner(wildcards)][stage]})

    return get_shared


def shared_tracking(stage):
    """A shared stage's tracking folder: a link, made before any job, to the tracking folder of
    the experiment whose live run tree the stage's run joins (snaketune.track.live)."""
    return f"{SHARED}/{stage}/{{data}}/{TRACKING_LINK}"


def get_final_outputs():
    runs = expand(rules.track_experiment.output.runs, experiment=list(EXPERIMENTS))
    sweeps = expand(rules.summarize_sweep.output.table, sweep=sweep_names(config))
    return [*runs, *sweeps, *shared_manifests()]


def shared_manifests():
    """Every shared stage's manifest: targets too, so that a shared folder deleted by hand is
    made again (Snakemake reruns no job for an intermediate output gone missing under results
    that are up to date), and what was built on it after it."""
    manifests = set()
    for keys in SHARING.keys.values():
        for stage, key in keys.items():
            job_rule = getattr(rules, tracked_stage(stage).rule)
            manifests.add(job_rule.output.manifest.format(data=key))
    return sorted(manifests)


def get_sweep_outputs(pattern):
    """Input function: `pattern` (an experiment's output) for every point of the sweep."""

    def get_points(wildcards):
        return [pattern.format(experiment=name) for name in sweep_points(config, wildcards.sweep)]

    return get_points


def dataset_folder(wildcards):
    return f"{R}/datasets/{EXPERIMENTS[owner(wildcards)]['dataset']}/download"


def get_raw_dir(wildcards):
    return f"{dataset_folder(wildcards)}/files"


def get_download_manifest(wildcards):
    return f"{dataset_folder(wildcards)}/manifest.json"


def tokenize_partitions(wildcards, output):
    """One output of every tokenize_partition job. With tokenize.partitions: auto their number
    depends on the splits' sizes, known once the plan_partitions checkpoint has run."""
    partitions = EXPERIMENTS[owner(wildcards)]["tokenize"]["partitions"]
    counts = fixed_partition_counts(partitions)
    planned = counts is None
    if planned:
        plan = checkpoints.plan_partitions.get(data=wildcards.data).output.plan
        counts = planned_partition_counts(plan)
    splits, parts = zip(*partition_names(counts))
    jobs = {"split": splits, "part": parts, "data": [wildcards.data] * len(parts)}
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


def get_split_file(wildcards):
    """The split a partition tokenizes: the split job's output named after it."""
    return shared("split", getattr(rules.split_corpus.output, wildcards.split))(wildcards)


def train_processes(wildcards):
    return EXPERIMENTS[wildcards.experiment]["train"]["processes"]


def get_train_launcher(wildcards):
    nodes = EXPERIMENTS[wildcards.experiment]["train"]["nodes"]
    return train_launcher(train_processes(wildcards), nodes)


def train_shape(resource):
    """One of the train job's SLURM_SHAPE resources, from its experiment's train.nodes."""
    return lambda wildcards: slurm_shape(EXPERIMENTS[wildcards.experiment]["train"]["nodes"])[
        resource
    ]


def get_train_threads(wildcards, threads):
    return threads_per_process(threads, train_processes(wildcards))


def check_gpus():
    """Before any job: --resources gpu=N cannot promise more GPUs than the machine has."""
    given = workflow.global_resources.get("gpu")
    asked = given.value if given is not None else None
    if not isinstance(asked, int) or not asked or not workflow.local_exec:
        return  # no bound asked for, or a cluster's scheduler assigns the GPUs
    devices = machine_devices()
    if asked > len(devices):
        raise_if_invalid(
            [
                f"--resources gpu={asked}: this machine has {len(devices)} GPU(s) {devices}; "
                "give at most that many, or list its devices in config local_gpus"
            ],
            "resources",
        )


def check_cuda_here():
    """Before any job (onstart: a run with jobs to execute, so a dry run or a report made on
    another machine is not refused), where the jobs run on this machine: train.device cuda
    without a GPU, or more training processes on GPUs than it has (each would fail only after
    the data stages). A cluster's jobs run elsewhere; a cluster job's own Snakemake (remote)
    does not check again."""
    if not workflow.local_exec or workflow.remote_exec or workflow.subprocess_exec:
        return
    devices = machine_devices()
    problems = []
    for exp in config["experiments"]:
        train = exp["train"]
        on_gpus = train["device"] == "cuda" or (train["device"] == "auto" and devices)
        if train["device"] == "cuda" and not devices:
            problems.append(
                f"experiment {exp['name']!r}: train.device is 'cuda', but this machine has no "
                "GPU (none in CUDA_VISIBLE_DEVICES, config local_gpus or nvidia-smi -L); use "
                "'auto' (CUDA when present) or 'cpu', or run under a cluster profile that gives "
                "GPUs"
            )
        elif exp["model"]["quantization"] != "none" and not (devices and bitsandbytes_here()):
            what = "bitsandbytes is not installed" if devices else "this machine has no GPU"
            problems.append(
                f"experiment {exp['name']!r}: model.quantization {exp['model']['quantization']} "
                f"loads weights with bitsandbytes on CUDA, and {what}; install bitsandbytes "
                f"({shlex.quote(sys.executable)} -m pip install bitsandbytes) on a GPU machine, "
                "run under a cluster profile that gives GPUs, or remove quantization"
            )
        elif on_gpus and devices and bf16_asked(exp) and (older := gpus_without_bf16(devices)):
            problems.append(
                f"experiment {exp['name']!r}: {bf16_asked(exp)} asks for bf16, and the GPUs of "
                f"compute capability {older} among this machine's {devices} have none (bf16 "
                "needs 8.0 or later): leave train.precision and model.dtype at auto (fp16 "
                "autocast with a gradient scaler, float32 weights), or run where the GPUs have "
                "bf16"
            )
        elif on_gpus and train["processes"] * train["nodes"] > len(devices):
            problems.append(
                f"experiment {exp['name']!r}: train.processes {train['processes']} processes on "
                f"{train['nodes']} node(s) of this machine need a GPU each, and it has "
                f"{len(devices)} {devices}; give at most {len(devices)}, or device: cpu"
            )
    raise_if_invalid(problems, "devices")


def bf16_asked(exp: dict) -> str:
    """The setting of the experiment that asks for bf16 by name, if any."""
    if exp["model"]["dtype"] == "bfloat16":
        return "model.dtype bfloat16"
    return "train.precision bf16" if exp["train"]["precision"] == "bf16" else ""


def bitsandbytes_here() -> bool:
    """Whether bitsandbytes is installed (found, not imported: it loads CUDA libraries)."""
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None


def check_local_sources():
    """Before any job: no local dataset file changed in place since it was verified."""
    manifest = rules.download_dataset.output.manifest
    sources = {}
    for name in {exp["dataset"] for exp in EXPERIMENTS.values()}:
        download = download_settings(CONFIG, name)
        url = resolve_url(download.url, workflow.basedir)
        sources[name] = (url, download.sha256, manifest.format(dataset=name))
    raise_if_invalid(changed_sources(sources), "a dataset file changed")


def say_how_training_continues():
    """Before any job, on the console: an experiment whose checkpoint will go on to a new
    max_steps, or whose changed settings start it again from step 0 (what the train job then
    does, and its log says too)."""
    state_dir = rules.train_model.params.state_dir
    for name in EXPERIMENTS:
        state = state_dir.format(experiment=name)
        job = BY_RULE["train_model"].from_config(CONFIG, experiment=name)
        shards = rules.gather_shards.output.shards.format(data=SHARING.keys[name]["tokenize"])
        record = resume.read_record(state)
        plan = resume.plan(record, job, None, shards, model_source_digest(job.model, FOLDERS))
        if record is None:  # nothing kept to continue from: only a finished model, if any
            plan = resume.plan_without_state(
                finished_train(rules.train_model.output.manifest.format(experiment=name)), job
            )
        if plan.message:
            print(f"snaketune: {name}: training {plan.message} ({state})", file=sys.stderr)
    FOLDERS.save()


def plan_training_memory():
    """Before any job: each train job's memory estimate (snaketune.train.memory_plan), printed by a
    dry run; a job over train.max_memory_gb, or over this machine's GPU where it trains on one,
    is refused with what would make it fit. A cluster's jobs are planned for CUDA, and checked
    against max_memory_gb only."""
    if workflow.remote_exec or workflow.subprocess_exec:
        return
    devices = machine_devices() if workflow.local_exec else []
    gpu_memory = smallest_gpu_memory() if devices else None
    dry_run = dry_run_asked()
    problems = []
    for name, exp in EXPERIMENTS.items():
        train = exp["train"]
        cuda = train["device"] == "cuda" or (
            train["device"] == "auto" and (devices or not workflow.local_exec)
        )
        limit = train["max_memory_gb"] * memory_plan.GB if train["max_memory_gb"] else None
        if limit is None and cuda:
            limit = gpu_memory
        if limit is None and not dry_run:
            continue  # nothing to check against, nothing asked to print
        lm = exp["task"] == "causal_lm"
        context = exp["tokenize"]["block_size" if lm else "max_length"]
        # A scratch model's vocabulary is the tokenizer's: known here for a BPE trained here.
        bpe = exp["tokenizer"]["kind"] == "bpe"
        vocab = exp["tokenizer"]["vocab_size"] if bpe else None
        shape = memory_plan.job_shape(exp["model"], vocab, context)
        if shape is None:
            if train["max_memory_gb"]:  # set, and not checkable: say so rather than pass
                print(
                    f"snaketune: {name}: train.max_memory_gb is not checked: the model's size "
                    "is known only once its job has the checkpoint or the tokenizer",
                    file=sys.stderr,
                )
            continue
        if dry_run:
            planned = memory_plan.plan(shape, exp["model"], train, context, cuda)
            where = "GPU" if cuda else "CPU"
            print(f"snaketune: {name}: memory plan ({where}): {planned.describe()}", file=sys.stderr)
        why = limit and memory_plan.refusal(shape, exp["model"], train, context, cuda, limit)
        if why:
            problems.append(f"experiment {name!r}: the train job {why}")
    raise_if_invalid(problems, "memory")


def dry_run_asked() -> bool:
    """Whether the command line asks for a dry run (-n, --dry-run, or -n among short flags):
    Snakemake says so only once the workflow is parsed, after these checks."""
    short = [a for a in sys.argv[1:] if a.startswith("-") and not a.startswith("--")]
    return bool({"--dry-run", "--dryrun"} & set(sys.argv)) or any("n" in a for a in short)


def finished_train(manifest):
    """(max_steps, steps) of the train stage's manifest, or None."""
    if not os.path.exists(manifest):
        return None
    recorded = json.loads(open(manifest).read())
    return recorded["params"]["train"]["max_steps"], recorded["counts"]["steps"]


def record_invocation():
    """Once per invocation, before any job: its command line, and where each experiment's
    stages track their runs live."""
    joblog.clear()
    write_invocation(R, sys.argv, config)
    for name in EXPERIMENTS:
        settings = BY_RULE["track_experiment"].from_config(CONFIG, experiment=name)
        target = Target.of(settings, MLFLOW_STORE, MLFLOW_ARTIFACTS)
        target.write(TRACKING.format(experiment=name))
    link_shared_stages()


def restore_links():
    """When the workflow is read (onstart comes only when there are jobs to run): the links to
    shared outputs that exist, so that one deleted by hand comes back and a folder of an older
    layout is reported also when there is nothing else to do."""
    if not (workflow.remote_exec or workflow.subprocess_exec):
        link_shared_stages(existing_only=True)


def link_shared_stages(existing_only=False):
    tracking = lambda experiment: TRACKING.format(experiment=experiment)
    for problem in link_all(R, SHARING, tracking, existing_only):
        print(f"snaketune: {problem}", file=sys.stderr)


def print_failures():
    """At the end of a failed run: each failed job, its message and its log."""
    summary = joblog.summary()
    if summary:
        print(summary, file=sys.stderr)


def sibling_command(name):
    """A command of this environment, by a path that works from any shell (relative when it is
    under the working directory, as the README writes .venv/bin/mlflow), whatever PATH holds;
    where the package's script is not beside the interpreter, the module through it."""
    path = os.path.join(os.path.dirname(sys.executable), name)
    if not os.path.exists(path):
        return f"{shlex.quote(sys.executable)} -m {name}"
    relative = os.path.relpath(path)
    return shlex.quote(relative if not relative.startswith("..") else path)


def print_summary():
    configured = mlflow_settings(CONFIG).tracking_uri
    uri = redact(effective_tracking_uri(store_uri(configured, MLFLOW_STORE)))
    print(f"\nsnaketune: results are under {os.path.abspath(R)}/<experiment>/<stage>/")
    for name in EXPERIMENTS:
        print(f"  {name}: {R}/{name}/evaluate/metrics.json")
    runs = f"{R}/{next(iter(EXPERIMENTS))}/track/runs.json"
    if uri.startswith("sqlite:///"):
        mlflow = sibling_command("mlflow")
        print(f"Start the MLflow UI: {mlflow} ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000")
        uri = "http://127.0.0.1:5000"
    if os.path.exists(runs):
        print(f"Browse the runs: {runs_table_url(uri, json.loads(open(runs).read()))}\n")
