"""Stage 4, prepare_tokenizer: train a byte-level BPE on the train split, or load a pretrained
tokenizer; either way save it in Hugging Face format so every later stage loads it the same way."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq

from snaketune.context import IN_PROCESS, JobContext
from snaketune.data.paths import TokenizerPaths
from snaketune.data.settings import TokenizerSettings
from snaketune.errors import TokenizerError, not_loadable
from snaketune.fileio import atomic_dir, sha256_tree
from snaketune.manifest import stage_manifest

EOS = "<|endoftext|>"
PAD = "<|pad|>"


def iter_texts(train_split: Path, batch_rows: int = 1024) -> Iterator[list[str]]:
    for batch in pq.ParquetFile(train_split).iter_batches(batch_size=batch_rows, columns=["text"]):
        yield batch.column("text").to_pylist()


def train_bpe(train_split: Path, settings: TokenizerSettings):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=settings.vocab_size,
        min_frequency=settings.min_frequency,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(iter_texts(train_split), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=EOS, bos_token=EOS, pad_token=PAD, unk_token=None
    )


def load_pretrained(name_or_path: str, trust_remote_code: bool = False):
    """AutoTokenizer.from_pretrained with an error that says how to work offline."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        key = "tokenizer.name_or_path"
        raise TokenizerError(not_loadable("tokenizer", key, name_or_path, err)) from err
    if tokenizer.pad_token is None:
        # Padding is needed for classification batches; EOS is the conventional stand-in.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def prepare_tokenizer(
    paths: TokenizerPaths, settings: TokenizerSettings, context: JobContext = IN_PROCESS
) -> int:
    unread = () if settings.kind == "bpe" else ("train",)  # a pretrained one reads no split
    with stage_manifest(paths, settings, context=context, unread=unread) as record:
        if settings.kind == "bpe":
            tokenizer = train_bpe(paths.train, settings)
        else:
            tokenizer = load_pretrained(settings.name_or_path, settings.trust_remote_code)
        with atomic_dir(paths.tokenizer) as tmp:
            tokenizer.save_pretrained(tmp)
        record.counts = {"vocab_size": len(tokenizer)}
        record.extra["tokenizer_sha256"] = sha256_tree(paths.tokenizer)
    return len(tokenizer)
