"""Stage 6, train_model: explicit training steps (set up, train, save), resumable at any point.

The data order is a pure function of (seed, step), and a checkpoint holds the model, optimizer,
RNG states, step, history, the learning-rate plan and early-stopping state, so a job killed at
any moment and run again continues from its last checkpoint as if nothing had happened.
Checkpoints live in a state directory that is not a Snakemake output (a failed job's outputs
are deleted; this must survive) and are written to a temporary file and renamed, so a
half-written one is never loaded. A finished run keeps its last checkpoint (keep_final_state),
so raising max_steps continues it; snaketune.train.resume decides what continues and what starts
over. Under `torchrun` the same code trains with DistributedDataParallel: each process takes
its slice of every batch, and process 0 alone writes checkpoints and outputs.

Fused AdamW on every device (one kernel a step), and the loss and gradient norm read from
the device only every train.log_every steps: a step whose values are not finite is skipped on
the device (fused AdamW's found_inf) and stops training at the next read. On a GPU also TF32
matrix products, bf16 autocast (fp16 with a gradient scaler where bf16 is missing) and batches
copied from pinned memory without waiting.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from snaketune import plots
from snaketune.context import IN_PROCESS, JobContext
from snaketune.data.sources import model_source_digest
from snaketune.errors import TrainingError
from snaketune.fileio import atomic_dir, atomic_path, sha256_tree
from snaketune.manifest import OFFLINE, Tracking, stage_manifest
from snaketune.metrics import classification_metrics, perplexity
from snaketune.names import TRAIN, VAL
from snaketune.tasks import Task, task_of
from snaketune.tokenize.shards import TokenizedData
from snaketune.train import (
    attempts,
    compile_cache,
    distributed,
    lean_gpt,
    lm_loss,
    memory_plan,
    resume,
)
from snaketune.train.batches import IGNORED_LABEL, TokenRows, batch_indices
from snaketune.train.checkpoint import (
    last_good,
    load_best,
    load_checkpoint,
    rng_state,
    save_best,
    save_checkpoint,
    set_rng_state,
)
from snaketune.train.devices import Placement, deterministic, place, set_deterministic, to_device
from snaketune.train.models import (
    apply_lora,
    build_model,
    count_parameters,
    is_quantized,
    save_adapter,
    saves_adapter_alone,
    unwrap_for_saving,
)
from snaketune.train.paths import TrainPaths
from snaketune.train.positions import model_positions
from snaketune.train.prefetch import BatchesAhead
from snaketune.train.settings import ModelSettings, TrainJob, TrainSettings
from snaketune.train.system_metrics import sample_system_metrics

log = logging.getLogger(__name__)


@dataclass
class Progress:
    """What the loop carries from step to step and across a resume."""

    step: int = 0
    history: list[dict] | None = None
    best_val: float = math.inf
    best_step: int = 0
    evals_without_improvement: int = 0
    stopped_early: bool = False
    schedule: list[list] = field(default_factory=list)
    """The learning-rate plan: [start, end, lr at start] per part (see learning_rate)."""
    memory_retries: list[dict] = field(default_factory=list)
    """Each step that ran out of memory and was taken again with half the micro-batch: the
    step, and batch_size and grad_accum before and after (see step_within_memory)."""
    micro_batch: dict | None = None
    """batch_size auto: the micro-batch the search before the first step found, and each size
    it tried (see search_micro_batch)."""


# --- set-up ------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def learning_rate(step: int, settings: TrainSettings, schedule: list[list] | None = None) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio * lr at max_steps: a pure function of
    the step, so a checkpoint needs no scheduler state. A run continued from step k to a larger
    max_steps (a schedule part [k, end, lr at k]) decays from the rate it had at k to the same
    floor at its new end; the first part ([0, end, None]) is the warmup and cosine to its end."""
    parts = [p for p in schedule or [[0, settings.max_steps, None]] if p[0] <= step]
    start, end, first_lr = parts[-1]
    floor = settings.lr * settings.min_lr_ratio
    if first_lr is None:
        if step < settings.warmup_steps:
            return settings.lr * (step + 1) / settings.warmup_steps
        start, first_lr = settings.warmup_steps, settings.lr
    progress = min(1.0, (step - start) / max(1, end - start))
    return floor + 0.5 * (first_lr - floor) * (1 + math.cos(math.pi * progress))


def continued_schedule(schedule: list[list], step: int, settings: TrainSettings) -> list[list]:
    """The plan for a run at `step` going on to settings.max_steps."""
    schedule = schedule or [[0, settings.max_steps, None]]
    if schedule[-1][1] == settings.max_steps:
        return schedule
    return [*schedule, [step, settings.max_steps, learning_rate(step, settings, schedule)]]


def make_optimizer(model: torch.nn.Module, settings: TrainSettings) -> torch.optim.Optimizer:
    # No weight decay on biases and norm weights (1-D parameters), as in GPT-2 recipes.
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": settings.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # fused: one kernel per step instead of a loop over the parameters (5x faster a step on
    # the CPU too: 0.5 ms vs 2.4 ms for a 2 x 128 GPT-2), and an update the device itself
    # skips when told of a non-finite value.
    return torch.optim.AdamW(groups, lr=settings.lr, betas=(0.9, 0.95), fused=True)


# --- the loop ----------------------------------------------------------------------------------


