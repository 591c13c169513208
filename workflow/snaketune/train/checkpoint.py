"""Resumable training state: model, optimizer, RNG states, step, history and early-stopping
bookkeeping, written atomically and loaded without unpickling arbitrary objects.

`torch.load(weights_only=True)` accepts only tensors and plain containers, so a tampered
checkpoint cannot run code; RNG states are stored in that form for the same reason.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from snaketune.errors import TrainingError
from snaketune.fileio import atomic_path
from snaketune.train.resume import read_record

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoint.pt"
BEST_WEIGHTS = "best.safetensors"


def rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": pos,
            "has_gauss": has_gauss,
            "cached": cached,
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_as_tuples(state["python"]))
    numpy = state["numpy"]
    np.random.set_state(
        (
            numpy["kind"],
            numpy["keys"].numpy().astype(np.uint32),
            numpy["pos"],
            numpy["has_gauss"],
            numpy["cached"],
        )
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(value):
    """random.setstate wants the nested tuples that a round trip may have turned into lists."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, list | tuple) else value


def save_checkpoint(state_dir: Path, state: dict[str, Any], keep: int = 1) -> None:
    """Write checkpoint.pt (atomically); with keep > 1 the previous ones stay as
    checkpoint-<step>.pt, the newest keep - 1 of them."""
    path = Path(state_dir) / CHECKPOINT
    record = read_record(state_dir)
    if keep > 1 and path.exists() and record is not None:
        older = path.with_name(f"checkpoint-{record['step']:08d}.pt")
        older.unlink(missing_ok=True)
        os.link(path, older)  # the same bytes under a second name, no copy
    try:
        with atomic_path(path) as tmp:
            torch.save({**state, "rng": rng_state()}, tmp)
    except RuntimeError as err:  # torch reports a refused write as e.g. "unexpected pos 704"
        raise TrainingError(
            f"could not write checkpoint {path} at step {state['step']} ({err}); the previous "
            f"checkpoint, if any, is kept. Check the free space in {state_dir} and rerun."
        ) from err
    log.info("checkpoint written at step %d", state["step"])
    for stale in sorted(Path(state_dir).glob("checkpoint-*.pt"))[: -(keep - 1) or None]:
        stale.unlink()


def load_checkpoint(state_dir: Path, fingerprint: str) -> dict[str, Any] | None:
    """The last complete checkpoint of this exact run, or None (then training starts fresh)."""
    path = Path(state_dir) / CHECKPOINT
    for stale in Path(state_dir).glob(f".{CHECKPOINT}.*.tmp"):
        stale.unlink()  # left by a job killed mid-save; never loaded
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling refused or a corrupt file: never run or trust it
        raise TrainingError(
            f"refusing to load {path}: it is not a plain-tensor checkpoint written by snaketune "
            f"({type(err).__name__}). Delete {state_dir} to start the run over."
        ) from err
    if state.get("fingerprint") != fingerprint:
        log.warning("checkpoint in %s is from other settings or data; starting fresh", state_dir)
        return None
    return state


def save_best(state_dir: Path, model: torch.nn.Module) -> None:
    """The weights as they are now: all of them (save_model handles tied weights: GPT-2
    shares its embedding and output layer), or only those that train when some are frozen (a
    LoRA run's adapters, not its base)."""
    from safetensors.torch import save_file, save_model

    from snaketune.train.distributed import full_model_state

    with atomic_path(Path(state_dir) / BEST_WEIGHTS) as tmp:
        if any(not p.requires_grad for p in model.parameters()):
            trained = {k: v.detach().contiguous() for k, v in full_model_state(model).items()}
            save_file(trained, str(tmp))
        else:
            save_model(model, str(tmp))


def load_best(state_dir: Path, model: torch.nn.Module) -> None:
    """The best evaluated weights, when they were kept (early stopping was on when they were
    evaluated); otherwise the model keeps the weights it has, and the log says so."""
    from safetensors.torch import load_model

    path = Path(state_dir) / BEST_WEIGHTS
    if not path.exists():
        log.warning("no best weights in %s (early stopping was off then); keeping the last", path)
        return
    device = str(next(model.parameters()).device)
    if any(not p.requires_grad for p in model.parameters()):
        from safetensors.torch import load_file

        from snaketune.train.distributed import load_trained_state

        load_trained_state(model, load_file(str(path), device=device))
        return
    load_model(model, str(path), device=device)


def last_good(state_dir: Path) -> str:
    """Where a rerun with the same settings would resume from, said for an error message."""
    # checkpoint.json, written beside each checkpoint: loading the checkpoint itself would read
    # the weights and optimizer state into memory in an error path (an out-of-memory one).
    record = read_record(state_dir) if (Path(state_dir) / CHECKPOINT).exists() else None
    step = None if record is None else record["step"]
    if step is None:
        return f"no checkpoint has been written to {state_dir} yet (train.checkpoint_every)"
    return f"the last good checkpoint is step {step} in {state_dir}"
