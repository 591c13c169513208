"""How fast is our near-duplicate removal? One corpus, two methods:

1. ours: `snaketune.data.dedup.find_near_duplicates` (the code the split rule runs: numpy shingling
   and signatures, datasketch's MinHashLSH only for documents that share a band);
2. reference: datasketch as its documentation shows it: per document, the shingles as bytes into
   `MinHash.update_batch` (SHA-1), then `MinHashLSH.query` and `insert` for every document
   (with our band weights, so both find the same pairs).

Both keep the first of each cluster in the same visiting order, at the same threshold, shingle
size and permutations. Prints seconds, documents/s, removals and the reference's time relative to
ours. Corpus: GLUE SST-2 train from ../shared/data (phrases, exact duplicates dropped, the first
--docs of them), else the embedded demo corpus repeated with small edits.

Run: .venv/bin/python bench/bench_near_duplicates.py [--docs 50000]
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
from pathlib import Path

import pandas as pd
from datasketch import MinHash, MinHashLSH

from snaketune.data.clean import normalize_for_match
from snaketune.data.dedup import LSH_WEIGHTS, find_near_duplicates, visiting_order
from snaketune.data.settings import NearDuplicateSettings, SplitSettings
from snaketune.data.split import assign_splits
from snaketune.names import SPLITS

REPO = Path(__file__).resolve().parents[1]
SST2 = REPO.parent / "shared" / "data" / "sst2" / "train.tsv"
DEMO = REPO / "workflow" / "resources" / "demo" / "support.jsonl.gz"


def load_documents(count: int) -> tuple[list[str], str]:
    if SST2.exists():
        frame = pd.read_csv(SST2, sep="\t", quoting=3, dtype=str, keep_default_na=False)
        texts, source = frame["sentence"].tolist(), "SST-2 train"
    else:
        with gzip.open(DEMO, "rt") as fh:
            questions = [json.loads(line)["question"] for line in fh]
        texts = [f"{q} (ticket {i})" for i in range(count // len(questions) + 1) for q in questions]
        source = "demo corpus, repeated"
    unique = list({normalize_for_match(t): t for t in texts}.values())  # as cleaning leaves it
    return unique[:count], source


def reference(texts: list[str], splits: list[str], settings: NearDuplicateSettings) -> int:
    size, removed = settings.shingle_size, 0
    index = MinHashLSH(settings.threshold, settings.num_perm, weights=LSH_WEIGHTS)
    kept: dict[int, MinHash] = {}  # to confirm candidates, as datasketch's docs suggest
    for row in visiting_order(splits, SPLITS):
        text = normalize_for_match(texts[row])
        shingles = {text[i : i + size] for i in range(max(len(text) - size + 1, 1))}
        sketch = MinHash(settings.num_perm, seed=settings.seed)
        sketch.update_batch([s.encode("utf-8") for s in shingles])
        candidates = (kept[key] for key in index.query(sketch))
        if any(sketch.jaccard(other) >= settings.threshold for other in candidates):
            removed += 1
        else:
            index.insert(row, sketch, check_duplication=False)
            kept[row] = sketch
    return removed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=50_000)
    args = parser.parse_args()
    texts, source = load_documents(args.docs)
    splits = assign_splits(pd.Series(texts), SplitSettings()).tolist()
    settings = NearDuplicateSettings()
    print(f"corpus: {source}, {len(texts)} documents, {sum(map(len, texts))} characters")

    started = time.perf_counter()
    dropped, _ = find_near_duplicates(texts, splits, SPLITS, settings)
    ours = time.perf_counter() - started
    print(f"ours:      {ours:7.2f} s  {len(texts) / ours:9.0f} docs/s  removed {len(dropped)}")

    started = time.perf_counter()
    removed = reference(texts, splits, settings)
    theirs = time.perf_counter() - started
    print(
        f"reference: {theirs:7.2f} s  {len(texts) / theirs:9.0f} docs/s  removed {removed}"
        f"  ({theirs / ours:.1f}x ours)"
    )


if __name__ == "__main__":
    main()
