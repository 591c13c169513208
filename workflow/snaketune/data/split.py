"""Stage 3, split_corpus: deterministic train/val/test by a hash of each document's text.

The split of a document depends only on its normalized text, so it is the same on every machine
and every rerun, and identical documents can never land on both sides of a split. Near-copies
(a few words apart) hash apart, so they are removed afterwards (snaketune.data.dedup): documents are
only ever dropped, never moved, and the test split keeps nothing close to a training document.
"""

from __future__ import annotations

import hashlib

import pandas as pd

from snaketune.context import IN_PROCESS, JobContext
from snaketune.data.clean import normalize_for_match
from snaketune.data.dedup import NearDuplicateReport, find_near_duplicates
from snaketune.data.paths import SplitPaths
from snaketune.data.settings import NearDuplicateSettings, SplitSettings
from snaketune.errors import CorpusError
from snaketune.fileio import PARQUET_ROW_GROUP_ROWS, atomic_path
from snaketune.manifest import stage_manifest
from snaketune.names import SPLITS, TEST, TRAIN, VAL


def bucket_of(text: str, salt: str = "") -> float:
    """A number in [0, 1) fixed by the text: the first 8 bytes of sha256, scaled."""
    digest = hashlib.sha256((salt + normalize_for_match(text)).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_splits(texts: pd.Series, settings: SplitSettings) -> pd.Series:
    buckets = texts.map(lambda t: bucket_of(t, settings.salt))
    cut_val = settings.ratio(TRAIN)
    cut_test = cut_val + settings.ratio(VAL)
    names = [TRAIN if b < cut_val else VAL if b < cut_test else TEST for b in buckets]
    return pd.Series(names, index=texts.index, dtype="string")


def split_corpus(
    paths: SplitPaths, settings: SplitSettings, context: JobContext = IN_PROCESS
) -> dict[str, int]:
    """Write each split (train, val, test) to its path; the manifest records their sha256."""
    with stage_manifest(paths, settings, context=context) as record:
        docs = pd.read_parquet(paths.corpus)
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
            with atomic_path(getattr(paths, name)) as tmp:
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
