"""The trainer: it learns, its schedule and data order are what they claim, and a checkpoint of
other settings is not resumed. Killed, interrupted and failing runs are in tests/reliability."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from snaketune.train.batches import IGNORED_LABEL, batch_indices
from snaketune.train.models import build_model, load_trained
from snaketune.train.settings import ModelSettings, TrainSettings
from snaketune.train.trainer import learning_rate
from tests.support.stage_data import padded, rows_of, run_training

TINY_MODEL = ModelSettings(n_layer=1, n_embd=32, n_head=2, dropout=0.1)


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
    history = run_training(lm_data, tmp_path, "causal_lm", TINY_MODEL, settings)
    val = [row["val_loss"] for row in history if "val_loss" in row]
    assert len(history) == 60 and len(val) == 3
    # Random init scores about ln(vocab); a model that learned anything does far better.
    assert val[-1] < val[0] and val[-1] < math.log(400) - 1.0
    saved = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert saved == history
    assert (tmp_path / "model" / "model.safetensors").exists()
    assert (tmp_path / "model" / "tokenizer.json").exists()
    # The finished run's last checkpoint stays (keep_final_state), so more steps continue it.
    assert json.loads((tmp_path / "state" / "checkpoint.json").read_text())["step"] == 60
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["device"] == "cpu" and manifest["counts"]["steps"] == 60


def test_loaded_rows_are_the_shard_rows_followed_by_padding(lm_per_document_data):
    from snaketune.tokenize.shards import read_shards

    shards = read_shards(lm_per_document_data["shards"] / "val").column("input_ids").to_pylist()
    rows = replace(rows_of(lm_per_document_data, "val"), pad_token_id=7)
    val = padded(rows)

    assert len(rows) == len(shards)
    for i, row in enumerate(shards):
        assert val["input_ids"][i, : len(row)].tolist() == row
        assert set(val["input_ids"][i, len(row) :].tolist()) <= {7}
        assert val["attention_mask"][i].tolist() == [1] * len(row) + [0] * (32 - len(row))


def test_per_document_rows_are_padded_and_the_padding_is_never_a_target(lm_per_document_data):
    info = json.loads(lm_per_document_data["tokenize_manifest"].read_text())
    rows = rows_of(lm_per_document_data, "train")
    train = padded(rows)

    padding = train["attention_mask"] == 0
    assert padding.any() and train["input_ids"].size(1) == 32
    assert bool((train["labels"][padding] == IGNORED_LABEL).all())
    assert torch.equal(train["labels"][~padding], train["input_ids"][~padding])
    assert int((~padding).sum()) == info["counts"]["train"]["tokens"]
    kept = rows.with_targets()  # rows of one token have nothing to predict
    assert len(kept) == int((train["attention_mask"].sum(dim=1) >= 2).sum()) < len(rows)


@pytest.mark.parametrize("arch", ["gpt2", "lstm"])
def test_a_padded_batch_has_the_loss_of_its_rows_scored_one_by_one(lm_per_document_data, arch):
    info = json.loads(lm_per_document_data["tokenize_manifest"].read_text())
    train = rows_of(lm_per_document_data, "train")
    lengths = torch.from_numpy(train.lengths())
    short = int(torch.nonzero((lengths > 1) & (lengths < 32))[0])
    index = np.array([short, int(torch.argmax(lengths))])
    torch.manual_seed(0)
    settings = ModelSettings(arch=arch, n_layer=1, n_embd=32, n_head=2, dropout=0.0)
    model = build_model(settings, "causal_lm", info["vocab_size"], 32, 0, 1, []).eval()

    with torch.no_grad():
        batched = float(model(**train.batch(index)).loss)
        nll_sum, targets = 0.0, 0
        for i in index:
            row = train.batch([i])["input_ids"]
            nll_sum += float(model(input_ids=row, labels=row).loss) * (row.size(1) - 1)
            targets += row.size(1) - 1

    assert lengths[index[0]] < lengths[index[1]] == 32
    assert batched == pytest.approx(nll_sum / targets, rel=1e-5)


def test_causal_lm_training_on_per_document_rows_lowers_validation_loss(
    lm_per_document_data, tmp_path
):
    settings = TrainSettings(max_steps=40, batch_size=8, lr=3e-3, warmup_steps=5, eval_every=20)
    history = run_training(lm_per_document_data, tmp_path, "causal_lm", TINY_MODEL, settings)

    val = [row["val_loss"] for row in history if "val_loss" in row]
    assert val[-1] < val[0] and val[-1] < math.log(400) - 1.0
    # The model's context is the block size, not the longest row it happened to see.
    assert load_trained(tmp_path / "model", "causal_lm").config.n_positions == 32


@pytest.mark.parametrize("arch", ["gpt2", "lstm"])
def test_classifier_training_beats_chance(classification_data, tmp_path, arch):
    from snaketune.evaluate.evaluation import predict_classes
    from snaketune.train.models import load_trained

    settings = TrainSettings(max_steps=80, batch_size=32, lr=3e-3, warmup_steps=5, eval_every=40)
    run_training(
        classification_data,
        tmp_path,
        "sequence_classification",
        ModelSettings(arch=arch, n_layer=1, n_embd=48, n_head=2, dropout=0.0),
        settings,
    )
    info = json.loads(classification_data["tokenize_manifest"].read_text())
    val = rows_of(classification_data, "val")
    model = load_trained(tmp_path / "model", "sequence_classification")
    accuracy = (predict_classes(model, val, 64) == val.labels()).mean()
    assert accuracy > 2 / len(info["label_names"])  # chance is 1/8


def test_checkpoint_from_other_settings_is_not_resumed(lm_data, tmp_path):
    first = TrainSettings(max_steps=10, batch_size=4, checkpoint_every=5, warmup_steps=2)
    (tmp_path / "state").mkdir()
    from snaketune.train.checkpoint import save_checkpoint
    from snaketune.train.models import build_model
    from snaketune.train.trainer import make_optimizer

    model = build_model(TINY_MODEL, "causal_lm", 400, 32, 1, 0, [])
    state = {
        "step": 5,
        "history": [],
        "fingerprint": "other-run",
        "model": model.state_dict(),
        "optimizer": make_optimizer(model, first).state_dict(),
    }
    save_checkpoint(tmp_path / "state", state)
    history = run_training(lm_data, tmp_path, "causal_lm", TINY_MODEL, first)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["counts"]["resumed_from_step"] == 0 and len(history) == 10


# --- continued training -------------------------------------------------------------------------


def test_a_continued_schedule_goes_on_from_the_rate_it_had_to_the_new_end():
    from snaketune.train.trainer import continued_schedule

    s = TrainSettings(max_steps=100, warmup_steps=10, lr=1e-3, min_lr_ratio=0.1)
    killed_at_50 = continued_schedule([[0, 100, None]], 50, replace(s, max_steps=200))
    assert killed_at_50 == [[0, 100, None], [50, 200, pytest.approx(learning_rate(50, s))]]
    longer = replace(s, max_steps=200)
    assert learning_rate(49, longer, killed_at_50) == learning_rate(49, s)  # the past unchanged
    assert learning_rate(50, longer, killed_at_50) == pytest.approx(learning_rate(50, s))
    assert learning_rate(200, longer, killed_at_50) == pytest.approx(1e-4)  # the same floor
    rates = [learning_rate(i, longer, killed_at_50) for i in range(50, 201)]
    assert all(a >= b for a, b in zip(rates, rates[1:], strict=False))
    finished = continued_schedule([[0, 100, None]], 100, longer)
    assert learning_rate(150, longer, finished) == pytest.approx(1e-4)  # it goes on at its end
    assert continued_schedule(killed_at_50, 50, longer) == killed_at_50  # nothing new to plan


QUICK = TrainSettings(
    max_steps=20, batch_size=8, lr=3e-3, warmup_steps=2, eval_every=10, checkpoint_every=10
)


def test_more_steps_after_a_finished_run_continue_it_without_a_gap_or_a_repeat(lm_data, tmp_path):
    first = run_training(lm_data, tmp_path, "causal_lm", TINY_MODEL, QUICK)
    longer = replace(QUICK, max_steps=30)
    history = run_training(lm_data, tmp_path, "causal_lm", TINY_MODEL, longer)

    assert [row["step"] for row in history] == list(range(1, 31))
    drop = ("tokens_per_s",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in history[:20]] == [
        {k: v for k, v in r.items() if k not in drop} for r in first
    ]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["counts"]["resumed_from_step"] == 20 and manifest["counts"]["steps"] == 30
    assert manifest["schedule"][0] == [0, 20, None] and manifest["schedule"][1][:2] == [20, 30]
    assert history[20]["lr"] == pytest.approx(manifest["schedule"][1][2])


@pytest.mark.parametrize("record", ["missing", "a step behind"])
def test_a_job_killed_between_checkpoint_and_its_record_still_resumes(lm_data, tmp_path, record):
    from snaketune.train.resume import RECORD

    run_training(lm_data, tmp_path, "causal_lm", TINY_MODEL, QUICK)
    state = tmp_path / "state"
    if record == "missing":
        (state / RECORD).unlink()
    else:
        previous = {**json.loads((state / RECORD).read_text()), "step": 10}
        (state / RECORD).write_text(json.dumps(previous))
    history = run_training(lm_data, tmp_path, "causal_lm", TINY_MODEL, replace(QUICK, max_steps=30))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["counts"]["resumed_from_step"] == 20 and len(history) == 30


def test_settings_that_change_no_step_taken_resume_and_others_start_over(lm_data, tmp_path):
    run_training(lm_data, tmp_path, "causal_lm", TINY_MODEL, QUICK)
    calmer = replace(QUICK, eval_every=5, checkpoint_every=7, early_stopping_patience=3)
    again = run_training(lm_data, tmp_path, "causal_lm", TINY_MODEL, calmer)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["counts"]["resumed_from_step"] == 20 and len(again) == 20

    other = replace(QUICK, lr=1e-3)
    run_training(lm_data, tmp_path, "causal_lm", TINY_MODEL, other)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["counts"]["resumed_from_step"] == 0


def test_a_forced_restart_names_each_changed_key():
    from snaketune.train import resume
    from snaketune.train.settings import TrainJob

    job = TrainJob("causal_lm", TINY_MODEL, QUICK)
    record = {
        "step": 20,
        "max_steps": 20,
        "trajectory": resume.trajectory(job),
        "data": "d1",
    }
    changed = TrainJob("causal_lm", replace(TINY_MODEL, n_layer=2), replace(QUICK, lr=1e-3))
    plan = resume.plan(record, changed, "d2")
    assert not plan.resume
    assert "starts again from step 0: model.n_layer 1 -> 2; train.lr 0.003 -> 0.001" in plan.message
    assert "the tokenized data since the checkpoint at step 20" in plan.message
    assert resume.plan(record, job, "d1") == resume.Plan(True, "")
    fewer = resume.plan(
        record, TrainJob("causal_lm", TINY_MODEL, replace(QUICK, max_steps=10)), "d1"
    )
    assert not fewer.resume and "train.max_steps 10 is below the 20 steps" in fewer.message
    more = resume.plan(
        record, TrainJob("causal_lm", TINY_MODEL, replace(QUICK, max_steps=40)), "d1"
    )
    assert (
        more.resume and "continues the checkpoint at step 20 to train.max_steps 40" in more.message
    )


def test_the_last_k_checkpoints_are_kept(lm_data, tmp_path):
    settings = replace(QUICK, max_steps=30, keep_checkpoints=2)
    run_training(lm_data, tmp_path, "causal_lm", TINY_MODEL, settings)
    kept = sorted(p.name for p in (tmp_path / "state").glob("checkpoint*"))
    assert kept == ["checkpoint-00000020.pt", "checkpoint.json", "checkpoint.pt"]
    assert torch.load(tmp_path / "state" / "checkpoint.pt", weights_only=True)["step"] == 30


def test_keep_final_state_off_removes_the_state_once_the_model_is_saved(lm_data, tmp_path):
    run_training(lm_data, tmp_path, "causal_lm", TINY_MODEL, replace(QUICK, keep_final_state=False))
    assert not (tmp_path / "state").exists() and (tmp_path / "model").exists()


def test_validation_reports_the_whole_split_as_loss_perplexity_accuracy_and_f1(
    lm_data, classification_data, tmp_path
):
    lm = run_training(lm_data, tmp_path / "lm", "causal_lm", TINY_MODEL, QUICK)
    row = lm[-1]
    assert row["val_perplexity"] == pytest.approx(math.exp(row["val_loss"]))
    cls = run_training(
        classification_data, tmp_path / "cls", "sequence_classification", TINY_MODEL, QUICK
    )
    assert 0 <= cls[-1]["val_accuracy"] <= 1 and 0 <= cls[-1]["val_macro_f1"] <= 1


@pytest.fixture
def cpu_run(lm_data, tmp_path):
    """A real training run set up on the CPU, before its first step."""
    from snaketune.tokenize.shards import TokenizedData
    from snaketune.train.distributed import World
    from snaketune.train.settings import TrainJob
    from snaketune.train.trainer import prepare_run

    data = TokenizedData.read(lm_data["tokenize_manifest"], lm_data["shards"])
    job = TrainJob(task="causal_lm", model=TINY_MODEL, train=replace(QUICK, log_every=4))
    return prepare_run(data, tmp_path / "state", job, World())


def test_a_non_finite_step_is_skipped_on_the_device_and_the_read_stops_training(cpu_run):
    """The CUDA path (found_inf given to fused AdamW, the loss read later), on the CPU's fused
    AdamW: the weights and the optimizer's step count do not move, and the read refuses it."""
    from snaketune.errors import TrainingError
    from snaketune.train.trainer import Unread, one_step, update

    run = cpu_run
    assert run.optimizer.defaults["fused"]
    row, reading = one_step(run, 0, [[0, run.settings.max_steps, None]])  # a finite step
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    for p in run.model.parameters():
        p.grad = torch.full_like(p, float("nan"))
    update(run, torch.tensor([float("nan"), float("nan")]))
    after = run.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(int(s["step"]) == 1 for s in run.optimizer.state.values())
    unread = Unread(
        [row, {"step": 2, "lr": 0.1, "tokens": 1}], [reading, torch.tensor([math.nan, 1.0])]
    )
    with pytest.raises(TrainingError, match="loss nan .* at step 2; training stopped before"):
        unread.read(run)