class StopRequested:
    """Turns SIGTERM (what a cluster sends before its time limit) into a checkpoint and exit,
    while the training loop runs: the handler before it is back when the loop ends, however it
    ends (a process that trains in-process, such as a test run, keeps its own)."""

    def __init__(self) -> None:
        self.requested = False
        self.previous = None

    def __enter__(self) -> StopRequested:
        self.previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGTERM, self.previous)

    def _handle(self, signum, frame) -> None:
        self.requested = True


def forward(model, batch: dict[str, torch.Tensor], placement: Placement):
    inputs = to_device(batch, placement)
    if "position_ids" in inputs:  # packed examples: transformers masks them apart without a cache
        inputs["use_cache"] = False
    with placement.autocasting():
        return model(**inputs)


@dataclass
class Run:
    """Everything one training run needs inside the loop."""

    model: torch.nn.Module
    """The module whose weights are saved (unwrapped)."""
    step_model: torch.nn.Module
    """What the steps call: the model, possibly compiled and wrapped in DDP."""
    optimizer: torch.optim.Optimizer
    train: TokenRows
    val: TokenRows
    job: TrainJob
    state_dir: Path
    data_digest: str
    placement: Placement
    world: distributed.World
    scaler: torch.amp.GradScaler | None = None
    label_names: list[str] = field(default_factory=list)
    micro_batch: tuple[int, int] | None = None
    """(batch_size, grad_accum) after an out-of-memory retry; None: the configured ones."""
    data_folder: str = ""
    """The shards' folder, as the job was given it (snaketune.train.resume records it)."""
    model_source: str = ""
    """The content digest of a local pretrained model folder ("" for any other model): an edit
    in place starts the run again (snaketune.train.resume)."""
    loss: str = lm_loss.OWN_FORWARD
    """How the steps compute the loss (snaketune.train.lm_loss), for the manifest."""
    scorer: torch.nn.Module | None = None
    """The causal LM validation scores with: compiled with train.compile (lm_loss.scoring)."""
    ahead: BatchesAhead | None = None
    """The train micro-batches, each made while the one before it trains."""

    def __post_init__(self) -> None:
        if self.ahead is None:
            self.ahead = BatchesAhead(self.train, self.placement)

    @property
    def settings(self) -> TrainSettings:
        return self.job.train

    @property
    def batch_shape(self) -> tuple[int, int]:
        """Rows per micro-batch and micro-batches per step, as the steps take them now."""
        return self.micro_batch or self.settings.configured_shape

    @property
    def device(self) -> torch.device:
        return self.placement.device


def backward(run: Run, loss: torch.Tensor) -> None:
    (run.scaler.scale(loss) if run.scaler else loss).backward()


def micro_batch_rows(run: Run, step: int, micro: int) -> np.ndarray:
    """The train rows of micro-batch `micro` of step `step` (batches.batch_indices)."""
    s, world = run.settings, run.world
    batch_size, grad_accum = run.batch_shape
    return batch_indices(
        step, micro, batch_size, grad_accum, s.seed, len(run.train), world.size, world.rank
    )


def next_micro_batch(run: Run, step: int, micro: int) -> tuple[tuple, np.ndarray] | None:
    """The key and rows of the micro-batch after this one (None after the last step's last),
    for snaketune.train.prefetch to make while this one trains."""
    batch_size, grad_accum = run.batch_shape
    step, micro = (step, micro + 1) if micro + 1 < grad_accum else (step + 1, 0)
    if step >= run.settings.max_steps:
        return None
    return (step, micro, batch_size), micro_batch_rows(run, step, micro)


def one_step(run: Run, step: int, schedule: list[list]) -> tuple[dict, torch.Tensor]:
    """Step `step`: its history row, and its loss and gradient norm still on the device."""
    s, world = run.settings, run.world
    lr = learning_rate(step, s, schedule)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    loss_sum, tokens = torch.zeros((), device=run.device), 0
    batch_size, grad_accum = run.batch_shape
    for micro in range(grad_accum):
        batch, batch_tokens = run.ahead.take(
            (step, micro, batch_size),
            micro_batch_rows(run, step, micro),
            next_micro_batch(run, step, micro),
        )
        tokens += batch_tokens
        with distributed.no_sync_unless(run.step_model, micro == grad_accum - 1):
            loss = forward(run.step_model, batch, run.placement).loss / grad_accum
            backward(run, loss)
        loss_sum += loss.detach().float()
    loss_sum = distributed.mean(loss_sum)
    if run.scaler:
        run.scaler.unscale_(run.optimizer)
    grad_norm = distributed.local(
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), s.grad_clip)
    )
    reading = torch.stack([loss_sum, grad_norm.float()])
    update(run, reading)
    row = {"step": step + 1, "lr": lr, "tokens": tokens * world.size}
    return row, reading


def update(run: Run, reading: torch.Tensor) -> None:
    """The optimizer step, never with a loss or gradient that is not finite: fused AdamW skips
    the update on the device when told of a non-finite value (found_inf, as GradScaler tells
    it), so the host need not wait for a GPU; the next read stops training."""
    if run.scaler:  # fp16: the scaler skips steps whose gradients overflowed, on the device
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.found_inf = (~torch.isfinite(reading).all()).float()
        run.optimizer.step()
        del run.optimizer.found_inf
    run.optimizer.zero_grad(set_to_none=True)


