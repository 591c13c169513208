"""Near-duplicate removal: MinHash signatures and an LSH index (datasketch) over character
shingles of each document's normalized text.

Exact duplicates are already gone after cleaning; this catches the copies that differ by a few
words (boilerplate, re-posted messages, templated texts), which would otherwise let a test set
score what the model memorized. Documents are visited in a fixed order (train, then val, then
test; corpus order within each), and one that is near an earlier, kept document is dropped. So
within a split the first of each cluster survives, and a val or test document near a training
document is the one removed.

Shingling and signatures are numpy over millions of characters at once; only the LSH index is
a per-document loop, and only for documents that share a band with another. The signatures are
exactly those of datasketch's MinHash ("affine32" scheme) fed the same shingle hashes, so the
index (MinHashLSH) takes them as they are.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from datasketch import LeanMinHash, MinHash, MinHashLSH

from snaketune.data.clean import normalize_for_match
from snaketune.data.settings import NearDuplicateSettings

log = logging.getLogger(__name__)

SCHEME = "affine32"
_POLY = np.uint64(0x100000001B3)  # FNV-1a's 64-bit prime: odd, so the rolling hash mixes well
_CHUNK_CHARS = 1 << 22  # characters shingled at once: bounds the hash arrays near 100 MB
_BLOCK_SHINGLES = 4096  # shingles per signature block: num_perm x 4096 x 4 B stays in cache
_EXAMPLES = 5
# LSH bands tuned to miss few true pairs: datasketch's default (equal weights) finds only ~40% of
# pairs right at the threshold, while every candidate is checked against the signatures anyway,
# so an extra candidate costs a comparison and a missed one leaks a near-copy into the test set.
LSH_WEIGHTS = (0.05, 0.95)  # (false positive, false negative)


@dataclass
class NearDuplicateReport:
    removed: dict[str, dict[str, int]]
    """removed[split][kept_split]: documents dropped from `split` as near-copies of a document
    kept in `kept_split`."""
    examples: list[dict]
    """A few removed documents next to the one they matched, to judge the threshold by."""


# --- shingles and signatures ------------------------------------------------------------------


def shingle_hashes(texts: Sequence[str], size: int) -> tuple[np.ndarray, np.ndarray]:
    """32-bit hashes of every `size`-character window of each normalized text, all documents in
    one array, and the index where each document's hashes start. A text shorter than `size` is
    one shingle (itself), so every document has at least one."""
    normalized = [normalize_for_match(t) for t in texts]
    lengths = np.fromiter((len(t) for t in normalized), dtype=np.int64, count=len(normalized))
    # Each text is followed by `size` zeros, so no window reaches into the next document.
    padded = "".join(t + "\0" * size for t in normalized)
    codes = np.frombuffer(padded.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    rolling = np.zeros(max(len(codes) - size + 1, 0), dtype=np.uint64)
    for offset in range(size):  # polynomial hash of each window, wrapping mod 2**64
        rolling = rolling * _POLY + codes[offset : offset + len(rolling)]
    starts = np.concatenate(([0], np.cumsum(lengths + size)[:-1]))
    per_doc = np.maximum(lengths - size + 1, 1)
    offsets = np.concatenate(([0], np.cumsum(per_doc)[:-1]))
    positions = np.repeat(starts - offsets, per_doc) + np.arange(per_doc.sum())
    folded = rolling[positions]
    return (folded ^ (folded >> np.uint64(32))).astype(np.uint32), offsets


def _fmix32(values: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finalizer, the pre-mix datasketch's affine32 scheme applies."""
    values = values ^ (values >> np.uint32(16))
    values = values * np.uint32(0x85EBCA6B)
    values = values ^ (values >> np.uint32(13))
    values = values * np.uint32(0xC2B2AE35)
    return values ^ (values >> np.uint32(16))


def signatures(hashes: np.ndarray, offsets: np.ndarray, num_perm: int, seed: int) -> np.ndarray:
    """One MinHash signature per document (rows), equal to datasketch's MinHash(num_perm, seed)
    updated with that document's shingle hashes."""
    a, b = MinHash(num_perm=num_perm, seed=seed, scheme=SCHEME).permutations
    mixed = _fmix32(hashes)
    # Permutations run along rows so each document's minimum is over a contiguous slice.
    out = np.empty((num_perm, len(offsets)), dtype=np.uint32)
    ends = np.append(offsets[1:], len(mixed))
    for first, stop in batches(ends, _BLOCK_SHINGLES):
        block = a[:, None] * mixed[None, offsets[first] : ends[stop - 1]] + b[:, None]
        out[:, first:stop] = np.minimum.reduceat(
            block, offsets[first:stop] - offsets[first], axis=1
        )
    return np.ascontiguousarray(out.T)


