"""Snakemake's plan, checked without running a job: every rule passes exactly its job's paths by
their names, the train rule's launcher for several processes, a thousand tokenize partitions
planned quickly, and presets that download only what their experiments use or stop before any
job."""

from __future__ import annotations

import copy
import re
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from snaketune.paths import INPUT, OUTPUT, STATE, output_name, path_fields
from snaketune.stages import BY_RULE, INTERPRETER
from tests.support.repo import DEFAULT_CONFIG, REPO
from tests.support.workflow import config_with, snakemake_command, snakemake_with

CONSTRAINT = r"\{(\w+),(?:[^{}]|\{[^{}]*\})*\}"
"""A wildcard's constraint, which Snakemake writes into the patterns: {part,\\d{5}}."""


def parsed_rules(workdir: Path) -> dict:
    """The workflow's rules as Snakemake parses them (its API's workflow object)."""
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import (
        ConfigSettings,
        OutputSettings,
        ResourceSettings,
        StorageSettings,
        WorkflowSettings,
    )

    (workdir / "config.yaml").write_text(yaml.safe_dump(DEFAULT_CONFIG))
    with SnakemakeApi(OutputSettings(quiet={"all"})) as api:
        workflow = api.workflow(
            resource_settings=ResourceSettings(cores=1),
            config_settings=ConfigSettings(),
            storage_settings=StorageSettings(),
            workflow_settings=WorkflowSettings(),
            snakefile=REPO / "Snakefile",
            workdir=workdir,
        )
        return {rule.name: rule for rule in workflow._workflow.rules if rule.name != "all"}


def test_every_rule_passes_exactly_its_jobs_paths_by_their_names(tmp_path):
    rules = parsed_rules(tmp_path)
    assert set(rules) == set(BY_RULE)
    for name, rule in rules.items():
        paths = BY_RULE[name].paths
        assert set(rule.input.keys()) == {f.name for f in path_fields(paths, INPUT)}, name
        assert set(rule.output.keys()) == {f.name for f in path_fields(paths, OUTPUT)}, name
        assert {f.name for f in path_fields(paths, STATE)} <= set(rule.params.keys()), name
        assert "settings" in rule.params.keys(), name
        # Every output in one folder, named as the job's paths name it (what Paths.under gives).
        outputs = [
            re.sub(CONSTRAINT, r"{\1}", str(rule.output[f.name])).rpartition("/")
            for f in path_fields(paths, OUTPUT)
        ]
        assert len({folder for folder, _, _ in outputs}) == 1, name
        assert [file for _, _, file in outputs] == [
            output_name(paths, f) for f in path_fields(paths, OUTPUT)
        ], name


def test_train_rule_launches_torchrun_for_several_processes(tmp_path: Path):
    config = config_with(experiments__0__train__processes=2)
    result = snakemake_with(
        tmp_path, config, "--cores", "2", "--dry-run", "--printshellcmds", "--forceall"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    commands = [line for line in result.stdout.splitlines() if " train --shards " in line]
    assert len(commands) == 2
    ddp = [c for c in commands if "demo-lm" in c][0]
    single = [c for c in commands if "demo-intent" in c][0]
    # Every command runs the workflow's own interpreter (the rules' shell prefix sets it), not
    # whatever PATH finds.
    python = INTERPRETER
    assert (
        f"{python} -m torch.distributed.run --standalone --nproc_per_node=2 -m snaketune.cli train"
        in ddp
    )
    assert "OMP_NUM_THREADS=1 " in ddp  # the rule's 2 threads shared by 2 processes
    assert "torch.distributed.run" not in single
    assert (
        f"SNAKETUNE_ATTEMPT=1 {python} -m snaketune.gpus 0 -- {python} -m snaketune.cli train"
        in single
    )


def test_snakemake_plans_a_thousand_partitions_quickly(tmp_path):
    config = config_with(experiments__0__tokenize__partitions=1000)

    started = time.perf_counter()
    result = snakemake_with(tmp_path, config, "--dry-run", "--cores", "8", "--quiet", "rules")
    seconds = time.perf_counter() - started

    assert result.returncode == 0, result.stderr[-2000:]
    jobs = re.search(r"^tokenize_partition\s+(\d+)$", result.stdout, re.MULTILINE)
    assert jobs and int(jobs[1]) == 1000 + 2  # train's partitions, then val and test whole
    print(f"snakemake --dry-run with 1,000 tokenize partitions: {seconds:.1f} s")
    # The whole command, start-up included; a safety net, not the figure (it is printed above).
    assert seconds < 60


@pytest.mark.slow
@pytest.mark.parametrize("switch", ["configfile", "config"])
def test_snakemake_plans_downloads_only_for_datasets_the_experiments_use(tmp_path, switch):
    # As `snakemake --configfile presets/sms-spam.yaml` (or `--config preset=sms-spam`) run in
    # the repository would see it.
    (tmp_path / "config.yaml").write_text((REPO / "config.yaml").read_text())
    preset = REPO / "presets" / "sms-spam.yaml"
    # A second --configfile replaces the helper's: config.yaml, then the preset over it.
    layers = {
        "configfile": ["--configfile", str(tmp_path / "config.yaml"), str(preset)],
        "config": ["--config", "preset=sms-spam"],
    }[switch]
    command = snakemake_command(tmp_path, "--dry-run", "--cores", "1", *layers)
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)

    assert run.returncode == 0, run.stderr[-2000:]
    planned = set(re.findall(r"datasets/([\w.-]+)/download/manifest\.json", run.stdout))
    assert planned == {"sms-spam"}


