"""Shared fixtures: offline, loopback only, no MLflow URI leaking in from the environment; real
stage data built once per session; real servers on 127.0.0.1 (helpers in tests/support)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# Nothing here imports the library at collection time: huggingface_hub reads HF_HUB_OFFLINE when
# it is first imported, which must be after offline_environment has set it.


@pytest.fixture(autouse=True, scope="session")
def offline_environment():
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield


@pytest.fixture(autouse=True, scope="session")
def new_shell_path():
    """Every command a test runs sees the PATH of a new shell where the venv is not activated
    (`make test` puts it first): what the README and the console print must work from there."""
    from tests.support.repo import without_venv

    os.environ["PATH"] = without_venv(os.environ.get("PATH", ""))
    os.environ.pop("VIRTUAL_ENV", None)
    yield


@pytest.fixture(scope="session")
def lm_data(tmp_path_factory) -> dict[str, Path]:
    from tests.support.stage_data import prepare_stage_data

    return prepare_stage_data(tmp_path_factory.mktemp("lm-data"), "causal_lm")


@pytest.fixture(scope="session")
def lm_per_document_data(lm_data, tmp_path_factory) -> dict[str, Path]:
    """lm_data's splits and tokenizer, tokenized with packing: per_document."""
    from snaketune.tokenize.one_process import tokenize_in_one_process
    from snaketune.tokenize.settings import TokenizeJob, TokenizeSettings

    root = tmp_path_factory.mktemp("lm-per-document")
    job = TokenizeJob("causal_lm", TokenizeSettings(block_size=32, packing="per_document"))
    tokenize_in_one_process(
        lm_data["splits"], lm_data["tokenizer"], root / "shards", root / "manifest.json", job
    )
    return {**lm_data, "shards": root / "shards", "tokenize_manifest": root / "manifest.json"}


@pytest.fixture(scope="session", params=["across_documents", "per_document", "chat_template"])
def qa_data(request, tmp_path_factory, lm_data) -> dict[str, Path]:
    """The demo corpus as instruction data (answers learned): with the demo's template and each
    packing, and (chat_template) without a template, through a pretrained tokenizer's chat
    template (lm_data's BPE, given one)."""
    from transformers import AutoTokenizer

    from tests.support.checkpoints import CHAT_TEMPLATE
    from tests.support.stage_data import prepare_stage_data

    root = tmp_path_factory.mktemp(f"qa-{request.param}")
    if request.param != "chat_template":
        return prepare_stage_data(root, "causal_lm", 64, instruction=True, packing=request.param)
    chat = AutoTokenizer.from_pretrained(lm_data["tokenizer"])
    chat.chat_template = CHAT_TEMPLATE
    chat.save_pretrained(root / "chat-tokenizer")
    experiment = {
        "text_template": None,
        "tokenizer": {"kind": "pretrained", "name_or_path": str(root / "chat-tokenizer")},
    }
    return prepare_stage_data(root, "causal_lm", 64, instruction=True, experiment=experiment)


@pytest.fixture(scope="session")
def classification_data(tmp_path_factory) -> dict[str, Path]:
    from tests.support.stage_data import prepare_stage_data

    return prepare_stage_data(tmp_path_factory.mktemp("cls-data"), "sequence_classification")


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
    """A misbehaving HTTP origin server on 127.0.0.1 (tests/support/downloads.py)."""
    from tests.support.downloads import Origin
    from tests.support.servers import serving

    with serving(Origin()) as server:
        yield server


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """One real `mlflow server` on 127.0.0.1 for the whole session (tests/support/servers.py)."""
    from tests.support.servers import free_port, start_server, stop

    server, process = start_server(tmp_path_factory.mktemp("mlflow-server"), free_port())
    try:
        yield server
    finally:
        stop(process)
