"""Said vs done in continued training: what the console says before any job (snaketune.train.resume,
decided once from the checkpoint's record and where the data will come from) is what the train
job then does. A larger max_steps after a change upstream of the data starts again from step 0
and says so, where it said the run continues; a finished run that kept no state says it trains
again from step 0, where it said nothing."""

from __future__ import annotations

import shutil

import pytest
import yaml

from tests.support.reliability import EXPERIMENT, run_snakemake, workdir_with

pytestmark = pytest.mark.slow


def edited(workdir, **train) -> None:
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    config["experiments"][0]["train"].update(train)
    return config


def write(workdir, config) -> None:
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))


def test_more_steps_continue_and_say_so(interrupted_pipeline, tmp_path):
    workdir = workdir_with(interrupted_pipeline.results, tmp_path, [EXPERIMENT])
    config = edited(workdir)
    steps = config["experiments"][0]["train"]["max_steps"]
    config["experiments"][0]["train"]["max_steps"] = steps + 10
    write(workdir, config)
    planned = run_snakemake(workdir, "--dry-run")
    assert f"{EXPERIMENT}: training continues the checkpoint at step {steps}" in planned.stderr


def test_more_steps_after_a_data_change_say_they_start_again_from_step_0(
    interrupted_pipeline, tmp_path
):
    workdir = workdir_with(interrupted_pipeline.results, tmp_path, [EXPERIMENT])
    config = edited(workdir)
    config["experiments"][0]["train"]["max_steps"] += 10
    config["experiments"][0]["clean"]["min_chars"] = 12  # a new corpus, so new shards
    write(workdir, config)
    planned = run_snakemake(workdir, "--dry-run")
    said = planned.stderr
    assert f"{EXPERIMENT}: training starts again from step 0: the tokenized data" in said, said
    assert "continues the checkpoint" not in said


def test_a_finished_run_without_kept_state_says_it_trains_again_from_step_0(
    interrupted_pipeline, tmp_path
):
    workdir = workdir_with(interrupted_pipeline.results, tmp_path, [EXPERIMENT])
    shutil.rmtree(workdir / "results" / EXPERIMENT / "train_state")  # as keep_final_state: false
    config = edited(workdir)
    config["experiments"][0]["train"]["max_steps"] += 10
    write(workdir, config)
    planned = run_snakemake(workdir, "--dry-run")
    assert "training starts again from step 0 to train.max_steps" in planned.stderr
    assert "kept no state to continue from" in planned.stderr
