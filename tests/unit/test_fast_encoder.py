"""The tokenize stage's fast encoder: gigatoken where it gives tokenizers' ids, checked by the
plan on a sample of every split and on probe texts (the tokenizer's added and special tokens
among them); tokenizers otherwise, with the reason
in the plan and the manifest. The shards are byte-identical whichever encoder ran."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest
from tokenizers import AddedToken, Tokenizer

from snaketune.errors import CorpusError
from snaketune.fileio import PARQUET_ROW_GROUP_ROWS, read_json
from snaketune.tokenize.encoder import (
    FastEncoder,
    HfEncoder,
    encoder_for,
    first_difference,
    tokenizer_facts,
)
from snaketune.tokenize.one_process import tokenize_in_one_process
from snaketune.tokenize.settings import TokenizeJob, TokenizeSettings

HARD_TEXTS = [
    "Unicode: café, 東京, Москва, emoji 😀👍🏽 and e\u0301",
    "  spaces   around  ",
    "CRLF\r\nline\r\n\ttab",
    "the end of text <|endoftext|> in the middle",
    "digits 1234567890 and 3.14159",
    "w" * 3000,
]


@pytest.fixture(scope="module")
def hard_splits(lm_data, tmp_path_factory) -> dict[str, Path]:
    """lm_data's splits with texts that trip encoders added to each."""
    root = tmp_path_factory.mktemp("hard-splits")
    out = {}
    for name, path in lm_data["splits"].items():
        frame = pd.read_parquet(path)
        extra = pd.DataFrame({"text": HARD_TEXTS})
        extra = extra.reindex(columns=frame.columns).astype(frame.dtypes.to_dict())
        frame = pd.concat([frame, extra], ignore_index=True)
        out[name] = root / f"{name}.parquet"
        frame.to_parquet(out[name], index=False, row_group_size=PARQUET_ROW_GROUP_ROWS)
    return out


def tokenized(splits, tokenizer: Path, where: Path, **settings) -> tuple[Path, dict]:
    job = TokenizeJob("causal_lm", TokenizeSettings(block_size=32, shard_rows=64, **settings))
    tokenize_in_one_process(splits, tokenizer, where / "shards", where / "manifest.json", job)
    return where / "shards", read_json(where / "manifest.json")


def file_bytes(folder: Path) -> dict[str, bytes]:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return {str(p.relative_to(folder)): p.read_bytes() for p in files}


@pytest.mark.parametrize("packing", ["across_documents", "per_document"])
def test_the_shards_are_byte_identical_whichever_encoder_ran(
    hard_splits, lm_data, tmp_path, packing
):
    # Three partitions: their row ranges start inside read batches (sliced Arrow arrays).
    common = {"packing": packing, "partitions": 3, "read_batch_rows": 97}
    fast, fast_manifest = tokenized(hard_splits, lm_data["tokenizer"], tmp_path / "fast", **common)
    hf, hf_manifest = tokenized(
        hard_splits, lm_data["tokenizer"], tmp_path / "hf", encoder="hf", **common
    )
    assert fast_manifest["encoder"]["name"] == "gigatoken", fast_manifest["encoder"]
    assert hf_manifest["encoder"] == {
        "name": "hf",
        "reason": "tokenize.encoder is 'hf'",
        "checked_documents": 0,
        "version": None,
    }
    shards = file_bytes(fast)
    assert any(name.endswith(".parquet") for name in shards)
    assert shards == file_bytes(hf)


def test_the_plan_compares_a_sample_and_the_probes_and_records_why(lm_data, tmp_path):
    _, manifest = tokenized(lm_data["splits"], lm_data["tokenizer"], tmp_path)
    choice = manifest["encoder"]
    rows = pd.read_parquet(lm_data["splits"]["train"]).shape[0]
    assert choice["name"] == "gigatoken" and choice["version"]
    assert choice["checked_documents"] > min(rows, 2048)  # the sample and the probes
    assert "gives tokenizers' ids on" in choice["reason"]
    # Every split is encoded with it, so every split is sampled.
    assert all(f" {split}" in choice["reason"] for split in ("train", "val", "test"))


def test_an_added_token_read_differently_inside_words_falls_back_with_the_reason(lm_data, tmp_path):
    """An added token that is a word of its own for tokenizers (single_word), which the sample
    never holds glued inside a word: the probes of every added token find where gigatoken reads
    it otherwise (the sample of the train split and the EOS probes alone did not)."""
    folder = tmp_path / "added-token"
    shutil.copytree(lm_data["tokenizer"], folder)
    backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
    backend.add_tokens([AddedToken("<|user|>", single_word=True, normalized=False)])
    backend.save(str(folder / "tokenizer.json"))
    _, manifest = tokenized(lm_data["splits"], folder, tmp_path / "out")
    choice = manifest["encoder"]
    assert choice["name"] == "hf", choice
    assert "ids differ from tokenizers' on a probe text" in choice["reason"]
    assert "<|user|>" in choice["reason"]


