"""The real workflow through the SLURM profile (profiles/slurm) on a one-node cluster on this
machine: every job runs as its own SLURM job with the resources it asks for, training is granted
a (fake) GPU, and every output and MLflow run is written. `bash tests/cluster/slurm.sh start`
brings the cluster up (Debian, root); without it these tests are skipped."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from snaketune.sharing import SHARED_FOLDER, SHARED_STAGES
from snaketune.train.launch import scontrol_record
from tests.support.repo import REPO
from tests.support.workflow import (
    MLFLOW_EXPERIMENT,
    STAGES,
    same_metrics,
    stage_folder,
    tiny_config,
)

pytestmark = pytest.mark.slow

CLUSTER_SCRIPT = REPO / "tests" / "cluster" / "slurm.sh"
EXPERIMENTS = ("demo-lm", "demo-intent")
SHARED = [stage for stage, _ in SHARED_STAGES]
# The rule behind each stage, as the plugin names it in the SLURM job's comment.
RULES = {
    "download": "download_dataset",
    "clean": "clean_corpus",
    "split": "split_corpus",
    "tokenizer": "prepare_tokenizer",
    "tokenize_plan": "plan_partitions",
    "tokenize_partition": "tokenize_partition",
    "tokenize": "gather_shards",
    "train": "train_model",
    "evaluate": "evaluate_model",
    "track": "track_experiment",
}
# Sourced by every bash that Snakemake starts for a rule's shell command (through BASH_ENV,
# which sbatch --export=ALL and srun pass on): where the command ran and which GPUs it got.
RECORD_HOOK = """\
printf '%s\\t%s\\t%s\\t%s\\n' "${SLURM_JOB_ID:-}" "${SLURM_STEP_ID:-}" \\
    "${CUDA_VISIBLE_DEVICES:-}" "${BASH_EXECUTION_STRING//[$'\\t\\n']/ }" \\
    >> "$SNAKETUNE_JOB_RECORDS/${SLURM_JOB_ID:-none}-$$.tsv"
"""


def cluster_problem() -> str | None:
    if shutil.which("sinfo") is None:
        return "SLURM is not installed (no sinfo on PATH); see tests/cluster/slurm.sh"
    status = subprocess.run(
        ["bash", str(CLUSTER_SCRIPT), "status"], capture_output=True, text=True, timeout=60
    )
    if status.returncode != 0:
        return (
            f"the local SLURM cluster is not up ({status.stderr.strip()}); "
            "start it with `bash tests/cluster/slurm.sh start`"
        )
    return None


def scontrol_job(job_id: str) -> dict[str, str]:
    return scontrol_record("--details", "show", "job", job_id)


def job_resources(slurm_log: Path) -> dict[str, str]:
    """The resources Snakemake lists for the job in the SLURM job's own log."""
    line = re.search(r"^\s+resources: (.*)$", slurm_log.read_text(), re.MULTILINE)
    assert line, slurm_log
    return dict(item.split("=", 1) for item in line.group(1).split(", "))


def test_the_profile_gives_train_nodes_a_task_per_node_that_the_launcher_starts(
    slurm_run, tmp_path
):
    """train.nodes 2 under the profile: the train job asks SLURM for 2 nodes and a task on
    each, SLURM runs its command as it is (not inside `srun -n1`, which would leave one task),
    and the launcher's srun starts a torchrun agent per task, which rendezvous. This cluster has
    one node, so `--set-resources train_model:nodes=1` stands it in for the two; the tasks
    are the rule's own, and GPUs are asked for per node (gres), as the README says."""
    workdir, _ = slurm_run
    moved = tmp_path / "nodes"
    shutil.copytree(workdir, moved, symlinks=True)  # its data stages are done: train alone runs
    config = yaml.safe_load((moved / "config.yaml").read_text())
    lm = next(e for e in config["experiments"] if e["name"] == "demo-lm")
    lm["train"]["nodes"] = 2
    (moved / "config.yaml").write_text(yaml.safe_dump(config))
    shutil.rmtree(moved / "results" / "demo-lm" / "train_state")  # a checkpoint of 1 process
    target = "results/demo-lm/train/manifest.json"
    asked = run_with_profile(moved, dict(os.environ), "--dry-run", target)
    assert "nodes=2, tasks=2, tasks_per_gpu=0, mpi=srun" in asked, asked[-3000:]
    output = run_with_profile(
        moved,
        dict(os.environ),
        # GPUs per node as the README asks for them (this cluster's are fake: it trains on CPU).
        *("--set-resources", "train_model:nodes=1", "train_model:gres=gpu:1"),
        *("--set-threads", "train_model=1"),
        *("--verbose", target),
    )
    sbatch = [line for line in output.splitlines() if "sbatch call:" in line]
    assert len(sbatch) == 1, output[-5000:]  # the train job alone
    for flag in ("--nodes=1", "--ntasks=2", "--cpus-per-task=1"):
        assert f" {flag} " in f"{sbatch[0]} ", sbatch[0]
    assert "gpu:1" in sbatch[0] and "--ntasks-per-gpu" not in sbatch[0], sbatch[0]
    log = (moved / "results" / "demo-lm" / "train" / "train.log").read_text()
    job_id = re.search(r"rendezvous (\d+)", log)
    assert job_id, log[-3000:]
    for rank in (0, 1):  # one process under each agent, both in the job's rendezvous
        assert f"process {rank} of 2 on " in log, log[-3000:]
        assert f"node rank {rank}, rendezvous {job_id.group(1)}" in log, log[-3000:]
    manifest = json.loads((moved / target).read_text())
    assert manifest["counts"]["processes"] == 2


