"""Nothing silent in the newer features (sweeps, instruction data, the evaluation protocol):

- names that become paths, links or MLflow queries are checked by one rule before any job
  (snaketune.names), as the user wrote them: a sweep's name that would climb out of results/,
  an experiment named as a folder of the results layout, two sweeps of one name, a point given
  twice, a name with a quote;
- a number from nothing is null with its reason: an answer perplexity with no answer token,
  metrics of an empty test text; answers that block_size cut short are not described as ending
  with EOS.
Each runs the real thing (snakemake on the real Snakefile, the evaluation's own functions on a
real model) and checks the message, the exit code and that nothing was written or lost."""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch

from snaketune.evaluate.evaluation import CPU
from snaketune.evaluate.qa import answer_nll
from snaketune.tokenize.shards import TokenArrays
from snaketune.train.batches import TokenRows
from tests.support.workflow import config_with, snakemake_with

pytestmark = pytest.mark.slow


def sweep_entry(name: str, sweep: dict) -> dict:
    entry = copy.deepcopy(config_with()["experiments"][0])
    return {**entry, "name": name, "sweep": sweep}


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        (
            [sweep_entry("../../outside", {"grid": {"train.lr": [0.1]}})],
            "experiments[2].name: '../../outside' is not a usable sweep name",
        ),
        (
            [
                sweep_entry("lm", {"grid": {"train.lr": [0.1]}}),
                sweep_entry("lm", {"points": [{"train.lr": 0.2}]}),
            ],
            "experiments[3].name: sweep 'lm' is declared by experiments[2] too",
        ),
        (
            [sweep_entry("lm", {"points": [{"train.lr": 0.2}, {"train.lr": 0.2}]})],
            "experiments[2].sweep point {train.lr: 0.2}: is given twice",
        ),
        (
            [{**sweep_entry("shared", {}), "sweep": None}],
            "'shared' is a name results_dir uses for itself",
        ),
    ],
)
def test_names_that_would_escape_or_collide_stop_snakemake_before_any_job(
    tmp_path, entries, message
):
    config = config_with()
    for entry in entries:
        if entry.get("sweep") is None:
            entry.pop("sweep")
        config["experiments"].append(entry)
    run = snakemake_with(tmp_path, config, "--cores", "1")
    console = run.stdout + run.stderr
    assert run.returncode != 0 and message in console, console[-3000:]
    assert "Traceback" not in console
    assert not (tmp_path / "results").exists()  # no job ran, nothing written
    assert not (tmp_path.parent / "outside").exists()


def test_a_quote_in_the_mlflow_experiment_name_stops_snakemake_before_any_job(tmp_path):
    config = config_with(mlflow__experiment_name="team's runs")
    run = snakemake_with(tmp_path, config, "--cores", "1")
    assert run.returncode != 0
    assert 'mlflow.experiment_name: "team\'s runs" has a quote' in run.stdout + run.stderr


def instruction_rows(rows: list[tuple[list[int], list[int]]]) -> TokenRows:
    """Test rows of instruction data as the tokenize stage writes them: (tokens, targets)."""
    tokens = np.array([t for row, _ in rows for t in row], dtype=np.int32)
    targets = np.array([t for _, target in rows for t in target], dtype=np.uint8)
    offsets = np.cumsum([0, *(len(row) for row, _ in rows)]).astype(np.int64)
    return TokenRows(TokenArrays(tokens, offsets, None, targets), "causal_lm", 0)


def tiny_model():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=8, n_embd=16, n_layer=1, n_head=2))


EOS = 31


def test_no_answer_token_left_is_a_null_answer_perplexity_with_its_reason():
    """Every prompt fills block_size (8): exp(0 / 0) was reported as a perfect 1.0."""
    rows = instruction_rows([([1, 2, 3, 4, 5, 6, 7, 8], [0] * 8)] * 3)
    scored = answer_nll(tiny_model(), rows, 2, CPU, EOS)
    assert scored["answer_perplexity"] is None and scored["answer_tokens"] == 0
    assert scored["answers_cut_off"] == 3
    assert (
        "prompts of all 3 test examples fill tokenize.block_size"
        in scored["answer_perplexity_note"]
    )


def test_answers_cut_short_by_block_size_are_counted_not_said_to_end_with_eos():
    rows = instruction_rows(
        [
            ([1, 2, 3, 9, 10, EOS], [0, 0, 0, 1, 1, 1]),  # whole: the answer ends with EOS
            ([1, 2, 3, 4, 5, 6, 9, 10], [0, 0, 0, 0, 0, 0, 1, 1]),  # cut inside the answer
        ]
    )
    scored = answer_nll(tiny_model(), rows, 2, CPU, EOS)
    assert scored["answers_cut_short"] == 1 and scored["answer_tokens"] == 5
    assert scored["answer_perplexity"] is not None and "answer_perplexity_note" not in scored


