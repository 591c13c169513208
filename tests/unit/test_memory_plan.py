"""The memory plan made before any job (snaketune.train.memory_plan): its parts are the model's own
counts, its total is within 25% of the measured peak of real training steps on the CPU, and a
job over the memory it may use is refused before any job, with what would make it fit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from snaketune.train import lm_loss, memory_plan
from tests.support.repo import DEFAULT_CONFIG, REPO
from tests.support.workflow import snakemake_command

VOCAB = 500


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    """A Llama-shaped checkpoint (4 blocks of width 512, grouped-query attention)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    folder = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=512,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def measured(folder: Path, model: dict, batch: int, context: int = 128) -> dict:
    job = {
        "folder": str(folder),
        "model": model,
        "train": {"batch_size": batch},
        "context": context,
        "vocab": VOCAB,
    }
    command = [sys.executable, "-m", "tests.support.memory", json.dumps(job)]
    out = subprocess.run(command, check=True, capture_output=True, text=True, cwd=REPO)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_plan_uses_the_logits_chunk_of_the_loss():
    assert memory_plan.LOGITS_CHUNK_BYTES == lm_loss.LOGITS_CHUNK_BYTES


@pytest.mark.slow
@pytest.mark.parametrize(
    ("model", "batch"),
    [
        ({}, 16),
        ({"lora_rank": 8}, 32),
        ({"gradient_checkpointing": True}, 32),
    ],
    ids=["full", "lora", "checkpointing"],
)
def test_the_estimate_is_within_a_quarter_of_the_measured_peak(llama, model, batch):
    result = measured(llama, model, batch)
    shape = result["shape"]
    # The parts it is built from are the model's own counts.
    assert shape["parameters"] == result["parameters"] - shape["lora_parameters"]
    assert (shape["lora_parameters"] or shape["parameters"]) == result["trainable"]
    ratio = result["planned"] / result["measured"]
    assert 0.75 <= ratio <= 1.25, (ratio, result["describe"], result["measured"])


def test_a_job_over_its_memory_is_refused_before_any_job_with_what_would_fit(tmp_path):
    config = json.loads(json.dumps(DEFAULT_CONFIG))
    config["results_dir"] = str(tmp_path / "results")
    config["experiments"][0]["train"]["max_memory_gb"] = 0.1
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    command = snakemake_command(tmp_path, "--cores", "1", "-n")
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    out = run.stdout + run.stderr
    assert "experiment 'demo-lm': the train job needs about" in out
    assert "over the 0.1 GB it may use; it would fit with" in out
    assert "model.gradient_checkpointing: true" in out or "train.batch_size" in out
    assert not (tmp_path / "results").exists()


def test_a_dry_run_prints_each_train_job_s_plan(tmp_path):
    config = json.loads(json.dumps(DEFAULT_CONFIG))
    config["results_dir"] = str(tmp_path / "results")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    run = subprocess.run(
        snakemake_command(tmp_path, "--cores", "1", "-n"), capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-2000:]
    for name in ("demo-lm", "demo-intent"):
        assert f"snaketune: {name}: memory plan (CPU): weights" in run.stderr


def test_fsdp_splits_weights_gradients_and_moments_over_the_processes(llama):
    from snaketune.train.settings import ModelSettings, TrainSettings

    model = dict(ModelSettings(init="pretrained", name_or_path=str(llama)).__dict__)
    shape = memory_plan.checkpoint_shape(llama, model)
    one = memory_plan.plan(shape, model, dict(TrainSettings().__dict__), 128, cuda=True)
    train = dict(TrainSettings(strategy="fsdp", processes=4).__dict__)
    four = memory_plan.plan(shape, model, train, 128, cuda=True)
    assert four.weights == pytest.approx(one.weights / 4)
    assert four.optimizer == pytest.approx(one.optimizer / 4)
    assert four.activations == one.activations


def test_batch_size_auto_is_planned_at_the_one_row_it_needs_to_fit(llama):
    from snaketune.train.settings import ModelSettings, TrainSettings

    model = dict(ModelSettings(init="pretrained", name_or_path=str(llama)).__dict__)
    shape = memory_plan.checkpoint_shape(llama, model)
    auto = {**TrainSettings().__dict__, "batch_size": "auto", "grad_accum": 64}
    one = {**TrainSettings().__dict__, "batch_size": 1, "grad_accum": 64}
    planned = memory_plan.plan(shape, model, auto, 128, cuda=True)
    assert planned == memory_plan.plan(shape, model, one, 128, cuda=True)
    assert planned.micro_batch == (1, 128)
