"""Stage 6, train_model: explicit training steps (set up, train, save), resumable at any point.

The data order is a pure function of (seed, step), and a checkpoint holds the model, optimizer,
RNG states, step and history, so a job killed at any moment and run again continues from its
last checkpoint as if nothing had happened. Checkpoints live in a state directory that is not a
Snakemake output (a failed job's outputs are deleted; this must survive) and are written to a
temporary file and renamed, so a half-written checkpoint is never loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import shutil
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from snaketune import plots
from snaketune.errors import TrainingError
from snaketune.fileio import atomic_dir, atomic_path, read_json, sha256_tree
from snaketune.manifest import stage_manifest
from snaketune.models import ModelSettings, build_model, count_parameters
from snaketune.shards import read_shards

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoint.pt"
LOSS_CURVE = "loss_curve.png"  # written beside history.jsonl


@dataclass(frozen=True)
class TrainSettings:
    max_steps: int = 200
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_batches: int = 8
    checkpoint_every: int = 50
    seed: int = 1234
    device: str = "auto"
    """'auto' uses CUDA when present, else CPU."""
    precision: str = "auto"
    """'auto' is bf16 autocast on CUDA and fp32 on CPU; 'fp32' forces full precision."""
    threads: int = 0
    """CPU threads for torch; 0 leaves torch's default."""
    deterministic: bool = True


# --- set-up ------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(settings: TrainSettings) -> tuple[torch.device, torch.dtype | None]:
    wants_cuda = settings.device in ("auto", "cuda")
    if settings.device == "cuda" and not torch.cuda.is_available():
        raise TrainingError("train.device is 'cuda' but no CUDA device is visible")
    device = torch.device("cuda" if wants_cuda and torch.cuda.is_available() else "cpu")
    autocast = None
    if device.type == "cuda" and settings.precision in ("auto", "bf16"):
        autocast = torch.bfloat16
    return device, autocast


@dataclass
class Examples:
    """One split in memory: padded ids, attention mask and (for classification) labels."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.size(0)

    def batch(self, index: np.ndarray) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(index)
        mask = self.attention_mask[idx]
        width = int(mask.sum(dim=1).max())  # trim padding shared by the whole batch
        return {
            "input_ids": self.input_ids[idx, :width],
            "attention_mask": mask[:, :width],
            "labels": self.labels[idx] if self.labels.dim() == 1 else self.labels[idx, :width],
        }


def load_examples(shard_dir: Path, task: str, pad_token_id: int) -> Examples:
    table = read_shards(shard_dir)
    rows = table.column("input_ids").to_pylist()
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    if task == "causal_lm":
        return Examples(ids, mask, ids.clone())  # packed blocks: every position is a target
    labels = torch.tensor(table.column("label").to_pylist(), dtype=torch.long)
    return Examples(ids, mask, labels)


def batch_indices(step: int, micro: int, settings: TrainSettings, n: int) -> np.ndarray:
    """Example indices of one micro-batch: a fresh seeded permutation per epoch."""
    per_step = settings.batch_size * settings.grad_accum
    start = step * per_step + micro * settings.batch_size
    positions = np.arange(start, start + settings.batch_size)
    epochs, offsets = positions // n, positions % n
    out = np.empty_like(positions)
    for epoch in np.unique(epochs):
        perm = np.random.default_rng([settings.seed, int(epoch)]).permutation(n)
        out[epochs == epoch] = perm[offsets[epochs == epoch]]
    return out


def learning_rate(step: int, settings: TrainSettings) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio * lr at max_steps."""
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


# --- checkpoints -------------------------------------------------------------------------------


def run_fingerprint(settings: TrainSettings, model: ModelSettings, data_digest: str) -> str:
    blob = json.dumps([asdict(settings), asdict(model), data_digest], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def save_checkpoint(
    state_dir: Path, step: int, model, optimizer, history: list[dict], fingerprint: str
) -> None:
    state = {
        "step": step,
        "fingerprint": fingerprint,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "history": history,
        "rng": {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        },
    }
    with atomic_path(Path(state_dir) / CHECKPOINT) as tmp:
        torch.save(state, tmp)
    log.info("checkpoint written at step %d", step)


def load_checkpoint(state_dir: Path, fingerprint: str) -> dict | None:
    path = Path(state_dir) / CHECKPOINT
    for stale in Path(state_dir).glob(f".{CHECKPOINT}.*.tmp"):
        stale.unlink()  # left by a job killed mid-save; never loaded
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("fingerprint") != fingerprint:
        log.warning("checkpoint in %s is from other settings or data; starting fresh", state_dir)
        return None
    return state


def restore(state: dict, model, optimizer) -> None:
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])


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


