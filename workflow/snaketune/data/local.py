"""An experiment's data stages (download, clean, split, tokenizer, tokenize) run one after
another in this process on a scratch folder, with the settings the workflow's rules would get
from the same config: prepared data for notebooks, tests and benchmarks without a workflow."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from snaketune.config import REPO, validated
from snaketune.data.clean import clean_corpus
from snaketune.data.download import download_dataset
from snaketune.data.settings import clean_job, download_settings, split_settings, tokenizer_settings
from snaketune.data.split import split_corpus
from snaketune.data.tokenizer import prepare_tokenizer
from snaketune.names import SEQUENCE_CLASSIFICATION, SPLITS
from snaketune.settings import ConfigView
from snaketune.stages import (
    CleanPaths,
    DownloadPaths,
    EvaluatePaths,
    SplitPaths,
    TokenizerPaths,
    TrainPaths,
)
from snaketune.tokenize.one_process import tokenize_in_one_process
from snaketune.tokenize.settings import tokenize_job

DEMO_DATASET = "support-demo"
DEMO_EXPERIMENT = "demo-data"


def demo_config(
    task: str, block_size: int = 32, vocab_size: int = 400, instruction: bool = False
) -> dict[str, Any]:
    """One experiment on the shipped demo corpus (config.yaml's support-demo), small enough to
    prepare in seconds: a BPE of `vocab_size`, rows of `block_size` (or 32) tokens. A causal LM
    learns the whole text, or, with `instruction`, the answers only (the catalog's
    prompt_column and response_column)."""
    catalog = yaml.safe_load((REPO / "config.yaml").read_text())["datasets"]
    dataset = copy.deepcopy(catalog[DEMO_DATASET])
    if not instruction:
        dataset.pop("prompt_column", None)
        dataset.pop("response_column", None)
    classify = task == SEQUENCE_CLASSIFICATION
    experiment = {
        "name": DEMO_EXPERIMENT,
        "dataset": DEMO_DATASET,
        "task": task,
        "text_template": None if classify else "Customer: {question}\nAgent: {answer}",
        "clean": {"strip_html": True},
        "tokenizer": {"vocab_size": vocab_size},
        "tokenize": {"max_length": 32} if classify else {"block_size": block_size},
    }
    return {
        "datasets": {DEMO_DATASET: dataset},
        "experiments": [experiment],
    }


@dataclass(frozen=True)
class PreparedData:
    """What training and evaluation take from the data stages."""

    splits: dict[str, Path]
    tokenizer: Path
    shards: Path
    tokenize_manifest: Path
    manifests: dict[str, Path] = field(default_factory=dict)
    """Each data stage's manifest, by stage (what the track job reads)."""

    def train_paths(self, out: Path) -> TrainPaths:
        """The train job on this data, every output and the checkpoints under out."""
        out = Path(out)
        return TrainPaths(
            shards=self.shards,
            tokenize_manifest=self.tokenize_manifest,
            tokenizer=self.tokenizer,
            model=out / "model",
            history=out / "history.jsonl",
            loss_curve=out / "loss_curve.png",
            manifest=out / "manifest.json",
            system_metrics=out / "system_metrics.jsonl",
            state_dir=out / "state",
        )

    def evaluate_paths(self, model: Path, out: Path) -> EvaluatePaths:
        """The evaluate job of `model` on this data's test split, outputs under out."""
        out = Path(out)
        return EvaluatePaths(
            model=model,
            shards=self.shards,
            tokenize_manifest=self.tokenize_manifest,
            train=self.splits["train"],
            test=self.splits["test"],
            metrics=out / "metrics.json",
            samples=out / "samples.csv",
            plot=out / "eval_plot.png",
            manifest=out / "manifest.json",
        )


def prepare_data(
    config: dict[str, Any], experiment: str, root: Path, base_dir: Path = REPO
) -> PreparedData:
    """Run the data stages of `experiment` (a name in config["experiments"]) under root/<stage>/."""
    view = ConfigView(validated(config, base_dir), base_dir)
    root = Path(root)
    dataset = view.experiment(experiment)["dataset"]
    download = DownloadPaths(
        files=root / "download" / "files", manifest=root / "download" / "manifest.json"
    )
    download_dataset(download, download_settings(view, dataset))
    clean = CleanPaths(
        raw=download.files,
        corpus=root / "clean" / "corpus.parquet",
        report=root / "clean" / "report.json",
        manifest=root / "clean" / "manifest.json",
    )
    clean_corpus(clean, clean_job(view, experiment))
    split = SplitPaths(
        corpus=clean.corpus,
        **{name: root / "split" / f"{name}.parquet" for name in SPLITS},
        manifest=root / "split" / "manifest.json",
    )
    split_corpus(split, split_settings(view, experiment))
    tokenizer = TokenizerPaths(
        train=split.train,
        tokenizer=root / "tokenizer" / "tokenizer",
        manifest=root / "tokenizer" / "manifest.json",
    )
    prepare_tokenizer(tokenizer, tokenizer_settings(view, experiment))
    splits = {name: getattr(split, name) for name in SPLITS}
    tokenize_manifest = root / "tokenize" / "manifest.json"
    manifests = {
        "download": download.manifest,
        "clean": clean.manifest,
        "split": split.manifest,
        "tokenizer": tokenizer.manifest,
        "tokenize": tokenize_manifest,
    }
    prepared = PreparedData(
        splits, tokenizer.tokenizer, root / "tokenize" / "shards", tokenize_manifest, manifests
    )
    tokenize_in_one_process(
        splits,
        prepared.tokenizer,
        prepared.shards,
        prepared.tokenize_manifest,
        tokenize_job(view, experiment),
    )
    return prepared
