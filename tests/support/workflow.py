"""The real workflow run as a user runs it: snakemake on a config in a working directory."""

from __future__ import annotations

import copy
import functools
import subprocess
from pathlib import Path

import pytest
import yaml

from snaketune.stages import TRACKED
from tests.support.repo import DEFAULT_CONFIG, REPO, SNAKEMAKE

STAGES = list(TRACKED)
"""The stages of an experiment's results folder (and its MLflow child runs), in order."""
TINY_MODEL = {"n_layer": 1, "n_embd": 48, "n_head": 2, "dropout": 0.0}


def config_with(**changes) -> dict:
    """The default config with `a__0__b=value` meaning config["a"][0]["b"] = value."""
    config = copy.deepcopy(DEFAULT_CONFIG)
    for dotted, value in changes.items():
        target = config
        *parents, last = dotted.split("__")
        for key in parents:
            target = target[int(key)] if key.isdigit() else target[key]
        target[last] = value
    return config


def with_defaults(config: dict) -> dict:
    """`config` validated against the schema as the workflow validates it, the schema's defaults
    filled in (in place): what snaketune.config.cross_checks is given in a run."""
    from snakemake.utils import validate

    from snaketune.config import SCHEMA

    validate(config, str(SCHEMA))
    return config


@functools.cache
def layered(preset_file: Path) -> dict:
    """config.yaml with a --configfile on top, merged as Snakemake merges them (mappings key by
    key, lists replaced), with the schema's defaults filled in."""
    from snakemake.utils import update_config, validate

    from snaketune.config import SCHEMA

    config = copy.deepcopy(DEFAULT_CONFIG)
    update_config(config, yaml.safe_load(preset_file.read_text()))
    validate(config, str(SCHEMA))
    return config


def stage_folder(config: dict, experiment: str, stage: str) -> Path:
    """results_dir/shared/<stage>/<key>: where a shared stage of `experiment` writes (a path to
    give snakemake as a target; results/<experiment>/<stage> is a link made when it runs)."""
    from snaketune.config import validated
    from snaketune.settings import ConfigView
    from snaketune.sharing import keys_of, stage_dir

    view = ConfigView(validated(copy.deepcopy(config), REPO), REPO)
    return stage_dir(config["results_dir"], stage, keys_of(view, experiment)[stage])


def snakemake_command(workdir: Path, *args: str) -> list[str]:
    """The real workflow's snakemake, run in `workdir` on workdir/config.yaml."""
    return [
        SNAKEMAKE,
        "--snakefile",
        str(REPO / "Snakefile"),
        "--directory",
        str(workdir),
        "--configfile",
        str(workdir / "config.yaml"),
        *args,
    ]


def snakemake_with(tmp_path: Path, config: dict, *args: str) -> subprocess.CompletedProcess:
    """Run the real workflow's snakemake on `config` in tmp_path."""
    config = {**config, "results_dir": str(tmp_path / "results")}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    command = snakemake_command(tmp_path, *args)
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    command = snakemake_command(workdir, "--cores", "2", *args)
    return subprocess.run(command, capture_output=True, text=True, timeout=900)


MLFLOW_EXPERIMENT = DEFAULT_CONFIG["mlflow"]["experiment_name"]
"""tiny_config's MLflow experiment."""


def tiny_config() -> dict:
    """The demo's two experiments with tiny models and few steps."""
    config = copy.deepcopy(DEFAULT_CONFIG)
    config["results_dir"] = "results"  # relative: two runs' manifests can then be compared
    # The default MLflow experiment name: the README's commands (models:/snaketune-demo...) run
    # on this config as printed.
    lm, intent = config["experiments"]
    lm.update(
        tokenizer={"vocab_size": 500},
        model=TINY_MODEL,
        train={
            "max_steps": 40,
            "batch_size": 8,
            "eval_every": 20,
            "checkpoint_every": 20,
            "warmup_steps": 5,
            "lr": 0.005,
        },
        evaluate={"prompts": lm["evaluate"]["prompts"][:1], "max_new_tokens": 8},
    )
    intent.update(
        tokenizer={"vocab_size": 500},
        model=TINY_MODEL,
        train={
            "max_steps": 80,
            "batch_size": 32,
            "eval_every": 40,
            "checkpoint_every": 40,
            "warmup_steps": 5,
            "lr": 0.003,
        },
    )
    return config


def run_in_new_workdir(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """(results folder, completed snakemake) of tiny_config run with --cores 2."""
    workdir = tmp_path_factory.mktemp("workflow")
    (workdir / "config.yaml").write_text(yaml.safe_dump(tiny_config()))
    run = snakemake(workdir)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return workdir / "results", run


def same_to_rounding(ours, theirs, where, rel: float = 1e-5) -> None:
    """JSON values equal, numbers to a relative `rel`."""
    if isinstance(ours, dict):
        assert ours.keys() == theirs.keys(), where
        for key in ours:
            same_to_rounding(ours[key], theirs[key], f"{where}: {key}", rel)
    elif isinstance(ours, list):
        assert len(ours) == len(theirs), where
        for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            same_to_rounding(a, b, f"{where}[{i}]", rel)
    elif isinstance(ours, float):
        assert ours == pytest.approx(theirs, rel=rel), where
    else:
        assert ours == theirs, where


def same_metrics(ours: dict, theirs: dict, where) -> None:
    """Two evaluations of models that rounding set apart (1e-7 in a loss): the metrics to a
    relative 1e-4 (seen 5e-6 apart: word perplexity sums exp of many such differences), and a
    generated answer's scores to one answer in the answered examples (a greedy token at a tie
    that rounding breaks the other way changes one answer). Another seed or setting moves them
    by far more."""
    from snaketune.evaluate.answers import SCORES

    ours, theirs = dict(ours), dict(theirs)
    for name in SCORES:
        if name in ours:
            one_answer = 1 / ours["answered_examples"]
            assert abs(ours.pop(name) - theirs.pop(name)) <= one_answer, f"{where}: {name}"
    same_to_rounding(ours, theirs, where, rel=1e-4)
