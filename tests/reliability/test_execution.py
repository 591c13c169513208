"""Reliability scenarios 10-17: killed, interrupted and failing runs keep what they finished,
leave nothing half-written under a final name, say what happened, and resume. See README.md."""

from __future__ import annotations

import contextlib
import json
import resource
import signal
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from snaketune.errors import OutputError, TrainingError
from snaketune.fileio import atomic_dir, atomic_path, write_json
from snaketune.sharing import SHARED_FOLDER
from snaketune.stages import command_line
from snaketune.tokenize.paths import PartitionPaths, PlanPaths
from snaketune.tokenize.plan import plan_partitions
from snaketune.tokenize.settings import PartitionJob, TokenizeJob, TokenizeSettings
from snaketune.train.checkpoint import CHECKPOINT
from snaketune.train.settings import TrainSettings
from tests.support.processes import wait_for
from tests.support.reliability import (
    EXPERIMENT,
    TINY_MODEL,
    rerun_resumes,
    run_snakemake,
    run_train,
    single_thread_env,
    train_command,
    workdir_with,
)
from tests.support.repo import SNAKETUNE
from tests.support.stage_data import run_training
from tests.support.workflow import snakemake_command


def manifest_counts(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())["counts"]


# --- 10. SIGKILL mid-step ------------------------------------------------------------------------