def test_prompts_that_fill_block_size_are_refused_by_the_tokenize_stage_not_in_training(
    tmp_path,
):
    """The demo's Q&A with block_size 8: no prompt leaves room for an answer token. The
    tokenize stage says so with what to do; the trainer used to fail with an IndexError."""
    from snaketune.errors import CorpusError
    from tests.support.stage_data import prepare_stage_data

    with pytest.raises(CorpusError) as caught:
        prepare_stage_data(
            tmp_path,
            "causal_lm",
            8,
            instruction=True,
            experiment={"tokenizer": {"vocab_size": 300}},
        )
    assert "no training example has an answer token within tokenize.block_size=8" in str(
        caught.value
    )
    assert "Raise tokenize.block_size" in str(caught.value)
    assert not (tmp_path / "tokenize" / "shards").exists()  # nothing left under its name


def test_train_device_cuda_on_a_machine_without_a_gpu_stops_before_any_job(tmp_path):
    from snaketune.gpus import machine_devices

    if machine_devices():
        pytest.skip(f"this machine has GPUs {machine_devices()}: the refusal cannot happen")
    config = config_with(experiments__1__train__device="cuda")
    run = snakemake_with(tmp_path, config, "--cores", "1")
    console = run.stdout + run.stderr
    assert run.returncode != 0
    assert (
        "experiment 'demo-intent': train.device is 'cuda', but this machine has no GPU" in console
    )
    assert not (tmp_path / "results").exists()


def test_evaluation_windows_that_cannot_advance_stop_snakemake_before_any_job(tmp_path):
    """A context of one token: its windows predict nothing, and the default stride (context - 1)
    is 0, which ended the evaluate job in a traceback after training."""
    config = config_with(experiments__0__evaluate__context_length=1)
    run = snakemake_with(tmp_path, config, "--cores", "1")
    console = run.stdout + run.stderr
    assert run.returncode != 0
    assert "experiments[0].evaluate.context_length: 1 leaves no token to predict" in console
    assert not (tmp_path / "results").exists()


def test_more_training_processes_on_gpus_than_the_machine_has_stop_before_any_job(
    tmp_path, monkeypatch
):
    """As on a machine with one GPU (CUDA_VISIBLE_DEVICES lists it; none needs to exist)."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    config = config_with(experiments__0__train__processes=2)
    run = snakemake_with(tmp_path, config, "--cores", "1")
    console = run.stdout + run.stderr
    assert run.returncode != 0
    assert "experiment 'demo-lm': train.processes 2 processes on 1 node(s)" in console
    assert "it has 1 ['0']; give at most 1, or device: cpu" in console


FAKE_NVIDIA_SMI = """#!/bin/sh
# Two GPUs as nvidia-smi describes them: 0 of compute capability 7.5 (no bf16), 1 of 9.0.
case "$*" in
  *compute_cap*) printf '7.5\\n9.0\\n' ;;
  *memory.total*) printf '15360\\n143771\\n' ;;
  *) printf 'GPU 0: Tesla T4 (UUID: GPU-0)\\nGPU 1: NVIDIA H200 (UUID: GPU-1)\\n' ;;
esac
"""


def test_bf16_asked_of_gpus_without_it_stops_before_any_job(tmp_path, monkeypatch):
    """Both settings that ask for bf16 by name are refused at once, naming each, on a machine
    whose GPU has none (nvidia-smi describes it: a GPU cannot exist here, the check is the
    workflow's own, before CUDA is initialised)."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text(FAKE_NVIDIA_SMI)
    (fake / "nvidia-smi").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")  # the T4 alone (the H200 is not the jobs')
    config = config_with(
        experiments__0__model__dtype="bfloat16", experiments__1__train__precision="bf16"
    )
    (tmp_path / "run").mkdir()
    run = snakemake_with(tmp_path / "run", config, "--cores", "1")
    console = run.stdout + run.stderr
    assert run.returncode != 0, console
    assert "experiment 'demo-lm': model.dtype bfloat16 asks for bf16" in console
    assert "experiment 'demo-intent': train.precision bf16 asks for bf16" in console
    assert "compute capability [7.5] among this machine's ['0']" in console
    assert not (tmp_path / "run" / "results").exists()
    # Only the GPUs the jobs may use count: the H200 alone has bf16.
    from snaketune.gpus import gpus_without_bf16

    assert gpus_without_bf16(["1"]) == [] and gpus_without_bf16(["0", "1"]) == [7.5]
