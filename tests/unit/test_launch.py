"""snaketune.train.launch's commands: one torchrun agent per node with a c10d rendezvous, by srun
inside a SLURM job (its first node the rendezvous), by this process elsewhere (the two-node run
itself: tests/unit/test_finetune.py)."""

from __future__ import annotations

import sys

import pytest

from snaketune.stages import train_launcher
from snaketune.train import launch


def test_the_train_rule_launches_one_agent_per_node_only_for_several_nodes():
    # What the workflow's own interpreter runs (stages.INTERPRETER before it): never a command
    # looked up on PATH, which may lack the environment.
    assert train_launcher(1) == "-m snaketune.cli"
    assert train_launcher(4).startswith("-m torch.distributed.run --standalone --nproc_per_node=4")
    assert train_launcher(2, nodes=3) == "-m snaketune.train.launch 3 2"


def test_launch_without_its_arguments_prints_its_usage(capsys):
    assert launch.main([]) == 2
    assert launch.main(["two", "4", "train"]) == 2
    assert capsys.readouterr().err.startswith(
        "usage: python -m snaketune.train.launch NODES PROCESSES"
    )


def test_inside_a_slurm_job_srun_starts_an_agent_per_task():
    launch.check_tasks(2, "417", 2)
    with pytest.raises(SystemExit, match="train.nodes is 3, but SLURM job 417 has 2 task"):
        launch.check_tasks(3, "417", 2)  # its agents would all run on one node
    command = launch.slurm_command(2, 4, ["train", "--settings", "{}"], "gpu-node-07", "417")
    assert command[:3] == ["srun", "--ntasks=2", "--kill-on-bad-exit=1"]
    agent = command[3:]
    assert agent[:3] == [sys.executable, "-m", "torch.distributed.run"]
    agent = agent[2:]
    assert agent[1:6] == [
        "--nnodes=2",
        "--nproc_per_node=4",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint=gpu-node-07:{launch.RENDEZVOUS_PORT}",
        "--rdzv_id=417",
    ]
    assert agent[6:] == ["-m", "snaketune.cli", "train", "--settings", "{}"]