def test_the_loss_is_read_every_log_every_steps_and_where_the_loop_needs_it_on_any_device(
    cpu_run,
):
    from snaketune.train.devices import Placement
    from snaketune.train.trainer import read_now

    s = cpu_run.settings  # log_every 4, eval_every 10, checkpoint_every 10, max_steps 20
    expected = sorted({*range(4, 21, 4), *range(s.eval_every, 21, s.eval_every), 20})
    cuda = replace(cpu_run, placement=Placement(torch.device("cuda"), torch.bfloat16))
    for run in (cpu_run, cuda):
        assert [step for step in range(1, 21) if read_now(run, step)] == expected


def test_a_validation_split_with_nothing_to_predict_is_an_error_not_a_zero_loss(cpu_run):
    from snaketune.errors import TrainingError
    from snaketune.tokenize.shards import TokenArrays
    from snaketune.train.trainer import validate

    one_token_rows = TokenArrays(np.arange(5, dtype=np.uint16), np.arange(6), None)
    run = replace(cpu_run, val=replace(cpu_run.val, arrays=one_token_rows, rows=None))
    with pytest.raises(TrainingError, match="the validation split has no token to predict"):
        validate(run)


def test_rows_read_together_keep_every_step_and_share_the_window_s_throughput(cpu_run):
    from snaketune.train.trainer import Unread, one_step

    unread = Unread()
    for step in range(3):
        row, reading = one_step(cpu_run, step, [[0, cpu_run.settings.max_steps, None]])
        unread.rows.append(row)
        unread.readings.append(reading)
    rows = unread.read(cpu_run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in rows)
    assert len({r["tokens_per_s"] for r in rows}) == 1 and not unread.rows


