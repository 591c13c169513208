"""The Rust encoder every partition runs: a copy of the configured tokenizer's backend that adds
what the task's rows need (EOS after each LM document; the model's special tokens and
truncation for classification), and the loop that keeps it busy while rows are written."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa

from snaketune.errors import CorpusError
from snaketune.names import SEQUENCE_CLASSIFICATION
from snaketune.settings import TokenizeJob


def truncating(tokenizer, max_length: int):
    """A copy of the Rust tokenizer that adds the model's special tokens (e.g. BERT's [CLS] and
    [SEP]) and truncates to max_length with them in place."""
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.no_padding()
    backend.enable_truncation(max_length)
    return backend


def eos_appending(tokenizer):
    """A copy of the Rust tokenizer whose post-processor ends every document with EOS, so packing
    needs no per-token Python work (the caller's tokenizer is left as it was)."""
    from tokenizers import Tokenizer, processors

    eos, eos_id = tokenizer.eos_token, tokenizer.eos_token_id
    if eos is None or eos_id is None:
        raise CorpusError(
            "causal_lm packing joins documents with an EOS token, and this tokenizer has none; "
            "use a tokenizer with eos_token set (the trained BPE has <|endoftext|>)"
        )
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.no_truncation()
    backend.no_padding()
    backend.post_processor = processors.TemplateProcessing(
        single=f"$A {eos}", special_tokens=[(eos, eos_id)]
    )
    return backend


def encoder_for(tokenizer, job: TokenizeJob):
    if job.task == SEQUENCE_CLASSIFICATION:
        return truncating(tokenizer, job.tokenize.max_length)
    return eos_appending(tokenizer)


def encoded_batches(encoder, batches: Iterator[pa.RecordBatch]) -> Iterator[tuple]:
    """Each record batch with its encodings. The next batch is encoded in a worker thread (the
    Rust encoder releases the GIL) while the caller packs and writes the current one."""

    def encode(batch: pa.RecordBatch) -> list:
        return encoder.encode_batch_fast(batch.column("text").to_pylist())

    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for batch in batches:
            future = pool.submit(encode, batch)
            if pending is not None:
                yield pending[0], pending[1].result()
            pending = (batch, future)
        if pending is not None:
            yield pending[0], pending[1].result()