@pytest.fixture(scope="module")
def slurm_run(tmp_path_factory):
    problem = cluster_problem()
    if problem:
        pytest.skip(problem)
    workdir = tmp_path_factory.mktemp("slurm-workflow")
    # test_workflow's config, so that its local run (finished_run) is this run's twin.
    (workdir / "config.yaml").write_text(yaml.safe_dump(tiny_config()))
    records = workdir / "job-records"
    records.mkdir()
    hook = workdir / "record-job.sh"
    hook.write_text(RECORD_HOOK)
    env = {**os.environ, "BASH_ENV": str(hook), "SNAKETUNE_JOB_RECORDS": str(records)}
    output = run_with_profile(workdir, env, "--set-resources", "train_model:gpu=1")
    return workdir, output


def run_with_profile(workdir: Path, env: dict[str, str], *args: str) -> str:
    """snakemake --profile profiles/slurm in `workdir`, to the end; its output."""
    command = [
        *("timeout", "-k", "20", "480"),  # a hung Snakemake ignores SIGTERM
        str(Path(sys.executable).with_name("snakemake")),
        *("--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir)),
        *("--configfile", str(workdir / "config.yaml")),
        *("--profile", str(REPO / "profiles" / "slurm")),
        "--slurm-keep-successful-logs",
        # Poll sooner than the profile does: these jobs take seconds, not minutes.
        *("--slurm-init-seconds-before-status-checks", "2"),
        *args,
    ]
    run = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=540)
    output = run.stdout + run.stderr
    if run.returncode != 0:
        run_id = re.search(r"SLURM run ID: (\S+)", output)
        if run_id:  # after a timeout, leave no job of this run behind in the queue
            subprocess.run(["scancel", "--name", run_id.group(1)], timeout=60)
    assert run.returncode == 0, output[-5000:]
    return output


@pytest.fixture(scope="module")
def job_records(slurm_run) -> dict[str, list[dict[str, str]]]:
    """Each rule's shell command, by its log file: the SLURM job and step it ran in, its GPUs."""
    workdir, _ = slurm_run
    by_log: dict[str, list[dict[str, str]]] = {}
    for path in sorted((workdir / "job-records").glob("*.tsv")):
        for line in path.read_text().splitlines():
            job, step, gpus, command = line.split("\t")
            log = re.search(r"> (\S+\.log) 2>&1", command)
            if log:  # a rule's command; other bash processes are no concern here
                record = {"job": job, "step": step, "gpus": gpus}
                by_log.setdefault(log.group(1), []).append(record)
    return by_log


