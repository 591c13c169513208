"""Config validation: every problem names its key and what is allowed, before any job runs."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import yaml

from snaketune.config import cross_checks, schema_problems
from tests.conftest import REPO

DEFAULT_CONFIG = yaml.safe_load((REPO / "config.yaml").read_text())


def config_with(**changes) -> dict:
    config = copy.deepcopy(DEFAULT_CONFIG)
    for dotted, value in changes.items():
        target = config
        *parents, last = dotted.split("__")
        for key in parents:
            target = target[int(key)] if key.isdigit() else target[key]
        target[last] = value
    return config


def test_default_config_is_valid():
    assert schema_problems(DEFAULT_CONFIG) == []


def test_unknown_key_is_named_with_the_allowed_keys():
    problems = schema_problems(config_with(experiments__0__train__learning_rate=0.1))
    assert len(problems) == 1
    assert "experiments[0].train" in problems[0]
    assert "'learning_rate'" in problems[0] and "'lr'" in problems[0]


def test_bad_enum_names_key_and_allowed_values():
    (problem,) = schema_problems(config_with(experiments__1__task="regression"))
    assert problem.startswith("experiments[1].task:")
    assert "'regression'" in problem and "causal_lm" in problem
    assert "sequence_classification" in problem


def test_wrong_type_and_out_of_range_are_both_reported():
    problems = schema_problems(
        config_with(experiments__0__train__max_steps="many", experiments__0__model__dropout=2.0)
    )
    keys = sorted(p.split(":")[0] for p in problems)
    assert keys == ["experiments[0].model.dropout", "experiments[0].train.max_steps"]


def test_cross_checks_find_missing_dataset_and_bad_ratios():
    config = config_with(experiments__0__dataset="nope")
    config["experiments"][1]["split"] = {"train": 0.5, "val": 0.1, "test": 0.1, "salt": ""}
    filled = _with_defaults(config)
    problems = cross_checks(filled)
    assert any(p.startswith("experiments[0].dataset:") and "support-demo" in p for p in problems)
    assert any(p.startswith("experiments[1].split:") and "0.7" in p for p in problems)


def test_heads_must_divide_embedding_size():
    filled = _with_defaults(config_with(experiments__0__model__n_head=3))
    assert any("model.n_embd" in p and "n_head=3" in p for p in cross_checks(filled))


def _with_defaults(config: dict) -> dict:
    from snakemake.utils import validate

    from snaketune.config import SCHEMA

    validate(config, str(SCHEMA))
    return config


def snakemake_with(tmp_path: Path, config: dict, *args: str) -> subprocess.CompletedProcess:
    """Run the real workflow's snakemake on `config` in tmp_path."""
    config = {**config, "results_dir": str(tmp_path / "results")}
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    command = [
        str(Path(sys.executable).with_name("snakemake")),
        "--snakefile",
        str(REPO / "Snakefile"),
        "--directory",
        str(tmp_path),
        "--configfile",
        str(config_path),
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_snakemake_refuses_a_bad_config_before_any_job(tmp_path: Path):
    result = snakemake_with(
        tmp_path, config_with(experiments__0__task="regression"), "--cores", "1"
    )
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "experiments[0].task" in output and "sequence_classification" in output
    assert not (tmp_path / "results").exists()


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
    assert "torchrun --standalone --nproc_per_node=2 -m snaketune.cli train" in ddp
    assert "OMP_NUM_THREADS=1 " in ddp  # the rule's 2 threads shared by 2 processes
    assert "torchrun" not in single and "OMP_NUM_THREADS=2 snaketune train" in single
