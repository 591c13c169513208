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
    log: Path
    """What the server wrote (stdout and stderr)."""


def serve(uri: str, model_uri: str, log_path: Path) -> tuple[str, subprocess.Popen]:
    port = free_port()
    command = [str(MLFLOW), "models", "serve", "-m", model_uri, "--env-manager", "local"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    # The server runs `uvicorn` by name: the venv's bin first, as the README's command has it.
    path = os.pathsep.join([str(MLFLOW.parent), os.environ.get("PATH", "")])
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": path}
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
            name: Served(
                url,
                models[name],
                labels if name.endswith("intent") else [],
                store.uri,
                root / f"{name}.log",
            )
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


def served_weights(served: Served, monkeypatch):
    """(model, tokenizer) from the served version's own copy of the model folder."""
    from mlflow.artifacts import download_artifacts
    from transformers import AutoTokenizer

    from snaketune.train.models import load_trained

    monkeypatch.setenv("MLFLOW_TRACKING_URI", served.store_uri)  # models:/ goes by it
    logged = Path(download_artifacts(artifact_uri=served.model["uri"]))
    (weights,) = {p.parent for p in logged.rglob("tokenizer.json")}
    return load_trained(weights, "causal_lm").eval(), AutoTokenizer.from_pretrained(weights)


def evaluation_continuation(model, tokenizer, prompt: str, **settings) -> str:
    """What evaluation generates for `prompt` (its context: the training rows, 32 tokens)."""
    from snaketune.evaluate.evaluation import CPU
    from snaketune.evaluate.generation import generate
    from snaketune.evaluate.settings import EvalSettings

    decoding = EvalSettings(**{"max_new_tokens": NEW_TOKENS, **settings})
    return generate(model, tokenizer, prompt, decoding, CONFIG["tokenize"]["block_size"], CPU)[0]


@pytest.mark.parametrize("name", ["lm", "lstm-lm"])
def test_the_served_model_generates_what_the_evaluation_generates(served, monkeypatch, name):
    """The pyfunc model's greedy continuation is the evaluation's on the same weights."""
    model, tokenizer = served_weights(served[name], monkeypatch)
    (text,) = invoke(served[name].url, {"inputs": PROMPTS[:1]})["predictions"]
    assert text == PROMPTS[0] + evaluation_continuation(model, tokenizer, PROMPTS[0])


def greedy_ids(model, tokenizer, prompt: str) -> list[int]:
    """The token ids evaluation generates greedily for `prompt`, before they are decoded."""
    from snaketune.evaluate.evaluation import CPU
    from snaketune.evaluate.generation import prompt_ids, with_cache, with_state
    from snaketune.evaluate.settings import EvalSettings

    settings = EvalSettings(max_new_tokens=NEW_TOKENS)
    ids, _ = prompt_ids(tokenizer, prompt, CONFIG["tokenize"]["block_size"], NEW_TOKENS)
    if hasattr(model, "generate"):
        return with_cache(model, tokenizer, [ids], settings, CPU)[0]
    return with_state(model, tokenizer, ids, settings, CPU)


@pytest.mark.parametrize("name", ["lm", "lstm-lm"])
def test_max_new_tokens_is_honoured(served, monkeypatch, name):
    """Greedy tokens come one after the other: 2 new tokens are the first 2 of the 6 that
    evaluation's max_new_tokens gives."""
    model, tokenizer = served_weights(served[name], monkeypatch)
    request = {"inputs": PROMPTS[:1], "params": {"max_new_tokens": 2}}
    (text,) = invoke(served[name].url, request)["predictions"]
    ids = greedy_ids(model, tokenizer, PROMPTS[0])
    assert len(ids) > 2  # else 2 tokens could not be told from the evaluation's 6
    assert text == PROMPTS[0] + tokenizer.decode(ids[:2], skip_special_tokens=True)


@pytest.mark.parametrize(
    "params",
    [
        {"decoding": "sample", "temperature": 1.5, "top_k": 50},
        {"do_sample": True, "top_k": 3, "max_new_tokens": 4},
    ],
    ids=["decoding-sample", "do_sample"],
)
def test_sampling_params_are_honoured(served, monkeypatch, params):
    """Sampled as evaluation samples (seeded): the same continuation for the same settings."""
    lm = served["lm"]
    model, tokenizer = served_weights(lm, monkeypatch)
    (text,) = invoke(lm.url, {"inputs": PROMPTS[:1], "params": params})["predictions"]
    settings = {k: v for k, v in params.items() if k != "do_sample"} | {"decoding": "sample"}
    expected = evaluation_continuation(model, tokenizer, PROMPTS[0], **settings)
    assert text == PROMPTS[0] + expected
    length = settings.get("max_new_tokens", NEW_TOKENS)
    greedy = evaluation_continuation(model, tokenizer, PROMPTS[0], max_new_tokens=length)
    assert expected != greedy  # else sampling and greedy decoding could not be told apart


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
    # transformers' tokenizer would log that a prompt past its 64 positions "will result in
    # indexing errors": the cut prevents them, so the warning would only mislead.
    log = lm.log.read_text()
    assert "POST /invocations" in log  # the server logs its requests here
    assert "indexing errors" not in log


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


# --- requests that are refused with HTTP 400 and a message saying what is expected -------------

EXPECTED_TEXTS = 'expected texts: {"inputs": ["a text", ...]} (a list of non-blank strings)'
LM_PARAMS = "its params are max_new_tokens, decoding, do_sample, temperature, top_k, top_p"
REFUSED = {
    "a-number": ("lm", {"inputs": 5}, [EXPECTED_TEXTS, "found int 5 as input 1"]),
    "numbers": ("lm", {"inputs": [1, 2]}, [EXPECTED_TEXTS, "found int 1 as input 1"]),
    "a-bare-list": ("lm", [1, 2], ["The input must be a JSON dictionary", "Received a list"]),
    "an-empty-prompt": ("lm", {"inputs": [""]}, ["input 1 is empty: send a text to answer"]),
    "a-blank-prompt": ("lstm-lm", {"inputs": ["ok", " \n"]}, ["input 2 is empty"]),
    "an-empty-text": ("intent", {"inputs": [""]}, ["input 1 is empty"]),
    "a-null": ("lstm-intent", {"inputs": [None]}, [EXPECTED_TEXTS, "found null as input 1"]),
    "a-wrong-key": (
        "lm",
        {"texts": ["Where is my parcel?"]},
        ["The input must be a JSON dictionary with exactly one of the input fields"],
    ),
    "a-conversation": (
        "lm",
        {"inputs": [{"role": "user", "content": "Where is my parcel?"}]},
        [EXPECTED_TEXTS, "found a conversation of role/content turns, which is not taken"],
    ),
    "an-unknown-param": (
        "lm",
        {"inputs": ["x"], "params": {"max_tokens": 5}},
        [f"unknown params ['max_tokens'] for this model: {LM_PARAMS}"],
    ),
    "a-param-to-a-classifier": (
        "lstm-intent",
        {"inputs": ["x"], "params": {"max_new_tokens": 5}},
        ["unknown params ['max_new_tokens'] for this model: it takes no params"],
    ),
    "greedy-with-temperature": (
        "lm",
        {"inputs": ["x"], "params": {"temperature": 0.7}},
        ["temperature apply to sampling; this request decodes greedily", '"decoding": "sample"'],
    ),
    "greedy-with-top-k": (
        "lstm-lm",
        {"inputs": ["x"], "params": {"do_sample": False, "top_k": 5}},
        ["top_k apply to sampling; this request decodes greedily"],
    ),
    "no-new-tokens": (
        "lm",
        {"inputs": ["x"], "params": {"max_new_tokens": 0}},
        ["max_new_tokens must be between 1 and 63; found 0"],  # 64 positions, 1 prompt token
    ),
    "absurd-new-tokens": (
        "lstm-lm",
        {"inputs": ["x"], "params": {"max_new_tokens": 1_000_000}},
        ["max_new_tokens must be between 1 and 1024; found 1000000"],
    ),
    "zero-temperature": (
        "lm",
        {"inputs": ["x"], "params": {"decoding": "sample", "temperature": 0}},
        ["temperature must be a number above 0; found 0"],
    ),
    "a-mistyped-param": (
        "lm",
        {"inputs": ["x"], "params": {"max_new_tokens": "many"}},
        ["Invalid parameters found", "max_new_tokens"],  # MLflow's check of the ParamSchema
    ),
}


@pytest.mark.parametrize(("name", "payload", "messages"), REFUSED.values(), ids=REFUSED.keys())
def test_a_request_the_model_cannot_answer_gets_a_400_saying_what_is_expected(
    served, name, payload, messages
):
    status, body = invoke_refused(served[name].url, payload)
    assert status == 400
    for message in messages:
        assert message in body["message"]
    assert "stack_trace" not in body and "Traceback" not in json.dumps(body)