def train_steps(
    model,
    optimizer,
    train: Examples,
    val: Examples,
    settings: TrainSettings,
    state_dir: Path,
    fingerprint: str,
    start: int,
    history: list[dict],
    device,
    autocast,
) -> list[dict]:
    from tqdm import tqdm

    stop = StopRequested()
    tokens_per_step = 0
    started = time.perf_counter()
    model.train()
    for step in tqdm(
        range(start, settings.max_steps),
        initial=start,
        total=settings.max_steps,
        desc="train",
        mininterval=5,
    ):
        lr = learning_rate(step, settings)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum, tokens_per_step = 0.0, 0
        for micro in range(settings.grad_accum):
            batch = train.batch(batch_indices(step, micro, settings, len(train)))
            tokens_per_step += int(batch["attention_mask"].sum())
            loss = forward(model, batch, device, autocast).loss / settings.grad_accum
            loss.backward()
            loss_sum += loss.item()
        if not math.isfinite(loss_sum):
            raise TrainingError(
                f"loss became {loss_sum} at step {step}; the last good checkpoint is in "
                f"{state_dir}. Lower train.lr or check the data, then rerun."
            )
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed, started = time.perf_counter() - started, time.perf_counter()
        row = {
            "step": step + 1,
            "loss": loss_sum,
            "lr": lr,
            "grad_norm": float(grad_norm),
            "tokens_per_s": tokens_per_step / max(elapsed, 1e-9),
        }
        done = step + 1
        if done % settings.eval_every == 0 or done == settings.max_steps:
            row["val_loss"] = estimate_loss(model, val, settings, device, autocast)
            log.info("step %d loss %.4f val_loss %.4f", done, loss_sum, row["val_loss"])
        history.append(row)
        if done % settings.checkpoint_every == 0 or stop.requested:
            save_checkpoint(state_dir, done, model, optimizer, history, fingerprint)
        if stop.requested:
            raise SystemExit(f"SIGTERM received: checkpoint saved at step {done}; rerun to resume")
    return history


def train_model(
    shard_dir: Path,
    tokenize_manifest: Path,
    tokenizer_dir: Path,
    out_dir: Path,
    history_path: Path,
    manifest: Path,
    state_dir: Path,
    task: str,
    model_settings: ModelSettings,
    settings: TrainSettings,
) -> list[dict]:
    shard_dir, state_dir = Path(shard_dir), Path(state_dir)
    data_info = read_json(tokenize_manifest)
    params = {"model": asdict(model_settings), "train": asdict(settings), "task": task}
    with stage_manifest(
        "train", manifest, {"shards": shard_dir, "tokenizer": tokenizer_dir}, params
    ) as record:
        if settings.threads:
            torch.set_num_threads(settings.threads)
        torch.use_deterministic_algorithms(settings.deterministic, warn_only=True)
        seed_everything(settings.seed)
        device, autocast = pick_device(settings)
        pad = data_info["pad_token_id"]
        train = load_examples(shard_dir / "train", task, pad)
        val = load_examples(shard_dir / "val", task, pad)
        context = train.input_ids.size(1)
        model = build_model(
            model_settings,
            task,
            data_info["vocab_size"],
            context,
            pad,
            data_info["eos_token_id"],
            data_info["label_names"],
        ).to(device)
        optimizer = make_optimizer(model, settings)
        fingerprint = run_fingerprint(settings, model_settings, sha256_tree(shard_dir))
        state_dir.mkdir(parents=True, exist_ok=True)
        state = load_checkpoint(state_dir, fingerprint)
        start, history = 0, []
        if state is not None:
            restore(state, model, optimizer)
            start, history = state["step"], state["history"]
            log.info("resumed from checkpoint at step %d", start)
        log.info(
            "training %s (%d parameters) on %s%s from step %d",
            model_settings.arch,
            count_parameters(model),
            device,
            " with bf16 autocast" if autocast else "",
            start,
        )
        history = train_steps(
            model,
            optimizer,
            train,
            val,
            settings,
            state_dir,
            fingerprint,
            start,
            history,
            device,
            autocast,
        )
        save_final(model, tokenizer_dir, out_dir, history, history_path)
        record.counts = {
            "parameters": count_parameters(model),
            "steps": settings.max_steps,
            "resumed_from_step": start,
            "train_rows": len(train),
            "final_val_loss": history[-1].get("val_loss"),
        }
        record.extra.update(
            {"device": str(device), "autocast": str(autocast), "fingerprint": fingerprint}
        )
    shutil.rmtree(state_dir, ignore_errors=True)  # the finished model replaces the checkpoint
    return history


def save_final(
    model, tokenizer_dir: Path, out_dir: Path, history: list[dict], history_path: Path
) -> None:
    with atomic_dir(out_dir) as tmp:
        model.to("cpu").save_pretrained(tmp)
        for item in Path(tokenizer_dir).iterdir():
            shutil.copy2(item, tmp / item.name)
    with atomic_path(history_path) as tmp:
        tmp.write_text("".join(json.dumps(row) + "\n" for row in history))
    plots.loss_curve(history, Path(history_path).with_name(LOSS_CURVE), "training loss")


def last_checkpoint_step(state_dir: Path) -> int | None:
    path = Path(state_dir) / CHECKPOINT
    if not path.exists():
        return None
    return int(torch.load(path, map_location="cpu", weights_only=False)["step"])
