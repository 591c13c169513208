"""Stage 6, train_model: explicit training steps (set up, train, save), resumable at any point.

The data order is a pure function of (seed, step), and a checkpoint holds the model, optimizer,
RNG states, step, history and early-stopping state, so a job killed at any moment and run again
continues from its last checkpoint as if nothing had happened. Checkpoints live in a state
directory that is not a Snakemake output (a failed job's outputs are deleted; this must
survive) and are written to a temporary file and renamed, so a half-written one is never
loaded. Under `torchrun` the same code trains with DistributedDataParallel: each process takes
its slice of every batch, and process 0 alone writes checkpoints and outputs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import random
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from snaketune import distributed, plots
from snaketune.batches import Examples, batch_indices, load_examples
from snaketune.checkpoint import (
    last_good,
    load_best,
    load_checkpoint,
    save_best,
    save_checkpoint,
    set_rng_state,
)
from snaketune.errors import TrainingError
from snaketune.fileio import atomic_dir, atomic_path, sha256_tree
from snaketune.manifest import stage_manifest
from snaketune.models import apply_lora, build_model, count_parameters, unwrap_for_saving
from snaketune.names import CAUSAL_LM, TRAIN, VAL
from snaketune.settings import ModelSettings, TrainJob, TrainSettings
from snaketune.stages import TrainPaths
from snaketune.system_metrics import sample_system_metrics
from snaketune.tokenize.shards import TokenizedData

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


# --- set-up ------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(
    settings: TrainSettings, local_rank: int
) -> tuple[torch.device, torch.dtype | None]:
    wants_cuda = settings.device in ("auto", "cuda")
    if settings.device == "cuda" and not torch.cuda.is_available():
        raise TrainingError("train.device is 'cuda' but no CUDA device is visible")
    use_cuda = wants_cuda and torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if settings.precision == "bf16" and device.type != "cuda":
        raise TrainingError(
            "train.precision is 'bf16' (autocast on CUDA) but this job runs on the CPU, in fp32: "
            "set train.precision: auto or fp32, or run the job where a GPU is visible"
        )
    if settings.precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise TrainingError(
            f"train.precision is 'bf16' but {torch.cuda.get_device_name(device)} has no bf16: "
            "set train.precision: fp32 (or auto)"
        )
    autocast = None
    if device.type == "cuda" and settings.precision in ("auto", "bf16"):
        # auto on a GPU without bf16 trains in fp32 (and says so in the manifest's autocast)
        autocast = torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return device, autocast


def learning_rate(step: int, settings: TrainSettings) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio * lr at max_steps. A pure function of
    the step, so the schedule needs no state of its own in a checkpoint."""
    if step < settings.warmup_steps:
        return settings.lr * (step + 1) / settings.warmup_steps
    span = max(1, settings.max_steps - settings.warmup_steps)
    progress = min(1.0, (step - settings.warmup_steps) / span)
    floor = settings.lr * settings.min_lr_ratio
    return floor + 0.5 * (settings.lr - floor) * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, settings: TrainSettings) -> torch.optim.Optimizer:
    # No weight decay on biases and norm weights (1-D parameters), as in GPT-2 recipes.
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": settings.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=settings.lr, betas=(0.9, 0.95))