def test_the_plan_before_any_job_compares_where_the_data_will_come_from():
    """Before any job the data's digest is unknown, but its folder is keyed by everything the
    data is computed from: another folder means other data, and the plan says so."""
    from snaketune.train import resume
    from snaketune.train.settings import ModelSettings, TrainJob, TrainSettings

    job = TrainJob("causal_lm", ModelSettings(), TrainSettings(max_steps=20))
    record = resume.record_of(10, job, "digest", "results/shared/tokenize/demo-aaa/shards")
    more = TrainJob("causal_lm", ModelSettings(), TrainSettings(max_steps=30))
    same = resume.plan(record, more, None, "results/shared/tokenize/demo-aaa/shards/")
    assert same.resume and "continues the checkpoint at step 10" in same.message
    other = resume.plan(record, more, None, "results/shared/tokenize/demo-bbb/shards")
    assert not other.resume and "the tokenized data (a change upstream" in other.message
    assert resume.plan_without_state((20, 20), job).message == ""
    assert "kept no state" in resume.plan_without_state((20, 20), more).message


def test_a_local_base_model_edited_in_place_starts_the_run_again(tmp_path):
    """The workflow reruns the train job when a local pretrained folder changes (its digest is
    a param); the checkpoint must not then continue on the old base weights."""
    from snaketune.data.sources import FolderDigests, model_source_digest
    from snaketune.train import resume
    from snaketune.train.settings import ModelSettings, TrainJob, TrainSettings

    folder = tmp_path / "base"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights v1")
    model = ModelSettings(init="pretrained", name_or_path=str(folder))
    digests = FolderDigests(tmp_path / "digests.json")
    before = model_source_digest(model, digests)
    assert before and model_source_digest(ModelSettings(), digests) == ""  # built here
    job = TrainJob("causal_lm", model, TrainSettings(max_steps=20))
    record = resume.record_of(20, job, "data", "shards", before)
    (folder / "model.safetensors").write_bytes(b"weights v2")
    after = model_source_digest(model, digests)
    assert after != before
    assert resume.fingerprint(job, "data", after) != resume.fingerprint(job, "data", before)
    plan = resume.plan(record, job, "data", model_source=after)
    assert not plan.resume and "the content of the local model folder" in plan.message
    assert resume.plan(record, job, "data", model_source=before).resume


