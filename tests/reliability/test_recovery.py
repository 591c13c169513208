"""Recovery without hand surgery: what a user deletes by hand from a finished results folder
comes back on the next run, even one with nothing else to do."""

from __future__ import annotations

import os

import pytest

from tests.support.reliability import EXPERIMENT, run_snakemake, workdir_with

pytestmark = pytest.mark.slow


def test_an_experiment_link_deleted_by_hand_comes_back_on_a_run_with_nothing_to_do(
    interrupted_pipeline, tmp_path
):
    workdir = workdir_with(interrupted_pipeline.results, tmp_path, [EXPERIMENT])
    links = {stage: workdir / "results" / EXPERIMENT / stage for stage in ("clean", "tokenize")}
    targets = {stage: os.readlink(link) for stage, link in links.items()}
    for link in links.values():
        link.unlink()
    run = run_snakemake(workdir, "--cores", "1")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Nothing to be done" in run.stdout + run.stderr  # no hook ran: no job started
    for stage, link in links.items():
        assert link.is_symlink() and os.readlink(link) == targets[stage]
        assert (link / "manifest.json").exists()