def run_fingerprint(settings: TrainSettings, model: ModelSettings, data_digest: str) -> str:
    blob = json.dumps([asdict(settings), asdict(model), data_digest], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --- the loop ----------------------------------------------------------------------------------


class StopRequested:
    """Turns SIGTERM (what a cluster sends before its time limit) into a checkpoint and exit."""

    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True


@torch.no_grad()
def estimate_loss(model, data: Examples, settings: TrainSettings, device, autocast) -> float:
    model.eval()
    losses = []
    for i in range(min(settings.eval_batches, math.ceil(len(data) / settings.batch_size))):
        index = np.arange(i * settings.batch_size, min(len(data), (i + 1) * settings.batch_size))
        losses.append(forward(model, data.batch(index), device, autocast).loss.item())
    model.train()
    return float(np.mean(losses))


def forward(model, batch: dict[str, torch.Tensor], device, autocast):
    batch = {k: v.to(device) for k, v in batch.items()}
    with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
        return model(**batch)


@dataclass
class Run:
    """Everything one training run needs inside the loop."""

    model: torch.nn.Module
    """The module whose weights are saved (unwrapped)."""
    step_model: torch.nn.Module
    """What the steps call: the model, possibly compiled and wrapped in DDP."""
    optimizer: torch.optim.Optimizer
    train: Examples
    val: Examples
    settings: TrainSettings
    state_dir: Path
    fingerprint: str
    device: torch.device
    autocast: torch.dtype | None
    world: distributed.World


def one_step(run: Run, step: int) -> dict:
    s, world = run.settings, run.world
    lr = learning_rate(step, s)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    loss_sum, tokens = 0.0, 0
    for micro in range(s.grad_accum):
        index = batch_indices(
            step, micro, s.batch_size, s.grad_accum, s.seed, len(run.train), world.size, world.rank
        )
        batch = run.train.batch(index)
        mask = batch.get("attention_mask")
        tokens += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
        with distributed.no_sync_unless(run.step_model, micro == s.grad_accum - 1):
            loss = forward(run.step_model, batch, run.device, run.autocast).loss / s.grad_accum
            loss.backward()
        loss_sum += loss.item()
    loss_sum = distributed.mean(loss_sum, run.device)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(run.model.parameters(), s.grad_clip))
    if not (math.isfinite(loss_sum) and math.isfinite(grad_norm)):
        # Stop before the update: the weights, checkpoints and outputs never hold a NaN.
        raise TrainingError(
            f"loss {loss_sum} (gradient norm {grad_norm}) at step {step + 1}; training "
            f"stopped before updating the weights and saved no model; {last_good(run.state_dir)}. "
            "Lower train.lr or check the data (changed settings start again from step 0)."
        )
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return {
        "step": step + 1,
        "loss": loss_sum,
        "lr": lr,
        "grad_norm": float(grad_norm),
        "tokens": tokens * world.size,
    }


@contextlib.contextmanager
def out_of_memory_advice(run: Run, step: int) -> Iterator[None]:
    """A step that cannot allocate its activations becomes advice on the batch settings."""
    try:
        yield
    except (RuntimeError, MemoryError) as err:  # CUDA, CPU (torch) and numpy say it differently
        text = str(err) or type(err).__name__
        if not isinstance(err, torch.OutOfMemoryError | MemoryError) and not any(
            sign in text for sign in ("out of memory", "can't allocate memory")
        ):
            raise
        s = run.settings
        raise TrainingError(
            f"out of memory at step {step + 1} on {run.device} with train.batch_size="
            f"{s.batch_size} and train.grad_accum={s.grad_accum}: divide batch_size and multiply "
            f"grad_accum by the same factor (the batch per step, {s.batch_size * s.grad_accum}, "
            "stays the same), or lower tokenize.block_size / max_length; "
            f"{last_good(run.state_dir)}. ({text.splitlines()[0]})"
        ) from err


def evaluate_and_track_best(run: Run, progress: Progress, row: dict) -> None:
    row["val_loss"] = estimate_loss(run.model, run.val, run.settings, run.device, run.autocast)
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
    if run.world.is_main:
        state = asdict(progress)
        state.update(
            fingerprint=run.fingerprint,
            model=run.model.state_dict(),
            optimizer=run.optimizer.state_dict(),
        )
        save_checkpoint(run.state_dir, state)
    distributed.barrier()


def train_steps(run: Run, progress: Progress) -> Progress:
    from tqdm import tqdm

    stop = StopRequested()
    s = run.settings
    started = time.perf_counter()
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
        with out_of_memory_advice(run, step):
            row = one_step(run, step)
        elapsed, started = time.perf_counter() - started, time.perf_counter()
        row["tokens_per_s"] = row.pop("tokens") / max(elapsed, 1e-9)
        progress.step = row["step"]
        if progress.step % s.eval_every == 0 or progress.step == s.max_steps:
            evaluate_and_track_best(run, progress, row)
        progress.history.append(row)
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


