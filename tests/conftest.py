"""Shared test set-up: offline, loopback only, no MLflow URI leaking in from the environment."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import socketserver
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DEMO_CORPUS = REPO / "workflow" / "resources" / "demo" / "support.jsonl.gz"
SHARED_DATA = REPO.parent / "shared" / "data"
DEFAULT_CONFIG = yaml.safe_load((REPO / "config.yaml").read_text())
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))


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
def lm_per_document_data(lm_data, tmp_path_factory) -> dict[str, Path]:
    """lm_data's splits and tokenizer, tokenized with packing: per_document."""
    from snaketune.shards import TokenizeSettings, tokenize_shards

    root = tmp_path_factory.mktemp("lm-per-document")
    settings = TokenizeSettings(task="causal_lm", block_size=32, packing="per_document")
    tokenize_shards(
        lm_data["splits"], lm_data["tokenizer"], root / "shards", root / "manifest.json", settings
    )
    return {**lm_data, "shards": root / "shards", "tokenize_manifest": root / "manifest.json"}


@pytest.fixture(scope="session")
def classification_data(tmp_path_factory) -> dict[str, Path]:
    return prepare_stage_data(tmp_path_factory.mktemp("cls-data"), "sequence_classification")


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
    from snaketune.train import train_model

    return train_model(
        shards or data["shards"],
        manifest or data["tokenize_manifest"],
        data["tokenizer"],
        out / "model",
        out / "history.jsonl",
        out / "manifest.json",
        out / "state",
        task,
        model,
        settings,
    )


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


@pytest.fixture
def no_proxy(monkeypatch) -> None:
    """urllib honours *_proxy variables; a proxy from the environment must not see loopback."""
    for name in (
        "http_proxy",
        "https_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "all_proxy",
        "ALL_PROXY",
    ):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def origin(no_proxy) -> Iterator:
    """A misbehaving HTTP origin server on 127.0.0.1 (tests/downloads.py)."""
    from tests.downloads import Origin

    with serving(Origin()) as server:
        yield server


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """One real `mlflow server` on 127.0.0.1 for the whole session (tests/servers.py)."""
    from tests.servers import free_port, start_server, stop

    server, process = start_server(tmp_path_factory.mktemp("mlflow-server"), free_port())
    try:
        yield server
    finally:
        stop(process)


@contextlib.contextmanager
def serving(server: socketserver.BaseServer) -> Iterator:
    """Serve on a thread while the block runs (test servers bind 127.0.0.1 only)."""
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def config_with(**changes) -> dict:
    """The default config with `a__0__b=value` meaning config["a"][0]["b"] = value."""
    config = copy.deepcopy(DEFAULT_CONFIG)
    for dotted, value in changes.items():
        target = config
        *parents, last = dotted.split("__")
        for key in parents:
            target = target[int(key)] if key.isdigit() else target[key]
        target[last] = value
    return config


def snakemake_command(workdir: Path, *args: str) -> list[str]:
    """The real workflow's snakemake, run in `workdir` on workdir/config.yaml."""
    return [
        SNAKEMAKE,
        "--snakefile",
        str(REPO / "Snakefile"),
        "--directory",
        str(workdir),
        "--configfile",
        str(workdir / "config.yaml"),
        *args,
    ]


def snakemake_with(tmp_path: Path, config: dict, *args: str) -> subprocess.CompletedProcess:
    """Run the real workflow's snakemake on `config` in tmp_path."""
    config = {**config, "results_dir": str(tmp_path / "results")}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    command = snakemake_command(tmp_path, *args)
    return subprocess.run(command, capture_output=True, text=True, timeout=120)
