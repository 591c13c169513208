"""Near-duplicate removal: the signatures are datasketch's own, near-copies are found within and
across splits (the earlier split keeps its copy), unrelated documents are kept, and the result is
the same on every run."""

from __future__ import annotations

import numpy as np
import pytest
from datasketch import MinHash

from snaketune.data import dedup
from snaketune.data.dedup import SCHEME, find_near_duplicates, shingle_hashes, signatures
from snaketune.data.settings import NearDuplicateSettings
from snaketune.names import SPLITS
from tests.support.texts import near_copy, unrelated_texts


def run(texts, splits, **settings):
    return find_near_duplicates(texts, splits, SPLITS, NearDuplicateSettings(**settings))


# --- signatures ----------------------------------------------------------------------------------


def test_signatures_equal_datasketch_minhash_of_the_same_shingles():
    texts = ["the parcel never arrived", "ok", "", "Refund   my ORDER please, it broke."]
    hashes, offsets = shingle_hashes(texts, 5)

    ours = signatures(hashes, offsets, num_perm=64, seed=7)

    ends = [*offsets[1:], len(hashes)]
    for row, (start, end) in enumerate(zip(offsets, ends, strict=True)):
        reference = MinHash(num_perm=64, seed=7, scheme=SCHEME, hashfunc=int)
        reference.update_batch(hashes[start:end].tolist())
        assert np.array_equal(ours[row], reference.hashvalues), texts[row]


def test_signatures_do_not_depend_on_block_or_chunk_boundaries(monkeypatch):
    texts = unrelated_texts(1000)  # ~400k shingles: many signature blocks
    hashes, offsets = shingle_hashes(texts, 5)
    together = signatures(hashes, offsets, num_perm=32, seed=1)

    alone_hashes, alone_offsets = shingle_hashes(texts[123:124], 5)
    assert np.array_equal(together[123], signatures(alone_hashes, alone_offsets, 32, 1)[0])
    monkeypatch.setattr(dedup, "_CHUNK_CHARS", 10_000)  # ~25 texts per chunk
    settings = NearDuplicateSettings(num_perm=32, seed=1)
    assert np.array_equal(dedup.corpus_signatures(texts, settings), together)


def test_shingles_ignore_case_and_spacing_and_short_texts_are_one_shingle():
    hashes, offsets = shingle_hashes(["Hello   World", "hello world", "hi", "hi!"], 5)

    per_doc = np.split(hashes, offsets[1:])
    assert np.array_equal(per_doc[0], per_doc[1])
    assert len(per_doc[0]) == len("hello world") - 4
    assert len(per_doc[2]) == len(per_doc[3]) == 1
    assert per_doc[2][0] != per_doc[3][0]


# --- removal -------------------------------------------------------------------------------------


def test_test_copy_of_a_training_document_is_removed_and_counted():
    texts = unrelated_texts(300)
    splits = ["train"] * 240 + ["val"] * 30 + ["test"] * 30
    texts[-1] = near_copy(texts[5])  # planted: a test document two words off a training one

    dropped, report = run(texts, splits)

    assert dropped == [299]
    assert report.removed == {
        "train": {"train": 0},
        "val": {"train": 0, "val": 0},
        "test": {"train": 1, "val": 0, "test": 0},
    }
    (example,) = report.examples
    assert example["removed"] == {"split": "test", "text": texts[-1][:300]}
    assert example["kept"] == {"split": "train", "text": texts[5][:300]}
    assert 0.8 <= example["estimated_jaccard"] < 1


def test_training_copy_is_kept_even_when_the_test_copy_comes_first_in_the_corpus():
    texts = unrelated_texts(50)
    copy = near_copy(texts[40])
    splits = ["test"] + ["train"] * 50
    dropped, report = run([copy, *texts], splits)

    assert dropped == [0]  # the test row, though it is the corpus's first
    assert report.removed["test"]["train"] == 1


def test_within_a_split_the_first_of_a_cluster_is_kept():
    base = unrelated_texts(20)
    texts = [*base, near_copy(base[3]), near_copy(base[3]).upper(), base[7] + " indeed"]
    splits = ["train"] * len(texts)

    dropped, report = run(texts, splits)

    assert dropped == [20, 21, 22]
    assert report.removed["train"] == {"train": 3}


def test_val_copy_of_a_val_document_and_test_copy_of_a_val_document_are_counted_apart():
    base = unrelated_texts(30)
    texts = [*base, near_copy(base[25]), near_copy(base[26])]
    splits = ["train"] * 20 + ["val"] * 11 + ["test"]

    _, report = run(texts, splits)

    assert report.removed["val"] == {"train": 0, "val": 1}
    assert report.removed["test"] == {"train": 0, "val": 1, "test": 0}


def test_unrelated_documents_are_all_kept():
    texts = unrelated_texts(2000)
    splits = [SPLITS[i % 3] for i in range(2000)]

    dropped, report = run(texts, splits)

    assert dropped == [] and report.examples == []


def test_a_lower_threshold_catches_looser_copies():
    texts = unrelated_texts(100)
    loose = " ".join("zebra" if i % 5 == 0 else w for i, w in enumerate(texts[0].split()))
    splits = ["train"] * 100 + ["test"]

    assert run([*texts, loose], splits)[0] == []
    assert run([*texts, loose], splits, threshold=0.5)[0] == [100]


def test_same_input_gives_the_same_removals():
    texts = unrelated_texts(500)
    texts += [near_copy(t) for t in texts[:50]]
    splits = [SPLITS[i % 3] for i in range(len(texts))]

    first, second = run(texts, splits), run(texts, splits)

    assert first == second and len(first[0]) == 50


def test_an_empty_corpus_removes_nothing():
    dropped, report = run([], [])
    assert dropped == [] and report.removed["test"] == {"train": 0, "val": 0, "test": 0}


def test_settings_name_every_bad_value():
    with pytest.raises(ValueError) as caught:
        NearDuplicateSettings(threshold=1.5, shingle_size=0, num_perm=1)
    message = str(caught.value)
    assert "threshold must be in (0, 1], got 1.5" in message
    assert "shingle_size must be at least 1, got 0" in message
    assert "num_perm must be at least 2, got 1" in message