def prepare_run(
    data: TokenizedData, state_dir: Path, job: TrainJob, world: distributed.World
) -> Run:
    settings, model_settings = job.train, job.model
    if settings.threads:
        torch.set_num_threads(settings.threads)
    torch.use_deterministic_algorithms(settings.deterministic, warn_only=True)
    seed_everything(settings.seed)
    device, autocast = pick_device(settings, world.local_rank)
    train = load_examples(data.split(TRAIN), job.task, data.pad_token_id)
    val = load_examples(data.split(VAL), job.task, data.pad_token_id)
    if job.task == CAUSAL_LM:
        train, val = train.with_targets(), val.with_targets()
    # causal_lm: the rows' block_size, which per-document rows may all fall short of.
    context = data.block_size if job.task == CAUSAL_LM else train.input_ids.size(1)
    model = build_model(
        model_settings,
        job.task,
        data.vocab_size,
        context,
        data.pad_token_id,
        data.eos_token_id,
        data.label_names,
        device.type,
    )
    check_positions(model, context, model_settings)
    model = apply_lora(model, model_settings, job.task).to(device)
    step_model = distributed.wrap(model, world, device)
    if settings.compile:
        step_model = torch.compile(step_model)
    return Run(
        model=model,
        step_model=step_model,
        optimizer=make_optimizer(model, settings),
        train=train,
        val=val,
        settings=settings,
        state_dir=state_dir,
        fingerprint=run_fingerprint(settings, model_settings, sha256_tree(data.shards)),
        device=device,
        autocast=autocast,
        world=world,
    )


def resume(run: Run) -> Progress:
    run.state_dir.mkdir(parents=True, exist_ok=True)
    distributed.barrier()
    state = load_checkpoint(run.state_dir, run.fingerprint)
    if state is None:
        return Progress(history=[])
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
    log.info("resumed from checkpoint at step %d", state["step"])
    fields = {k: state[k] for k in asdict(Progress()) if k in state}
    return Progress(**fields)


def train_model(paths: TrainPaths, job: TrainJob) -> list[dict]:
    data = TokenizedData.read(paths.tokenize_manifest, paths.shards)
    world = distributed.start()
    try:
        run = prepare_run(data, paths.state_dir, job, world)
        if not world.is_main:  # other processes train; process 0 alone writes
            return train_steps(run, resume(run)).history
        with stage_manifest(paths, job) as record:
            progress = resume(run)
            resumed_from = progress.step
            log.info(
                "training %s (%d parameters) on %s x%d%s from step %d",
                job.model.arch,
                count_parameters(run.model),
                run.device,
                world.size,
                " with bf16 autocast" if run.autocast else "",
                resumed_from,
            )
            with sample_system_metrics(paths.system_metrics, run.device):
                progress = train_steps(run, progress)
            if job.train.early_stopping_patience and progress.best_step:
                load_best(paths.state_dir, run.model)  # the best evaluated weights are the result
            save_final(run.model, progress.history, paths)
            record.counts = {
                "parameters": count_parameters(run.model),
                "steps": progress.step,
                "resumed_from_step": resumed_from,
                "train_rows": len(run.train),
                "best_val_loss": progress.best_val if math.isfinite(progress.best_val) else None,
                "best_step": progress.best_step,
                "stopped_early": progress.stopped_early,
                "processes": world.size,
            }
            record.extra.update(
                {
                    "device": str(run.device),
                    "autocast": str(run.autocast),
                    "fingerprint": run.fingerprint,
                }
            )
        shutil.rmtree(paths.state_dir, ignore_errors=True)  # the finished model replaces the state
        return progress.history
    finally:
        distributed.stop()


def model_positions(model) -> int | None:
    config = getattr(model, "config", None)
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)


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


def save_final(model, history: list[dict], paths: TrainPaths) -> None:
    with atomic_dir(paths.model) as tmp:
        plain = unwrap_for_saving(model).to("cpu")
        plain.save_pretrained(tmp)
        for item in Path(paths.tokenizer).iterdir():
            shutil.copy2(item, tmp / item.name)
        limit_tokenizer_length(tmp, model_positions(plain))
    with atomic_path(paths.history) as tmp:
        tmp.write_text("".join(json.dumps(row) + "\n" for row in history))
    plots.loss_curve(history, paths.loss_curve, "training loss")
