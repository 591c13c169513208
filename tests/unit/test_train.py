"""The trainer: it learns, its schedule and data order are what they claim, and a job killed
with SIGKILL resumes from its last checkpoint and ends with the same weights."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from snaketune.batches import batch_indices
from snaketune.checkpoint import CHECKPOINT
from snaketune.models import ModelSettings
from snaketune.train import TrainSettings, learning_rate, train_model
from tests.conftest import train_cli_args

TINY_MODEL = ModelSettings(n_layer=1, n_embd=32, n_head=2, dropout=0.1)


def run_training(
    data: dict, out: Path, task: str, settings: TrainSettings, model: ModelSettings = TINY_MODEL
) -> list[dict]:
    return train_model(
        data["shards"],
        data["tokenize_manifest"],
        data["tokenizer"],
        out / "model",
        out / "history.jsonl",
        out / "manifest.json",
        out / "state",
        task,
        model,
        settings,
    )


def test_learning_rate_warms_up_then_decays_to_the_floor():
    s = TrainSettings(max_steps=100, warmup_steps=10, lr=1e-3, min_lr_ratio=0.1)
    assert learning_rate(0, s) == pytest.approx(1e-4)
    assert learning_rate(9, s) == pytest.approx(1e-3)
    assert learning_rate(55, s) == pytest.approx(0.55e-3)  # cosine midpoint
    assert learning_rate(100, s) == pytest.approx(1e-4)
    assert all(learning_rate(i, s) >= learning_rate(i + 1, s) for i in range(10, 100))


def test_batch_order_is_a_seeded_permutation_per_epoch():
    n = 12  # three steps per epoch

    def draw(step: int) -> np.ndarray:
        return batch_indices(step, 0, batch_size=4, grad_accum=1, seed=7, n=n)

    epoch0 = np.concatenate([draw(step) for step in range(3)])
    epoch1 = np.concatenate([draw(step) for step in range(3, 6)])
    assert sorted(epoch0) == list(range(n)) and sorted(epoch1) == list(range(n))
    assert not np.array_equal(epoch0, epoch1)
    assert np.array_equal(draw(4), draw(4))


def test_processes_split_each_batch_between_them():
    one = batch_indices(5, 1, batch_size=8, grad_accum=2, seed=3, n=100)
    halves = [
        batch_indices(5, 1, batch_size=4, grad_accum=2, seed=3, n=100, world=2, rank=r)
        for r in (0, 1)
    ]
    assert np.array_equal(one, np.concatenate(halves))


def test_causal_lm_training_lowers_validation_loss(lm_data, tmp_path):
    settings = TrainSettings(
        max_steps=60, batch_size=8, lr=3e-3, warmup_steps=5, eval_every=20, checkpoint_every=30
    )
    history = run_training(lm_data, tmp_path, "causal_lm", settings)
    val = [row["val_loss"] for row in history if "val_loss" in row]
    assert len(history) == 60 and len(val) == 3
    # Random init scores about ln(vocab); a model that learned anything does far better.
    assert val[-1] < val[0] and val[-1] < math.log(400) - 1.0
    saved = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert saved == history
    assert (tmp_path / "model" / "model.safetensors").exists()
    assert (tmp_path / "model" / "tokenizer.json").exists()
    assert not (tmp_path / "state").exists()  # the finished model replaces the checkpoint
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["device"] == "cpu" and manifest["counts"]["steps"] == 60


@pytest.mark.parametrize("arch", ["gpt2", "lstm"])
def test_classifier_training_beats_chance(classification_data, tmp_path, arch):
    from snaketune.evaluation import predict_classes
    from snaketune.models import load_trained
    from snaketune.train import load_examples

    settings = TrainSettings(max_steps=80, batch_size=32, lr=3e-3, warmup_steps=5, eval_every=40)
    run_training(
        classification_data,
        tmp_path,
        "sequence_classification",
        settings,
        ModelSettings(arch=arch, n_layer=1, n_embd=48, n_head=2, dropout=0.0),
    )
    info = json.loads(classification_data["tokenize_manifest"].read_text())
    val = load_examples(
        classification_data["shards"] / "val", "sequence_classification", info["pad_token_id"]
    )
    model = load_trained(tmp_path / "model", "sequence_classification")
    accuracy = (predict_classes(model, val, 64) == val.labels.numpy()).mean()
    assert accuracy > 2 / len(info["label_names"])  # chance is 1/8


def _train_command(data: dict, out: Path, settings: TrainSettings) -> list[str]:
    payload = {"task": "causal_lm", "model": asdict(TINY_MODEL), "train": asdict(settings)}
    return [str(Path(sys.executable).with_name("snaketune")), *train_cli_args(data, out, payload)]


def _single_thread_env() -> dict[str, str]:
    # One thread on both runs, so the floating-point reduction order is identical.
    return {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_sigkill_mid_training_resumes_from_checkpoint_with_identical_weights(lm_data, tmp_path):
    settings = TrainSettings(
        max_steps=150, batch_size=8, warmup_steps=5, eval_every=50, checkpoint_every=10
    )
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(
        _train_command(lm_data, straight, settings),
        check=True,
        env=_single_thread_env(),
        capture_output=True,
        timeout=300,
    )

    job = subprocess.Popen(
        _train_command(lm_data, killed, settings),
        env=_single_thread_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    checkpoint = killed / "state" / CHECKPOINT
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    job.send_signal(signal.SIGKILL)
    job.wait()
    assert job.returncode == -signal.SIGKILL, "training finished before it could be killed"
    assert not (killed / "model").exists()
    killed_at = torch.load(checkpoint, weights_only=True)["step"]
    assert 0 < killed_at < settings.max_steps

    rerun = subprocess.run(
        _train_command(lm_data, killed, settings),
        env=_single_thread_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert rerun.returncode == 0, rerun.stderr
    assert f"resumed from checkpoint at step {killed_at}" in rerun.stderr
    manifest = json.loads((killed / "manifest.json").read_text())
    assert manifest["counts"]["resumed_from_step"] == killed_at

    a = load_file(straight / "model" / "model.safetensors")
    b = load_file(killed / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)
    history_a = (straight / "history.jsonl").read_text().splitlines()
    history_b = (killed / "history.jsonl").read_text().splitlines()
    assert [json.loads(x)["loss"] for x in history_a] == [json.loads(x)["loss"] for x in history_b]


def test_checkpoint_from_other_settings_is_not_resumed(lm_data, tmp_path):
    first = TrainSettings(max_steps=10, batch_size=4, checkpoint_every=5, warmup_steps=2)
    (tmp_path / "state").mkdir()
    from snaketune.checkpoint import save_checkpoint
    from snaketune.models import build_model
    from snaketune.train import make_optimizer

    model = build_model(TINY_MODEL, "causal_lm", 400, 32, 1, 0, [])
    state = {
        "step": 5,
        "history": [],
        "fingerprint": "other-run",
        "model": model.state_dict(),
        "optimizer": make_optimizer(model, first).state_dict(),
    }
    save_checkpoint(tmp_path / "state", state)
    history = run_training(lm_data, tmp_path, "causal_lm", first)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["counts"]["resumed_from_step"] == 0 and len(history) == 10


def test_half_written_checkpoint_is_ignored_and_removed(lm_data, tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    partial = state / f".{CHECKPOINT}.abc123.tmp"
    partial.write_bytes(b"\x80\x02 truncated")
    run_training(
        lm_data,
        tmp_path,
        "causal_lm",
        TrainSettings(max_steps=4, batch_size=4, warmup_steps=1, checkpoint_every=2),
    )
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["counts"]["resumed_from_step"] == 0
    assert not partial.exists()


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_before_exit_and_the_rerun_resumes(lm_data, tmp_path):
    # No periodic checkpoint before the signal: the one found afterwards is SIGTERM's.
    settings = TrainSettings(
        max_steps=400, batch_size=8, warmup_steps=5, eval_every=400, checkpoint_every=1000
    )
    job = subprocess.Popen(
        _train_command(lm_data, tmp_path, settings),
        env=_single_thread_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in job.stderr:
        if "training gpt2" in line:  # set-up done, steps under way
            break
    time.sleep(1.0)
    job.send_signal(signal.SIGTERM)
    rest = job.stderr.read()
    job.wait(timeout=120)
    assert job.returncode != 0 and "SIGTERM received" in rest
    saved = torch.load(tmp_path / "state" / CHECKPOINT, weights_only=True)["step"]
    assert 0 < saved < settings.max_steps
    assert not (tmp_path / "model").exists()

    rerun = subprocess.run(
        _train_command(lm_data, tmp_path, settings),
        env=_single_thread_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert rerun.returncode == 0, rerun.stderr
    assert f"resumed from checkpoint at step {saved}" in rerun.stderr
