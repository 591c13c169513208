"""A local pretrained tokenizer (or model) folder edited in place: its content digest is a param
of the jobs that read it (snaketune.data.sources), so the edit reruns them, as a changed setting
would, while a touch that changes nothing reruns nothing. It used to give "Nothing to be done",
the corpus, the tokenizer copy and the serving template keeping the old chat template."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.checkpoints import CHAT_TEMPLATE
from tests.support.workflow import config_with, snakemake, stage_folder

pytestmark = pytest.mark.slow


def save_chat_tokenizer(folder: Path) -> None:
    """A small byte-level BPE with an end-of-text token and a chat template, as
    save_pretrained writes one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    texts = ["Where is my parcel?", "Your parcel ships on Monday.", "How do I reset it?"] * 20
    bpe.train_from_iterator(
        texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"])
    )
    wrapped = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    wrapped.pad_token = wrapped.eos_token
    wrapped.chat_template = CHAT_TEMPLATE
    wrapped.save_pretrained(folder)


def test_a_local_chat_tokenizer_edited_in_place_reruns_the_jobs_that_read_it(tmp_path):
    folder = tmp_path / "chat-tokenizer"
    save_chat_tokenizer(folder)
    config = config_with(
        experiments__0__text_template=None,
        experiments__0__tokenizer={"kind": "pretrained", "name_or_path": str(folder)},
    )
    config["results_dir"] = str(tmp_path / "results")
    (tmp_path / "config.yaml").write_text(json.dumps(config))
    clean = stage_folder(config, "demo-lm", "clean") / "manifest.json"
    tokenizer = stage_folder(config, "demo-lm", "tokenizer") / "manifest.json"
    first = snakemake(tmp_path, str(clean), str(tokenizer))
    assert first.returncode == 0, first.stderr[-3000:]
    corpus = clean.parent / "corpus.parquet"
    before = corpus.read_bytes()

    template = folder / "chat_template.jinja"  # where transformers saves the chat template
    template.touch()  # touched, the same content: nothing to do
    again = snakemake(tmp_path, "--dry-run", str(clean), str(tokenizer))
    assert "Nothing to be done" in again.stdout + again.stderr

    edited = CHAT_TEMPLATE.replace("<|{{ m['role'] }}|>", "### {{ m['role'] }}: ")
    template.write_text(edited.replace("<|assistant|>", "### assistant: "))
    planned = snakemake(tmp_path, "--dry-run", str(clean), str(tokenizer))
    out = planned.stdout + planned.stderr
    assert "clean_corpus" in out and "prepare_tokenizer" in out, out[-3000:]
    assert "Params have changed" in out or "params" in out.lower()

    rerun = snakemake(tmp_path, str(clean), str(tokenizer))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert corpus.read_bytes() != before  # composed with the new template
    import pandas as pd

    assert pd.read_parquet(corpus)["text"].str.contains("### user: ").all()
