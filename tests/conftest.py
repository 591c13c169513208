"""Shared test set-up: offline, loopback only, no MLflow URI leaking in from the environment."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO_CORPUS = REPO / "workflow" / "resources" / "demo" / "support.jsonl.gz"
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(autouse=True, scope="session")
def offline_environment():
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield


def prepare_stage_data(root: Path, task: str, block_size: int = 32) -> dict[str, Path]:
    """Run the real data stages (download → clean → split → tokenizer → tokenize) on the demo
    corpus with small settings; return the paths the train and evaluate stages take."""
    from snaketune.clean import CleanSettings, ReadSettings, clean_corpus
    from snaketune.download import DownloadSettings, download_dataset
    from snaketune.fileio import sha256_file
    from snaketune.shards import TokenizeSettings, tokenize_shards
    from snaketune.split import SplitSettings, split_corpus
    from snaketune.tokenizer import TokenizerSettings, prepare_tokenizer

    raw = root / "download" / "files"
    download_dataset(
        DownloadSettings(url=str(DEMO_CORPUS), sha256=sha256_file(DEMO_CORPUS)),
        raw,
        root / "download" / "manifest.json",
    )
    classify = task == "sequence_classification"
    read = ReadSettings(
        format="jsonl",
        text_column="question",
        label_column="intent" if classify else None,
        text_template=None if classify else "Customer: {question}\nAgent: {answer}",
    )
    corpus = root / "clean" / "corpus.parquet"
    clean_corpus(
        raw,
        corpus,
        root / "clean" / "report.json",
        root / "clean" / "manifest.json",
        read,
        CleanSettings(strip_html=True),
    )
    splits = {name: root / "split" / f"{name}.parquet" for name in ("train", "val", "test")}
    split_corpus(corpus, splits, root / "split" / "manifest.json", SplitSettings())
    tokenizer = root / "tokenizer" / "tokenizer"
    prepare_tokenizer(
        splits["train"],
        tokenizer,
        root / "tokenizer" / "manifest.json",
        TokenizerSettings(vocab_size=400),
    )
    shards = root / "tokenize" / "shards"
    tokenize_manifest = root / "tokenize" / "manifest.json"
    tokenize_shards(
        splits,
        tokenizer,
        shards,
        tokenize_manifest,
        TokenizeSettings(task=task, block_size=block_size, max_length=32),
    )
    return {
        "splits": splits,
        "tokenizer": tokenizer,
        "shards": shards,
        "tokenize_manifest": tokenize_manifest,
    }


@pytest.fixture(scope="session")
def lm_data(tmp_path_factory) -> dict[str, Path]:
    return prepare_stage_data(tmp_path_factory.mktemp("lm-data"), "causal_lm")


@pytest.fixture(scope="session")
def classification_data(tmp_path_factory) -> dict[str, Path]:
    return prepare_stage_data(tmp_path_factory.mktemp("cls-data"), "sequence_classification")


def train_cli_args(data: dict, out: Path, payload: dict) -> list[str]:
    """`train` and its arguments as the train rule passes them (after the launcher)."""
    return [
        "train",
        "--shards",
        str(data["shards"]),
        "--tokenize-manifest",
        str(data["tokenize_manifest"]),
        "--tokenizer",
        str(data["tokenizer"]),
        "--out",
        str(out / "model"),
        "--history",
        str(out / "history.jsonl"),
        "--manifest",
        str(out / "manifest.json"),
        "--state-dir",
        str(out / "state"),
        "--settings",
        json.dumps(payload),
    ]
