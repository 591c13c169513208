"""The real data stages on the demo corpus with small settings, the train job's paths and
command line on such data, and the evaluate job's paths."""

from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path

import pandas as pd

from snaketune.data.clean import CleanReport, clean_corpus
from snaketune.data.paths import CleanPaths
from snaketune.data.settings import CleanJob, CleanSettings, ReadSettings
from snaketune.evaluate.paths import EvaluatePaths
from snaketune.local import DEMO_EXPERIMENT, PreparedData, demo_config, prepare_data
from snaketune.stages import command_line
from snaketune.train.settings import TrainJob
from snaketune.train.trainer import train_model

TXT = ReadSettings(format="txt")


def prepare_stage_data(
    root: Path,
    task: str,
    block_size: int = 32,
    instruction: bool = False,
    packing: str = "",
    experiment: dict | None = None,
) -> dict:
    """Run the real data stages (download → clean → split → tokenizer → tokenize) on the demo
    corpus with small settings (`experiment`: keys of the experiment entry replaced); return
    the paths the train and evaluate stages take."""
    config = demo_config(task, block_size, instruction=instruction)
    if packing:
        config["experiments"][0]["tokenize"]["packing"] = packing
    config["experiments"][0].update(experiment or {})
    prepared = prepare_data(config, DEMO_EXPERIMENT, root)
    return {f.name: getattr(prepared, f.name) for f in fields(PreparedData)}


def train_paths(data: dict, out: Path, shards: Path | None = None, manifest: Path | None = None):
    """The train job's paths on prepared stage data, every output and the state under out."""
    prepared = PreparedData(**data)
    if shards is not None:
        prepared = replace(prepared, shards=shards, tokenize_manifest=manifest)
    return prepared.train_paths(out)


def evaluate_paths(data: dict, out: Path) -> EvaluatePaths:
    """The evaluate job's paths on prepared stage data and a model in out/model."""
    return PreparedData(**data).evaluate_paths(out / "model", out)


def run_training(
    data: dict,
    out: Path,
    task: str,
    model,
    settings,
    shards: Path | None = None,
    manifest: Path | None = None,
) -> list[dict]:
    """train_model on prepared stage data, writing model, history, manifest and state under out."""
    job = TrainJob(task=task, model=model, train=settings)
    return train_model(train_paths(data, out, shards, manifest), job)


def train_cli_args(data: dict, out: Path, job: TrainJob) -> list[str]:
    """`train` and its arguments as the train rule passes them (after the launcher)."""
    return command_line(train_paths(data, out), job)


def run_clean(
    tmp_path: Path,
    name: str,
    data: bytes,
    read: ReadSettings = TXT,
    settings: CleanSettings | None = None,
) -> tuple[CleanReport, pd.DataFrame]:
    """Write `data` as the only raw file, clean it, return the report and the output corpus."""
    raw = tmp_path / "raw"
    raw.mkdir(exist_ok=True)
    (raw / name).write_bytes(data)
    paths = CleanPaths.under(tmp_path, raw=raw)
    report = clean_corpus(paths, CleanJob(read=read, clean=settings or CleanSettings()))
    return report, pd.read_parquet(paths.corpus)


def rows_of(data: dict, split: str, shards: Path | None = None, manifest: Path | None = None):
    """A split's memory-mapped rows, as training and evaluation open them."""
    from snaketune.tokenize.shards import TokenizedData
    from snaketune.train.batches import TokenRows

    tokenized = TokenizedData.read(manifest or data["tokenize_manifest"], shards or data["shards"])
    return TokenRows.open(tokenized, split)


def padded(rows) -> dict:
    """Every row of `rows` in one batch (for small test data): ids, mask, labels."""
    import numpy as np
    import torch

    batch = rows.batch(np.arange(len(rows)))
    batch.setdefault("attention_mask", torch.ones_like(batch["input_ids"]))
    return batch