@pytest.mark.slow
def test_sigkill_mid_training_resumes_from_checkpoint_with_identical_weights(lm_data, tmp_path):
    settings = TrainSettings(
        max_steps=150, batch_size=8, warmup_steps=5, eval_every=50, checkpoint_every=10
    )
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert run_train(lm_data, straight, settings).returncode == 0

    job = subprocess.Popen(
        train_command(lm_data, killed, settings),
        env=single_thread_env(),
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

    rerun_resumes(lm_data, killed, settings, killed_at)
    manifest = json.loads((killed / "manifest.json").read_text())
    assert manifest["counts"]["resumed_from_step"] == killed_at

    a = load_file(straight / "model" / "model.safetensors")
    b = load_file(killed / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)
    history_a = (straight / "history.jsonl").read_text().splitlines()
    history_b = (killed / "history.jsonl").read_text().splitlines()
    losses = [[json.loads(x)["loss"] for x in h] for h in (history_a, history_b)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


# --- 11. SIGTERM ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_before_exit_and_the_rerun_resumes(lm_data, tmp_path):
    # No periodic checkpoint before the signal: the one found afterwards is SIGTERM's.
    settings = TrainSettings(
        max_steps=400, batch_size=8, warmup_steps=5, eval_every=100, checkpoint_every=1000
    )
    job = subprocess.Popen(
        train_command(lm_data, tmp_path, settings),
        env=single_thread_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    # The first evaluation's line: the loop is under way with 300 steps to go, however fast
    # the machine (a fixed wait once let a fast one reach the last step first).
    for line in job.stderr:
        if "step 100 loss" in line:
            break
    job.send_signal(signal.SIGTERM)
    rest = job.stderr.read()
    job.wait(timeout=120)
    assert job.returncode != 0 and "SIGTERM received" in rest
    saved = torch.load(tmp_path / "state" / CHECKPOINT, weights_only=True)["step"]
    assert 0 < saved < settings.max_steps
    assert not (tmp_path / "model").exists()

    rerun_resumes(lm_data, tmp_path, settings, saved)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["attempt"] == 2 and manifest["previous_failure"]["cause"] == "stopped"
    assert "SIGTERM received" in manifest["previous_failure"]["message"]
    assert not (tmp_path / "state" / "failure.json").exists()  # this attempt succeeded


@pytest.mark.slow
def test_a_retry_of_an_error_it_would_repeat_stops_at_once_and_a_new_run_goes(lm_data, tmp_path):
    settings = TrainSettings(max_steps=5, batch_size=8, warmup_steps=1, memory_retries=0)
    failed = run_train(lm_data, tmp_path, settings, *SMALL_DEVICE)
    assert failed.returncode == 1 and "out of memory at step 1" in failed.stderr
    record = json.loads((tmp_path / "state" / "failure.json").read_text())
    assert record["cause"] == "error" and record["attempt"] == 1

    started = time.perf_counter()
    retried = run_train(lm_data, tmp_path, settings, *SMALL_DEVICE, attempt=2)
    assert retried.returncode == 1
    assert "not retried (attempt 2): attempt 1 failed with an error a retry would repeat: " in (
        retried.stderr
    )
    assert "out of memory at step 1" in retried.stderr.splitlines()[-1]
    assert "training gpt2" not in retried.stderr  # refused before any set-up
    print(f"refused retry: {time.perf_counter() - started:.1f} s")

    again = run_train(lm_data, tmp_path, settings)  # a new invocation: the cause was fixed
    assert again.returncode == 0, again.stderr[-3000:]
    assert not (tmp_path / "state" / "failure.json").exists()


# --- 12. crash while writing a checkpoint --------------------------------------------------------


def test_half_written_checkpoint_is_ignored_and_removed(lm_data, tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    partial = state / f".{CHECKPOINT}.abc123.tmp"
    partial.write_bytes(b"\x80\x02 truncated")
    run_training(
        lm_data,
        tmp_path,
        "causal_lm",
        TINY_MODEL,
        TrainSettings(max_steps=4, batch_size=4, warmup_steps=1, checkpoint_every=2),
    )
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["counts"]["resumed_from_step"] == 0
    assert not partial.exists()


@pytest.mark.slow
def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(lm_data, tmp_path):
    settings = TrainSettings(
        max_steps=100, batch_size=8, warmup_steps=5, eval_every=100, checkpoint_every=10
    )
    # Python ignores SIGXFSZ; with the default action back, a write past the file size limit
    # kills the trainer in the middle of that write, as a crash would.
    prelude = [
        "import resource, signal",
        "signal.signal(signal.SIGXFSZ, signal.SIG_DFL)",
        "resource.setrlimit(resource.RLIMIT_CORE, (0, 0))",
    ]
    job = subprocess.Popen(
        train_command(lm_data, tmp_path, settings, *prelude),
        env=single_thread_env(),
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    checkpoint = tmp_path / "state" / CHECKPOINT
    wait_for(lambda: checkpoint.exists() or job.poll() is not None, 300)
    size = checkpoint.stat().st_size
    resource.prlimit(job.pid, resource.RLIMIT_FSIZE, (size // 2, resource.RLIM_INFINITY))
    job.wait(timeout=300)

    assert job.returncode == -signal.SIGXFSZ
    (partial,) = (tmp_path / "state").glob(f".{CHECKPOINT}.*.tmp")
    assert 0 < partial.stat().st_size <= size // 2
    kept = torch.load(checkpoint, weights_only=True)["step"]
    assert kept % 10 == 0 and 0 < kept < settings.max_steps

    history = run_training(lm_data, tmp_path, "causal_lm", TINY_MODEL, settings)

    assert manifest_counts(tmp_path)["resumed_from_step"] == kept
    assert len(history) == settings.max_steps
    assert not partial.exists()


# --- 13. a stage killed mid-write under snakemake ------------------------------------------------


@pytest.mark.slow
def test_killed_stage_is_marked_incomplete_and_rerun_incomplete_resumes_it(interrupted_pipeline):
    run = interrupted_pipeline
    exp = run.results / EXPERIMENT
    # Killed while train_model was saving: its model folder was there, nothing downstream was.
    assert run.killed["train/model"] and not run.killed["evaluate"]
    output = run.dry_run.stdout + run.dry_run.stderr
    assert run.dry_run.returncode != 0
    assert "seem to be incomplete" in output and "--rerun-incomplete" in output
    assert f"results/{EXPERIMENT}/train/model" in output

    train_log = (exp / "train" / "train.log").read_text()
    resumed = manifest_counts(exp / "train")["resumed_from_step"]
    assert resumed > 0 and f"resumed from checkpoint at step {resumed}" in train_log
    assert (exp / "evaluate" / "metrics.json").exists()
    assert (exp / "track" / "runs.json").exists()


# --- 14. disk full or unwritable results dir while writing shards ---------------------------------


def test_file_size_limit_while_writing_shards_is_named_and_nothing_is_kept(lm_data, tmp_path):
    job = TokenizeJob("causal_lm", TokenizeSettings(block_size=32))
    work = tmp_path / "tokenize"
    splits = lm_data["splits"]
    plan = PlanPaths(
        **splits,
        tokenizer=lm_data["tokenizer"],
        plan=work / "plan.json",
        encoder=work / "encoder.json",
    )
    plan_partitions(plan, job)
    out, manifest = work / "parts" / "train" / "00000", work / "parts" / "train" / "00000.json"
    partition = PartitionPaths(splits["train"], plan.plan, plan.encoder, out, manifest)
    command = [
        SNAKETUNE,
        *command_line(partition, PartitionJob(job.task, job.tokenize, split="train", part=0)),
    ]
    # A file size limit is the full disk a process meets without privileges (root included).
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=lambda: resource.setrlimit(
            resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY)
        ),
    )

    assert result.returncode == 1
    assert f"snaketune tokenize-partition: error: could not write {out}: file size limit" in (
        result.stderr
    )
    assert "Nothing was kept under that name" in result.stderr
    assert sorted(p.name for p in (work / "parts" / "train").iterdir()) == []  # no temporaries


def test_results_dir_that_cannot_be_created_is_named(tmp_path):
    blocker = tmp_path / "results"
    blocker.write_text("a file where the results folder should be")
    target = blocker / "demo-lm" / "split" / "manifest.json"
    with pytest.raises(OutputError, match=rf"cannot write {target}: its folder .* cannot be"):
        write_json(target, {"stage": "split"})
    with pytest.raises(OutputError, match="Point results_dir at a writable folder"):
        with atomic_dir(blocker / "demo-lm" / "tokenize" / "shards"):
            pass


def test_full_disk_inside_an_atomic_write_keeps_the_old_file(tmp_path):
    final = tmp_path / "shards" / "shard-00000.parquet"
    final.parent.mkdir()
    final.write_bytes(b"the complete shard of an earlier run")
    with pytest.raises(OutputError) as caught:
        with atomic_path(final), open("/dev/full", "wb") as full:  # every write: ENOSPC
            full.write(b"x" * 65536)
            full.flush()
    assert f"could not write {final}: no space left on the device" in str(caught.value)
    assert final.read_bytes() == b"the complete shard of an earlier run"
    assert [p.name for p in final.parent.iterdir()] == [final.name]


# --- 15. NaN / inf loss --------------------------------------------------------------------------


def test_nan_loss_stops_before_the_update_naming_the_step_and_the_last_checkpoint(
    lm_data, tmp_path
):
    # A learning rate no schema allows: one AdamW step moves every weight by about 1e20, so the
    # next forward pass overflows.
    settings = TrainSettings(
        max_steps=20, batch_size=8, lr=1e20, warmup_steps=0, checkpoint_every=1, eval_every=20
    )
    with pytest.raises(TrainingError) as caught:
        run_training(lm_data, tmp_path, "causal_lm", TINY_MODEL, settings)

    message = str(caught.value)
    assert (
        "at step 2; training stopped before updating the weights with it and saved no model"
        in message
    )
    assert f"the last good checkpoint is step 1 in {tmp_path / 'state'}" in message
    assert "Lower train.lr" in message
    for output in ("model", "history.jsonl", "manifest.json"):
        assert not (tmp_path / output).exists()
    state = torch.load(tmp_path / "state" / CHECKPOINT, weights_only=True)
    assert state["step"] == 1
    assert all(torch.isfinite(tensor).all() for tensor in state["model"].values())


# --- 16. out of memory ---------------------------------------------------------------------------


@pytest.mark.slow
def test_out_of_memory_suggests_a_smaller_batch_and_gradient_accumulation(lm_data, tmp_path):
    settings = TrainSettings(
        max_steps=5, batch_size=400_000, warmup_steps=1, eval_every=5, memory_retries=0
    )
    # A cap 2 GiB above what the process has mapped once imported: the model and data fit, one
    # batch of 400,000 rows of 32 tokens does not.
    prelude = [
        "import resource",
        "import snaketune.cli, snaketune.train.trainer, transformers.models.gpt2.modeling_gpt2",
        "mapped = int(open('/proc/self/statm').read().split()[0]) * resource.getpagesize()",
        "resource.setrlimit(resource.RLIMIT_AS, (mapped + (2 << 30), resource.RLIM_INFINITY))",
    ]
    result = run_train(lm_data, tmp_path, settings, *prelude)

    assert result.returncode == 1, result.stderr[-3000:]
    message = result.stderr.splitlines()[-1]
    assert message.startswith("snaketune train: error: out of memory at step 1 on cpu")
    assert "train.batch_size=400000 and train.grad_accum=1" in message
    assert "divide batch_size and multiply grad_accum by the same factor" in message
    assert "no checkpoint has been written" in message
    assert not (tmp_path / "model").exists()


# A device whose memory holds the activations of 4 rows: beyond that its forward pass fails as
# CUDA's does (a real CUDA device cannot exist here; the retry path is the one a GPU takes).
SMALL_DEVICE = [
    "import torch, snaketune.train.trainer as train",
    "real_forward = train.forward",
    "def forward(model, batch, placement):",
    "    if len(batch['input_ids']) > 4:",
    "        raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB')",
    "    return real_forward(model, batch, placement)",
    "train.forward = forward",
]


@pytest.mark.slow
def test_a_step_out_of_memory_is_taken_again_smaller_on_the_same_trajectory(lm_data, tmp_path):
    """And batch_size auto finds the micro-batch that fits before the first step: both take
    the steps of a run configured with it."""
    configured = TrainSettings(
        max_steps=20, batch_size=16, warmup_steps=2, eval_every=10, checkpoint_every=10
    )
    small, straight, auto = tmp_path / "small", tmp_path / "straight", tmp_path / "auto"
    adapted = run_train(lm_data, small, configured, *SMALL_DEVICE)
    assert adapted.returncode == 0, adapted.stderr[-3000:]
    for was, now in (("16 x 1", "8 x grad_accum 2"), ("8 x 2", "4 x grad_accum 4")):
        assert f"out of memory at step 1: taking it again with batch_size {now} (was {was})" in (
            adapted.stderr
        )
    searched = run_train(
        lm_data, auto, replace(configured, batch_size="auto", grad_accum=16), *SMALL_DEVICE
    )
    assert searched.returncode == 0, searched.stderr[-3000:]
    # The same examples per step: the weights of a run configured with what fitted.
    fitted = replace(configured, batch_size=4, grad_accum=4)
    assert run_train(lm_data, straight, fitted).returncode == 0
    theirs = load_file(straight / "model" / "model.safetensors")
    for out in (small, auto):
        ours = load_file(out / "model" / "model.safetensors")
        assert ours.keys() == theirs.keys()
        for k in ours:  # to rounding: two processes' MKL products may round apart (README)
            torch.testing.assert_close(ours[k], theirs[k], rtol=1e-4, atol=1e-6)
    manifest = json.loads((small / "manifest.json").read_text())
    assert manifest["memory_retries"] == [
        {"step": 1, "cause": "out of memory", "batch_size": [16, 8], "grad_accum": [1, 2]},
        {"step": 1, "cause": "out of memory", "batch_size": [8, 4], "grad_accum": [2, 4]},
    ]
    assert manifest["counts"]["memory_retries"] == 2
    manifest = json.loads((auto / "manifest.json").read_text())
    assert manifest["micro_batch"] == {
        "batch_size": 4,
        "grad_accum": 4,
        "tried": [
            {"batch_size": 2, "fits": True},
            {"batch_size": 4, "fits": True},
            {"batch_size": 8, "fits": False},
        ],
    }
    assert manifest["memory_retries"] == []


@pytest.mark.slow
def test_out_of_memory_beyond_memory_retries_is_the_batch_advice(lm_data, tmp_path):
    settings = TrainSettings(max_steps=5, batch_size=16, warmup_steps=1, memory_retries=1)
    result = run_train(lm_data, tmp_path, settings, *SMALL_DEVICE)
    assert result.returncode == 1
    message = result.stderr.splitlines()[-1]
    assert "train.batch_size=8 and train.grad_accum=2 (after 1 retries" in message
    assert "divide batch_size and multiply grad_accum by the same factor" in message


# --- 17. two snakemake invocations on one results dir --------------------------------------------


@pytest.mark.slow
def test_second_snakemake_on_the_same_results_refuses_and_loses_nothing(
    interrupted_pipeline, tmp_path
):
    workdir = workdir_with(interrupted_pipeline.results, tmp_path, [EXPERIMENT])
    results = workdir / "results"
    outputs = [*(results / EXPERIMENT).rglob("*"), *(results / "datasets").rglob("*")]
    outputs += (results / SHARED_FOLDER).rglob("*")
    # The track job's outputs and the MLflow run ids (tracking/) are the forced job's to write.
    mlflow_side = {"track", "tracking"}
    untouched = {
        p: p.stat().st_mtime_ns for p in outputs if p.is_file() and not mlflow_side & set(p.parts)
    }
    with (workdir / "first.log").open("w") as log:
        first = subprocess.Popen(
            snakemake_command(workdir, "--cores", "1", "--forcerun", "track_experiment"),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    locks = workdir / ".snakemake" / "locks"
    wait_for(lambda: any(locks.glob("*")) or first.poll() is not None, 300)
    # Hold the first run still while it holds the lock: the second meets it for certain.
    held = psutil.Process(first.pid)
    held = [held, *held.children(recursive=True)]
    for process in held:
        # A short-lived child may end between the listing and this: it needs no holding.
        with contextlib.suppress(psutil.NoSuchProcess):
            process.suspend()
    try:
        second = run_snakemake(workdir, "--cores", "1")
    finally:
        for process in held:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.resume()

    assert first.wait(timeout=600) == 0, (workdir / "first.log").read_text()[-3000:]
    assert second.returncode != 0
    assert "Directory cannot be locked" in second.stdout + second.stderr
    assert all(p.stat().st_mtime_ns == mtime for p, mtime in untouched.items())
    assert (results / EXPERIMENT / "track" / "runs.json").exists()
    again = run_snakemake(workdir, "--dry-run")
    assert "Nothing to be done" in again.stdout + again.stderr