def expected_jobs() -> dict[str, tuple[str, str]]:
    """Rule log -> (rule, wildcards) for every job the workflow runs."""
    jobs = {"results/datasets/support-demo/download/download.log": ("download", "support-demo")}
    for experiment in EXPERIMENTS:
        for stage in [*STAGES[1:], "track"]:
            if stage in SHARED:  # the data stages write under their key (snaketune.sharing)
                folder = stage_folder(tiny_config(), experiment, stage)
                jobs[f"{folder}/{stage}.log"] = (stage, folder.name)
            else:
                jobs[f"results/{experiment}/{stage}/{stage}.log"] = (stage, experiment)
        # Tokenization is planned, then run one job per partition: one each on this tiny data.
        tokenize = stage_folder(tiny_config(), experiment, "tokenize")
        jobs[f"{tokenize}/plan.log"] = ("tokenize_plan", tokenize.name)
        for split in ("train", "val", "test"):
            jobs[f"{tokenize}/parts/{split}/00000.log"] = (
                "tokenize_partition",
                f"{tokenize.name}_{split}_00000",
            )
    return jobs


def test_every_job_ran_once_in_its_own_slurm_job(slurm_run, job_records):
    workdir, output = slurm_run
    expected = expected_jobs()
    assert sorted(job_records) == sorted(expected)
    job_ids = set()
    for log, (stage, wildcards) in expected.items():
        assert len(job_records[log]) == 1, (log, job_records[log])
        record = job_records[log][0]
        # Inside a job step (srun) of a batch job, not on the submitting host.
        assert record["job"].isdigit() and record["step"].isdigit(), (log, record)
        job_ids.add(record["job"])
        rule = RULES[stage]
        job = scontrol_job(record["job"])
        assert job["JobState"] == "COMPLETED", (log, job["JobState"])
        assert job["Comment"] == f"rule_{rule}_wildcards_{wildcards}"
        assert Path(job["WorkDir"]) == workdir
        slurm_log = Path(job["StdOut"])
        assert slurm_log.exists() and slurm_log.name == f"{record['job']}.log"
        assert slurm_log.is_relative_to(workdir / ".snakemake" / "slurm_logs" / f"rule_{rule}")
        # What Snakemake asked for this job (rule resources, else the profile's defaults) is
        # what SLURM allocated.
        resources = job_resources(slurm_log)
        assert job["CPUs/Task"] == resources["cpus_per_task"], log
        assert job["MinMemoryNode"] == f"{resources['mem_mb']}M", log
        runtime = int(resources["runtime"])
        assert job["TimeLimit"] == f"{runtime // 60:02d}:{runtime % 60:02d}:00", log
    assert len(job_ids) == len(expected)
    assert len(re.findall(r"has been submitted with SLURM jobid \d+", output)) == len(expected)
    assert re.findall(r"^localrule (\w+):", output, re.MULTILINE) == ["all"]


def test_training_was_granted_a_gpu_and_nothing_else_was(slurm_run, job_records):
    workdir, _ = slurm_run
    for log, (stage, _) in expected_jobs().items():
        record = job_records[log][0]
        job = scontrol_job(record["job"])
        if stage == "train":
            assert job["TresPerJob"] == "gres:gpu:1" and job["JOB_GRES"] == "gpu:1", log
            assert record["gpus"] in ("0", "1"), (log, record)  # one of the node's two
        else:
            assert "TresPerJob" not in job and job["JOB_GRES"] == "(null)", (log, job)
            assert record["gpus"] == "", (log, record)
    for experiment in tiny_config()["experiments"]:  # the fake GPU has no CUDA device behind it
        manifest = json.loads(
            (workdir / "results" / experiment["name"] / "train" / "manifest.json").read_text()
        )
        assert manifest["device"] == "cpu"
        assert manifest["counts"]["steps"] == experiment["train"]["max_steps"]


def test_every_output_and_mlflow_run_is_written(slurm_run):
    from mlflow import MlflowClient

    workdir, output = slurm_run
    results = workdir / "results"
    assert (results / "datasets" / "support-demo" / "download" / "manifest.json").exists()
    for experiment in EXPERIMENTS:
        for stage in STAGES[1:]:
            manifest = json.loads((results / experiment / stage / "manifest.json").read_text())
            assert manifest["stage"] == stage
        assert (results / experiment / "train" / "model" / "model.safetensors").exists()
        assert json.loads((results / experiment / "evaluate" / "metrics.json").read_text())
    assert "--profile" in json.loads((results / "provenance.json").read_text())["command"]
    assert "mlflow ui --backend-store-uri sqlite:///" in output

    client = MlflowClient(tracking_uri=f"sqlite:///{results / 'mlflow.db'}")
    mlflow_experiment = client.get_experiment_by_name(MLFLOW_EXPERIMENT)
    runs = client.search_runs([mlflow_experiment.experiment_id])
    parents = {r.info.run_name: r for r in runs if "mlflow.parentRunId" not in r.data.tags}
    assert sorted(parents) == sorted(EXPERIMENTS)
    for name, parent in parents.items():
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert sorted(r.info.run_name for r in children) == sorted(STAGES)
        runs_json = json.loads((results / name / "track" / "runs.json").read_text())
        assert runs_json["runs"]["parent"] == parent.info.run_id


