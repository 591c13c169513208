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
from snaketune.data.paths import CleanPaths, DownloadPaths, SplitPaths, TokenizerPaths
from snaketune.data.settings import clean_job, download_settings, split_settings, tokenizer_settings
from snaketune.data.split import split_corpus
from snaketune.data.tokenizer import prepare_tokenizer
from snaketune.evaluate.paths import EvaluatePaths
from snaketune.names import SPLITS
from snaketune.paths import output_names
from snaketune.settings import ConfigView
from snaketune.tasks import task_of
from snaketune.tokenize.one_process import tokenize_in_one_process
from snaketune.tokenize.paths import GatherPaths
from snaketune.tokenize.settings import tokenize_job
from snaketune.train.paths import TrainPaths

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
    classify = not task_of(task).predicts_tokens
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
        return TrainPaths.under(
            out,
            shards=self.shards,
            tokenize_manifest=self.tokenize_manifest,
            tokenizer=self.tokenizer,
            state_dir=Path(out) / "state",
        )

    def evaluate_paths(self, model: Path, out: Path) -> EvaluatePaths:
        """The evaluate job of `model` on this data's test split, outputs under out."""
        return EvaluatePaths.under(
            out,
            model=model,
            shards=self.shards,
            tokenize_manifest=self.tokenize_manifest,
            train=self.splits["train"],
            test=self.splits["test"],
        )


def prepare_data(
    config: dict[str, Any], experiment: str, root: Path, base_dir: Path = REPO
) -> PreparedData:
    """Run the data stages of `experiment` (a name in config["experiments"]) under root/<stage>/."""
    view = ConfigView(validated(config, base_dir), base_dir)
    root = Path(root)
    dataset = view.experiment(experiment)["dataset"]
    download = DownloadPaths.under(root / "download")
    download_dataset(download, download_settings(view, dataset))
    clean = CleanPaths.under(root / "clean", raw=download.files)
    clean_corpus(clean, clean_job(view, experiment))
    split = SplitPaths.under(root / "split", corpus=clean.corpus)
    split_corpus(split, split_settings(view, experiment))
    tokenizer = TokenizerPaths.under(root / "tokenizer", train=split.train)
    prepare_tokenizer(tokenizer, tokenizer_settings(view, experiment))
    splits = {name: getattr(split, name) for name in SPLITS}
    gathered = output_names(GatherPaths, {})  # the tokenize stage's outputs
    tokenize_manifest = root / "tokenize" / gathered["manifest"]
    manifests = {
        "download": download.manifest,
        "clean": clean.manifest,
        "split": split.manifest,
        "tokenizer": tokenizer.manifest,
        "tokenize": tokenize_manifest,
    }
    prepared = PreparedData(
        splits,
        tokenizer.tokenizer,
        root / "tokenize" / gathered["shards"],
        tokenize_manifest,
        manifests,
    )
    tokenize_in_one_process(
        splits,
        prepared.tokenizer,
        prepared.shards,
        prepared.tokenize_manifest,
        tokenize_job(view, experiment),
    )
    return prepared