@pytest.mark.slow
def test_snakemake_refuses_an_unknown_preset_before_any_job(tmp_path):
    (tmp_path / "config.yaml").write_text((REPO / "config.yaml").read_text())
    command = snakemake_command(tmp_path, "--cores", "1", "--config", "preset=imdb")
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)

    assert run.returncode != 0
    assert "preset: 'imdb' is not one of ['ag-news', 'sms-spam'" in run.stderr
    assert not (tmp_path / "results").exists()


def test_the_console_says_which_runs_continue_and_names_the_keys_that_start_one_over(tmp_path):
    """Before any job: one experiment's finished run goes on to a larger max_steps, the other's
    changed learning rate starts it again from step 0, named key by key."""
    from snaketune.config import validated
    from snaketune.settings import ConfigView
    from snaketune.train import resume

    view = ConfigView(validated(copy.deepcopy(DEFAULT_CONFIG), REPO), REPO)  # fills defaults
    for name in ("demo-lm", "demo-intent"):
        job = BY_RULE["train_model"].from_config(view, experiment=name)
        resume.write_record(tmp_path / "results" / name / "train_state", 300, job, "digest")
    config = config_with(experiments__0__train__max_steps=400, experiments__1__train__lr=0.001)
    result = snakemake_with(tmp_path, config, "--cores", "1", "--dry-run")
    assert result.returncode == 0, result.stderr[-2000:]
    assert (
        "demo-lm: training continues the checkpoint at step 300 to train.max_steps 400"
        in result.stderr
    )
    assert "demo-intent: training starts again from step 0: train.lr 0.002 -> 0.001" in (
        result.stderr
    )


# --- stages shared by the experiments that compute the same thing -----------------------------


def lr_runs(*lrs: float) -> dict:
    """The demo's LM experiment three times, differing only in train.lr."""
    config = copy.deepcopy(DEFAULT_CONFIG)
    lm = config["experiments"][0]
    config["experiments"] = [
        {**copy.deepcopy(lm), "name": f"lm-lr{i}", "train": {**lm["train"], "lr": lr}}
        for i, lr in enumerate(lrs)
    ]
    return config


def planned_jobs(tmp_path: Path, config: dict) -> dict[str, int]:
    result = snakemake_with(tmp_path, config, "--dry-run", "--cores", "2", "--quiet", "rules")
    assert result.returncode == 0, result.stderr[-2000:]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", result.stdout, re.M)}


def test_experiments_that_differ_only_in_training_share_every_data_stage(tmp_path):
    jobs = planned_jobs(tmp_path, lr_runs(1e-3, 2e-3, 3e-3))
    assert {rule: jobs[rule] for rule in DATA_RULES} == dict.fromkeys(DATA_RULES, 1)
    assert {rule: jobs[rule] for rule in PER_EXPERIMENT_RULES} == dict.fromkeys(
        PER_EXPERIMENT_RULES, 3
    )


def test_a_changed_clean_setting_gives_that_experiment_its_own_upstream(tmp_path):
    config = lr_runs(1e-3, 2e-3, 3e-3)
    config["experiments"][2]["clean"] = {**config["experiments"][2]["clean"], "min_chars": 20}
    jobs = planned_jobs(tmp_path, config)
    assert jobs["download_dataset"] == 1  # the same dataset
    assert {rule: jobs[rule] for rule in DATA_RULES[1:]} == dict.fromkeys(DATA_RULES[1:], 2)


DATA_RULES = (
    "download_dataset",
    "clean_corpus",
    "split_corpus",
    "prepare_tokenizer",
    "plan_partitions",
    "gather_shards",
)
PER_EXPERIMENT_RULES = ("train_model", "evaluate_model", "track_experiment")