def refuse_non_finite(run: Run, step: int, loss: float, grad_norm: float) -> None:
    # A scaled fp16 step whose gradients overflowed is skipped by the scaler, as it should be.
    if not math.isfinite(loss) or not (math.isfinite(grad_norm) or run.scaler):
        # The weights, checkpoints and outputs never hold a NaN: no update was made with it.
        raise TrainingError(
            f"loss {loss} (gradient norm {grad_norm}) at step {step}; training stopped "
            f"before updating the weights with it and saved no model; {last_good(run.state_dir)}. "
            "Lower train.lr or check the data (changed settings start again from step 0)."
        )


@dataclass
class Unread:
    """Steps taken since the last read from the device: their rows and device-side values."""

    rows: list[dict] = field(default_factory=list)
    readings: list[torch.Tensor] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)

    def read(self, run: Run) -> list[dict]:
        """The rows with their loss, gradient norm and tokens/s (over the steps since the last
        read: the host's clock per step would time the queueing, not the GPU's work)."""
        values = torch.stack(self.readings).tolist()  # the one wait for the device
        read_at = round(time.time(), 3)
        seconds = max(time.perf_counter() - self.started, 1e-9)
        tokens_per_s = sum(row.pop("tokens") for row in self.rows) / seconds
        rows = []
        for row, (loss, grad_norm) in zip(self.rows, values, strict=True):
            refuse_non_finite(run, row["step"], loss, grad_norm)
            step, lr = row["step"], row["lr"]
            rows.append(
                {
                    "step": step,
                    "loss": loss,
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "tokens_per_s": tokens_per_s,
                    "timestamp": read_at,
                }
            )
        self.rows, self.readings, self.started = [], [], time.perf_counter()
        return rows


