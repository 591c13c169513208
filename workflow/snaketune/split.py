"""Stage 3, split_corpus: deterministic train/val/test by a hash of each document's text.

The split of a document depends only on its normalized text, so it is the same on every machine
and every rerun, and identical documents can never land on both sides of a split. Near-copies
(a few words apart) hash apart, so they are removed afterwards (snaketune.dedup): documents are
only ever dropped, never moved, and the test split keeps nothing close to a training document.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from snaketune.clean import normalize_for_match
from snaketune.dedup import NearDuplicateReport, NearDuplicateSettings, find_near_duplicates
from snaketune.errors import CorpusError
from snaketune.fileio import PARQUET_ROW_GROUP_ROWS, atomic_path
from snaketune.manifest import stage_manifest

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SplitSettings:
    train: float = 0.8
    val: float = 0.1
    test: float = 0.1
    salt: str = ""
    """Change to draw a different (still deterministic) split."""
    near_duplicates: NearDuplicateSettings = field(default_factory=NearDuplicateSettings)
    """MinHash/LSH removal of near-copies within and across splits (a dict is accepted)."""

    def __post_init__(self) -> None:
        if isinstance(self.near_duplicates, dict):  # as it arrives from the JSON settings
            object.__setattr__(
                self, "near_duplicates", NearDuplicateSettings(**self.near_duplicates)
            )
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"split ratios must sum to 1, got {total} ({asdict(self)})")


def bucket_of(text: str, salt: str = "") -> float:
    """A number in [0, 1) fixed by the text: the first 8 bytes of sha256, scaled."""
    digest = hashlib.sha256((salt + normalize_for_match(text)).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_splits(texts: pd.Series, settings: SplitSettings) -> pd.Series:
    buckets = texts.map(lambda t: bucket_of(t, settings.salt))
    cut_val = settings.train
    cut_test = settings.train + settings.val
    names = ["train" if b < cut_val else "val" if b < cut_test else "test" for b in buckets]
    return pd.Series(names, index=texts.index, dtype="string")


def split_corpus(
    corpus: Path, outputs: dict[str, Path], manifest: Path, settings: SplitSettings
) -> dict[str, int]:
    with stage_manifest("split", manifest, {"corpus": corpus}, asdict(settings)) as record:
        docs = pd.read_parquet(corpus)
        docs["split"] = assign_splits(docs["text"], settings).values
        report = None
        if settings.near_duplicates.enabled:
            docs, report = drop_near_duplicates(docs, settings.near_duplicates)
        parts = {
            name: docs[docs["split"] == name].drop(columns="split").reset_index(drop=True)
            for name in SPLITS
        }
        # Every split is checked before any is written: a failure leaves no split behind.
        for name, part in parts.items():
            if part.empty:
                raise CorpusError(
                    f"split '{name}' has zero documents (corpus has {len(docs)}); use a larger "
                    "corpus or raise that split's ratio"
                )
        counts = {}
        for name, part in parts.items():
            with atomic_path(outputs[name]) as tmp:
                part.to_parquet(tmp, index=False, row_group_size=PARQUET_ROW_GROUP_ROWS)
            counts[name] = len(part)
        record.counts = dict(counts)
        if report is not None:
            # Under counts, so the tracking stage logs them as metrics like any other count.
            record.counts["near_duplicates_removed"] = report.removed
            record.extra["near_duplicate_examples"] = report.examples
        if docs["label"].notna().any():
            record.extra["labels"] = labels_per_split(docs)
    return counts


def drop_near_duplicates(
    docs: pd.DataFrame, settings: NearDuplicateSettings
) -> tuple[pd.DataFrame, NearDuplicateReport]:
    texts, splits = docs["text"].tolist(), docs["split"].tolist()
    dropped, report = find_near_duplicates(texts, splits, SPLITS, settings)
    return docs.drop(index=docs.index[dropped]), report


def labels_per_split(docs: pd.DataFrame) -> dict[str, dict[str, int]]:
    return {
        name: {
            str(k): int(v)
            for k, v in docs.loc[docs["split"] == name, "label"].value_counts().items()
        }
        for name in SPLITS
    }
