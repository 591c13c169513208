"""The tokenize stage's three jobs with a real BPE trained on the demo corpus: packed LM blocks
are exactly the documents joined with EOS, classification rows are the examples truncated and
labelled as the manifest says, and every shard is bounded, readable and has the digest the
manifest records. Partitioned, the rows are those of one pass (classification, per-document LM
packing) or of one pass per partition less one short remainder each (LM packing across
documents), and a rerun writes the same bytes."""

from __future__ import annotations

import gzip
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer

from snaketune.data.clean import clean_corpus
from snaketune.data.paths import CleanPaths, SplitPaths, TokenizerPaths
from snaketune.data.settings import CleanJob, ReadSettings, SplitSettings, TokenizerSettings
from snaketune.data.split import split_corpus
from snaketune.data.tokenizer import EOS, prepare_tokenizer
from snaketune.errors import CorpusError
from snaketune.fileio import sha256_file
from snaketune.manifest import TIMINGS
from snaketune.names import SPLITS
from snaketune.tokenize.one_process import tokenize_in_one_process
from snaketune.tokenize.plan import row_ranges
from snaketune.tokenize.settings import TokenizeJob, TokenizeSettings
from snaketune.tokenize.shards import SHARD_GLOB, TokenArrays, read_shards
from tests.support.repo import DEMO_CORPUS

BLOCK = 32
MAX_LENGTH = 90  # about the median document length, so some rows are cut and some not
LM_SHARD_ROWS = 500
CLS_SHARD_ROWS = 300
PARTITIONS = 5
# read_batch_rows=100 makes blocks straddle read batches, not only documents.
LM_SETTINGS = TokenizeJob(
    "causal_lm", TokenizeSettings(block_size=BLOCK, shard_rows=LM_SHARD_ROWS, read_batch_rows=100)
)
CLS_SETTINGS = TokenizeJob(
    "sequence_classification",
    TokenizeSettings(max_length=MAX_LENGTH, shard_rows=CLS_SHARD_ROWS, read_batch_rows=128),
)

# --- helpers -------------------------------------------------------------------------------------


def run_tokenize(splits: dict[str, Path], tokenizer: Path, root: Path, job: TokenizeJob) -> dict:
    """Run the stage; return its shard folder and parsed manifest."""
    tokenize_in_one_process(splits, tokenizer, root / "shards", root / "manifest.json", job)
    return {"dir": root / "shards", "manifest": json.loads((root / "manifest.json").read_text())}


def changed(job: TokenizeJob, **tokenize) -> TokenizeJob:
    """The job with these tokenize settings changed."""
    return replace(job, tokenize=replace(job.tokenize, **tokenize))


def write_splits(root: Path, rows: dict[str, list[tuple[str, str]]]) -> dict[str, Path]:
    """Small hand-made splits: {split: [(text, label), ...]} as clean/split write them."""
    root.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, pairs in rows.items():
        paths[name] = root / f"{name}.parquet"
        frame = pd.DataFrame(
            {
                "doc_id": [f"{name}-{i}" for i in range(len(pairs))],
                "text": [t for t, _ in pairs],
                "label": [y for _, y in pairs],
            }
        ).astype("string")
        frame.to_parquet(paths[name], index=False)
    return paths


def reference_ids(tokenizer_dir: Path, split: Path) -> list[list[int]]:
    """Token ids of each document, from the saved tokenizer.json alone (not via transformers)."""
    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    texts = pd.read_parquet(split)["text"].tolist()
    return [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]


def eos_id(tokenizer_dir: Path) -> int:
    return Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).token_to_id(EOS)


def shard_files(shard_dir: Path) -> list[str]:
    return sorted(p.name for p in shard_dir.glob(SHARD_GLOB))


# --- real data, built once per module ------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_splits(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("demo-splits")
    raw = root / "raw"
    raw.mkdir()
    (raw / "support.jsonl").write_bytes(gzip.decompress(DEMO_CORPUS.read_bytes()))
    read = ReadSettings(
        format="jsonl",
        text_template="Customer: {question}\nAgent: {answer}",
        label_column="intent",
    )
    corpus = root / "corpus.parquet"
    clean_corpus(CleanPaths(raw, corpus, root / "report.json", root / "clean.json"), CleanJob(read))
    splits = {name: root / f"{name}.parquet" for name in SPLITS}
    split_corpus(SplitPaths(corpus, **splits, manifest=root / "split.json"), SplitSettings())
    return splits