def test_the_sigterm_handler_is_installed_for_the_loop_only():
    """Training turns SIGTERM into a checkpoint while it runs; afterwards the process's own
    handler is back (a SIGTERM later in the same process is not swallowed)."""
    import signal

    from snaketune.train.trainer import StopRequested

    def own(signum, frame):
        raise AssertionError("not called")

    before = signal.signal(signal.SIGTERM, own)
    try:
        with StopRequested() as stop:
            assert signal.getsignal(signal.SIGTERM) == stop._handle
        assert signal.getsignal(signal.SIGTERM) is own
        with pytest.raises(RuntimeError), StopRequested():
            raise RuntimeError("a failed step")
        assert signal.getsignal(signal.SIGTERM) is own
    finally:
        signal.signal(signal.SIGTERM, before)


def test_a_checkpoint_of_adapters_keeps_what_trains_and_buffers_only():
    """A frozen base is left out, and so is what a quantized layer adds to its state beside
    its weight (bitsandbytes' absmax, quant_map, SCB: neither parameter nor buffer), which
    loading the state back could not place."""
    from torch import nn

    from snaketune.train.distributed import full_model_state, load_trained_state

    class QuantizedLike(nn.Linear):
        def _save_to_state_dict(self, destination, prefix, keep_vars):
            super()._save_to_state_dict(destination, prefix, keep_vars)
            destination[prefix + "weight.absmax"] = torch.ones(2)

    model = nn.Sequential(QuantizedLike(4, 4), nn.Linear(4, 2), nn.BatchNorm1d(2))
    model[0].requires_grad_(False)
    state = {k: v.clone() for k, v in full_model_state(model).items()}
    assert set(state) == {
        "1.weight",
        "1.bias",
        "2.weight",
        "2.bias",
        "2.running_mean",
        "2.running_var",
        "2.num_batches_tracked",
    }
    load_trained_state(model, {k: v + 1 if v.is_floating_point() else v for k, v in state.items()})
    assert torch.equal(model[1].weight, state["1.weight"] + 1)
    with pytest.raises(RuntimeError, match="missing"):
        load_trained_state(model, {k: v for k, v in state.items() if k != "1.weight"})