def is_out_of_memory(err: BaseException) -> bool:
    """CUDA, CPU (torch) and numpy say it differently."""
    if isinstance(err, torch.OutOfMemoryError | MemoryError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(
        sign in text for sign in ("out of memory", "can't allocate memory")
    )


def step_within_memory(run: Run, step: int, progress: Progress) -> tuple[dict, torch.Tensor]:
    """Step `step`; one that runs out of memory is taken again with a micro-batch smaller by its
    smallest factor (half, for an even one) and as many times more micro-batches: the same
    examples per step, so the same trajectory. Up to train.memory_retries times, each recorded
    in progress.memory_retries. With several processes the others would wait for the one that
    failed, so there it is an error at once."""
    while True:
        try:
            return one_step(run, step, progress.schedule)
        except (RuntimeError, MemoryError) as err:
            if not is_out_of_memory(err):
                raise
            batch_size, grad_accum = run.batch_shape
            retried = len(progress.memory_retries)
            if batch_size == 1 or run.world.size > 1 or retried >= run.settings.memory_retries:
                raise out_of_memory(run, step, err, retried) from err
            run.optimizer.zero_grad(set_to_none=True)  # the partial step's gradients
            del err
            if run.device.type == "cuda":
                torch.cuda.empty_cache()
            factor = smallest_factor(batch_size)
            run.micro_batch = (batch_size // factor, grad_accum * factor)
            progress.memory_retries.append(
                {
                    "step": step + 1,
                    "cause": "out of memory",
                    "batch_size": [batch_size, run.micro_batch[0]],
                    "grad_accum": [grad_accum, run.micro_batch[1]],
                }
            )
            log.warning(
                "out of memory at step %d: taking it again with batch_size %d x grad_accum %d "
                "(was %d x %d)",
                step + 1,
                *run.micro_batch,
                batch_size,
                grad_accum,
            )


def smallest_factor(n: int) -> int:
    return next(f for f in range(2, n + 1) if n % f == 0)


def out_of_memory(run: Run, step: int, err: BaseException, retried: int) -> TrainingError:
    """Advice on the batch settings for a step that cannot allocate its activations."""
    text = str(err) or type(err).__name__
    batch_size, grad_accum = run.batch_shape
    after = f" (after {retried} retries with a smaller micro-batch)" if retried else ""
    return TrainingError(
        f"out of memory at step {step + 1} on {run.device} with train.batch_size="
        f"{batch_size} and train.grad_accum={grad_accum}{after}: divide batch_size and "
        f"multiply grad_accum by the same factor (the batch per step, {batch_size * grad_accum}, "
        "stays the same), or lower tokenize.block_size / max_length; "
        f"{last_good(run.state_dir)}. ({text.splitlines()[0]})"
    )


@torch.no_grad()
def validate(run: Run) -> dict[str, float]:
    """Loss on the validation split's first eval_rows rows (all of them when fewer), weighted
    by the targets of each batch; with it the perplexity (LM) or accuracy and macro-F1."""
    rows = min(len(run.val), run.settings.eval_rows)
    batch_size = run.batch_shape[0]
    batches = (
        run.val.batch(np.arange(start, min(rows, start + batch_size)))
        for start in range(0, rows, batch_size)
    )
    run.model.eval()
    measure = validate_lm if task_of(run.job.task).predicts_tokens else validate_classifier
    metrics = measure(run, batches, rows)
    run.model.train()
    return metrics


def validate_lm(run: Run, batches: Iterator[dict], rows: int) -> dict[str, float]:
    nll = torch.zeros((), dtype=torch.float64, device=run.device)
    targets = 0
    for batch in batches:
        nll += lm_nll_sum(run.scorer or run.model, batch, run.placement)
        targets += int((batch["labels"][:, 1:] != IGNORED_LABEL).sum())
    loss = mean_loss(nll, targets)
    return {"val_loss": loss, "val_perplexity": perplexity(float(nll), targets)}


def validate_classifier(run: Run, batches: Iterator[dict], rows: int) -> dict[str, float]:
    nll = torch.zeros((), dtype=torch.float64, device=run.device)
    targets, predicted = 0, []
    for batch in batches:
        out = forward(run.model, batch, run.placement)
        predicted.append(out.logits.argmax(-1))
        nll += out.loss.double() * len(batch["labels"])
        targets += len(batch["labels"])
    loss = mean_loss(nll, targets)
    predictions = torch.cat(predicted).cpu().numpy()
    scores = classification_metrics(predictions, run.val.labels()[:rows], run.label_names)
    return {
        "val_loss": loss,
        "val_accuracy": scores["accuracy"],
        "val_macro_f1": scores["macro_f1"],
    }


def mean_loss(nll: torch.Tensor, targets: int) -> float:
    if not targets:
        raise TrainingError(
            "the validation split has no token to predict (every row is shorter than two "
            "tokens): a val_loss would be 0 for nothing; use longer documents or "
            "tokenize.packing: across_documents"
        )
    return float(nll) / targets


def lm_nll_sum(model, batch: dict[str, torch.Tensor], placement: Placement) -> torch.Tensor:
    """The summed NLL of a batch's labelled next tokens, on the device (snaketune.train.lm_loss: no
    whole logits tensor where the model's head allows)."""
    inputs = dict(to_device(batch, placement))
    labels = inputs.pop("labels")
    targets = lm_loss.next_token_targets(labels)
    with placement.autocasting():
        nll, _ = lm_loss.target_scores(model, targets=targets.clamp(min=0), **inputs)
    return (nll.double() * (targets != IGNORED_LABEL)).sum()


def evaluate_and_track_best(run: Run, progress: Progress, row: dict) -> None:
    row.update(validate(run))
    log.info("step %d loss %.4f val_loss %.4f", row["step"], row["loss"], row["val_loss"])
    if row["val_loss"] < progress.best_val:
        progress.best_val, progress.best_step = row["val_loss"], row["step"]
        progress.evals_without_improvement = 0
        if run.settings.early_stopping_patience and run.world.is_main:
            save_best(run.state_dir, run.model)
    else:
        progress.evals_without_improvement += 1
        patience = run.settings.early_stopping_patience
        progress.stopped_early = bool(patience) and progress.evals_without_improvement >= patience


def checkpoint(run: Run, progress: Progress) -> None:
    # Every process's random state (dropout), so that a resumed run draws what each would have;
    # the whole model and optimizer state, gathered from the shards under FSDP.
    states = distributed.gathered(rng_state(), run.world)
    model_state = distributed.full_model_state(run.model)
    optimizer_state = distributed.full_optimizer_state(run.model, run.optimizer)
    if run.world.is_main:
        state = asdict(progress)
        state.update(
            fingerprint=resume.fingerprint(run.job, run.data_digest, run.model_source),
            model=model_state,
            optimizer=optimizer_state,
            scaler=run.scaler.state_dict() if run.scaler else {},
            rng_per_process=states if run.world.size > 1 else [],
        )
        save_checkpoint(run.state_dir, state, run.settings.keep_checkpoints)
        resume.write_record(
            run.state_dir,
            progress.step,
            run.job,
            run.data_digest,
            run.data_folder,
            run.model_source,
        )
    distributed.barrier()


def read_now(run: Run, step: int) -> bool:
    """Steps after which the loss is read: every log_every steps and wherever the loop needs
    it (evaluation, checkpoint, the last step)."""
    s = run.settings
    return (
        step % s.log_every == 0
        or step % s.eval_every == 0
        or step % s.checkpoint_every == 0
        or step == s.max_steps
    )


def train_steps(run: Run, progress: Progress, tracker: Tracking = OFFLINE) -> Progress:
    """Train until max_steps, early stopping or a stop asked from outside; each step's values
    go to `tracker` (the stage's live run: process 0's)."""
    try:
        with StopRequested() as stop:
            return steps_until_done(run, progress, stop, tracker)
    finally:
        run.ahead.close()


def steps_until_done(
    run: Run, progress: Progress, stop: StopRequested, tracker: Tracking
) -> Progress:
    from tqdm import tqdm

    s = run.settings
    unread = Unread()
    run.step_model.train()
    steps = range(progress.step, s.max_steps)
    for step in tqdm(
        steps,
        initial=progress.step,
        total=s.max_steps,
        desc="train",
        mininterval=5,
        disable=not run.world.is_main,
    ):
        row, reading = step_within_memory(run, step, progress)
        unread.rows.append(row)
        unread.readings.append(reading)
        if not read_now(run, row["step"]):
            continue
        rows = unread.read(run)
        progress.history.extend(rows)
        progress.step, row = rows[-1]["step"], rows[-1]
        if progress.step % s.eval_every == 0 or progress.step == s.max_steps:
            evaluate_and_track_best(run, progress, row)
        tracker.log_rows(rows)  # queued; never waits for the server
        # Asked of every process at once (SIGTERM may reach only some); a read point already
        # waited for the device.
        stopping = distributed.any_rank(stop.requested, run.device)
        if progress.step % s.checkpoint_every == 0 or stopping:
            checkpoint(run, progress)
        if stopping:
            raise SystemExit(
                f"SIGTERM received: checkpoint saved at step {progress.step}; rerun to resume"
            )
        if progress.stopped_early:
            log.info(
                "early stopping at step %d: best val_loss %.4f at step %d",
                progress.step,
                progress.best_val,
                progress.best_step,
            )
            break
    return progress


# --- set up, train, save -----------------------------------------------------------------------


def check_positions(model, context: int, settings: ModelSettings) -> None:
    """Rows longer than the model has positions for would fail inside its forward pass."""
    positions = model_positions(model)
    if positions is not None and context > positions:
        raise TrainingError(
            f"rows of {context} tokens, but model {settings.name_or_path or settings.arch!r} has "
            f"positions for {positions}: set tokenize.block_size (or max_length) to at most "
            f"{positions}"
        )


@torch.no_grad()
def check_examples_apart(model, vocab_size: int, placement: Placement) -> None:
    """Packed instruction examples (and documents_apart) are kept apart by position ids that
    restart per example (snaketune.train.batches); a model family whose attention ignores them would
    let each answer see the examples before it. Checked with one forward pass of two examples
    in a row against the second alone, before the first step."""
    ids = torch.arange(1, 13)[None] % vocab_size
    positions = torch.cat([torch.arange(5), torch.arange(7)])[None]
    was_training = model.training
    model.eval()
    try:
        packed = forward(model, {"input_ids": ids, "position_ids": positions}, placement)
        alone = forward(model, {"input_ids": ids[:, 5:]}, placement)
    finally:
        model.train(was_training)
    packed_logits, alone_logits = packed.logits[:, 5:].float(), alone.logits.float()
    scale = float(alone_logits.abs().max().clamp(min=1.0))
    # Loose enough for bf16 and other kernels on the two lengths; a model that attends
    # across examples is off by far more.
    if not torch.allclose(packed_logits, alone_logits, rtol=2e-2, atol=2e-2 * scale):
        raise TrainingError(
            f"model {type(model).__name__} lets a packed example attend to the examples before "
            "it (its attention ignores the position ids that restart per example), so each "
            "answer would be trained on text that is not its prompt: set tokenize.packing: "
            "per_document"
        )


def row_context(task: Task, data: TokenizedData, train: TokenRows) -> int:
    """The positions the model is built for: a language model's block_size (which rows of one
    document each may all fall short of), a classifier's widest train row."""
    return data.block_size if task.predicts_tokens else train.width()


def prepare_run(
    data: TokenizedData, state_dir: Path, job: TrainJob, world: distributed.World
) -> Run:
    settings, model_settings, task = job.train, job.model, task_of(job.task)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    placement = place(settings.device, settings.precision, world.local_rank)
    set_deterministic(deterministic(settings.deterministic, placement), bool(settings.compile_mode))
    seed_everything(settings.seed)
    train, val = TokenRows.open(data, TRAIN), TokenRows.open(data, VAL)
    if task.predicts_tokens:
        train, val = train.with_targets(), val.with_targets()
    context = row_context(task, data, train)
    model = build_model(
        model_settings,
        job.task,
        data.vocab_size,
        context,
        data.pad_token_id,
        data.eos_token_id,
        data.label_names,
        placement.device.type,
    )
    check_positions(model, context, model_settings)
    if model_settings.gradient_checkpointing:
        # Non-reentrant: the recomputation sees the same dropout masks (the RNG state is
        # replayed) and works with LoRA's frozen inputs.
        model.activation_checkpointing_enable({"use_reentrant": False})
    model = apply_lora(model, model_settings, job.task)
    if not is_quantized(model):  # quantized weights are placed on their GPU as they load
        model = model.to(placement.device)
    if data.job.keeps_packed_apart:
        check_examples_apart(model, data.vocab_size, placement)
    # DDP: rank 0's weights everywhere; FSDP: every process starts from the same seed. FSDP
    # shards the model itself (its root's forward gathers the head), so it keeps its own loss.
    sharding = world.size > 1 and settings.strategy == distributed.FSDP
    lm = model if not task.predicts_tokens or sharding else lm_loss.with_chunked_loss(model)
    step_model = distributed.wrap(lm, world, placement.device, settings.strategy)
    chunked = lm is not model or hasattr(model, "lm_head_parts")  # wrapped, or the lean GPT
    if world.size > 1:
        seed_everything(distributed.process_seed(settings.seed, world.rank))
    if settings.compile_mode:
        step_model = torch.compile(step_model, mode=settings.compile_mode)
    return Run(
        model=model,
        step_model=step_model,
        optimizer=make_optimizer(model, settings),
        train=train,
        val=val,
        job=job,
        state_dir=state_dir,
        data_digest=sha256_tree(data.shards),
        data_folder=str(data.shards),
        model_source=model_source_digest(model_settings),
        placement=placement,
        world=world,
        scaler=torch.amp.GradScaler("cuda") if placement.scaled else None,
        label_names=data.label_names,
        loss=lm_loss.CHUNKED if chunked else lm_loss.OWN_FORWARD,
        scorer=lm_loss.scoring(model, settings.compile_mode) if task.predicts_tokens else None,
    )


def resume_run(run: Run) -> Progress:
    """The progress to train from (the checkpoint's, when resume.py says it continues),
    with the micro-batch of batch_size auto: searched for once per run, before its first step."""
    progress = resumed_progress(run)
    if not run.settings.searches_micro_batch or run.world.size > 1:
        return progress
    if progress.micro_batch is None:
        progress.micro_batch = search_micro_batch(run)
        log.info(
            "batch_size auto: micro-batches of %d rows x grad_accum %d (tried %s)",
            progress.micro_batch["batch_size"],
            progress.micro_batch["grad_accum"],
            progress.micro_batch["tried"],
        )
    if not progress.memory_retries:  # a retry after the search is the micro-batch that fitted
        run.micro_batch = (progress.micro_batch["batch_size"], progress.micro_batch["grad_accum"])
    return progress


def search_micro_batch(run: Run) -> dict:
    """The largest micro-batch that fits, for batch_size auto: grad_accum is the examples per
    step, and each of its divisors from 2 up is tried with the widest train rows (a forward and
    backward pass of the uncompiled model, its gradients then dropped, beside a reserve of the
    optimizer moments' size, which the first step will allocate), doubling until one does not
    fit, then bisecting between the last that fitted and it. On the CPU a size whose memory,
    extrapolated from the sizes tried, would pass 80% of the memory available does not fit
    either (the kernel would kill the process, not raise). The random state is restored after,
    and the peak memory reset, so the run takes (and records) the steps a run configured with
    the result would. One row is taken to fit (the first step, and memory_retries, say
    otherwise)."""
    examples = run.settings.grad_accum
    sizes = [d for d in range(1, min(examples, len(run.train)) + 1) if examples % d == 0]
    widest = np.argsort(-run.train.lengths(), kind="stable")
    tried: dict[int, bool] = {}
    host = None if run.placement.cuda else HostMemory(available_bytes())

    def fits(index: int) -> bool:
        rows = sizes[index]
        fitted = host is None or host.allows(rows)
        fitted = fitted and micro_batch_fits(run, run.train.batch(widest[:rows]), host, rows)
        tried[rows] = fitted
        return fitted

    random_state = rng_state()
    try:
        fitted, failed, index = 0, len(sizes), 1
        while index < len(sizes) and fits(index):
            fitted = index
            index = next((i for i, d in enumerate(sizes) if d >= 2 * sizes[index]), len(sizes))
        failed = min(index, failed)
        while failed - fitted > 1:
            middle = (fitted + failed) // 2
            fitted, failed = (middle, failed) if fits(middle) else (fitted, middle)
    finally:
        set_rng_state(random_state)
        reset_peak_memory(run)
    rows = sizes[fitted]
    return {
        "batch_size": rows,
        "grad_accum": examples // rows,
        "tried": [{"batch_size": r, "fits": ok} for r, ok in sorted(tried.items())],
    }


class HostMemory:
    """The CPU's side of the search: how much a micro-batch's pass takes, per row, from the
    sizes tried, against the memory the kernel says is available."""

    def __init__(self, available: int):
        self.available = available
        self.per_row = 0.0

    def allows(self, rows: int) -> bool:
        return not self.available or rows * self.per_row <= 0.8 * self.available

    def measured(self, rows: int, peak_above: int) -> None:
        self.per_row = max(self.per_row, peak_above / rows)


def available_bytes() -> int:
    """MemAvailable from /proc/meminfo (0 where the kernel does not say)."""
    meminfo = Path("/proc/meminfo")
    lines = meminfo.read_text().splitlines() if meminfo.exists() else []
    return next((int(x.split()[1]) * 1024 for x in lines if x.startswith("MemAvailable:")), 0)


def reset_peak_memory(run: Run) -> None:
    """The peak memory counted from now: CUDA's allocator peak, or the process's resident peak
    (VmHWM, which /proc/self/clear_refs resets to the current resident memory)."""
    if run.placement.cuda:
        torch.cuda.reset_peak_memory_stats(run.device)
        return
    clear = Path("/proc/self/clear_refs")
    if clear.exists():
        clear.write_text("5")


def micro_batch_fits(
    run: Run, batch: dict[str, torch.Tensor], host: HostMemory | None = None, rows: int = 0
) -> bool:
    """Whether one micro-batch's forward and backward pass runs within the device's memory,
    with the optimizer's moments (two fp32 values per trained parameter) reserved beside it;
    its gradients are dropped either way. The eager model is tried: compiling each size would
    leave training a graph made for shapes of every size."""
    eager = getattr(run.step_model, "_orig_mod", run.step_model)
    trained = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
    run.model.train()
    reset_peak_memory(run)
    before = resident_bytes("VmRSS")
    reserve = None
    try:
        reserve = torch.zeros(2 * trained, dtype=torch.float32, device=run.device)
        backward(run, forward(eager, batch, run.placement).loss)
        if host is not None:
            host.measured(rows, resident_bytes("VmHWM") - before - reserve.nbytes)
        return True
    except (RuntimeError, MemoryError) as err:
        if not is_out_of_memory(err):
            raise
        return False
    finally:
        del reserve
        run.optimizer.zero_grad(set_to_none=True)
        if run.device.type == "cuda":
            torch.cuda.empty_cache()


def resumed_progress(run: Run) -> Progress:
    """The checkpoint's progress, when resume.py says it continues, else a fresh one."""
    run.state_dir.mkdir(parents=True, exist_ok=True)
    distributed.barrier()
    fingerprint = resume.fingerprint(run.job, run.data_digest, run.model_source)
    state = load_checkpoint(run.state_dir, fingerprint)
    record = resume.read_record(run.state_dir)
    if state is not None and (record is None or record["step"] != state["step"]):
        # Killed between writing the checkpoint and its record: the checkpoint's fingerprint
        # matched, so it is this run's; plan from what it holds, not from the stale record.
        record = resume.record_of(
            state["step"], run.job, run.data_digest, run.data_folder, run.model_source
        )
        record["max_steps"] = state["schedule"][-1][1]  # the end it was training towards
    plan = resume.plan(record, run.job, run.data_digest, model_source=run.model_source)
    if plan.message:
        log.warning("training %s", plan.message)
    if state is None or not plan.resume:
        return Progress(history=[], schedule=[[0, run.settings.max_steps, None]])
    # A run that trained as transformers' GPT-2 before scratch GPT-2 became the lean module.
    optimizer_state = lean_gpt.adopt_optimizer_state(
        run.model, run.optimizer, state["model"], state["optimizer"]
    )
    distributed.load_full_state(run.model, run.optimizer, state["model"], optimizer_state)
    if run.scaler and state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    restore_rng(state, run.world)
    log.info("resumed from checkpoint at step %d", state["step"])
    progress = Progress(**{k: state[k] for k in asdict(Progress()) if k in state})
    if progress.memory_retries:  # the micro-batch that fitted, not the one that did not
        last = progress.memory_retries[-1]
        run.micro_batch = (last["batch_size"][1], last["grad_accum"][1])
    progress.schedule = continued_schedule(progress.schedule, progress.step, run.settings)
    if progress.step < run.settings.max_steps:
        progress.stopped_early = False  # more steps asked for: patience counts from here
    return progress


def restore_rng(state: dict, world: distributed.World) -> None:
    """This process's random state from the checkpoint (process 0's for one process)."""
    per_process = state.get("rng_per_process") or []
    if world.size > 1 and len(per_process) == world.size:
        set_rng_state(per_process[world.rank])
        return
    set_rng_state(state["rng"])
    if world.size > 1:
        log.warning(
            "the checkpoint holds the random state of %d process(es), not of these %d: the "
            "other processes' dropout continues from process 0's state, so the run is no longer "
            "the uninterrupted one",
            max(len(per_process), 1),
            world.size,
        )


def train_model(paths: TrainPaths, job: TrainJob, context: JobContext = IN_PROCESS) -> list[dict]:
    world = distributed.start()
    if world.size > 1:  # where each process runs: which agent (node) and which rendezvous
        log.info(
            "process %d of %d on %s: node rank %s, rendezvous %s",
            world.rank,
            world.size,
            socket.gethostname(),
            os.environ.get("GROUP_RANK", "?"),
            os.environ.get("TORCHELASTIC_RUN_ID", "?"),
        )
    try:
        if not world.is_main:  # other processes train; process 0 alone writes
            data = TokenizedData.read(paths.tokenize_manifest, paths.shards)
            run = prepare_run(data, paths.state_dir, job, world)
            progress = train_steps(run, resume_run(run))
            final_state(run, progress)  # its part of the last checkpoint and of the weights
            return progress.history
        with attempts.attempt(paths.state_dir, context.attempt) as this_attempt:
            return train_as_main(paths, job, world, this_attempt, context)
    finally:
        distributed.stop()


def final_state(run: Run, progress: Progress) -> dict:
    """On every process (both are collectives): the last checkpoint, when the last step was not
    one and the final state is kept, and the whole weights for process 0 to save."""
    last = resume.read_record(run.state_dir)
    if run.settings.keep_final_state and (last or {}).get("step") != progress.step:
        checkpoint(run, progress)
    return distributed.full_model_state(run.model)


def train_as_main(
    paths: TrainPaths,
    job: TrainJob,
    world: distributed.World,
    this_attempt: dict,
    context: JobContext,
) -> list[dict]:
    data = TokenizedData.read(paths.tokenize_manifest, paths.shards)
    before_model = resident_bytes("VmRSS")  # what the process held before the model
    run = prepare_run(data, paths.state_dir, job, world)
    with stage_manifest(paths, job, context=context, known={"shards": run.data_digest}) as record:
        progress = resume_run(run)
        resumed_from = progress.step
        footprint = parameter_footprint(run.model)  # before save_final merges any adapter
        log.info(
            "training %s (%d parameters) on %s x%d from step %d",
            job.model.arch,
            count_parameters(run.model),
            run.placement.describe(),
            world.size,
            resumed_from,
        )
        with sample_system_metrics(paths.system_metrics, run.device, record.tracker):
            progress = train_steps(run, progress, record.tracker)
        weights = final_state(run, progress)  # before save_final, which merges LoRA in
        if job.train.early_stopping_patience and progress.best_step:
            load_best(paths.state_dir, run.model)  # the best evaluated weights are the result
            weights = None
        adapter_alone = saves_adapter_alone(job.model, job.task, run.model)
        save_final(run.model, progress.history, paths, weights, adapter_alone and run)
        record.counts = {
            "parameters": count_parameters(run.model),
            "steps": progress.step,
            "resumed_from_step": resumed_from,
            "train_rows": len(run.train),
            "best_val_loss": progress.best_val if math.isfinite(progress.best_val) else None,
            "best_step": progress.best_step,
            "stopped_early": progress.stopped_early,
            "processes": world.size,
            "memory_retries": len(progress.memory_retries),
            "trainable_parameters": footprint["trainable"],
        }
        record.extra.update(
            {
                "device": str(run.device),
                # The devices the job was given (snaketune.gpus, or SLURM); None: all.
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "autocast": str(run.placement.autocast),
                # Activations recomputed in the backward pass (model.gradient_checkpointing).
                "activation_checkpointing": bool(
                    getattr(run.model, "is_activation_checkpointing", False)
                ),
                # The loss: a chunk of positions at a time, or the model's own forward.
                "loss": run.loss,
                # Packed instruction examples (or documents_apart): position ids restart per
                # example, attention stays within each (snaketune.train.batches).
                "packed_examples_kept_apart": data.job.keeps_packed_apart,
                # The family trained (the checkpoint's, for a pretrained model).
                "model_type": getattr(getattr(run.model, "config", None), "model_type", "lstm"),
                "parameter_bytes_by_dtype": footprint["bytes_by_dtype"],
                # The estimate made before any job (snaketune.train.memory_plan), and what was used.
                "memory": memory_used(run, data, before_model),
                # model/ holds the adapter alone (with its base's identity) or a whole model.
                "saved_model": "adapter" if adapter_alone else "whole",
                "fingerprint": resume.fingerprint(job, run.data_digest),
                "schedule": progress.schedule,
                # What each out-of-memory retry changed (empty: none was needed).
                "memory_retries": progress.memory_retries,
                # batch_size auto: the micro-batch found before the first step (None: given).
                "micro_batch": progress.micro_batch,
                # train.compile: the graphs found in the compile cache and those compiled.
                "compile_cache": compile_cache.usage() if job.train.compile else None,
                # Which attempt this was, and why the one before it stopped (attempts).
                **this_attempt,
            }
        )
    if not job.train.keep_final_state:
        shutil.rmtree(paths.state_dir, ignore_errors=True)
    return progress.history


def memory_used(run: Run, data: TokenizedData, before_model: int) -> dict:
    """The planned and the measured peak memory of this process's training, in GB: on CUDA the
    allocator's peak reserved memory, on the CPU the process's peak resident memory above what
    it held before the model was built (the interpreter and its libraries)."""
    job = run.job
    context = row_context(task_of(job.task), data, run.train)
    shape = memory_plan.job_shape(asdict(job.model), data.vocab_size, context)
    # The plan of the micro-batch that trained (after a search or out-of-memory retries).
    train = {**asdict(job.train), "batch_size": run.batch_shape[0]}
    planned = shape and memory_plan.plan(
        shape, asdict(job.model), train, context, run.placement.cuda
    )
    if run.placement.cuda:
        peak = torch.cuda.max_memory_reserved(run.device)
    else:
        peak = resident_bytes("VmHWM") - before_model
    return {
        "planned_gb": round(planned.total / memory_plan.GB, 3) if planned else None,
        "peak_gb": round(peak / memory_plan.GB, 3),
        "measured": "peak reserved (CUDA)"
        if run.placement.cuda
        else "peak resident above the process before the model",
    }


def resident_bytes(field: str) -> int:
    """The process's resident memory now (VmRSS) or at its peak (VmHWM); 0 where the kernel
    does not say (not Linux)."""
    status = Path("/proc/self/status")
    lines = status.read_text().splitlines() if status.exists() else []
    return next((int(x.split()[1]) * 1024 for x in lines if x.startswith(field + ":")), 0)


def parameter_footprint(model: torch.nn.Module) -> dict:
    """Trainable parameters, and the bytes of all parameters by dtype (each counted once)."""
    unique = {id(p): p for p in model.parameters()}.values()
    by_dtype: dict[str, int] = {}
    for param in unique:
        name = str(param.dtype).removeprefix("torch.")
        by_dtype[name] = by_dtype.get(name, 0) + param.numel() * param.element_size()
    trainable = sum(p.numel() for p in unique if p.requires_grad)
    return {"trainable": trainable, "bytes_by_dtype": dict(sorted(by_dtype.items()))}


def limit_tokenizer_length(model_dir: Path, positions: int | None) -> None:
    """The saved tokenizer's model_max_length becomes the model's positions, so that whatever
    loads the folder (a served pipeline, say) knows how long an input may be."""
    config_path = Path(model_dir) / "tokenizer_config.json"
    if positions is None or not config_path.exists():
        return
    config = json.loads(config_path.read_text())
    if config.get("model_max_length", positions + 1) > positions:
        config["model_max_length"] = positions
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_final(
    model,
    history: list[dict],
    paths: TrainPaths,
    weights: dict | None = None,
    adapter_of: Run | None = None,
):
    """The model as a save_pretrained folder with the tokenizer, the history and the loss
    curve: the adapter alone with its base's identity (`adapter_of`: the run whose adapter it
    is, see models.saves_adapter_alone), or the whole model (its `weights`, gathered from
    FSDP's shards, when given; LoRA adapters merged in)."""
    with atomic_dir(paths.model) as tmp:
        if adapter_of:
            save_adapter(model, adapter_of.job.model, tmp, adapter_of.model_source)
            plain = model.get_base_model()
        elif weights is not None and distributed.sharded(model):
            model.save_pretrained(tmp, state_dict=weights)
            plain = model
        else:
            plain = unwrap_for_saving(model).to("cpu")
            plain.save_pretrained(tmp)
        for item in Path(paths.tokenizer).iterdir():
            shutil.copy2(item, tmp / item.name)
        limit_tokenizer_length(tmp, model_positions(plain))
    with atomic_path(paths.history) as tmp:
        tmp.write_text("".join(json.dumps(row) + "\n" for row in history))
    plots.loss_curve(history, paths.loss_curve, "training loss")