def test_cluster_outputs_match_a_local_run(slurm_run, finished_run):
    """The same config run locally gives the same splits and shards, byte for byte, and the
    same training and metrics to float rounding: two processes' CPU arithmetic may round apart
    (seen once: a loss 1e-6 away at step 4; MKL is asked for reproducible results in
    snaketune.cli), and the weights of a model that rounding set apart are compared through
    what they compute (losses within 1e-5, metrics within 1e-5), not bit by bit."""
    workdir, _ = slurm_run
    local_results, _ = finished_run
    cluster_results = workdir / "results"
    compared = 0
    for folder in (*EXPERIMENTS, SHARED_FOLDER):  # the shared data stages, then each model
        for path in sorted((cluster_results / folder).rglob("*")):
            twin = local_results / path.relative_to(cluster_results)
            where = path.relative_to(cluster_results)
            if path.suffix == ".parquet":
                assert path.read_bytes() == twin.read_bytes(), where
            elif path.name == "metrics.json":
                same_metrics(json.loads(path.read_text()), json.loads(twin.read_text()), where)
            elif path.name == "history.jsonl":
                ours, theirs = (
                    [json.loads(line)["loss"] for line in p.read_text().splitlines()]
                    for p in (path, twin)
                )
                assert ours == pytest.approx(theirs, rel=1e-5), where
            else:
                continue
            compared += 1
    assert compared > 10


# --- a training job of two tasks, standing in for two nodes ---------------------------------------


def test_a_two_task_training_job_runs_as_two_rendezvoused_agents(lm_data, tmp_path):
    """sbatch --ntasks=2 running `python -m snaketune.train.launch 2 1 train ...`, as the train rule
    runs it with train.nodes 2: srun starts one torchrun agent per task, the two join a c10d
    rendezvous on the allocation's first node under the job id, and together they take the
    steps of one process with twice the batch."""
    import shlex

    from snaketune.train.settings import ModelSettings, TrainJob, TrainSettings
    from tests.support.stage_data import run_training, train_cli_args

    problem = cluster_problem()
    if problem:
        pytest.skip(problem)
    model = ModelSettings(n_layer=1, n_embd=32, n_head=2, dropout=0.0)
    settings = TrainSettings(
        max_steps=12, batch_size=8, lr=5e-3, warmup_steps=4, eval_every=6, checkpoint_every=6
    )
    nodes = TrainJob("causal_lm", model, replace(settings, batch_size=4, nodes=2))
    out = tmp_path / "nodes"
    script = shlex.join(
        [
            sys.executable,
            "-m",
            "snaketune.train.launch",
            "2",
            "1",
            *train_cli_args(lm_data, out, nodes),
        ]
    )
    log = tmp_path / "slurm.out"
    submitted = subprocess.run(
        ["sbatch", "--parsable", "--ntasks=2", "--cpus-per-task=1", "--mem=3000", "--time=10"]
        + [f"--output={log}", "--export=ALL,OMP_NUM_THREADS=1", "--wrap", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    job_id = submitted.stdout.strip().split(";")[0]
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        state = scontrol_job(job_id).get("JobState")
        if state not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING"):
            break
        time.sleep(1)
    else:
        subprocess.run(["scancel", job_id], timeout=60)
        pytest.fail(f"job {job_id} did not finish in 300 s:\n{log.read_text()[-3000:]}")
    text = log.read_text()
    assert state == "COMPLETED", text[-3000:]
    assert scontrol_job(job_id)["NumTasks"] == "2"
    for rank in (0, 1):  # one process under each agent, both in the job's rendezvous
        assert (
            f"process {rank} of 2 on " in text and f"node rank {rank}, rendezvous {job_id}" in text
        )
    trained = [json.loads(x)["loss"] for x in (out / "history.jsonl").read_text().splitlines()]
    single = run_training(lm_data, tmp_path / "single", "causal_lm", model, settings)
    assert trained == pytest.approx([r["loss"] for r in single], abs=1e-4)
