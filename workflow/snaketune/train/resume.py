"""Whether a training run continues from its checkpoint, decided the same way by the trainer
and, before any job, by the workflow (which says so on the console).

A checkpoint continues when nothing that shaped the steps already taken changed: the model,
the data, and every train setting but those in FREE (how often to evaluate and checkpoint,
early-stopping patience, threads, compile, ...) and max_steps. A larger max_steps continues a
finished run from its last step (see trainer.learning_rate for the schedule); anything
else that changed starts again from step 0, and the message names each changed key.

Beside every checkpoint the trainer writes `checkpoint.json` (step, max_steps, the settings
that shape the steps, the data's digest): this module reads only that, so the workflow can
decide without torch.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from snaketune.fileio import read_json, write_json
from snaketune.train.settings import TrainJob

RECORD = "checkpoint.json"
FREE = (
    "eval_every",
    "log_every",
    "eval_rows",
    "checkpoint_every",
    "early_stopping_patience",
    "threads",
    "compile",
    "deterministic",
    "keep_checkpoints",
    "keep_final_state",
    "memory_retries",
)
"""Train settings that change no step already taken."""


def trajectory(job: TrainJob) -> dict[str, Any]:
    """The settings that shape the steps (max_steps aside: more steps continue the run)."""
    train = {k: v for k, v in asdict(job.train).items() if k not in (*FREE, "max_steps")}
    return {"task": job.task, "model": asdict(job.model), "train": train}


def fingerprint(job: TrainJob, data_digest: str, model_source: str = "") -> str:
    """The run's identity: its trajectory, its data and (a local pretrained folder) its base
    model's content."""
    parts = [trajectory(job), data_digest, *([model_source] if model_source else [])]
    blob = json.dumps(parts, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def data_key(data_folder: str) -> str:
    """What names the data of a shards folder wherever the results are (moved, or results_dir
    given relative or absolute): its shared stage's key, the folder above `shards`."""
    return Path(data_folder).parent.name if data_folder else ""


def record_of(
    step: int, job: TrainJob, data_digest: str, data_folder: str = "", model_source: str = ""
) -> dict[str, Any]:
    return {
        "step": step,
        "max_steps": job.train.max_steps,
        "trajectory": trajectory(job),
        "data": data_digest,
        "model_source": model_source,
        # Where the shards were: the workflow, before any job, knows only where they will be
        # (a shared stage's folder is keyed by all it is computed from), not their digest.
        "data_key": data_key(data_folder),
        "fingerprint": fingerprint(job, data_digest, model_source),
    }


def write_record(
    state_dir: Path,
    step: int,
    job: TrainJob,
    data_digest: str,
    data_folder: str = "",
    model_source: str = "",
) -> None:
    record = record_of(step, job, data_digest, data_folder, model_source)
    write_json(Path(state_dir) / RECORD, record)


def read_record(state_dir: Path) -> dict[str, Any] | None:
    path = Path(state_dir) / RECORD
    return read_json(path) if path.exists() else None


@dataclass(frozen=True)
class Plan:
    resume: bool
    """Whether training continues from the checkpoint."""
    message: str
    """What happens and why, for the log and the console; empty when nothing changed."""


def changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ, each with old -> new."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [c for k in keys for c in changed_keys(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [f"{prefix.rstrip('.')} {old!r} -> {new!r}"]


def plan(
    record: dict[str, Any] | None,
    job: TrainJob,
    data_digest: str | None,
    data_folder: str | None = None,
    model_source: str | None = None,
) -> Plan:
    """What a checkpoint described by `record` means for `job`. data_digest None: not compared,
    as before any job, where the data may still be rebuilt; there the data's folder is (a
    shared stage's, keyed by everything the data is computed from)."""
    if record is None:
        return Plan(False, "")
    where = f"the checkpoint at step {record['step']}"
    changed = changed_keys(record["trajectory"], trajectory(job))
    if data_digest is not None and record["data"] != data_digest:
        changed.append("the tokenized data")
    elif data_folder and record.get("data_key") not in ("", None, data_key(data_folder)):
        changed.append(
            f"the tokenized data (a change upstream: {record['data_key']} -> "
            f"{data_key(data_folder)})"
        )
    if model_source is not None and record.get("model_source", "") != model_source:
        changed.append(f"the content of the local model folder {job.model.name_or_path}")
    if changed:
        return Plan(False, f"starts again from step 0: {'; '.join(changed)} since {where}")
    steps = job.train.max_steps
    if steps < record["step"]:
        return Plan(
            False,
            f"starts again from step 0: train.max_steps {steps} is below the {record['step']} "
            f"steps of {where}",
        )
    if steps != record["max_steps"]:
        return Plan(
            True,
            f"continues {where} to train.max_steps {steps} (was {record['max_steps']}); the "
            "learning rate decays from its value there to the new end",
        )
    return Plan(True, "")


def plan_without_state(finished: tuple[int, int] | None, job: TrainJob) -> Plan:
    """No checkpoint kept (train.keep_final_state false, or deleted), but a finished model
    trained towards `finished` = (max_steps, steps taken): a new max_steps trains again from
    step 0, and says so."""
    if finished is None or finished[0] == job.train.max_steps:
        return Plan(False, "")
    return Plan(
        False,
        f"starts again from step 0 to train.max_steps {job.train.max_steps}: the finished run "
        f"({finished[1]} steps) kept no state to continue from (train.keep_final_state was "
        "false, or its state was deleted)",
    )