@pytest.fixture(scope="module")
def tokenizer_dir(demo_splits, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tokenizer") / "tokenizer"
    settings = TokenizerSettings(vocab_size=400)
    prepare_tokenizer(
        TokenizerPaths(demo_splits["train"], out, out.parent / "manifest.json"), settings
    )
    return out


@pytest.fixture(scope="module")
def lm(demo_splits, tokenizer_dir, tmp_path_factory) -> dict:
    return run_tokenize(demo_splits, tokenizer_dir, tmp_path_factory.mktemp("lm"), LM_SETTINGS)


@pytest.fixture(scope="module")
def cls(demo_splits, tokenizer_dir, tmp_path_factory) -> dict:
    return run_tokenize(demo_splits, tokenizer_dir, tmp_path_factory.mktemp("cls"), CLS_SETTINGS)


# --- causal_lm -----------------------------------------------------------------------------------


@pytest.mark.parametrize("split", SPLITS)
def test_lm_every_row_has_exactly_block_size_tokens(lm, split):
    table = read_shards(lm["dir"] / split)
    lengths = {len(row) for row in table.column("input_ids").to_pylist()}
    assert lengths == {BLOCK}
    assert table.num_rows == lm["manifest"]["counts"][split]["rows"] > 0


@pytest.mark.parametrize("split", SPLITS)
def test_lm_blocks_are_documents_joined_with_eos_minus_a_short_remainder(
    lm, demo_splits, tokenizer_dir, split
):
    eos = eos_id(tokenizer_dir)
    expected = [t for doc in reference_ids(tokenizer_dir, demo_splits[split]) for t in (*doc, eos)]
    packed = np.concatenate(read_shards(lm["dir"] / split).column("input_ids").to_numpy())
    dropped = lm["manifest"]["counts"][split]["dropped_remainder_tokens"]

    assert 0 <= dropped < BLOCK
    assert len(packed) + dropped == len(expected)
    assert packed.tolist() == expected[: len(packed)]


def test_lm_manifest_counts_documents_tokens_and_special_ids(lm, demo_splits, tokenizer_dir):
    manifest = lm["manifest"]
    for split in SPLITS:
        counts = manifest["counts"][split]
        assert counts["documents"] == len(pd.read_parquet(demo_splits[split]))
        assert counts["tokens"] == counts["rows"] * BLOCK
        assert counts["truncated"] == 0
    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    assert manifest["eos_token_id"] == eos_id(tokenizer_dir)
    assert manifest["vocab_size"] == tokenizer.get_vocab_size()
    assert manifest["task"] == "causal_lm" and manifest["label_names"] == []


def test_lm_shards_hold_at_most_shard_rows_and_only_the_last_is_short(lm):
    shards = lm["manifest"]["shards"]["train"]
    rows = [pq.ParquetFile(lm["dir"] / "train" / s["file"]).metadata.num_rows for s in shards]

    assert len(shards) > 1
    assert rows == [s["rows"] for s in shards]
    assert all(r == LM_SHARD_ROWS for r in rows[:-1])
    assert 0 < rows[-1] <= LM_SHARD_ROWS
    assert sum(rows) == lm["manifest"]["counts"]["train"]["rows"]


@pytest.mark.parametrize("split", SPLITS)
def test_lm_manifest_sha256_matches_each_shard_file(lm, split):
    shards = lm["manifest"]["shards"][split]
    assert shard_files(lm["dir"] / split) == [s["file"] for s in shards]
    for shard in shards:
        assert sha256_file(lm["dir"] / split / shard["file"]) == shard["sha256"], shard["file"]


def test_lm_shards_are_readable_by_pandas_and_pyarrow(lm):
    first = lm["dir"] / "train" / "shard-00000.parquet"

    frame = pd.read_parquet(first)
    table = pq.read_table(first)

    assert list(frame.columns) == ["input_ids"]
    assert len(frame) == LM_SHARD_ROWS
    assert {len(ids) for ids in frame["input_ids"]} == {BLOCK}
    assert table.schema.field("input_ids").type == pa.list_(pa.int32())
    assert frame["input_ids"][0].tolist() == table.column("input_ids")[0].as_py()


def test_lm_split_shorter_than_one_block_is_an_error(tokenizer_dir, tmp_path):
    long_text = "Customer: where is my order? Agent: it ships tomorrow. " * 20
    splits = write_splits(
        tmp_path / "splits",
        {"train": [(long_text, "")], "val": [("hi", "")], "test": [(long_text, "")]},
    )
    settings = TokenizeJob("causal_lm", TokenizeSettings(block_size=BLOCK))

    with pytest.raises(CorpusError, match=rf"val.parquet produced no rows.*block_size={BLOCK}"):
        run_tokenize(splits, tokenizer_dir, tmp_path / "out", settings)

    assert not (tmp_path / "out" / "shards").exists()
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_unknown_task_is_refused(demo_splits, tokenizer_dir, tmp_path):
    with pytest.raises(ValueError, match=r"task 'regression' is not one of"):
        run_tokenize(demo_splits, tokenizer_dir, tmp_path, TokenizeJob(task="regression"))


# --- sequence_classification ---------------------------------------------------------------------


@pytest.mark.parametrize("split", SPLITS)
def test_cls_has_one_row_per_example_in_order(cls, demo_splits, split):
    table = read_shards(cls["dir"] / split)
    docs = pd.read_parquet(demo_splits[split])

    assert table.column("doc_id").to_pylist() == docs["doc_id"].tolist()
    assert cls["manifest"]["counts"][split]["documents"] == len(docs)


@pytest.mark.parametrize("split", SPLITS)
def test_cls_input_ids_are_truncated_to_max_length_and_counted(
    cls, demo_splits, tokenizer_dir, split
):
    full = reference_ids(tokenizer_dir, demo_splits[split])
    rows = read_shards(cls["dir"] / split).column("input_ids").to_pylist()
    truncated = sum(len(ids) > MAX_LENGTH for ids in full)

    assert rows == [ids[:MAX_LENGTH] for ids in full]
    assert cls["manifest"]["counts"][split]["truncated"] == truncated
    # Both kinds occur, so the count above is a real check and not 0 == 0 or all == all.
    assert 0 < truncated < len(full)


@pytest.mark.parametrize("split", SPLITS)
def test_cls_label_ids_index_the_sorted_label_names(cls, demo_splits, split):
    names = cls["manifest"]["label_names"]
    labels = read_shards(cls["dir"] / split).column("label").to_pylist()
    expected = pd.read_parquet(demo_splits[split])["label"].tolist()

    assert names == sorted(set(pd.read_parquet(demo_splits["train"])["label"]))
    assert len(names) > 2
    assert [names[i] for i in labels] == expected


def test_cls_shards_are_bounded_typed_and_match_their_digests(cls):
    shards = cls["manifest"]["shards"]["train"]
    schema = pq.read_schema(cls["dir"] / "train" / shards[0]["file"])

    assert len(shards) > 1
    assert all(s["rows"] <= CLS_SHARD_ROWS for s in shards)
    assert schema.names == ["doc_id", "input_ids", "label"]
    assert schema.field("label").type == pa.int32()
    for shard in shards:
        assert sha256_file(cls["dir"] / "train" / shard["file"]) == shard["sha256"]


def test_cls_label_seen_only_in_test_is_an_error(tokenizer_dir, tmp_path):
    splits = write_splits(
        tmp_path / "splits",
        {
            "train": [("my parcel is late", "shipping"), ("refund my card", "billing")],
            "val": [("where is the box", "shipping")],
            "test": [("close my account", "account"), ("charged twice", "billing")],
        },
    )
    settings = TokenizeJob("sequence_classification")

    with pytest.raises(CorpusError) as caught:
        run_tokenize(splits, tokenizer_dir, tmp_path / "out", settings)

    assert "labels ['account'] in test.parquet never occur in the train split" in str(caught.value)
    assert not (tmp_path / "out" / "shards").exists()
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_cls_train_split_with_a_single_label_is_an_error(tokenizer_dir, tmp_path):
    one_label = [("my parcel is late", "shipping"), ("where is the box", "shipping")]
    splits = write_splits(
        tmp_path / "splits", {"train": one_label, "val": one_label, "test": one_label}
    )
    settings = TokenizeJob("sequence_classification")

    with pytest.raises(CorpusError, match=r"at least two labels in the train split") as caught:
        run_tokenize(splits, tokenizer_dir, tmp_path / "out", settings)

    assert "found ['shipping']" in str(caught.value)


# --- partitions ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm_parts(demo_splits, tokenizer_dir, tmp_path_factory) -> dict:
    """As `lm`, with the train split cut into PARTITIONS."""
    settings = changed(LM_SETTINGS, partitions=PARTITIONS)
    return run_tokenize(demo_splits, tokenizer_dir, tmp_path_factory.mktemp("lm-parts"), settings)


def test_lm_partitions_pack_their_own_rows_and_each_drops_one_short_remainder(
    lm, lm_parts, demo_splits, tokenizer_dir
):
    eos = eos_id(tokenizer_dir)
    docs = reference_ids(tokenizer_dir, demo_splits["train"])
    parts = lm_parts["manifest"]["partitions"]["train"]
    expected = []
    for part in parts:
        start, end = part["rows_read"]
        stream = [t for doc in docs[start:end] for t in (*doc, eos)]
        kept = len(stream) // BLOCK * BLOCK
        assert part["dropped_remainder_tokens"] == len(stream) - kept < BLOCK
        expected += stream[:kept]
    packed = np.concatenate(read_shards(lm_parts["dir"] / "train").column("input_ids").to_numpy())

    assert [tuple(p["rows_read"]) for p in parts] == row_ranges(len(docs), PARTITIONS)
    assert packed.tolist() == expected
    one, many = lm["manifest"]["counts"]["train"], lm_parts["manifest"]["counts"]["train"]
    assert many["partitions"] == PARTITIONS and one["partitions"] == 1
    assert (
        many["tokens"] + many["dropped_remainder_tokens"]
        == one["tokens"] + one["dropped_remainder_tokens"]
    )
    assert one["dropped_remainder_tokens"] <= many["dropped_remainder_tokens"] < PARTITIONS * BLOCK


def test_lm_val_and_test_are_one_partition_whatever_train_is_cut_into(lm, lm_parts):
    for split in ("val", "test"):
        assert lm_parts["manifest"]["counts"][split]["partitions"] == 1
        for shard in lm["manifest"]["shards"][split]:
            ours = (lm_parts["dir"] / split / shard["file"]).read_bytes()
            assert ours == (lm["dir"] / split / shard["file"]).read_bytes()


def test_cls_rows_are_the_same_in_one_partition_and_in_several(
    cls, demo_splits, tokenizer_dir, tmp_path
):
    settings = changed(CLS_SETTINGS, read_batch_rows=50, partitions=PARTITIONS)
    parts = run_tokenize(demo_splits, tokenizer_dir, tmp_path, settings)

    for split in SPLITS:
        assert read_shards(parts["dir"] / split).equals(read_shards(cls["dir"] / split))
        counts = {k: v for k, v in parts["manifest"]["counts"][split].items() if k != "partitions"}
        assert counts == {
            k: v for k, v in cls["manifest"]["counts"][split].items() if k != "partitions"
        }
    assert parts["manifest"]["counts"]["train"]["partitions"] == PARTITIONS


PER_DOCUMENT = changed(LM_SETTINGS, packing="per_document")


@pytest.fixture(scope="module")
def per_doc(demo_splits, tokenizer_dir, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("per-doc")
    return run_tokenize(demo_splits, tokenizer_dir, root, PER_DOCUMENT)


def test_per_document_rows_are_each_document_with_eos_cut_every_block_size_tokens(
    per_doc, demo_splits, tokenizer_dir
):
    eos = eos_id(tokenizer_dir)
    for split in SPLITS:
        docs = [(*ids, eos) for ids in reference_ids(tokenizer_dir, demo_splits[split])]
        expected = [list(d[i : i + BLOCK]) for d in docs for i in range(0, len(d), BLOCK)]
        rows = read_shards(per_doc["dir"] / split).column("input_ids").to_pylist()

        assert rows == expected
        assert any(len(d) > BLOCK for d in docs) and any(len(r) < BLOCK for r in rows)
        counts = per_doc["manifest"]["counts"][split]
        assert counts["documents"] == len(docs) and counts["dropped_remainder_tokens"] == 0
        assert counts["tokens"] == sum(map(len, docs))  # nothing dropped
        assert counts["short_rows"] == sum(len(r) < BLOCK for r in rows)
    assert per_doc["manifest"]["packing"].startswith("each document")


def test_per_document_rows_are_the_same_for_one_partition_and_for_several(
    per_doc, demo_splits, tokenizer_dir, tmp_path
):
    settings = changed(PER_DOCUMENT, partitions=PARTITIONS, read_batch_rows=7)
    parts = run_tokenize(demo_splits, tokenizer_dir, tmp_path, settings)

    assert parts["manifest"]["counts"]["train"]["partitions"] == PARTITIONS
    for split in SPLITS:
        one = read_shards(per_doc["dir"] / split).column("input_ids").to_pylist()
        many = read_shards(parts["dir"] / split).column("input_ids").to_pylist()
        assert many == one  # the same rows in the same order, so the same multiset too
        counts = {k: v for k, v in parts["manifest"]["counts"][split].items() if k != "partitions"}
        assert counts == {
            k: v for k, v in per_doc["manifest"]["counts"][split].items() if k != "partitions"
        }


def test_unknown_packing_is_refused_with_the_allowed_values():
    with pytest.raises(ValueError, match="packing 'tight' is not one of"):
        changed(LM_SETTINGS, packing="tight")


def _without(manifest: dict, *keys: str) -> dict:
    return {k: v for k, v in manifest.items() if k not in keys}


def test_a_rerun_writes_byte_identical_shards_however_reads_are_batched(
    lm_parts, demo_splits, tokenizer_dir, tmp_path
):
    settings = changed(LM_SETTINGS, read_batch_rows=1000, partitions=PARTITIONS)  # not 100
    again = run_tokenize(demo_splits, tokenizer_dir, tmp_path, settings)

    first = sorted(p.relative_to(lm_parts["dir"]) for p in lm_parts["dir"].rglob("*.parquet"))
    assert first == sorted(p.relative_to(again["dir"]) for p in again["dir"].rglob("*.parquet"))
    for path in first:
        assert (again["dir"] / path).read_bytes() == (lm_parts["dir"] / path).read_bytes(), path
    # Timings differ, and so does the one setting changed on purpose.
    assert _without(again["manifest"], *TIMINGS, "params", "run_key") == _without(
        lm_parts["manifest"], *TIMINGS, "params", "run_key"
    )
    assert not list(tmp_path.glob(".*")), "the partitions' working files are left behind"


def test_more_partitions_than_rows_leaves_the_extra_ones_empty(tokenizer_dir, tmp_path):
    pairs = [("my parcel is late", "shipping"), ("refund my card", "billing")] * 2
    splits = write_splits(tmp_path / "splits", {"train": pairs, "val": pairs, "test": pairs})
    settings = changed(CLS_SETTINGS, partitions=7)

    out = run_tokenize(splits, tokenizer_dir, tmp_path / "out", settings)

    parts = out["manifest"]["partitions"]["train"]
    assert len(parts) == 7 and sum(p["rows"] > 0 for p in parts) == len(pairs)
    assert [p["shards"] for p in parts if p["rows"] == 0] == [[], [], []]
    assert read_shards(out["dir"] / "train").column("doc_id").to_pylist() == [
        f"train-{i}" for i in range(len(pairs))
    ]


# --- the memory-mapped arrays beside the shards -------------------------------------------------


@pytest.mark.parametrize("split", SPLITS)
def test_the_token_arrays_hold_exactly_the_shard_rows(lm, cls, split):
    for out in (lm, cls):
        table = read_shards(out["dir"] / split)
        assert out["manifest"]["token_dtype"] == "uint16"  # a vocabulary of 400 fits
        arrays = TokenArrays.open(out["dir"] / split, "uint16")
        rows = table.column("input_ids").to_pylist()
        assert len(arrays) == len(rows)
        assert arrays.tokens.dtype == np.uint16 and arrays.offsets.dtype == np.int64
        for i in (0, len(rows) // 2, len(rows) - 1):
            start, end = arrays.offsets[i], arrays.offsets[i + 1]
            assert arrays.tokens[start:end].tolist() == rows[i]
        assert int(arrays.offsets[-1]) == sum(map(len, rows)) == len(arrays.tokens)
        if "label" in table.column_names:
            assert arrays.labels.tolist() == table.column("label").to_pylist()
        else:
            assert len(arrays.labels) == 0


def test_a_token_id_beyond_the_array_s_type_is_refused_not_wrapped(tmp_path):
    from snaketune.tokenize.shards import write_arrays

    shard = tmp_path / "shard-00000.parquet"
    rows = pa.array([[1, 2, 70_000]], type=pa.list_(pa.int32()))
    pq.write_table(pa.table({"input_ids": rows}), shard)
    with pytest.raises(CorpusError, match=r"token id 70000, beyond the uint16 token array"):
        write_arrays(tmp_path, [shard], "uint16")
    assert write_arrays(tmp_path, [shard], "uint32") == 3
    assert TokenArrays.open(tmp_path, "uint32").tokens.tolist() == [1, 2, 70_000]
