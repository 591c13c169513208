"""The encoders every partition runs, and which one.

The plan writes encoder.json: a copy of the configured tokenizer's backend that adds what the
task's rows need (EOS after each LM document; the model's special tokens and truncation for
classification). Hugging Face tokenizers runs it as written (HfEncoder). For causal LM text,
gigatoken (FastEncoder: a BPE encoder an order of magnitude faster, reading the Arrow text
buffers in place) runs the same tokenizer.json with EOS appended in numpy; the plan uses it only
where it gives exactly tokenizers' ids on a sample of every split and on probe texts, the
tokenizer's added and special tokens among them (choose_encoder), and says which ran and why.
Both yield the same Encoded batches, so the rows, and the shards, are the same whichever ran."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import chain
from operator import attrgetter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from snaketune.errors import CorpusError
from snaketune.fileio import read_json
from snaketune.names import INSTRUCTION_COLUMNS
from snaketune.tasks import task_of
from snaketune.tokenize.settings import FAST_ENCODER, HF_ENCODER, TokenizeJob

PLAIN_TOKENIZER_CLASS = "TokenizersBackend"
"""What transformers writes as tokenizer_class for a tokenizer that is its tokenizer.json and
nothing more, as the tokenizer stage's trained BPE is: such a folder is read without
transformers (whose import is most of a plan job's 4 s and 466 MB)."""


@dataclass(frozen=True)
class TokenizerFacts:
    """What the tokenize steps need of a tokenizer folder."""

    backend: Any
    """A tokenizers.Tokenizer of its own (changing it changes no one else's)."""
    eos_token: str | None
    eos_token_id: int | None
    pad_token_id: int | None
    vocab_size: int
    """Tokens the model's embedding must hold, added ones included (len() in transformers)."""


def tokenizer_facts(folder: Path) -> TokenizerFacts:
    """The folder's tokenizer: read with `tokenizers` alone when it is a plain tokenizer.json
    (PLAIN_TOKENIZER_CLASS), else through transformers, which knows every other kind."""
    from tokenizers import Tokenizer

    folder = Path(folder)
    config_path, file = folder / "tokenizer_config.json", folder / "tokenizer.json"
    config = read_json(config_path) if config_path.exists() else {}
    if file.exists() and config.get("tokenizer_class") == PLAIN_TOKENIZER_CLASS:
        backend = Tokenizer.from_file(str(file))
        eos, pad = token_text(config.get("eos_token")), token_text(config.get("pad_token"))
        return TokenizerFacts(
            backend=backend,
            eos_token=eos,
            eos_token_id=None if eos is None else backend.token_to_id(eos),
            pad_token_id=None if pad is None else backend.token_to_id(pad),
            vocab_size=backend.get_vocab_size(with_added_tokens=True),
        )
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    return TokenizerFacts(
        backend=Tokenizer.from_str(tokenizer.backend_tokenizer.to_str()),
        eos_token=tokenizer.eos_token,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        vocab_size=len(tokenizer),
    )


def token_text(entry: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: its text, or {"content": text}."""
    return entry.get("content") if isinstance(entry, dict) else entry


def truncating(tokenizer: TokenizerFacts, max_length: int):
    """A copy of the Rust tokenizer that adds the model's special tokens (e.g. BERT's [CLS] and
    [SEP]) and truncates to max_length with them in place."""
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(tokenizer.backend.to_str())
    backend.no_padding()
    backend.enable_truncation(max_length)
    return backend


def eos_appending(tokenizer: TokenizerFacts):
    """A copy of the Rust tokenizer whose post-processor ends every document with EOS, so packing
    needs no per-token Python work (the caller's tokenizer is left as it was)."""
    from tokenizers import Tokenizer, processors

    eos, eos_id = tokenizer.eos_token, tokenizer.eos_token_id
    if eos is None or eos_id is None:
        raise CorpusError(
            "causal_lm packing joins documents with an EOS token, and this tokenizer has none; "
            "use a tokenizer with eos_token set (the trained BPE has <|endoftext|>)"
        )
    backend = Tokenizer.from_str(tokenizer.backend.to_str())
    backend.no_truncation()
    backend.no_padding()
    backend.post_processor = processors.TemplateProcessing(
        single=f"$A {eos}", special_tokens=[(eos, eos_id)]
    )
    return backend


def encoder_for(tokenizer: TokenizerFacts, job: TokenizeJob):
    """The tokenizers copy the plan writes as encoder.json, the reference for every encoder."""
    if not task_of(job.task).predicts_tokens:
        return truncating(tokenizer, job.tokenize.max_length)
    return eos_appending(tokenizer)


# --- the encoders a partition runs ---------------------------------------------------------------


@dataclass(frozen=True)
class Encoded:
    """A batch of documents' token ids, back to back, with each document's length."""

    ids: np.ndarray
    """int32"""
    lengths: np.ndarray
    """int64, one per document"""
    truncated: int = 0
    """Documents cut at max_length (classification)."""
    targets: np.ndarray | None = None
    """Instruction data: bool per token, true for the response's (the ones trained on)."""

    def offsets(self) -> np.ndarray:
        return np.concatenate([np.zeros(1, np.int64), np.cumsum(self.lengths)])


def instruction_examples(prompts: Encoded, responses: Encoded) -> Encoded:
    """Each example's prompt ids (without the EOS the encoder ends every text with), then its
    response's ids (ending with it), with targets true for the response's. Encoding the two
    apart gives the ids of the whole text: the response starts with the whitespace before it
    (settings.InstructionTemplate), where a byte-level BPE pre-tokenizer splits anyway."""
    prompt_lengths = prompts.lengths - 1
    keep = np.ones(len(prompts.ids), dtype=bool)
    keep[prompts.offsets()[1:] - 1] = False
    lengths = prompt_lengths + responses.lengths
    starts = np.cumsum(lengths) - lengths
    within = np.arange(int(prompt_lengths.sum())) - np.repeat(
        np.cumsum(prompt_lengths) - prompt_lengths, prompt_lengths
    )
    targets = np.ones(int(lengths.sum()), dtype=bool)
    targets[np.repeat(starts, prompt_lengths) + within] = False
    ids = np.empty(len(targets), dtype=np.int32)
    ids[~targets] = prompts.ids[keep]
    ids[targets] = responses.ids
    return Encoded(ids, lengths, targets=targets)


class HfEncoder:
    """tokenizers' encode_batch_fast with encoder.json as the plan wrote it: its post-processor
    adds EOS or the model's special tokens, its truncation applies. Reads every tokenizer."""

    name = HF_ENCODER

    def __init__(self, encoder_json: str):
        from tokenizers import Tokenizer

        self.backend = Tokenizer.from_str(encoder_json)

    def encode(self, texts: pa.Array) -> Encoded:
        encodings = self.backend.encode_batch_fast(texts.to_pylist())
        docs = list(map(attrgetter("ids"), encodings))
        lengths = np.fromiter(map(len, docs), np.int64, len(docs))
        ids = np.fromiter(chain.from_iterable(docs), np.int32, int(lengths.sum()))
        truncated = sum(map(bool, map(attrgetter("overflowing"), encodings)))
        return Encoded(ids, lengths, truncated)


class FastEncoder:
    """gigatoken over the Arrow text buffers (no Python object per document or token), with EOS
    appended here: gigatoken runs no post-processor. Causal LM only. Used only where the plan
    found its ids equal to HfEncoder's (choose_encoder)."""

    name = FAST_ENCODER

    def __init__(self, encoder_json: str, eos_token_id: int):
        import gigatoken

        # encoder.json as written: gigatoken skips its post-processor (EOS is appended below),
        # and causal LM encoders have no truncation or padding. Should a gigatoken version
        # apply the post-processor after all, the plan's comparison sees EOS twice and keeps
        # tokenizers. (Rewriting the JSON without it would cost 0.2 s per job.)
        self.tokenizer = gigatoken.Tokenizer.from_json(encoder_json)
        self.eos_token_id = eos_token_id

    def encode(self, texts: pa.Array) -> Encoded:
        import awkward as ak

        if texts.null_count:
            raise CorpusError(f"{texts.null_count} documents have no text (null)")
        # Large strings: 64-bit offsets, the layout gigatoken reads in place.
        docs = ak.from_arrow(texts.cast(pa.large_string()), highlevel=True)
        out = self.tokenizer.encode_batch(docs).layout
        offsets = np.asarray(out.offsets.data)
        raw = np.asarray(out.content.data)[offsets[0] : offsets[-1]].astype(np.int32)
        ids = np.insert(raw, offsets[1:] - offsets[0], self.eos_token_id)
        return Encoded(ids, np.diff(offsets) + 1)


def encoder_from_plan(plan: dict, encoder_path: Path):
    """The encoder the plan chose, over its encoder.json."""
    encoder_json = Path(encoder_path).read_text()
    if plan["encoder"]["name"] == FAST_ENCODER:
        return FastEncoder(encoder_json, plan["eos_token_id"])
    return HfEncoder(encoder_json)


# --- which encoder: gigatoken only where it gives tokenizers' ids -------------------------------

SAMPLE_DOCUMENTS = 4096
"""Train documents the plan encodes both ways, from row groups spread over the split..."""
SAMPLE_BYTES = 2**19
"""...and at most this much of their text, so that the check costs a fraction of a second."""
SAMPLE_GROUPS = 16
FAST_ENCODER_MAX_PARTITION_BYTES = 256 * 2**20
"""gigatoken's pretoken cache is process-wide and unbounded: a job's memory grows with the
distinct text it encodes (about 0.6 MB per MB on bench/corpus.py's long-tailed text), and only
the job's end frees it. It is used only where no partition holds more text than this, which
`tokenize.partitions: auto` guarantees (snaketune.tokenize.plan)."""
PROBES = (
    "",
    " ",
    "  leading and trailing spaces  ",
    "\n\n\t tabs, newlines\r\nand CRLF\r\n",
    "Unicode: café, naïve, Zürich, 東京, Москва, emoji 😀👍🏽, combining e\u0301",
    "digits 1234567890 3.14159 and punctuation !?;:'\"()[]{}<>",
    "x" * 10_000,
    "a long word: " + "antidisestablishmentarianism" * 200,
)
"""Texts a corpus may hold anywhere, encoded both ways with the sample (the EOS token's own text
is added: a document may contain it)."""


@dataclass(frozen=True)
class EncoderChoice:
    """Which encoder the partitions run, and why (for the plan and the manifest)."""

    name: str
    reason: str
    checked_documents: int = 0
    version: str | None = None


SAMPLE_SHARES = {"train": 2, "val": 1, "test": 1}
"""Each split's share of the sample: every split is encoded by the chosen encoder, so each is
checked (a text only the test split holds must not get other ids there)."""
MAX_TOKEN_PROBES = 512
"""Added and special tokens probed (each alone, glued inside a word, between words)."""


def sample_splits(splits: dict[str, Path]) -> tuple[pa.Array, list[str]]:
    """Texts sampled from every split by SAMPLE_SHARES, and the split of each."""
    total = sum(SAMPLE_SHARES[name] for name in splits)
    arrays, names = [], []
    for name, path in splits.items():
        share = SAMPLE_SHARES[name] / total
        texts = sample_texts(path, int(SAMPLE_DOCUMENTS * share), int(SAMPLE_BYTES * share))
        arrays.append(texts)
        names += [name] * len(texts)
    return pa.concat_arrays(arrays) if arrays else pa.array([], pa.large_string()), names


def token_probes(backend) -> list[str]:
    """Texts holding the tokenizer's added and special tokens where a corpus may hold them:
    alone, glued inside a word, between words (an encoder may match them differently)."""
    added = sorted(
        {t.content for t in backend.get_added_tokens_decoder().values() if t.content.strip()}
    )
    return [
        text
        for token in added[:MAX_TOKEN_PROBES]
        for text in (token, f"in{token}side", f"a {token} b\n{token}{token}")
    ]


def sample_texts(
    split_path: Path, documents: int = SAMPLE_DOCUMENTS, text_bytes: int = SAMPLE_BYTES
) -> pa.Array:
    """Up to `documents` texts and `text_bytes` of text (large strings), an equal share from
    each of SAMPLE_GROUPS row groups spread evenly over the split."""
    parquet = pq.ParquetFile(split_path, pre_buffer=False)
    groups = parquet.metadata.num_row_groups
    if not groups:
        return pa.array([], pa.large_string())
    spread = max(SAMPLE_GROUPS - 1, 1)
    picked = sorted({round(i * (groups - 1) / spread) for i in range(SAMPLE_GROUPS)})
    documents, text_bytes = max(1, documents // len(picked)), text_bytes // len(picked)
    chunks = []
    for group in picked:
        batch = next(parquet.iter_batches(documents, row_groups=[group], columns=["text"]))
        texts = batch.column("text").cast(pa.large_string())
        ends = np.cumsum(pc.binary_length(texts).to_numpy(zero_copy_only=False))
        chunks.append(texts.slice(0, max(1, int(np.searchsorted(ends, text_bytes, "right")))))
    return pa.concat_arrays(chunks)


def first_difference(reference: Encoded, other: Encoded) -> int | None:
    """The first document whose ids differ, or None."""
    if np.array_equal(reference.lengths, other.lengths) and np.array_equal(
        reference.ids, other.ids
    ):
        return None
    starts, ends = reference.offsets(), other.offsets()
    for i in range(min(len(reference.lengths), len(other.lengths))):
        a = reference.ids[starts[i] : starts[i + 1]]
        b = other.ids[ends[i] : ends[i + 1]]
        if not np.array_equal(a, b):
            return i
    return min(len(reference.lengths), len(other.lengths))


def choose_encoder(
    setting: str,
    job: TokenizeJob,
    encoder_json: str,
    tokenizer: TokenizerFacts,
    splits: dict[str, Path],
    largest_partition_bytes: int,
) -> EncoderChoice:
    """gigatoken where it reproduces tokenizers' ids on a sample of every split and the probes
    (EOS and every added or special token included), and no partition is too large for its
    cache; tokenizers otherwise, with the reason. `setting` FAST_ENCODER makes a reason not to
    use it an error."""
    if setting == HF_ENCODER:
        return EncoderChoice(HF_ENCODER, "tokenize.encoder is 'hf'")
    if not task_of(job.task).predicts_tokens:
        return EncoderChoice(
            HF_ENCODER,
            "classification rows are truncated with the model's special tokens, which "
            "tokenizers does",
        )
    checked, sample, names = 0, pa.array([], pa.large_string()), []
    if largest_partition_bytes > FAST_ENCODER_MAX_PARTITION_BYTES:
        reason = (
            f"a partition holds {largest_partition_bytes / 2**20:,.0f} MiB of text, over the "
            f"{FAST_ENCODER_MAX_PARTITION_BYTES / 2**20:.0f} MiB that keep gigatoken's cache "
            "bounded; tokenize.partitions: auto (or more partitions) keeps them under it"
        )
    else:
        sample, names = sample_splits(splits)  # read only when the check runs
        reason, checked = fast_encoder_problem(encoder_json, tokenizer, sample, names)
    if reason is None:
        from importlib.metadata import version

        by_split = ", ".join(f"{names.count(n)} {n}" for n in dict.fromkeys(names))
        return EncoderChoice(
            FAST_ENCODER,
            f"gigatoken gives tokenizers' ids on {checked} documents ({len(sample)} sampled: "
            f"{by_split or 'none'}; and {checked - len(sample)} probes, the tokenizer's added "
            "and special tokens among them)",
            checked,
            version("gigatoken"),
        )
    if setting == FAST_ENCODER:
        raise CorpusError(
            f"tokenize.encoder is 'gigatoken', but {reason}; set tokenize.encoder: auto (or hf) "
            "to tokenize with tokenizers"
        )
    return EncoderChoice(HF_ENCODER, reason, checked)


def fast_encoder_problem(
    encoder_json: str, tokenizer: TokenizerFacts, sample: pa.Array, names: list[str]
) -> tuple[str | None, int]:
    """Why gigatoken cannot stand in for tokenizers here (None: it can), and how many documents
    were compared."""
    try:
        fast = FastEncoder(encoder_json, tokenizer.eos_token_id)
    except ImportError:
        return "gigatoken is not installed", 0
    except Exception as err:  # noqa: BLE001 - any refusal to load means: not this tokenizer
        return f"gigatoken cannot load this tokenizer ({first_line(err)})", 0
    eos = tokenizer.eos_token
    probes = [
        *PROBES,
        f"the EOS token {eos} inside a text",
        f"glued{eos}to{eos}{eos}words",
        *token_probes(tokenizer.backend),
    ]
    texts = pa.concat_arrays([sample, pa.array(probes, pa.large_string())])
    try:
        other = fast.encode(texts)
    except Exception as err:  # noqa: BLE001 - a failure to encode is a reason not to use it
        return f"gigatoken failed on the sample ({first_line(err)})", len(texts)
    differs = first_difference(HfEncoder(encoder_json).encode(texts), other)
    if differs is None:
        return None, len(texts)
    where = (
        f"sampled {names[differs]} document {differs}" if differs < len(sample) else "a probe text"
    )
    text = texts[differs].as_py() if differs < len(texts) else ""
    return f"gigatoken's ids differ from tokenizers' on {where} ({text[:60]!r})", len(texts)


def first_line(err: Exception) -> str:
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def encoded_batches(
    encoder, batches: Iterator[pa.RecordBatch], instruction: bool = False
) -> Iterator[tuple]:
    """Each record batch with its Encoded: of its text, or of its instruction examples. The next
    batch is encoded in a worker thread (both encoders release the GIL) while the caller packs
    and writes the current one."""

    def encode(batch: pa.RecordBatch) -> Encoded:
        if instruction:
            prompts, responses = (batch.column(name) for name in INSTRUCTION_COLUMNS)
            return instruction_examples(encoder.encode(prompts), encoder.encode(responses))
        return encoder.encode(batch.column("text"))

    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for batch in batches:
            future = pool.submit(encode, batch)
            if pending is not None:
                yield pending[0], pending[1].result()
            pending = (batch, future)
        if pending is not None:
            yield pending[0], pending[1].result()
