"""A registered version answers requests: `mlflow models serve -m models:/<name>/<version>`
against the store the track stage wrote, one server per task (a causal LM generating text, a
classifier labelling it), both started at once to keep the wait short."""

from __future__ import annotations

import json
import os
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from tests.support.mlflow_stores import (
    CONFIG,
    Store,
    new_store,
    settings_for,
    track,
    write_stage_files,
    write_tiny_model,
)
from tests.support.servers import MLFLOW, free_port, stop, wait_until_healthy

pytestmark = pytest.mark.slow

SERVE_TIMEOUT_S = 180.0
PROMPTS = ["Customer: Where is my parcel?\nAgent:", "Customer: I was charged twice.\nAgent:"]
NEW_TOKENS = 6


def register(
    store: Store, root: Path, data: dict, experiment: str, task: str, arch: str = "gpt2"
) -> dict:
    """Track a tiny experiment of the task with registration on; the runs.json model entry."""
    inputs = write_stage_files(root / experiment)
    write_tiny_model(data, inputs.model_dir, task, arch)
    config = {**CONFIG, "name": experiment, "task": task}
    config["evaluate"] = {**CONFIG["evaluate"], "max_new_tokens": NEW_TOKENS}
    settings = replace(
        settings_for(store.uri, f"serving.{experiment}"),
        experiment=experiment,
        config=config,
    )
    runs_path = root / experiment / "runs.json"
    track(settings, inputs, runs_path, store.artifact_dir)
    return json.loads(runs_path.read_text())["model"]


@dataclass(frozen=True)
class Served:
    url: str
    model: dict
    label_names: list[str]
    store_uri: str


def serve(uri: str, model_uri: str, log_path: Path) -> tuple[str, subprocess.Popen]:
    port = free_port()
    command = [str(MLFLOW), "models", "serve", "-m", model_uri, "--env-manager", "local"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    return f"http://127.0.0.1:{port}", process


def invoke(url: str, payload: dict) -> dict:
    request = urllib.request.Request(
        f"{url}/invocations",
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def served(tmp_path_factory, lm_data, classification_data):
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("serving")
    db = root / "store" / "template.db"
    db.parent.mkdir()
    MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    store = new_store(root / "store", db)
    models = {
        "lm": register(store, root / "results", lm_data, "demo-lm", "causal_lm"),
        "intent": register(
            store, root / "results", classification_data, "demo-intent", "sequence_classification"
        ),
        # The LSTM baseline, registered and served like GPT-2 (a pyfunc model), for both tasks.
        "lstm-lm": register(store, root / "results", lm_data, "lstm-lm", "causal_lm", "lstm"),
        "lstm-intent": register(
            store,
            root / "results",
            classification_data,
            "lstm-intent",
            "sequence_classification",
            "lstm",
        ),
    }
    labels = json.loads(classification_data["tokenize_manifest"].read_text())["label_names"]
    servers = {}
    try:
        for name, model in models.items():
            servers[name] = serve(store.uri, model["uri"], root / f"{name}.log")
        for name, (url, process) in servers.items():
            # Loading the pipeline takes the server a while on a busy machine.
            wait_until_healthy(url, process, root / f"{name}.log", SERVE_TIMEOUT_S)
        yield {
            name: Served(url, models[name], labels if name.endswith("intent") else [], store.uri)
            for name, (url, _) in servers.items()
        }
    finally:
        for _, process in servers.values():
            stop(process)


@pytest.mark.parametrize("name", ["lm", "lstm-lm"])
def test_causal_lm_version_generates_a_continuation_per_prompt(served, name):
    lm = served[name]
    assert lm.model["uri"] == f"models:/serving.{'demo-lm' if name == 'lm' else name}/1"
    answer = invoke(lm.url, {"inputs": PROMPTS})
    predictions = answer["predictions"]
    assert len(predictions) == len(PROMPTS)
    for prompt, text in zip(PROMPTS, predictions, strict=True):
        assert isinstance(text, str) and text.startswith(prompt) and len(text) > len(prompt)


def test_the_served_lstm_generates_what_the_evaluation_generates(served, monkeypatch):
    """The pyfunc model's greedy continuation is snaketune.generation's on the same weights."""
    from mlflow.artifacts import download_artifacts
    from transformers import AutoTokenizer

    from snaketune.evaluation import CPU
    from snaketune.generation import generate
    from snaketune.models import LSTM_CONFIG, load_trained
    from snaketune.settings import EvalSettings

    lstm = served["lstm-lm"]
    (text,) = invoke(lstm.url, {"inputs": PROMPTS[:1]})["predictions"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", lstm.store_uri)  # models:/ goes by it
    logged = Path(download_artifacts(artifact_uri=lstm.model["uri"]))
    (weights,) = {p.parent for p in logged.rglob(LSTM_CONFIG)}
    model = load_trained(weights, "causal_lm").eval()
    tokenizer = AutoTokenizer.from_pretrained(weights)
    settings = EvalSettings(max_new_tokens=NEW_TOKENS)
    expected, _ = generate(model, tokenizer, PROMPTS[0], settings, 32, CPU)
    assert text == PROMPTS[0] + expected


@pytest.mark.parametrize("name", ["intent", "lstm-intent"])
def test_classifier_version_labels_each_text_with_a_known_label(served, name):
    intent = served[name]
    assert intent.model["uri"] == f"models:/serving.{'demo-intent' if name == 'intent' else name}/1"
    texts = ["Where is my parcel?", "I want my money back", "How do I reset my password?"]
    predictions = invoke(intent.url, {"inputs": texts})["predictions"]
    assert len(predictions) == len(texts)
    for row in predictions:
        assert row["label"] in intent.label_names
        assert 0.0 <= row["score"] <= 1.0


# --- requests a served model must refuse or cope with (reliability scenario 32) ---------------


def invoke_refused(url: str, payload) -> tuple[int, dict]:
    try:
        invoke(url, payload)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())
    pytest.fail(f"{payload!r} was answered with 200")


def test_a_prompt_longer_than_the_context_is_cut_from_the_left_not_refused(served):
    lm = served["lm"]
    long_prompt = "Customer: where is my parcel? " * 60 + "\nAgent:"  # ~400 tokens, context 64
    (text,) = invoke(lm.url, {"inputs": [long_prompt]})["predictions"]
    assert text.startswith(long_prompt) and len(text) > len(long_prompt)


def test_a_text_longer_than_the_context_is_truncated_for_the_classifier(served):
    intent = served["intent"]
    (row,) = invoke(intent.url, {"inputs": ["my parcel is late " * 80]})["predictions"]
    assert row["label"] in intent.label_names


@pytest.mark.parametrize(
    "payload",
    [{"inputs": {"question": ["Where is it?"]}}, {"inputs": {"text": ["x"], "label": ["y"]}}],
    ids=["a-named-column", "two-columns"],
)
def test_inputs_of_another_shape_get_a_400_with_a_message_and_no_stack_trace(served, payload):
    for name in ("lm", "intent"):
        status, body = invoke_refused(served[name].url, payload)
        assert status == 400 and body["message"].startswith("Invalid input")
        assert "stack_trace" not in body and "Traceback" not in json.dumps(body)