def single_word_eos(lm_data, where: Path) -> Path:
    """The trained BPE with EOS as a single-word token: tokenizers does not match it inside a
    word, gigatoken does (its ids differ on such a text)."""
    folder = where / "single-word-eos"
    shutil.copytree(lm_data["tokenizer"], folder)
    backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
    backend.add_special_tokens([AddedToken("<|endoftext|>", single_word=True, normalized=False)])
    backend.save(str(folder / "tokenizer.json"))
    return folder


def test_a_tokenizer_gigatoken_reads_differently_falls_back_with_the_reason(lm_data, tmp_path):
    tokenizer = single_word_eos(lm_data, tmp_path)
    shards, manifest = tokenized(lm_data["splits"], tokenizer, tmp_path / "out")
    choice = manifest["encoder"]
    assert choice["name"] == "hf"
    assert "ids differ from tokenizers'" in choice["reason"] and "glued" in choice["reason"]
    _, reference = tokenized(lm_data["splits"], tokenizer, tmp_path / "hf", encoder="hf")
    assert manifest["shards"] == reference["shards"]


def test_gigatoken_required_and_not_reproducing_stops_with_the_reason(lm_data, tmp_path):
    tokenizer = single_word_eos(lm_data, tmp_path)
    with pytest.raises(CorpusError, match="tokenize.encoder is 'gigatoken', but .*ids differ"):
        tokenized(lm_data["splits"], tokenizer, tmp_path / "out", encoder="gigatoken")


def test_a_tokenizer_gigatoken_cannot_load_falls_back(lm_data, tmp_path):
    folder = tmp_path / "lowercase"
    shutil.copytree(lm_data["tokenizer"], folder)
    backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
    from tokenizers import normalizers

    backend.normalizer = normalizers.Lowercase()
    backend.save(str(folder / "tokenizer.json"))
    _, manifest = tokenized(lm_data["splits"], folder, tmp_path / "out")
    assert manifest["encoder"]["name"] == "hf"
    assert "gigatoken cannot load this tokenizer" in manifest["encoder"]["reason"]
    assert "Lowercase" in manifest["encoder"]["reason"]


def test_both_encoders_end_every_document_with_eos(lm_data):
    facts = tokenizer_facts(lm_data["tokenizer"])
    encoder_json = encoder_for(facts, TokenizeJob("causal_lm")).to_str()
    texts = pa.array(["", "one", "two words", ""] + HARD_TEXTS)
    fast = FastEncoder(encoder_json, facts.eos_token_id).encode(texts)
    hf = HfEncoder(encoder_json).encode(texts)
    assert first_difference(hf, fast) is None
    ends = fast.offsets()[1:] - 1
    assert (fast.ids[ends] == facts.eos_token_id).all()
    assert fast.lengths[0] == 1  # an empty document is its EOS


def test_first_difference_names_the_document(lm_data):
    facts = tokenizer_facts(lm_data["tokenizer"])
    encoder = HfEncoder(encoder_for(facts, TokenizeJob("causal_lm")).to_str())
    a = encoder.encode(pa.array(["same", "before", "after"]))
    b = encoder.encode(pa.array(["same", "before", "later"]))
    assert first_difference(a, a) is None
    assert first_difference(a, b) == 2


def test_partitions_too_large_for_gigatokens_cache_fall_back_with_the_reason(
    lm_data, tmp_path, monkeypatch
):
    """gigatoken's cache grows with the text a job encodes: a partition over the bound (here
    made small) gets tokenizers, and `gigatoken` required stops with the same reason."""
    from snaketune.tokenize import encoder

    monkeypatch.setattr(encoder, "FAST_ENCODER_MAX_PARTITION_BYTES", 10_000)
    _, manifest = tokenized(lm_data["splits"], lm_data["tokenizer"], tmp_path / "a", partitions=1)
    assert manifest["encoder"]["name"] == "hf"
    assert "over the 0 MiB that keep gigatoken's cache bounded" in manifest["encoder"]["reason"]
    with pytest.raises(CorpusError, match="tokenize.encoder is 'gigatoken', but a partition"):
        tokenized(
            lm_data["splits"],
            lm_data["tokenizer"],
            tmp_path / "b",
            partitions=1,
            encoder="gigatoken",
        )
