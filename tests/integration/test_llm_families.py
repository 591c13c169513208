"""Pretrained LLMs of four families fine-tuned through the workflow on chat-formatted
instruction data: tiny random Llama, Qwen2, Mistral and GPT-NeoX checkpoints (saved with
save_pretrained, each with the same tokenizer carrying a chat template), each with LoRA adapters
and with a full fine-tune. One snakemake run trains, evaluates, tracks and registers them all;
the tests read its results, its MLflow store, and the registered models as a server loads
them."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from tests.support.checkpoints import CHAT_TEMPLATE
from tests.support.families import tiny_causal_lm
from tests.support.workflow import DEFAULT_CONFIG, snakemake

pytestmark = pytest.mark.slow

RUNS = {
    f"{family}-{mode}": (family, rank)
    for family in ("llama", "qwen2", "mistral", "gpt_neox")
    for mode, rank in (("lora", 4), ("full", 0))
}
"""Each experiment's family and LoRA rank (0: a full fine-tune)."""
QUESTION = "Where is my parcel?"


def experiment(name: str, rank: int, base: Path, chat: Path) -> dict:
    return {
        "name": name,
        "dataset": "support-demo",
        "task": "causal_lm",
        "text_template": None,  # the chat template composes the examples
        "tokenizer": {"kind": "pretrained", "name_or_path": str(chat)},
        "tokenize": {"block_size": 128},
        "model": {"init": "pretrained", "name_or_path": str(base), "lora_rank": rank},
        "train": {
            "max_steps": 6,
            "batch_size": 8,
            "lr": 0.01,
            "warmup_steps": 1,
            "eval_every": 6,
            "checkpoint_every": 6,
            "eval_rows": 16,
        },
        "evaluate": {
            "prompts": [QUESTION],
            "max_new_tokens": 6,
            "answer_examples": 4,
            "batch_size": 4,
        },
    }


@pytest.fixture(scope="module")
def families_run(lm_data, tmp_path_factory) -> tuple[Path, dict]:
    """(workdir, config) of the finished run; the bases under workdir/bases."""
    import torch
    from transformers import AutoTokenizer

    workdir = tmp_path_factory.mktemp("families")
    chat = AutoTokenizer.from_pretrained(lm_data["tokenizer"])
    chat.chat_template = CHAT_TEMPLATE
    chat.save_pretrained(workdir / "chat-tokenizer")
    experiments = []
    for name, (family, rank) in RUNS.items():
        base = workdir / "bases" / family
        if not base.exists():
            torch.manual_seed(0)
            model = tiny_causal_lm(family, len(chat))
            model.config.eos_token_id = chat.eos_token_id
            model.save_pretrained(base)
            chat.save_pretrained(base)
        experiments.append(experiment(name, rank, base, workdir / "chat-tokenizer"))
    config = copy.deepcopy(DEFAULT_CONFIG)
    config.update(results_dir="results", experiments=experiments)
    config["mlflow"] = {**config["mlflow"], "experiment_name": "families"}
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    run = snakemake(workdir)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return workdir, config


def stage(run: tuple[Path, dict], experiment: str, name: str) -> Path:
    """results/<experiment>/<stage>: the experiment's own stage, or the link to a shared one."""
    workdir, _ = run
    return workdir / "results" / experiment / name


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


@pytest.mark.parametrize("name", RUNS)
def test_each_family_trains_with_the_chunked_loss_and_is_evaluated(families_run, name):
    family, rank = RUNS[name]
    train = json.loads((stage(families_run, name, "train") / "manifest.json").read_text())
    metrics = json.loads((stage(families_run, name, "evaluate") / "metrics.json").read_text())
    assert train["loss"] == "chunked" and train["model_type"] == family
    assert train["saved_model"] == ("adapter" if rank else "whole")
    trainable, total = train["counts"]["trainable_parameters"], train["counts"]["parameters"]
    assert (trainable < total / 5) if rank else trainable == total
    assert metrics["answer_perplexity"] > 1 and metrics["answer_tokens"] > 0


@pytest.mark.parametrize("name", RUNS)
def test_the_registered_model_serves_the_evaluated_answers(families_run, name):
    """What MLflow holds for a LoRA run is the adapter (a small fraction of the base's bytes),
    for a full fine-tune the whole model; the registered model, loaded as a server loads it,
    answers as evaluation's model does."""
    import mlflow
    import pandas as pd

    from snaketune.evaluate.evaluation import CPU
    from snaketune.evaluate.generation import generate_many
    from snaketune.evaluate.settings import EvalSettings
    from snaketune.track.registry import process_tracking_uri
    from snaketune.train.models import load_trained

    workdir, _ = families_run
    family, rank = RUNS[name]
    runs = json.loads((stage(families_run, name, "track") / "runs.json").read_text())
    model_uri = runs["model"]["uri"]
    # The process-wide tracking URI, set for this test and unset after it, as the track job
    # does (snaketune.track.registry): the tests after it use their own stores.
    with process_tracking_uri(f"sqlite:///{workdir / 'results' / 'mlflow.db'}"):
        logged = Path(mlflow.artifacts.download_artifacts(model_uri)) / "artifacts" / "model"
        served = mlflow.pyfunc.load_model(model_uri)
    weights = sorted(f.name for f in logged.glob("*.safetensors"))
    base = (workdir / "bases" / family / "model.safetensors").stat().st_size
    if rank:
        assert weights == ["adapter_model.safetensors"]  # no merged copy of the base
        assert folder_bytes(logged) < base / 5, (folder_bytes(logged), base)
    else:
        assert weights == ["model.safetensors"] and folder_bytes(logged) > base / 2

    answer = served.predict(pd.DataFrame({"text": [QUESTION]}))
    model_dir = stage(families_run, name, "train") / "model"
    model = load_trained(model_dir, "causal_lm").eval()
    tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(model_dir)
    prompt = served.unwrap_python_model().prompts([QUESTION])
    settings = EvalSettings(max_new_tokens=6)
    expected, _ = generate_many(model, tokenizer, prompt, settings, 128, CPU, 1)
    assert list(answer) == [expected[0].strip()]


def test_a_quantized_run_is_refused_before_any_job_on_this_machine(families_run, tmp_path):
    """bitsandbytes' 4-bit weights need CUDA: without a GPU the run stops before any job,
    naming the key (the CUDA path itself runs only where a GPU is lent)."""
    workdir, config = families_run
    config = copy.deepcopy(config)
    config["experiments"] = config["experiments"][:1]
    config["experiments"][0]["model"]["quantization"] = "4bit"
    config["results_dir"] = str(tmp_path / "results")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    run = snakemake(tmp_path)
    assert run.returncode != 0
    assert "model.quantization 4bit" in run.stdout + run.stderr
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").rglob("*.json"))
