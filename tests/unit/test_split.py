"""split_corpus: the split of a document is fixed by its normalized text, so reruns are
byte-identical, identical texts never straddle a split, near-copies of a training document are
removed from val and test, and the ratios hold."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import pytest

from snaketune.data.clean import stable_doc_id
from snaketune.data.paths import SplitPaths
from snaketune.data.settings import NearDuplicateSettings, SplitSettings
from snaketune.data.split import assign_splits, split_corpus
from snaketune.errors import CorpusError
from snaketune.names import SPLITS
from tests.support.texts import near_copy, unrelated_texts

NO_NEAR_DUPLICATES = {"enabled": False}

# --- helpers -------------------------------------------------------------------------------------


def write_corpus(path: Path, texts: list[str], labels: list[str] | None = None) -> Path:
    """A corpus as clean_corpus writes it: string columns doc_id, text, label."""
    frame = pd.DataFrame(
        {
            "doc_id": [stable_doc_id(t) for t in texts],
            "text": texts,
            "label": labels if labels is not None else [None] * len(texts),
        }
    ).astype("string")
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(path, index=False)
    return path


def run_split(
    corpus: Path, out: Path, settings: SplitSettings | None = None
) -> tuple[dict[str, int], dict[str, Path]]:
    outputs = {name: out / f"{name}.parquet" for name in SPLITS}
    paths = SplitPaths(corpus=corpus, **outputs, manifest=out / "manifest.json")
    counts = split_corpus(paths, settings or SplitSettings())
    return counts, outputs


def split_of_each_text(outputs: dict[str, Path]) -> dict[str, str]:
    return {text: name for name, path in outputs.items() for text in pd.read_parquet(path)["text"]}


def many_texts(n: int) -> list[str]:
    return [
        f"support ticket number {i}: my order {i * 7919 % 10007} has not arrived" for i in range(n)
    ]


# --- determinism ---------------------------------------------------------------------------------


def test_same_input_gives_byte_identical_splits(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.parquet", many_texts(300))

    first, first_paths = run_split(corpus, tmp_path / "a")
    second, second_paths = run_split(corpus, tmp_path / "b")

    assert first == second
    for name in SPLITS:
        assert first_paths[name].read_bytes() == second_paths[name].read_bytes(), name


def test_every_document_lands_in_exactly_one_split_with_its_columns(tmp_path):
    texts = many_texts(300)
    corpus = write_corpus(tmp_path / "corpus.parquet", texts, ["a", "b", "c"] * 100)

    counts, outputs = run_split(corpus, tmp_path / "out")

    parts = {name: pd.read_parquet(outputs[name]) for name in SPLITS}
    assert all(list(p.columns) == ["doc_id", "text", "label"] for p in parts.values())
    assert {name: len(p) for name, p in parts.items()} == counts
    assert sorted(pd.concat(parts.values())["text"]) == sorted(texts)


def test_differently_cased_and_spaced_copies_share_a_split(tmp_path):
    texts = many_texts(200)
    variants = ["  " + t.upper().replace(" ", " \t ") + "\n" for t in texts]
    corpus = write_corpus(tmp_path / "corpus.parquet", texts + variants)

    # Cleaning would have dropped these copies; kept here to see where the hash puts them.
    settings = SplitSettings(near_duplicates=NO_NEAR_DUPLICATES)
    _, outputs = run_split(corpus, tmp_path / "out", settings)

    where = split_of_each_text(outputs)
    assert len(set(where[t] for t in texts)) == 3  # the pairs are spread, not all in train
    assert [where[v] for v in variants] == [where[t] for t in texts]


def test_salt_draws_a_different_split(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.parquet", many_texts(300))

    _, plain = run_split(corpus, tmp_path / "plain")
    _, salted = run_split(corpus, tmp_path / "salted", SplitSettings(salt="v2"))

    before, after = split_of_each_text(plain), split_of_each_text(salted)
    moved = sum(before[t] != after[t] for t in before)
    assert moved > 30  # ~1 - (0.8² + 0.1² + 0.1²) = 34% of documents change split


# --- ratios --------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratios", [(0.8, 0.1, 0.1), (0.5, 0.3, 0.2)])
def test_ratios_are_roughly_respected_on_2000_documents(tmp_path, ratios):
    corpus = write_corpus(tmp_path / "corpus.parquet", many_texts(2000))

    counts, _ = run_split(corpus, tmp_path / "out", SplitSettings(*ratios))

    assert sum(counts.values()) == 2000
    for name, ratio in zip(SPLITS, ratios, strict=True):
        # A hash split is binomial: 4 standard deviations is at most ~90 documents here.
        assert abs(counts[name] - 2000 * ratio) < 90, (name, counts)


def test_manifest_records_counts_and_labels_per_split(tmp_path):
    labels = ["pos", "neg"] * 500
    corpus = write_corpus(tmp_path / "corpus.parquet", many_texts(1000), labels)

    counts, outputs = run_split(corpus, tmp_path / "out")

    record = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert {name: record["counts"][name] for name in SPLITS} == counts
    for name in SPLITS:
        expected = pd.read_parquet(outputs[name])["label"].value_counts().to_dict()
        assert record["labels"][name] == expected


# --- near-duplicates -----------------------------------------------------------------------------


def planted_train_test_pair(texts: list[str]) -> tuple[str, str]:
    """A text the hash split puts in train and a two-words-off copy it puts in test."""
    for text in texts:
        copy = near_copy(text)
        where = assign_splits(pd.Series([text, copy]), SplitSettings()).tolist()
        if where == ["train", "test"]:
            return text, copy
    raise AssertionError("no text/copy pair straddles train and test")


def test_test_copy_of_a_training_document_is_removed_and_counted(tmp_path):
    unrelated = unrelated_texts(400)
    original, copy = planted_train_test_pair(unrelated_texts(100, seed=1))
    corpus = write_corpus(tmp_path / "corpus.parquet", [copy, *unrelated, original])

    counts, outputs = run_split(corpus, tmp_path / "out")

    where = split_of_each_text(outputs)
    assert where[original] == "train" and copy not in where
    assert sorted(where) == sorted([*unrelated, original])  # every unrelated document is kept
    record = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert record["counts"]["near_duplicates_removed"] == {
        "train": {"train": 0},
        "val": {"train": 0, "val": 0},
        "test": {"train": 1, "val": 0, "test": 0},
    }
    assert record["near_duplicate_examples"][0]["removed"]["split"] == "test"
    assert record["params"]["near_duplicates"] == asdict(NearDuplicateSettings())
    assert sum(counts.values()) == 401


def test_near_duplicate_removal_can_be_turned_off(tmp_path):
    original, copy = planted_train_test_pair(unrelated_texts(100, seed=1))
    corpus = write_corpus(tmp_path / "corpus.parquet", [*unrelated_texts(100), original, copy])

    _, outputs = run_split(
        corpus, tmp_path / "out", SplitSettings(near_duplicates=NO_NEAR_DUPLICATES)
    )

    assert split_of_each_text(outputs)[copy] == "test"
    record = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert "near_duplicates_removed" not in record["counts"]


def test_near_duplicate_settings_arrive_as_a_dict_and_are_checked():
    settings = SplitSettings(near_duplicates={"threshold": 0.9, "num_perm": 64})
    assert settings.near_duplicates == NearDuplicateSettings(threshold=0.9, num_perm=64)
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\], got 0"):
        SplitSettings(near_duplicates={"threshold": 0})


# --- errors --------------------------------------------------------------------------------------


def test_split_without_documents_is_an_error_naming_it(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.parquet", many_texts(3))

    with pytest.raises(CorpusError, match=r"split 'val' has zero documents \(corpus has 3\)"):
        run_split(corpus, tmp_path / "out", SplitSettings(train=1.0, val=0.0, test=0.0))

    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.parametrize("ratios", [(0.7, 0.2, 0.2), (0.8, 0.1, 0.0)])
def test_ratios_not_summing_to_one_are_refused(ratios):
    with pytest.raises(ValueError, match=r"split ratios must sum to 1") as caught:
        SplitSettings(*ratios)
    train, val, test = ratios
    assert f"'train': {train}, 'val': {val}, 'test': {test}" in str(caught.value)
