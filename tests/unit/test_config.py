"""Config validation: the default config is valid, cross-checks between keys, and the train
rule's launcher. Problems that must stop a run before any job are in tests/reliability."""

from __future__ import annotations

from pathlib import Path

from snaketune.config import cross_checks, schema_problems
from tests.conftest import DEFAULT_CONFIG, config_with, snakemake_with


def test_default_config_is_valid():
    assert schema_problems(DEFAULT_CONFIG) == []


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


def test_tokenize_packing_names_the_key_and_its_allowed_values():
    (problem,) = schema_problems(config_with(experiments__0__tokenize={"packing": "tight"}))
    assert problem.startswith("experiments[0].tokenize.packing")
    assert "across_documents" in problem and "per_document" in problem
    assert schema_problems(config_with(experiments__0__tokenize={"packing": "per_document"})) == []


def _with_defaults(config: dict) -> dict:
    from snakemake.utils import validate

    from snaketune.config import SCHEMA

    validate(config, str(SCHEMA))
    return config


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
