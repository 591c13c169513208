"""An MLflow stage's inputs laid out as after a real run (small, made by hand), real SQLite
stores, and the track job called as the rule calls it."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass, fields, replace
from pathlib import Path

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import ViewType

from snaketune.data.paths import CleanPaths, DownloadPaths, SplitPaths, TokenizerPaths
from snaketune.evaluate.paths import EvaluatePaths
from snaketune.paths import OUTPUT, Paths, is_list
from snaketune.stages import TRACKED
from snaketune.tokenize.paths import GatherPaths
from snaketune.track import stage_log
from snaketune.track.paths import TrackPaths
from snaketune.track.reconcile import StageFiles, track_experiment
from snaketune.track.settings import TrackSettings
from snaketune.train.paths import TrainPaths
from tests.support.repo import REPO

EXPERIMENT = "demo-lm"
MLFLOW_EXPERIMENT = "snaketune-tests"
TRUNCATION_NOTE = "... (full value in config.json artifact)"
PROMPTS = [
    f"Customer: question {i} about an order that has not arrived yet, what now?\nAgent:"
    for i in range(12)
]
CONFIG = {
    "name": EXPERIMENT,
    "dataset": "support-demo",
    "task": "causal_lm",
    "text_template": "Customer: {question}\nAgent: {answer}",
    "clean": {"dedup": True, "min_chars": 10, "max_chars": 4000, "strip_html": True},
    "split": {"train": 0.8, "val": 0.1, "test": 0.1, "salt": ""},
    "tokenizer": {"kind": "bpe", "vocab_size": 400, "min_frequency": 2, "name_or_path": None},
    "tokenize": {"block_size": 32, "max_length": 32},
    "model": {"arch": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 2, "dropout": 0.1},
    "train": {"max_steps": 5, "batch_size": 8, "lr": 0.003, "warmup_steps": 1},
    "evaluate": {"batch_size": 32, "max_new_tokens": 40, "prompts": PROMPTS},
}
HISTORY = [
    {"step": 1, "loss": 7.44, "lr": 0.0001, "grad_norm": 2.34, "tokens_per_s": 3726.5},
    {"step": 2, "loss": 7.39, "lr": 0.0002, "grad_norm": 2.22, "tokens_per_s": 5396.6},
    {
        "step": 3,
        "loss": 7.28,
        "lr": 0.0003,
        "grad_norm": 2.28,
        "tokens_per_s": 5604.0,
        "val_loss": 7.1,
    },
    {"step": 4, "loss": 7.15, "lr": 0.0004, "grad_norm": 1.78, "tokens_per_s": 6490.3},
    {
        "step": 5,
        "loss": 7.03,
        "lr": 0.0005,
        "grad_norm": 1.38,
        "tokens_per_s": 6482.7,
        "val_loss": 6.9,
    },
]
# As the trainer writes them: each row with the time its values were read.
HISTORY = [{**row, "timestamp": 1790005000.5 + row["step"]} for row in HISTORY]
METRICS = {
    "perplexity": 1.633,
    "accuracy": 0.889,
    "macro_f1": 0.875,
    "test_rows": 110,
    "per_class": {
        "billing": {"precision": 0.9, "recall": 0.86, "f1": 0.88},
        "shipping": {"precision": 0.85, "recall": 0.89, "f1": 0.87},
    },
    "confusion_matrix": [[24, 1], [2, 38]],
    "label_names": ["billing", "shipping"],
    "protocol": "test split packed into non-overlapping blocks of 32 tokens",
}
EVAL_METRIC_NAMES = {
    "eval.perplexity",
    "eval.accuracy",
    "eval.macro_f1",
    "eval.test_rows",
    "eval.per_class.billing.precision",
    "eval.per_class.billing.recall",
    "eval.per_class.billing.f1",
    "eval.per_class.shipping.precision",
    "eval.per_class.shipping.recall",
    "eval.per_class.shipping.f1",
}
VERSIONS = {"python": "3.11.7", "mlflow": "3.17.2", "torch": "2.13.0+cpu", "snaketune": "0.1.0"}
SHA = "a55dca87a70bc06c08d4297126c5128a9e65081cd075c9fca872381e621d0e0e"
SPLIT_SHA = {
    "train": "e00d50372581def61ce2815e55ecff6f0aabbcb8a798ff16cafaf645b04c7085",
    "val": "813304c252b9e5ecbdd8eb546487838dad3b4dcc3565ad78635d9c87ad8b6d6c",
    "test": "eb546d110caa8baf601b1abf1032fe90669af155e9106960dc85d25a5c524992",
}
SPLIT_ROWS = {"train": 2491, "val": 308, "test": 319}
DOWNLOAD_URL = "workflow/resources/demo/support.jsonl.gz"
STARTED_AT = 1790000000.0
"""When the first stage started (each later one 1000 s after the one before)."""
SYSTEM_SAMPLES = [
    {
        "timestamp": 1790000000.0 + 5 * i,
        "elapsed_s": 5.0 * i,
        "cpu_utilization_percentage": 90.0 + i,
        "process_rss_megabytes": 400.0 + i,
        "system_memory_usage_megabytes": 3000.0,
        "system_memory_usage_percentage": 40.0,
    }
    for i in range(1, 4)
]


@dataclass(frozen=True)
class StageInputs:
    """What the track job reads: every stage's manifest (which says where its outputs are)."""

    root: Path
    manifests: dict[str, Path]
    history: Path
    metrics: Path
    model_dir: Path
    system_metrics: Path

    @property
    def stages(self) -> list[StageFiles]:
        """The stage files the track job finds through the manifests."""
        return [StageFiles.recorded(name, path) for name, path in self.manifests.items()]

    def paths(self, runs: Path, artifacts: Path | None = None) -> TrackPaths:
        return TrackPaths(
            **self.manifests,
            runs=runs,
            store=self.root / "mlflow.db",
            artifacts=artifacts or self.root / "mlartifacts",
            provenance=self.root / "provenance.json",
            tracking=self.tracking,
            model_card=runs.with_name("model_card.md"),
        )

    @property
    def tracking(self) -> Path:
        return self.root / EXPERIMENT / "tracking"