def corpus_signatures(texts: Sequence[str], settings: NearDuplicateSettings) -> np.ndarray:
    """Signatures of every text, shingled _CHUNK_CHARS characters at a time."""
    out = np.empty((len(texts), settings.num_perm), dtype=np.uint32)
    for first, stop in batches(np.cumsum([len(t) for t in texts]), _CHUNK_CHARS):
        hashes, offsets = shingle_hashes(texts[first:stop], settings.shingle_size)
        out[first:stop] = signatures(hashes, offsets, settings.num_perm, settings.seed)
    return out


def batches(ends: np.ndarray, budget: int) -> Iterator[tuple[int, int]]:
    """(first, stop) ranges of consecutive items holding about `budget` units together (at
    least one item each), given where each item ends in a running count of units."""
    first = 0
    while first < len(ends):
        done = int(ends[first - 1]) if first else 0
        stop = max(first + 1, int(np.searchsorted(ends, done + budget, "right")))
        yield first, stop
        first = stop


def may_collide(sigs: np.ndarray, index: MinHashLSH) -> np.ndarray:
    """Whether each document shares at least one LSH band with another document. Those that do
    not can never be a candidate pair, so they skip the (per-document) index entirely."""
    shared = np.zeros(len(sigs), dtype=bool)
    for start, end in index.hashranges:
        band = np.ascontiguousarray(sigs[:, start:end]).view(np.dtype((np.void, 4 * (end - start))))
        _, inverse, counts = np.unique(band.ravel(), return_inverse=True, return_counts=True)
        shared |= counts[inverse] > 1
    return shared


# --- removal ----------------------------------------------------------------------------------


def visiting_order(splits: Sequence[str], split_names: Sequence[str]) -> list[int]:
    """Row indices split by split in `split_names` order, corpus order within each."""
    return [i for name in split_names for i, s in enumerate(splits) if s == name]


def find_near_duplicates(
    texts: Sequence[str],
    splits: Sequence[str],
    split_names: Sequence[str],
    settings: NearDuplicateSettings,
) -> tuple[list[int], NearDuplicateReport]:
    """Rows to drop, and where they went. A row is dropped when its estimated Jaccard similarity
    to an earlier kept row (in visiting order) reaches the threshold."""
    # A document can only be removed by one visited before it: its own split or an earlier one.
    removed = {name: dict.fromkeys(split_names[: i + 1], 0) for i, name in enumerate(split_names)}
    if not texts:
        return [], NearDuplicateReport(removed, [])
    started = time.perf_counter()
    sigs = corpus_signatures(texts, settings)
    index = MinHashLSH(settings.threshold, settings.num_perm, weights=LSH_WEIGHTS)
    shared = may_collide(sigs, index)
    # One sketch re-pointed at each row: the index keeps band keys, never the sketch itself.
    sketch = LeanMinHash(seed=settings.seed, hashvalues=sigs[0], scheme=SCHEME)
    examples, dropped = [], []
    for row in (r for r in visiting_order(splits, split_names) if shared[r]):
        sketch.hashvalues = sigs[row]
        match, similarity = _best_match(index.query(sketch), sigs, row, settings.threshold)
        if match is None:
            index.insert(row, sketch, check_duplication=False)
            continue
        dropped.append(row)
        removed[splits[row]][splits[match]] += 1
        if len(examples) < _EXAMPLES:
            examples.append(_example(texts, splits, row, match, similarity))
    log.info(
        "near-duplicates: %d of %d documents removed in %.2fs (%d shared an LSH band)",
        len(dropped),
        len(texts),
        time.perf_counter() - started,
        int(shared.sum()),
    )
    return sorted(dropped), NearDuplicateReport(removed, examples)


def _best_match(
    candidates: list[int], sigs: np.ndarray, row: int, threshold: float
) -> tuple[int | None, float]:
    """The most similar candidate at or above the threshold (LSH candidates are only likely
    matches); ties go to the lowest row number, so the result never depends on set order."""
    if not candidates:
        return None, 0.0
    rows = np.sort(np.fromiter(candidates, dtype=np.int64, count=len(candidates)))
    similarity = np.count_nonzero(sigs[rows] == sigs[row], axis=1) / sigs.shape[1]
    best = int(np.argmax(similarity))
    if similarity[best] < threshold:
        return None, 0.0
    return int(rows[best]), float(similarity[best])


def _example(texts, splits, row: int, match: int, similarity: float) -> dict:
    return {
        "removed": {"split": splits[row], "text": texts[row][:300]},
        "kept": {"split": splits[match], "text": texts[match][:300]},
        "estimated_jaccard": round(similarity, 3),
    }
