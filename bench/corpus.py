"""Distinct text of any size for the data-stage benchmarks: documents drawn from a word-bigram
chain over the real corpora in ../shared/data (the embedded demo corpus when absent), with a
long tail of identifiers and numbers, as web text has (order ids, dates, prices), so that no two
documents repeat and an encoder's word caches see new words however large the corpus is.

Seeded: the same size gives the same corpus.
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
SOURCES = [
    "tinyshakespeare/input.txt",
    "wikitext-2/valid.txt",
    "wikitext-2/test.txt",
    "sst2/train.tsv",
    "ag_news/test.csv",
    "sms_spam_collection/SMSSpamCollection",
]
DEMO = REPO / "workflow" / "resources" / "demo" / "support.jsonl.gz"
TAIL_SHARE = 0.03
"""Words replaced by a fresh identifier or number."""
WORDS_PER_DOCUMENT = (40, 400)
CHAINS = 4096


def source_text() -> tuple[str, str]:
    found = [SHARED / name for name in SOURCES if (SHARED / name).exists()]
    if found:
        return "\n".join(p.read_text(errors="replace") for p in found), "../shared/data corpora"
    with gzip.open(DEMO, "rt") as fh:
        rows = [json.loads(line) for line in fh]
    return "\n".join(f"{r['question']} {r['answer']}" for r in rows), "the demo corpus"


def bigram_chain(text: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(words, successor offsets, successors): word i is followed by
    successors[offsets[i]:offsets[i + 1]], as often as in the text."""
    tokens = re.findall(r"\S+", text)
    words, ids = np.unique(np.array(tokens, dtype=object), return_inverse=True)
    order = np.argsort(ids[:-1], kind="stable")
    successors = ids[1:][order]
    counts = np.bincount(ids[:-1], minlength=len(words))
    offsets = np.concatenate([[0], np.cumsum(counts)])
    return words, offsets, successors


def documents(megabytes: float, seed: int = 0) -> tuple[list[str], str]:
    """Distinct documents totalling about `megabytes` of UTF-8 text, and where they come from."""
    text, source = source_text()
    words, offsets, successors = bigram_chain(text)
    rng = np.random.default_rng(seed)
    target, size, out, serial = megabytes * 1e6, 0, [], 0
    while size < target:
        lengths = rng.integers(*WORDS_PER_DOCUMENT, size=CHAINS)
        current = rng.integers(len(words), size=CHAINS)
        steps = np.empty((CHAINS, lengths.max()), dtype=np.int64)
        for position in range(lengths.max()):
            steps[:, position] = current
            counts = offsets[current + 1] - offsets[current]
            restart = counts == 0
            pick = offsets[current] + (rng.random(CHAINS) * np.maximum(counts, 1)).astype(np.int64)
            current = np.where(restart, rng.integers(len(words), size=CHAINS), successors[pick])
        tail = rng.random(steps.shape) < TAIL_SHARE
        for row in range(CHAINS):
            doc = words[steps[row, : lengths[row]]].tolist()
            for position in np.flatnonzero(tail[row, : lengths[row]]):
                serial += 1
                doc[position] = identifier(serial, rng)
            out.append(" ".join(doc))
            size += len(out[-1].encode()) + 1
            if size >= target:
                break
    return out, f"bigram chain over {source}, {len(out):,} documents"


def identifier(serial: int, rng: np.random.Generator) -> str:
    kind = serial % 4
    if kind == 0:
        return f"#{serial * 2654435761 % 16**8:08X}"
    if kind == 1:
        return f"{rng.integers(1, 10_000)}.{rng.integers(0, 100):02d}"
    if kind == 2:
        return f"2026-{rng.integers(1, 13):02d}-{rng.integers(1, 29):02d}"
    return f"user{serial}"