def write_json_file(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return path


def laid_out(cls: type[Paths], folder: Path) -> Paths:
    """A job's paths as the workflow lays them out in `folder` (Paths.under); its inputs and
    state paths, which the track job does not read, under `folder` by their field names."""
    elsewhere = {
        f.name: [] if is_list(f) else folder / f.name
        for f in fields(cls)
        if f.metadata["role"] != OUTPUT
    }
    return cls.under(folder, **elsewhere)


def write_manifest(
    paths: Paths,
    stage: str,
    params: dict,
    counts: dict,
    seconds: float,
    outputs: dict[str, str] | None = None,
    **extra,
) -> Path:
    """A manifest shaped like the ones snaketune.manifest.stage_manifest writes (the stages
    one after the other from STARTED_AT, a second apart)."""
    inputs = {"input": {"path": f"results/{EXPERIMENT}/{stage}/input", "sha256": SHA}}
    started_at = STARTED_AT + 1000 * TRACKED.index(stage)
    return write_json_file(
        paths.manifest,
        {
            "stage": stage,
            "inputs": inputs,
            "params": params,
            "counts": counts,
            "outputs": outputs or {},
            "paths": {f.name: str(getattr(paths, f.name)) for f in fields(paths) if not is_list(f)},
            "seconds": seconds,
            "started_at": started_at,
            "run_key": stage_log.run_key(inputs, params),
            "versions": VERSIONS,
            **extra,
        },
    )


def write_stage_files(
    root: Path,
    metrics: dict = METRICS,
    history: list = HISTORY,
    url: str = DOWNLOAD_URL,
) -> StageInputs:
    """A minimal but complete set of stage files laid out like results/ after a real run (the
    model is a stand-in: write_tiny_model puts a real one in its place)."""
    exp = root / EXPERIMENT
    download = laid_out(DownloadPaths, root / "datasets" / "support-demo" / "download")
    clean = laid_out(CleanPaths, exp / "clean")
    split = laid_out(SplitPaths, exp / "split")
    tokenizer = laid_out(TokenizerPaths, exp / "tokenizer")
    tokenize = laid_out(GatherPaths, exp / "tokenize")
    train = laid_out(TrainPaths, exp / "train")
    evaluate = laid_out(EvaluatePaths, exp / "evaluate")

    write_manifest(
        download,
        "download",
        {"url": url, "sha256": SHA, "retries": 4},
        {"fetched_bytes": 49408, "files": 1},
        0.005,
        fetched_sha256=SHA,
    )
    write_json_file(clean.report, {"removed": {"exact_duplicate": 146}})
    write_manifest(
        clean,
        "clean",
        {"clean": CONFIG["clean"], "member": None, "read": {"format": "jsonl"}},
        {
            "input_records": 3264,
            "output_records": 3118,
            "pii_redacted": {"email": 104},
            "labels": {},
        },
        0.366,
    )
    # As the split stage records the splits it wrote: their paths and sha256s.
    write_manifest(split, "split", CONFIG["split"], SPLIT_ROWS, 0.097, outputs=SPLIT_SHA)
    write_json_file(tokenizer.tokenizer / "tokenizer.json", {"model": {"type": "BPE", "vocab": {}}})
    write_json_file(tokenizer.tokenizer / "tokenizer_config.json", {"model_max_length": 32})
    write_manifest(tokenizer, "tokenizer", CONFIG["tokenizer"], {"vocab_size": 400}, 1.52)
    write_manifest(
        tokenize,
        "tokenize",
        {**CONFIG["tokenize"], "task": "causal_lm"},
        {
            "train": {"documents": 2491, "rows": 855, "tokens": 109440},
            "test": {"documents": 319, "rows": 110, "tokens": 14080},
        },
        2.25,
        label_names=[],
    )
    train.history.parent.mkdir(parents=True, exist_ok=True)
    train.history.write_text("".join(json.dumps(row) + "\n" for row in history))
    train.system_metrics.write_text("".join(json.dumps(row) + "\n" for row in SYSTEM_SAMPLES))
    write_json_file(train.model / "config.json", {"model_type": "gpt2", "n_layer": 1})
    (train.model / "model.safetensors").write_bytes(bytes(range(256)) * 4)
    write_manifest(  # no loss curve written: no such artifact
        train,
        "train",
        {"model": CONFIG["model"], "task": "causal_lm", "train": CONFIG["train"]},
        {"final_val_loss": 6.9, "parameters": 624384, "steps": 5, "train_rows": 855},
        88.804,
        device="cpu",
        fingerprint="33c43751ed6d804c",
    )
    write_json_file(evaluate.metrics, metrics)
    pd.DataFrame([{"prompt": PROMPTS[0], "generated": " Sorry!"}]).to_csv(
        evaluate.samples, index=False
    )
    write_manifest(  # no plot written: no such artifact
        evaluate, "evaluate", CONFIG["evaluate"], {"test_rows": 110}, 3.967
    )
    jobs = (download, clean, split, tokenizer, tokenize, train, evaluate)
    manifests = {stage: job.manifest for stage, job in zip(TRACKED, jobs, strict=True)}
    return StageInputs(
        root, manifests, train.history, evaluate.metrics, train.model, train.system_metrics
    )


def settings_for(tracking_uri: str, registered_model_name: str | None = None) -> TrackSettings:
    return TrackSettings(
        experiment=EXPERIMENT,
        mlflow_experiment=MLFLOW_EXPERIMENT,
        tracking_uri=tracking_uri,
        config=CONFIG,
        registered_model_name=registered_model_name,
    )


def server_settings(uri: str, mlflow_experiment: str) -> TrackSettings:
    # As the workflow does for an http(s) URI: the server decides where artifacts go.
    return replace(settings_for(uri), mlflow_experiment=mlflow_experiment)


def track(
    settings: TrackSettings, inputs: StageInputs, runs_path: Path, artifacts: Path | None = None
) -> dict[str, str]:
    """The track job on these inputs; `artifacts` is where a new local experiment keeps them."""
    return track_experiment(inputs.paths(runs_path, artifacts), settings)


def write_tiny_model(data: dict[str, Path], model_dir: Path, task: str, arch: str = "gpt2") -> Path:
    """A real (untrained) 1-layer GPT-2 (or LSTM) saved as the train stage saves it, with the
    tokenizer from `data` (the lm_data or classification_data fixture)."""
    from snaketune.train.models import build_model
    from snaketune.train.positions import model_positions
    from snaketune.train.settings import ModelSettings
    from snaketune.train.trainer import limit_tokenizer_length

    info = json.loads(data["tokenize_manifest"].read_text())
    model = build_model(
        ModelSettings(arch=arch, n_layer=1, n_embd=16, n_head=2, dropout=0.0),
        task,
        info["vocab_size"],
        64,
        info["pad_token_id"],
        info["eos_token_id"],
        info["label_names"],
    )
    shutil.rmtree(model_dir, ignore_errors=True)
    model.save_pretrained(model_dir)
    for item in data["tokenizer"].iterdir():
        shutil.copy2(item, model_dir / item.name)
    limit_tokenizer_length(model_dir, model_positions(model))  # as the train stage saves it
    return model_dir


def all_runs(client: MlflowClient, name: str = MLFLOW_EXPERIMENT) -> list:
    """Every run of the MLflow experiment, deleted ones included."""
    experiment = client.get_experiment_by_name(name)
    return client.search_runs([experiment.experiment_id], run_view_type=ViewType.ALL)


def artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    return {info.path for info in client.list_artifacts(run_id, path)}


def download(uri: str, run_id: str, path: str, dst: Path) -> Path:
    return Path(
        mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=path, dst_path=str(dst), tracking_uri=uri
        )
    )


def expected_git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "HEAD"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


@dataclass(frozen=True)
class Store:
    uri: str
    artifact_location: str
    artifact_dir: Path
    client: MlflowClient


def new_store(root: Path, empty_db: Path) -> Store:
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(empty_db, root / "mlflow.db")
    uri = f"sqlite:///{root}/mlflow.db"
    artifact_dir = root / "artifacts"
    return Store(uri, f"file://{artifact_dir}", artifact_dir, MlflowClient(tracking_uri=uri))
