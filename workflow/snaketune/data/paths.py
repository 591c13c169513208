"""The data stages' paths: download, clean, split and the tokenizer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from snaketune.paths import Paths, input_path, manifest_path, output_path, page_path


@dataclass(frozen=True)
class DownloadPaths(Paths):
    files: Path = output_path("the verified, unpacked dataset files", name="files", folder=True)
    manifest: Path = manifest_path()


@dataclass(frozen=True)
class CleanPaths(Paths):
    raw: Path = input_path("the download's files folder")
    corpus: Path = output_path("cleaned documents: doc_id, text, label", name="corpus.parquet")
    report: Path = output_path(
        "what each filter removed or changed", artifact=True, name="report.json"
    )
    manifest: Path = manifest_path()
    report_html: Path = page_path("the cleaning report as a table", of="report")


@dataclass(frozen=True)
class SplitPaths(Paths):
    corpus: Path = input_path("the cleaned corpus")
    train: Path = output_path("the train split", name="train.parquet")
    val: Path = output_path("the validation split", name="val.parquet")
    test: Path = output_path("the test split", name="test.parquet")
    manifest: Path = manifest_path()


@dataclass(frozen=True)
class TokenizerPaths(Paths):
    train: Path = input_path("the train split (BPE training text)")
    tokenizer: Path = output_path(
        "the tokenizer, Hugging Face format", artifact=True, name="tokenizer", folder=True
    )
    manifest: Path = manifest_path()
