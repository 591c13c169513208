"""Every stage's settings as typed dataclasses, built from the validated config in one place.

A dataclass named after a config section (`CleanSettings` for an experiment's `clean:`, ...)
defines each of that section's keys once, with `setting(default, description=..., bounds or
allowed values)`; snaketune.schema makes the JSON schema Snakemake validates against and the
README's settings reference from them (`make schema`), and a test keeps both current. A rule
whose job needs more than one section gets a `...Job` dataclass that holds them. The workflow
turns the config into a rule's settings with the builders at the end of this module and passes
them to the job as JSON (`to_json`); the CLI reads them back with `from_json`.

Each dataclass checks what it can check alone in `__post_init__` and raises a SettingsError that
names its fields; snaketune.config runs those checks for every experiment before any job and
prefixes each field with its key in config.yaml.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import re
import types
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar, get_args, get_origin, get_type_hints
from urllib.parse import urlparse

from snaketune.errors import SnaketuneError
from snaketune.names import CAUSAL_LM, SEQUENCE_CLASSIFICATION, SPLITS, TASKS

FORMATS = ("txt", "jsonl", "csv", "tsv", "parquet")
TXT_DOCUMENTS = ("line", "paragraph", "heading")
AUTO = "auto"
LM_PACKINGS = ("across_documents", "per_document", "documents_apart")
ACROSS_DOCUMENTS, PER_DOCUMENT, DOCUMENTS_APART = LM_PACKINGS
WEIGHT_DTYPES = (AUTO, "float32", "bfloat16")
NO_QUANTIZATION = "none"
QUANTIZATIONS = (NO_QUANTIZATION, "4bit", "8bit")
HF_ENCODER = "hf"
"""Hugging Face tokenizers, which reads every tokenizer.json."""
FAST_ENCODER = "gigatoken"
"""gigatoken, used when it gives the same ids (snaketune.tokenize.encoder)."""
ENCODERS = (AUTO, HF_ENCODER, FAST_ENCODER)
GPT2, LLAMA, LSTM = ARCHS = ("gpt2", "llama", "lstm")
TOKENIZER_KINDS = ("bpe", "pretrained")
INITS = ("scratch", "pretrained")
ATTENTIONS = (AUTO, "eager", "sdpa")
STRATEGIES = ("ddp", "fsdp")
DEVICES = (AUTO, "cpu", "cuda")
PRECISIONS = (AUTO, "fp32", "bf16", "fp16")
TRANSFORMERS = (GPT2, LLAMA)
"""model.arch values that build transformers (the others: the LSTM baseline)."""


def llama_inner_width(width: int) -> int:
    """A scratch Llama's SwiGLU inner width: 8/3 of the model's (the MLP's parameters those of
    a 4x GELU MLP), rounded up to a multiple of 64."""
    return -(-8 * width // (3 * 64)) * 64


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
"""torch.compile's modes train.compile may name (true: "default")."""


def compile_mode(setting: bool | str) -> str | None:
    """train.compile as torch.compile's mode, or None: not compiled."""
    return COMPILE_MODES[0] if setting is True else (setting or None)


URL_SCHEMES = ("http", "https", "file", "hf")
GREEDY, SAMPLE = DECODINGS = ("greedy", "sample")
"""evaluate.decoding: the most likely token each step, or top-k sampling at a temperature."""


class SettingsError(SnaketuneError, ValueError):
    """Settings that cannot work: (field, what is wrong) pairs, every one at once."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__("; ".join(f"{key}: {text}" if key else text for key, text in problems))


def raise_problems(problems: list[tuple[str, str]]) -> None:
    if problems:
        raise SettingsError(problems)


def setting(
    default: Any = MISSING,
    *,
    description: str,
    factory: Any = None,
    schema_default: bool = True,
    **schema: Any,
) -> Any:
    """A config key, defined once: a dataclass field with its default (or `factory`), its
    description, and what the JSON schema says of it beyond the type its annotation gives
    (bounds, allowed values, a pattern, or a whole schema where the type is a union);
    snaketune.schema makes config.schema.yaml and the README's reference from them.
    `schema_default=False`: a default the schema leaves out (the key is optional and absent
    means the default)."""
    metadata = {"description": description, "schema": schema, "schema_default": schema_default}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


# --- the datasets catalog ------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetSettings:
    """One entry of the config's `datasets:` catalog."""

    SECTION: ClassVar[str] = (
        "Catalog of datasets by name; experiments refer to these names. A name becomes a "
        "folder under results_dir (datasets/<name>/download), so it is letters, digits, "
        "'_', '.' and '-'."
    )

    url: str = setting(
        minLength=1,
        # A scheme other than these four is refused before any job (a local path has none).
        pattern="^((https?|file|hf)://|(?![A-Za-z][A-Za-z0-9+.-]*:))",
        description=(
            "http(s):// or file:// URL, a Hugging Face Hub file as "
            "hf://datasets/<owner>/<name>[@<revision>]/<file> (fetched through "
            "huggingface_hub's cache; HF_HUB_OFFLINE=1 uses the cache only), or a path relative "
            "to the repository (the Snakefile's directory) or absolute."
        ),
    )
    sha256: str = setting(
        pattern="^[0-9a-fA-F]{64}$",
        description="sha256 of the file as fetched (before decompression); a mismatch fails.",
    )
    format: str = setting(
        enum=FORMATS,
        description=(
            "Format of the (decompressed) data file. A .gz, .zip or .tar.gz URL is unpacked first."
        ),
    )
    member: str | None = setting(
        None, description="For archives holding several files, the path of the data file inside."
    )
    text_column: str = setting(
        "text",
        description="Column holding the document text (txt files use this name for each line).",
    )
    label_column: str | None = setting(
        None, description="Column holding the class label (needed for sequence_classification)."
    )
    prompt_column: str | None = setting(
        None,
        description=(
            "Instruction data: the column a model answers (the question). Used by the default "
            'template "Question: {prompt}\\nAnswer: {response}" when an experiment gives none.'
        ),
    )
    response_column: str | None = setting(
        None,
        description=(
            "Instruction data: the column of the answer. Set, a causal LM trains on the answers "
            "only (prompt tokens are no target), is scored on them (answer perplexity; exact "
            "match, F1 and ROUGE-L of generated answers, beside a retrieval baseline), and the "
            "experiment's text_template must hold its placeholder, after the prompt."
        ),
    )
    messages_column: str | None = setting(
        None,
        description=(
            "Instruction data as conversations: a column of lists of {role, content} turns, the "
            "last the assistant's answer, which alone is learned and scored. Composed by the "
            "experiment's pretrained tokenizer's chat template (tokenizer.kind pretrained, no "
            "text_template). Instead of prompt_column and response_column."
        ),
    )
    header: bool = setting(
        True, description="csv/tsv only. Whether the first line names the columns."
    )
    column_names: list[str] | None = setting(
        None, description="csv/tsv without a header. The column names, in order."
    )
    quoting: bool = setting(
        True,
        description="csv/tsv only. Treat '\"' as a quote character; turn off for raw text files.",
    )
    txt_document: str = setting(
        "line",
        enum=TXT_DOCUMENTS,
        description=(
            "txt only. What one document is: each non-blank line; each paragraph (lines up to a "
            "blank line, e.g. a speech in Tiny Shakespeare); or each article from a top-level "
            "heading ' = Title = ' to the next (WikiText). Matters for causal LMs, whose "
            "examples never cross a document boundary, and for dedup and the split, which work "
            "per document."
        ),
    )
    encoding: str | None = setting(
        None,
        description=(
            "Text encoding of the data file (a Python codec name: utf-8, utf-16, cp1252, "
            "latin-1, ...). Empty reads a byte-order mark (UTF-8, UTF-16, UTF-32) or else "
            "UTF-8; a file that is mostly not valid UTF-8 is refused, naming the likely "
            "encoding."
        ),
    )
    max_unpacked_bytes: int = setting(
        4294967296,
        minimum=1,
        description="Refuse files that decompress past this many bytes (decompression bombs).",
    )

    def __post_init__(self) -> None:
        problems = []
        if self.member is not None and not inside_folder(self.member):
            problems.append(
                (
                    "member",
                    f"{self.member!r} is not a path inside the download: use a relative "
                    "path without '..' segments, as the archive lists it",
                )
            )
        csv_like = self.format in ("csv", "tsv")
        for key, default in (("header", True), ("quoting", True), ("column_names", None)):
            if not csv_like and getattr(self, key) != default:
                problems.append((key, f"is a csv/tsv option; format is {self.format!r}"))
        if self.format != "txt" and self.txt_document != "line":
            problems.append(("txt_document", f"is a txt option; format is {self.format!r}"))
        if csv_like and self.header and self.column_names is not None:
            problems.append(
                (
                    "column_names",
                    "names the columns of a file without a header; the file has "
                    "one (header: true), whose names would be replaced: set header: false, or "
                    "remove column_names",
                )
            )
        if self.encoding is not None and not known_codec(self.encoding):
            problems.append(
                (
                    "encoding",
                    f"{self.encoding!r} is not a codec Python knows "
                    "(e.g. utf-8, utf-16, cp1252, latin-1)",
                )
            )
        if self.encoding is not None and self.format == "parquet":
            problems.append(("encoding", "is for text files; Parquet stores UTF-8"))
        if self.format == "txt" and (self.prompt_column or self.response_column):
            problems.append(
                ("response_column", "instruction data needs records with columns; txt has none")
            )
        if self.prompt_column and not self.response_column:
            problems.append(("prompt_column", "is for instruction data: set response_column too"))
        if self.messages_column and (self.prompt_column or self.response_column):
            problems.append(
                (
                    "messages_column",
                    "holds whole conversations; prompt_column and response_column are the other "
                    "way to give instruction data: set one or the other",
                )
            )
        if self.format == "txt" and self.messages_column:
            problems.append(("messages_column", "needs records with columns; txt has none"))
        raise_problems(problems)

    @property
    def is_instruction(self) -> bool:
        return bool(self.response_column or self.messages_column)


def inside_folder(relative: str) -> bool:
    """Whether a relative path stays inside the folder it is joined to."""
    parts = PurePosixPath(relative).parts
    return bool(parts) and not PurePosixPath(relative).is_absolute() and ".." not in parts


def known_codec(name: str) -> bool:
    try:
        codecs.lookup(name)
    except LookupError:
        return False
    return True


@dataclass(frozen=True)
class DownloadSettings:
    url: str
    """http(s)://, file://, hf:// or a local path (already resolved to absolute by the caller)."""
    sha256: str
    """Expected digest of the fetched bytes (before any decompression)."""
    retries: int = 4
    """Attempts after the first for connection errors and HTTP 5xx/429."""
    backoff_seconds: float = 1.0
    """First wait between attempts; doubles each time."""
    timeout_seconds: float = 60.0
    max_unpacked_bytes: int = 4 * 1024**3
    """Refuse archives or .gz files that expand past this (decompression bombs)."""


# --- clean and split ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ReadSettings:
    """How one experiment reads its dataset's records (from the catalog entry and the task)."""

    format: str
    """One of FORMATS (after decompression)."""
    text_column: str = "text"
    label_column: str | None = None
    text_template: str | None = None
    """A str.format template over the record's columns, e.g. 'Q: {question}\\nA: {answer}'."""
    prompt_column: str | None = None
    response_column: str | None = None
    """Instruction data (causal LM): the template's {response_column} placeholder starts the
    response, which alone is learned and scored (see `instruction`)."""
    messages_column: str | None = None
    chat_tokenizer: str | None = None
    """Instruction data without a text_template: the pretrained tokenizer whose chat template,
    if it has one, composes each example (snaketune.data.reading.compose_instruction)."""
    header: bool = True
    """csv/tsv: whether the first line names the columns."""
    column_names: list[str] | None = None
    """csv/tsv without a header: the names of the columns, in order."""
    quoting: bool = True
    """csv/tsv: treat '"' as a quote character (off for files such as SMS Spam)."""
    txt_document: str = "line"
    """txt: one document per non-blank line, per blank-line-separated paragraph, or per
    top-level heading ' = Title = ' up to the next one (WikiText's articles)."""
    encoding: str | None = None
    """Text files' codec; None reads a byte-order mark (UTF-8/16/32), else UTF-8."""

    def __post_init__(self) -> None:
        if self.messages_column and self.text_template:
            raise SettingsError(
                [
                    (
                        "text_template",
                        f"is not used with the dataset's messages_column "
                        f"{self.messages_column!r} (conversations, composed by the tokenizer's "
                        "chat template): remove it",
                    )
                ]
            )
        if self.messages_column and not self.chat_tokenizer:
            raise SettingsError(
                [
                    (
                        "tokenizer.kind",
                        f"the dataset's messages_column {self.messages_column!r} holds "
                        "conversations, which a pretrained tokenizer's chat template composes: "
                        "set tokenizer.kind: pretrained and a name_or_path that has one",
                    )
                ]
            )
        if self.response_column:
            self.instruction  # noqa: B018 (raises a SettingsError for a template that cannot work)

    @property
    def is_instruction(self) -> bool:
        return bool(self.response_column or self.messages_column)

    @property
    def instruction(self) -> InstructionTemplate | None:
        """How a record splits into prompt and response, for prompt and response columns;
        else None (conversations are split by the chat template)."""
        if not self.response_column:
            return None
        return instruction_template(self.text_template, self.prompt_column, self.response_column)


DEFAULT_INSTRUCTION_TEMPLATE = "Question: {prompt}\nAnswer: {response}"
"""Instruction data without a text_template: {prompt} and {response} stand for the dataset's
prompt_column and response_column."""


@dataclass(frozen=True)
class InstructionTemplate:
    """A record as prompt + response. The whitespace before the response placeholder belongs to
    the response, as byte-level BPE attaches a space to the word after it: the prompt's and the
    response's tokens, encoded apart, are then those of the whole text."""

    prompt: str
    """str.format template of the prompt (no trailing whitespace)."""
    response: str
    """str.format template of the response, starting with that whitespace."""

    @property
    def columns(self) -> list[str]:
        return re.findall(r"{(\w+)}", self.prompt + self.response)


def instruction_template(
    text_template: str | None, prompt_column: str | None, response_column: str
) -> InstructionTemplate:
    placeholder = "{" + response_column + "}"
    if not text_template:
        if not prompt_column:
            raise SettingsError(
                [
                    (
                        "text_template",
                        f"instruction data (response_column {response_column!r}) needs a "
                        f"text_template with {placeholder}, or the dataset's prompt_column for "
                        f"the default {DEFAULT_INSTRUCTION_TEMPLATE!r}",
                    )
                ]
            )
        text_template = DEFAULT_INSTRUCTION_TEMPLATE.format(
            prompt="{" + prompt_column + "}", response=placeholder
        )
    head, found, tail = text_template.partition(placeholder)
    problem = None
    if not found:
        problem = f"has no {placeholder}, the dataset's response_column: where does the answer go?"
    elif placeholder in tail:
        problem = f"holds {placeholder} twice; the response is one placeholder"
    elif not head.strip():
        problem = f"has nothing before {placeholder}: the response needs a prompt"
    if problem:
        raise SettingsError([("text_template", f"{text_template!r} {problem}")])
    prompt = head.rstrip()
    return InstructionTemplate(prompt=prompt, response=head[len(prompt) :] + placeholder + tail)


@dataclass(frozen=True)
class CleanSettings:
    SECTION: ClassVar[str] = (
        "Cleaning filters, applied in this order; each one's count goes to the report."
    )

    nfc: bool = setting(True, description="Unicode NFC normalization.")
    strip_html: bool = setting(False, description="Remove HTML tags and unescape entities.")
    redact_pii: bool = setting(
        False,
        description=(
            "Replace e-mail addresses, phone numbers and IPs with <EMAIL>, <PHONE>, <IP>."
        ),
    )
    min_chars: int = setting(1, minimum=0, description="Drop documents shorter than this.")
    max_chars: int = setting(100_000, minimum=1, description="Drop documents longer than this.")
    dedup: bool = setting(True, description="Drop exact duplicates after normalization.")
    min_alpha_ratio: float = setting(
        0,  # an int, as the schema always gave it: the stage keys stay
        minimum=0,
        maximum=1,
        description=(
            "Drop documents in which letters are less than this share of the non-space "
            "characters (tables, number dumps, mojibake); 0 is off, 0.6-0.8 suits prose."
        ),
    )
    max_repeated_line_fraction: float = setting(
        1,  # an int, as the schema always gave it: the stage keys stay
        minimum=0,
        maximum=1,
        description=(
            "Drop documents in which more than this share of the non-blank lines repeat an "
            "earlier line (menus, boilerplate); 1 is off, 0.3 is a common choice for web text."
        ),
    )
    min_mean_word_length: float = setting(
        0,  # an int, as the schema always gave it: the stage keys stay
        minimum=0,
        description=(
            "Drop documents whose mean word length is below this (0 is off; 3 suits English)."
        ),
    )
    max_mean_word_length: float | None = setting(
        None,
        exclusiveMinimum=0,
        description=(
            "Drop documents whose mean word length is above this (null is off; 10 suits English)."
        ),
    )

    def __post_init__(self) -> None:
        problems = []
        if self.min_chars > self.max_chars:
            problems.append(
                (
                    "min_chars",
                    f"{self.min_chars} is above max_chars={self.max_chars}: every "
                    "document would be removed",
                )
            )
        longest = self.max_mean_word_length
        if longest is not None and self.min_mean_word_length > longest:
            problems.append(
                (
                    "min_mean_word_length",
                    f"{self.min_mean_word_length} is above "
                    f"max_mean_word_length={longest}: every document would be removed",
                )
            )
        raise_problems(problems)


@dataclass(frozen=True)
class CleanJob:
    read: ReadSettings
    clean: CleanSettings = field(default_factory=CleanSettings)
    member: str | None = None
    """For archives holding several files, the path of the data file inside."""


@dataclass(frozen=True)
class NearDuplicateSettings:
    SECTION: ClassVar[str] = (
        "MinHash + LSH removal of near-copies (datasketch) after the split: documents are "
        "visited train, val, test, and one whose shingles overlap an earlier kept "
        "document's by the threshold or more is dropped. So each split keeps the first of a "
        "cluster, and val/test lose their near-copies of training documents. Counts per "
        "split go to the split manifest."
    )

    enabled: bool = setting(
        True,
        description=(
            "Turn off to keep near-copies (the test set may then hold copies of training text)."
        ),
    )
    threshold: float = setting(
        0.8,
        exclusiveMinimum=0,
        maximum=1,
        description=(
            "Estimated Jaccard similarity of two documents' shingle sets at which they count as "
            "near-duplicates. Lower it to catch looser copies; a short text differs more per "
            "changed word, so copies of tweets or sentences need ~0.6."
        ),
    )
    shingle_size: int = setting(
        5,
        minimum=1,
        description="Characters per shingle of the normalized (casefolded, single-spaced) text.",
    )
    num_perm: int = setting(
        128,
        minimum=16,
        maximum=1024,
        description=(
            "MinHash permutations; more estimates similarity more finely, at a linear cost."
        ),
    )
    seed: int = setting(
        1,
        minimum=0,
        description="Seeds the MinHash permutations (the removals are identical on every run).",
    )

    def __post_init__(self) -> None:
        problems = []
        if not 0.0 < self.threshold <= 1.0:
            problems.append(("", f"threshold must be in (0, 1], got {self.threshold}"))
        if self.shingle_size < 1:
            problems.append(("", f"shingle_size must be at least 1, got {self.shingle_size}"))
        if self.num_perm < 2:
            problems.append(("", f"num_perm must be at least 2, got {self.num_perm}"))
        if problems:
            raise SettingsError([("near_duplicates", "; ".join(text for _, text in problems))])


@dataclass(frozen=True)
class SplitSettings:
    SECTION: ClassVar[str] = "Ratios of the hash-based train/val/test split (must sum to 1)."

    train: float = setting(0.8, exclusiveMinimum=0, maximum=1, description="Train share.")
    val: float = setting(0.1, exclusiveMinimum=0, maximum=1, description="Validation share.")
    test: float = setting(0.1, exclusiveMinimum=0, maximum=1, description="Test share.")
    salt: str = setting("", description="Change to draw another deterministic split.")
    near_duplicates: NearDuplicateSettings = field(default_factory=NearDuplicateSettings)
    """MinHash/LSH removal of near-copies within and across splits (a dict is accepted)."""

    def __post_init__(self) -> None:
        if isinstance(self.near_duplicates, dict):  # as written in a config or a test
            object.__setattr__(
                self, "near_duplicates", NearDuplicateSettings(**self.near_duplicates)
            )
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise SettingsError(
                [("", f"split ratios must sum to 1, got {total:g} ({asdict(self)})")]
            )

    def ratio(self, split: str) -> float:
        return {name: getattr(self, name) for name in SPLITS}[split]


# --- tokenizer and tokenize ---------------------------------------------------------------------


@dataclass(frozen=True)
class TokenizerSettings:
    SECTION: ClassVar[str] = (
        "Train a byte-level BPE on the train split, or load a pretrained tokenizer."
    )

    kind: str = setting(
        "bpe",
        enum=TOKENIZER_KINDS,
        description="'bpe' trains; 'pretrained' loads name_or_path.",
    )
    vocab_size: int = setting(
        2000, minimum=260, maximum=1000000, description="BPE vocabulary size."
    )
    min_frequency: int = setting(
        2, minimum=1, description="BPE merges need at least this many occurrences."
    )
    name_or_path: str | None = setting(
        None, description="Local directory or hub id (pretrained only)."
    )
    trust_remote_code: bool = setting(
        False,
        description="Allow code shipped with a hub tokenizer. Leave off unless you trust it.",
    )

    def __post_init__(self) -> None:
        if self.kind == "pretrained" and not self.name_or_path:
            raise SettingsError([("name_or_path", "required when tokenizer.kind is 'pretrained'")])
        if self.kind == "bpe" and self.name_or_path:
            raise SettingsError(
                [
                    (
                        "name_or_path",
                        "is set but tokenizer.kind is 'bpe', which trains a new "
                        "tokenizer and would ignore it: set tokenizer.kind: pretrained to load it",
                    )
                ]
            )


@dataclass(frozen=True)
class TokenizeSettings:
    SECTION: ClassVar[str] = "How documents become Parquet shards of token ids."

    block_size: int = setting(
        128,
        minimum=8,
        maximum=131072,
        description=(
            "causal_lm tokens per row and the context length (per_document rows may be shorter)."
        ),
    )
    max_length: int = setting(
        128, minimum=4, maximum=131072, description="sequence_classification truncation length."
    )
    shard_rows: int = setting(4096, minimum=1, description="Rows per Parquet shard.")
    read_batch_rows: int = setting(
        1024, minimum=1, description="Documents tokenized per batch (bounds memory)."
    )
    partitions: int | str = setting(
        AUTO,
        oneOf=[{"type": "integer", "minimum": 1, "maximum": 99999}, {"const": "auto"}],
        description=(
            "Tokenize jobs for the train split, each reading its own contiguous rows (val and "
            "test are one job each). 'auto' sizes every split at one job per 256 MiB of text. "
            "Raise it to spread a large corpus over more cores or cluster jobs; with packing "
            "across_documents each causal_lm partition drops its last partial block (fewer than "
            "block_size tokens)."
        ),
    )
    packing: str = setting(
        ACROSS_DOCUMENTS,
        enum=LM_PACKINGS,
        description=(
            "causal_lm rows. across_documents packs documents, joined with EOS, into full "
            "block_size rows (no padding; a row may hold the end of one document and the start "
            "of the next, which attends to it). per_document cuts each document into rows of at "
            "most block_size tokens, so a model never attends across documents; short rows are "
            "padded and masked in training batches, nothing is dropped, and the rows do not "
            "depend on the number of partitions. documents_apart (plain text only; instruction "
            "examples packed across_documents are always kept apart) makes the rows of "
            "across_documents, but each document attends only to itself: its position ids "
            "restart at the EOS before it, in training, validation and the evaluation's windows "
            "alike (a transformer; the LSTM cannot)."
        ),
    )
    encoder: str = setting(
        AUTO,
        enum=ENCODERS,
        description=(
            "What turns text into token ids. auto uses gigatoken (a much faster BPE encoder) "
            "when the plan step finds it gives exactly the ids of Hugging Face tokenizers on a "
            "sample of the train split (EOS and special tokens included), else tokenizers; the "
            "plan and the manifest say which ran and why. hf always uses tokenizers; gigatoken "
            "requires it and stops with the reason when it differs. The shards are the same "
            "whichever ran. causal_lm only: classification uses tokenizers."
        ),
    )

    def __post_init__(self) -> None:
        problems = []
        if self.encoder not in ENCODERS:
            problems.append(("encoder", f"encoder {self.encoder!r} is not one of {ENCODERS}"))
        if self.partitions != AUTO and not (
            isinstance(self.partitions, int) and self.partitions >= 1
        ):
            problems.append(
                ("partitions", f"must be {AUTO!r} or an integer >= 1, not {self.partitions!r}")
            )
        if self.packing not in LM_PACKINGS:
            problems.append(("packing", f"packing {self.packing!r} is not one of {LM_PACKINGS}"))
        raise_problems(problems)


def check_task(task: str) -> None:
    if task not in TASKS:
        raise SettingsError([("task", f"task {task!r} is not one of {TASKS}")])


@dataclass(frozen=True)
class TokenizeJob:
    """What the plan and the gather need: the task and the tokenize section."""

    task: str
    tokenize: TokenizeSettings = field(default_factory=TokenizeSettings)
    instruction: bool = False
    """Instruction data: rows of whole examples whose prompt tokens are no target (see
    snaketune.tokenize.packing)."""

    def __post_init__(self) -> None:
        check_task(self.task)

    @property
    def layout(self) -> str:
        """How the rows are made: the LM packing (of instruction examples, for instruction
        data), or one row per classification example."""
        if self.task != CAUSAL_LM:
            return self.task
        return f"instruction_{self.tokenize.packing}" if self.instruction else self.tokenize.packing

    @property
    def packs_examples(self) -> bool:
        """Train rows may hold several instruction examples, which training keeps apart."""
        return (
            self.task == CAUSAL_LM
            and self.instruction
            and self.tokenize.packing == ACROSS_DOCUMENTS
        )

    @property
    def keeps_documents_apart(self) -> bool:
        """Plain-text rows packed across documents, each document attending only to itself
        (snaketune.train.batches.TokenRows.separator)."""
        return (
            self.task == CAUSAL_LM
            and not self.instruction
            and self.tokenize.packing == DOCUMENTS_APART
        )

    @property
    def keeps_packed_apart(self) -> bool:
        """A train row may hold several examples or documents, which training keeps apart."""
        return self.packs_examples or self.keeps_documents_apart


@dataclass(frozen=True)
class PartitionJob(TokenizeJob):
    """One partition job: the split and the partition (the job's wildcards)."""

    split: str = field(kw_only=True)
    part: int = field(kw_only=True)


# --- model, train, evaluate ---------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSettings:
    SECTION: ClassVar[str] = "The network to train."

    arch: str = setting(
        GPT2,
        enum=ARCHS,
        description=(
            "gpt2: a transformer. Built here (init scratch) it is a GPT-2 of the sizes below; "
            "with init pretrained it is whatever family the checkpoint's config names (Llama, "
            "Qwen2, Mistral, Gemma, Phi, GPT-NeoX, BERT, ...: the architecture is read from the "
            "checkpoint, and the train manifest records it as model_type). llama (init "
            "scratch): a Llama of the sizes below (rotary positions, RMSNorm, SwiGLU MLP of 8/3 "
            "the width, no biases, tied head), saved as a transformers Llama. lstm: the LSTM "
            "baseline, built here."
        ),
    )
    init: str = setting(
        "scratch",
        enum=INITS,
        description="'scratch' uses the sizes below; 'pretrained' loads name_or_path.",
    )
    name_or_path: str | None = setting(
        None, description="Local directory or hub id of a pretrained model."
    )
    trust_remote_code: bool = setting(
        False, description="Allow code shipped with a hub model. Leave off unless you trust it."
    )
    n_layer: int = setting(
        2, minimum=1, maximum=128, description="Transformer blocks (or LSTM layers)."
    )
    n_embd: int = setting(
        128, minimum=8, maximum=16384, description="Hidden size; must be divisible by n_head."
    )
    n_head: int = setting(4, minimum=1, maximum=256, description="Attention heads.")
    dropout: float = setting(
        0.1,
        minimum=0,
        maximum=0.9,
        description=(
            "Dropout probability. It costs speed: on 2 CPU cores a step with 0 takes 0.78x the "
            "time of one with 0.1 (GPT-2 2 x 128 and 4 x 256 alike); large pretraining runs "
            "often use 0."
        ),
    )
    attention: str = setting(
        "auto",
        enum=ATTENTIONS,
        description=(
            "Attention kernel: 'sdpa' (torch's fused attention) or 'eager'; 'auto' is sdpa, the "
            "faster on CUDA and no slower on the CPU (measured: 0.97x eager's step time for "
            "GPT-2 2 x 128 on 2 cores)."
        ),
    )
    lora_rank: int = setting(
        0, minimum=0, description="LoRA adapter rank (peft); 0 trains every weight."
    )
    lora_alpha: int = setting(
        16, minimum=1, description="LoRA scaling numerator (the update is scaled by alpha / rank)."
    )
    lora_dropout: float = setting(
        0.05, minimum=0, maximum=0.9, description="Dropout on the LoRA path."
    )
    lora_target_modules: list[str] = setting(
        factory=list,
        description=(
            "Module names to adapt (e.g. [c_attn] for GPT-2); empty uses peft's default for the "
            "architecture."
        ),
    )
    gradient_checkpointing: bool = setting(
        False,
        description=(
            "Recompute each transformer block's activations in the backward pass instead of "
            "keeping them (transformers' gradient checkpointing): less activation memory for "
            "longer contexts or larger batches, about a third more compute; the same gradients. "
            "Not for the LSTM."
        ),
    )
    dtype: str = setting(
        AUTO,
        enum=WEIGHT_DTYPES,
        description=(
            "The weights' dtype. auto: bfloat16 for a pretrained model trained with LoRA "
            "adapters on a GPU that has bf16 (the frozen base at half the memory; the adapters "
            "stay float32), else float32 (a full fine-tune keeps float32 master weights and "
            "computes in bf16 under autocast on a GPU). bfloat16 asks for bf16 weights whatever "
            "the training (a full fine-tune then updates bf16 weights). The train manifest "
            "records the dtype and the parameter bytes by dtype."
        ),
    )
    quantization: str = setting(
        NO_QUANTIZATION,
        enum=QUANTIZATIONS,
        description=(
            "Load a pretrained checkpoint's frozen weights in 4 bits (NF4, double quantization, "
            "bf16 compute) or 8 bits with bitsandbytes, and train LoRA adapters over them "
            "(QLoRA): the usual way to fit 7-8B parameters on 24 GB. Needs model.init "
            "pretrained, model.lora_rank > 0 and CUDA with bitsandbytes installed "
            "(.venv/bin/pip install bitsandbytes); refused before any job otherwise, and with "
            "train.device cpu or train.strategy fsdp. Evaluation loads the base quantized as "
            "well where CUDA is present, else in model.dtype."
        ),
    )
    save_merged: bool = setting(
        False,
        description=(
            "LoRA on a pretrained causal LM saves the adapter alone (peft's format, a few MB) "
            "with the base model's identity (name_or_path and, for a local folder, its content "
            "digest); evaluation, serving and MLflow load the base and the adapter. true saves, "
            "logs and registers the whole model with the adapters merged in."
        ),
    )

    def __post_init__(self) -> None:
        problems = self.precision_problems()
        if self.arch == "lstm" and self.gradient_checkpointing:
            problems.append(
                ("gradient_checkpointing", "is a transformer setting; model.arch is 'lstm'")
            )
        if self.arch in TRANSFORMERS and self.n_embd % self.n_head:
            problems.append(
                ("n_embd", f"{self.n_embd} is not divisible by model.n_head={self.n_head}")
            )
        elif self.arch == LLAMA and (self.n_embd // self.n_head) % 2:
            problems.append(
                (
                    "n_embd",
                    f"rotary positions turn pairs of each head's {self.n_embd // self.n_head} "
                    "dimensions: make n_embd / n_head even",
                )
            )
        if self.arch == LLAMA and self.init == "pretrained":
            problems.append(
                (
                    "arch",
                    "llama builds a Llama here; a pretrained checkpoint's architecture is its "
                    "own (Llama's too): use model.arch: gpt2, which means a transformer",
                )
            )
        if self.init == "pretrained" and not self.name_or_path:
            problems.append(("name_or_path", "required when model.init is 'pretrained'"))
        if self.init == "scratch" and self.name_or_path:
            problems.append(
                (
                    "name_or_path",
                    "is set but model.init is 'scratch', which would ignore it: "
                    "set model.init: pretrained to fine-tune it",
                )
            )
        if self.arch == "lstm" and self.init == "pretrained":
            problems.append(
                (
                    "init",
                    "the LSTM baseline trains from scratch only; fine-tune a pretrained "
                    "checkpoint with model.arch: gpt2 (any AutoModel checkpoint loads)",
                )
            )
        if self.arch == "lstm" and self.attention != "auto":
            problems.append(("attention", "is a transformer setting; model.arch is 'lstm'"))
        if self.arch == "lstm" and self.lora_rank:
            problems.append(("lora_rank", "LoRA needs model.arch 'gpt2', not 'lstm'"))
        if self.save_merged and not self.lora_rank:
            problems.append(("save_merged", "merges LoRA adapters, and model.lora_rank is 0"))
        if not self.lora_rank and self.lora_target_modules:
            problems.append(
                (
                    "lora_target_modules",
                    "is set but model.lora_rank is 0, so no adapter would be made: set lora_rank",
                )
            )
        raise_problems(problems)

    def precision_problems(self) -> list[tuple[str, str]]:
        """The weights' dtype and quantization against the rest of the model section."""
        problems = []
        if self.dtype not in WEIGHT_DTYPES:
            problems.append(("dtype", f"{self.dtype!r} is not one of {WEIGHT_DTYPES}"))
        if self.quantization not in QUANTIZATIONS:
            problems.append(
                ("quantization", f"{self.quantization!r} is not one of {QUANTIZATIONS}")
            )
        if self.arch == "lstm" and (self.dtype != AUTO or self.quantization != NO_QUANTIZATION):
            problems.append(("dtype", "dtype and quantization are transformer settings"))
        if self.quantization == NO_QUANTIZATION:
            return problems
        if self.init != "pretrained":
            problems.append(
                ("quantization", "quantizes a pretrained checkpoint; model.init is 'scratch'")
            )
        if not self.lora_rank:
            problems.append(
                (
                    "quantization",
                    "quantized weights do not train: set model.lora_rank to train adapters "
                    "over them (QLoRA), or remove quantization for a full fine-tune",
                )
            )
        if self.save_merged:
            problems.append(
                (
                    "save_merged",
                    "merging adapters into quantized weights would round them away: keep the "
                    "adapter (save_merged: false), or train without quantization",
                )
            )
        return problems


@dataclass(frozen=True)
class TrainSettings:
    SECTION: ClassVar[str] = "Optimization settings (AdamW, linear warmup then cosine decay)."

    max_steps: int = setting(200, minimum=1, description="Optimizer steps.")
    batch_size: int | str = setting(
        16,
        oneOf=[{"type": "integer", "minimum": 1}, {"const": "auto"}],
        description=(
            "Rows per micro-batch, per process. 'auto' (one process) finds the largest "
            "micro-batch that fits before the first step: grad_accum is then the examples per "
            "step (as at batch_size 1), and its divisors from 2 rows up are tried with the "
            "widest rows (forward and backward of the eager model, beside room for the "
            "optimizer's moments; on the CPU within 80% of the memory available), doubling "
            "until one does not fit, then bisecting; the largest that fitted takes the steps, "
            "with grad_accum divided by it (the same "
            "examples per step, so the same trajectory), recorded in the train manifest's "
            "micro_batch. The search is made once per run (a resumed run keeps its result), and "
            "a first step that still runs out of memory is retried smaller (memory_retries)."
        ),
    )
    grad_accum: int = setting(
        1,
        minimum=1,
        description=(
            "Micro-batches per optimizer step (with batch_size auto: the examples per step)."
        ),
    )
    memory_retries: int = setting(
        4,
        minimum=0,
        description=(
            "How many times a step that runs out of memory is taken again with a smaller "
            "micro-batch and more micro-batches (the same batch per step, recorded in the train "
            "manifest); 0 makes it an error. Not with train.processes > 1."
        ),
    )
    max_memory_gb: float | None = setting(
        None,
        exclusiveMinimum=0,
        description=(
            "The memory (GB) a train job may plan to use. Before any job, each train job's "
            "memory is estimated from its settings and the checkpoint's files (weights by "
            "dtype, gradients, AdamW's moments, activations of one micro-batch at the "
            "configured context, one chunk of logits; train/memory_plan.py) and printed by "
            "a dry run (-n); a job whose estimate is above this, or, when null, above the "
            "memory of this machine's GPU where it trains on one, is refused with the settings "
            "that would make it fit (LoRA, 4-bit quantization, gradient checkpointing, a "
            "smaller micro-batch). The train manifest records the estimate beside the measured "
            "peak."
        ),
    )
    lr: float = setting(3e-3, exclusiveMinimum=0, maximum=1, description="Peak learning rate.")
    min_lr_ratio: float = setting(
        0.1, minimum=0, maximum=1, description="Final learning rate as a share of lr."
    )
    warmup_steps: int = setting(20, minimum=0, description="Linear warmup steps.")
    weight_decay: float = setting(
        0.01, minimum=0, description="AdamW weight decay (not on biases/norms)."
    )
    grad_clip: float = setting(1.0, exclusiveMinimum=0, description="Max global gradient norm.")
    eval_every: int = setting(50, minimum=1, description="Steps between validation losses.")
    log_every: int = setting(
        10,
        minimum=1,
        description=(
            "Steps between reads of the loss and gradient norm from the device (on CUDA each "
            "read waits for the GPU, so between reads the host queues the next steps). Every "
            "step is still in the history, with the tokens/s of its span; a step whose loss or "
            "gradient is not finite is skipped on the device and stops training at the next "
            "read, as does a SIGTERM. Evaluation and checkpoint steps are always read."
        ),
    )
    eval_rows: int = setting(
        4096,
        minimum=1,
        description=(
            "Validation rows per estimate (val loss and perplexity, or accuracy and macro-F1): "
            "the whole validation split when it has fewer. Lower it if evaluating takes too "
            "long on a large split."
        ),
    )
    checkpoint_every: int = setting(
        50, minimum=1, description="Steps between resumable checkpoints."
    )
    keep_checkpoints: int = setting(
        1,
        minimum=1,
        description=(
            "Checkpoints kept in train_state/: the latest and the keep - 1 before it "
            "(checkpoint-<step>.pt)."
        ),
    )
    keep_final_state: bool = setting(
        True,
        description=(
            "Keep the last checkpoint (weights and optimizer state) in train_state/ when "
            "training ends, so that a larger max_steps continues the finished run instead of "
            "starting over. Turn off to save the disk space (about three times the model)."
        ),
    )
    early_stopping_patience: int = setting(
        0,
        minimum=0,
        description=(
            "Stop after this many evaluations without a lower val loss and keep the best "
            "weights (0: off)."
        ),
    )
    compile: bool | str = setting(
        False,
        oneOf=[{"type": "boolean"}, {"enum": COMPILE_MODES}],
        description=(
            "torch.compile the training step's model, and the model that validation and the "
            "evaluate job score with (worth it on GPUs; slow to start on CPU). true is "
            "torch.compile's default mode; reduce-overhead adds CUDA graphs (for small models "
            "whose steps wait on the host), max-autotune also searches kernels (a longer first "
            "compile). Compiled graphs are cached in <results_dir>/shared/compile_cache "
            "(TORCHINDUCTOR_CACHE_DIR, when set, wins), so the next job of the same shape loads "
            "them; the manifests record the cache's hits and misses."
        ),
    )
    processes: int = setting(
        1,
        minimum=1,
        maximum=64,
        description=(
            "Processes for DistributedDataParallel through torchrun (NCCL on GPUs, gloo on "
            "CPU), per node; batch_size is per process."
        ),
    )
    nodes: int = setting(
        1,
        minimum=1,
        maximum=1024,
        description=(
            "Nodes, one torchrun agent each with train.processes processes, joined by a c10d "
            "rendezvous (train/launch.py): inside a SLURM job of that many tasks srun starts "
            "them, elsewhere they run on this machine over 127.0.0.1."
        ),
    )
    strategy: str = setting(
        "ddp",
        enum=STRATEGIES,
        description=(
            "With several processes (processes x nodes > 1): ddp keeps the whole model on each "
            "(DistributedDataParallel); fsdp shards parameters, gradients and optimizer state "
            "over them (PyTorch's FSDP2 fully_shard, each transformer block on its own), "
            "checkpoints the whole state (resumable on any number of processes) and saves a "
            "plain save_pretrained model. fsdp is for GPT-2 / transformers models, without "
            "LoRA, compile or early stopping."
        ),
    )
    seed: int = setting(1234, minimum=0, description="Seeds init, dropout and data order.")
    device: str = setting("auto", enum=DEVICES, description="'auto' uses CUDA when present.")
    precision: str = setting(
        "auto",
        enum=PRECISIONS,
        description=(
            "'auto' is bf16 autocast on a CUDA device that has bf16, fp16 with a gradient "
            "scaler on one that has not, fp32 on the CPU; 'bf16' or 'fp16' is refused where it "
            "cannot run."
        ),
    )
    threads: int = setting(
        0, minimum=0, description="CPU threads for torch (0 = the rule's threads)."
    )
    deterministic: bool | str = setting(
        "auto",
        oneOf=[{"type": "boolean"}, {"const": "auto"}],
        description=(
            "Deterministic kernels: exact resume and repeatable weights, slower on GPUs. 'auto' "
            "is on for the CPU and off on CUDA."
        ),
    )

    def __post_init__(self) -> None:
        problems = []
        if self.precision in ("bf16", "fp16") and self.device == "cpu":
            problems.append(
                (
                    "precision",
                    f"{self.precision!r} is autocast on CUDA; train.device is 'cpu', which "
                    "trains in fp32: set precision: fp32 (or auto), or device: cuda",
                )
            )
        if not isinstance(self.compile, bool) and self.compile not in COMPILE_MODES:
            problems.append(
                ("compile", f"must be true, false or one of {COMPILE_MODES}, not {self.compile!r}")
            )
        if self.batch_size != AUTO and not (
            isinstance(self.batch_size, int) and self.batch_size >= 1
        ):
            problems.append(
                ("batch_size", f"must be {AUTO!r} or an integer >= 1, not {self.batch_size!r}")
            )
        raise_problems(problems)

    @property
    def compile_mode(self) -> str | None:
        return compile_mode(self.compile)

    @property
    def searches_micro_batch(self) -> bool:
        return self.batch_size == AUTO

    @property
    def configured_shape(self) -> tuple[int, int]:
        """(rows per micro-batch, micro-batches per step) before any search or retry:
        batch_size auto starts from micro-batches of one row."""
        if self.searches_micro_batch:
            return 1, self.grad_accum
        return int(self.batch_size), self.grad_accum


@dataclass(frozen=True)
class TrainJob:
    task: str
    model: ModelSettings = field(default_factory=ModelSettings)
    train: TrainSettings = field(default_factory=TrainSettings)

    def __post_init__(self) -> None:
        check_task(self.task)


@dataclass(frozen=True)
class EvalSettings:
    SECTION: ClassVar[str] = "Held-out evaluation."

    batch_size: int = setting(32, minimum=1, description="Rows per evaluation batch.")
    prompts: list[str] = setting(
        factory=list,
        description=(
            "causal_lm prompts whose continuations go to the samples table (samples.csv)."
        ),
    )
    max_new_tokens: int = setting(
        40,
        minimum=1,
        description=(
            "Tokens generated per prompt and per test answer (and per request to the registered "
            "model when served)."
        ),
    )
    decoding: str = setting(
        GREEDY,
        enum=DECODINGS,
        description=(
            "How every generation picks its tokens (the prompts', the test answers', the served "
            "model's): greedy takes the most likely token, sample draws among top_k at "
            "temperature, seeded."
        ),
    )
    temperature: float = setting(
        0.8, exclusiveMinimum=0, description="Sampling temperature (decoding sample)."
    )
    top_k: int = setting(
        20, minimum=1, description="Sample among the k most likely tokens (decoding sample)."
    )
    seed: int = setting(1234, minimum=0, description="Seeds generation.")
    answer_examples: int = setting(
        200,
        minimum=0,
        description=(
            "Instruction data: test examples whose answers are generated and scored (exact "
            "match, F1, ROUGE-L, and the retrieval baseline's); 0 means all."
        ),
    )
    context_length: int = setting(
        0,
        minimum=0,
        description="causal_lm tokens per perplexity window; 0 means tokenize.block_size.",
    )
    stride: int = setting(
        0,
        minimum=0,
        description=(
            "causal_lm tokens between perplexity windows; 0 means context_length - 1 (windows "
            "share one token, so every token is predicted once). Smaller gives the "
            "sliding-window estimate: more context per token, more compute."
        ),
    )
    compile: bool | str = setting(
        AUTO,
        oneOf=[{"type": "boolean"}, {"enum": (AUTO, *COMPILE_MODES)}],
        description=(
            "Score with the model compiled (perplexity windows and answer NLLs, or a "
            "classifier's predictions) and, on CUDA, generate through a static cache that "
            "generate() compiles in the same mode: 'auto' does as train.compile says; true, "
            "false, or a torch.compile mode as train.compile takes."
        ),
    )

    def __post_init__(self) -> None:
        if not isinstance(self.compile, bool) and self.compile not in (AUTO, *COMPILE_MODES):
            raise SettingsError(
                [("compile", f"must be true, false, auto or one of {COMPILE_MODES}")]
            )


@dataclass(frozen=True)
class EvalJob:
    task: str
    evaluate: EvalSettings = field(default_factory=EvalSettings)
    device: str = "auto"
    """Where the model is evaluated: the train section's device and precision."""
    precision: str = "auto"
    compile: bool | str = False
    """evaluate.compile, 'auto' resolved to train.compile (snaketune.train.lm_loss.scoring)."""

    @property
    def compile_mode(self) -> str | None:
        return compile_mode(self.compile)

    def __post_init__(self) -> None:
        check_task(self.task)


# --- tracking -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class MlflowSettings:
    """The config's `mlflow:` section."""

    SECTION: ClassVar[str] = "Where runs are tracked."

    tracking_uri: str = setting(
        "",
        description=(
            "MLflow tracking URI. Empty means an embedded SQLite store at "
            "<results_dir>/mlflow.db. The MLFLOW_TRACKING_URI environment variable, when set, "
            "takes precedence."
        ),
    )
    experiment_name: str = setting(
        "snaketune",
        minLength=1,
        description="The MLflow experiment that holds this config's runs (one per config).",
    )
    register_models: bool = setting(
        True,
        description=(
            "Log each experiment's trained model with MLflow's transformers flavour (servable "
            "with `mlflow models serve`) and register it as a new version in the Model "
            "Registry, with the eval metrics as version tags. The track job loads the weights "
            "to do so and the store keeps a second copy of them; turn off for models too large "
            "for that. LSTM models are never registered."
        ),
    )


@dataclass(frozen=True)
class TrackSettings:
    experiment: str
    """The experiment entry's name (the parent run's name)."""
    mlflow_experiment: str
    tracking_uri: str = ""
    """The configured store (empty: SQLite in the results folder); MLFLOW_TRACKING_URI, read
    at run time, takes precedence (so a credential in it never lands in a job's command line or
    in Snakemake's logs)."""
    config: dict[str, Any] = field(default_factory=dict)
    """The experiment's resolved config, logged as flattened params."""
    registered_model_name: str | None = None
    """Log the final model and register a version under this name; None logs no model."""


SWEPT = "swept"
"""The key the sweep expansion (snaketune.track.sweep) sets on each point's experiment entry:
{"of": the sweep's name, "point": {dotted key: value}}."""


@dataclass(frozen=True)
class SweepSettings:
    name: str
    """The sweep: the name of the experiment entry that declared it."""
    experiments: list[str]
    """The points' experiment names, in config order (the order of the job's input lists)."""
    values: dict[str, dict[str, Any]]
    """Each point's experiment name -> its swept values by dotted key."""
    mlflow_experiment: str
    tracking_uri: str = ""


def sweep_points(config: dict[str, Any], sweep: str) -> dict[str, dict[str, Any]]:
    return {
        exp["name"]: exp[SWEPT]["point"]
        for exp in config["experiments"]
        if exp.get(SWEPT, {}).get("of") == sweep
    }


def sweep_names(config: dict[str, Any]) -> list[str]:
    names = [exp[SWEPT]["of"] for exp in config["experiments"] if exp.get(SWEPT)]
    return list(dict.fromkeys(names))


def sweep_settings(view: ConfigView, sweep: str) -> SweepSettings:
    mlflow, points = mlflow_settings(view), sweep_points(view.config, sweep)
    return SweepSettings(
        name=sweep,
        experiments=list(points),
        values=points,
        mlflow_experiment=mlflow.experiment_name,
        tracking_uri=mlflow.tracking_uri,
    )


def config_hash(config: dict[str, Any]) -> str:
    """A short digest of an experiment's resolved config: its identity in MLflow."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


# --- JSON round trip (the rule's command line and the CLI) --------------------------------------


def to_json(settings: Any) -> str:
    return json.dumps(asdict(settings), sort_keys=True)


def from_dict(cls: type, data: Mapping[str, Any]) -> Any:
    """`cls` from a dict such as asdict(cls(...)) gives, nested dataclasses included; a value
    of the wrong type is refused, naming its key."""
    hints = get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise SettingsError([("", f"unknown key(s) {unknown}; allowed keys are {sorted(names)}")])
    values, problems = {}, []
    for name, value in data.items():
        if is_dataclass(hints[name]) and isinstance(value, dict):
            values[name] = from_dict(hints[name], value)
        elif not has_type(value, hints[name]):
            problems.append((name, f"{value!r} is not of type {type_name(hints[name])}"))
        else:
            values[name] = value
    missing = [
        f.name
        for f in fields(cls)
        if f.name not in data and f.default is MISSING and f.default_factory is MISSING
    ]
    problems += [(name, "is required and missing") for name in missing]
    raise_problems(problems)
    return cls(**values)


def has_type(value: Any, hint: Any) -> bool:
    """Whether a value read from JSON fits a field's annotation (an int for a float too)."""
    if isinstance(hint, types.UnionType):
        return any(has_type(value, option) for option in get_args(hint))
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if is_dataclass(hint):
        return isinstance(value, hint)
    origin = get_origin(hint) or hint
    if origin is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if origin is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list:
        (item,) = get_args(hint) or (Any,)
        return isinstance(value, list) and all(has_type(v, item) for v in value)
    return isinstance(value, origin)


def type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint)


def from_json(cls: type, text: str) -> Any:
    return from_dict(cls, json.loads(text))


# --- from the validated config ------------------------------------------------------------------


@dataclass(frozen=True)
class ConfigView:
    """The validated config (defaults filled) as the settings builders read it."""

    config: dict[str, Any]
    base_dir: Path
    """Where relative dataset paths start: the directory of the Snakefile (the repository)."""

    def experiment(self, name: str) -> dict[str, Any]:
        return next(exp for exp in self.config["experiments"] if exp["name"] == name)

    def dataset(self, name: str) -> DatasetSettings:
        return from_dict(DatasetSettings, self.config["datasets"][name])

    def dataset_of(self, experiment: str) -> DatasetSettings:
        return self.dataset(self.experiment(experiment)["dataset"])

    def section(self, cls: type, experiment: str, key: str) -> Any:
        return from_dict(cls, self.experiment(experiment)[key])


REPOSITORY_VARIABLE = "SNAKETUNE_REPOSITORY"
"""The workflow's repository, as the Snakefile found it (set for its jobs): relative dataset
paths start there."""


def repository() -> Path:
    """Where a job resolves relative dataset paths: the running workflow's repository, else
    this package's."""
    return Path(os.environ.get(REPOSITORY_VARIABLE) or Path(__file__).resolve().parents[2])


def resolve_url(url: str, base_dir: Path) -> str:
    """URLs stay as they are; a relative path is relative to base_dir, wherever snakemake runs."""
    if urlparse(url).scheme in URL_SCHEMES:
        return url
    return url if os.path.isabs(url) else os.path.join(base_dir, url)


def download_settings(view: ConfigView, dataset: str) -> DownloadSettings:
    """The url as configured: a relative path is resolved by the job (repository()), so that
    a moved or cloned checkout has the same download params and nothing to rerun."""
    ds = view.dataset(dataset)
    return DownloadSettings(
        url=ds.url,
        sha256=ds.sha256,
        max_unpacked_bytes=ds.max_unpacked_bytes,
    )


def read_settings_for(
    dataset: DatasetSettings,
    task: str,
    text_template: str | None,
    tokenizer: TokenizerSettings | None = None,
):
    """How an experiment reads its dataset: the label column only matters to classification,
    the prompt and response columns only to a causal LM, a pretrained tokenizer's chat template
    only to instruction data without a text_template."""
    lm = task == CAUSAL_LM
    chat = (
        tokenizer.name_or_path
        if lm and dataset.is_instruction and not text_template and tokenizer
        else None
    )
    return ReadSettings(
        format=dataset.format,
        text_column=dataset.text_column,
        label_column=dataset.label_column if task == SEQUENCE_CLASSIFICATION else None,
        text_template=text_template,
        prompt_column=dataset.prompt_column if lm else None,
        response_column=dataset.response_column if lm else None,
        messages_column=dataset.messages_column if lm else None,
        chat_tokenizer=chat,
        header=dataset.header,
        column_names=dataset.column_names,
        quoting=dataset.quoting,
        txt_document=dataset.txt_document,
        encoding=dataset.encoding,
    )


def clean_job(view: ConfigView, experiment: str) -> CleanJob:
    exp, dataset = view.experiment(experiment), view.dataset_of(experiment)
    return CleanJob(
        read=read_settings_for(
            dataset, exp["task"], exp["text_template"], tokenizer_settings(view, experiment)
        ),
        clean=view.section(CleanSettings, experiment, "clean"),
        member=dataset.member,
    )


def split_settings(view: ConfigView, experiment: str) -> SplitSettings:
    return view.section(SplitSettings, experiment, "split")


def tokenizer_settings(view: ConfigView, experiment: str) -> TokenizerSettings:
    return view.section(TokenizerSettings, experiment, "tokenizer")


def tokenize_job(view: ConfigView, experiment: str) -> TokenizeJob:
    tokenize = view.section(TokenizeSettings, experiment, "tokenize")
    task = view.experiment(experiment)["task"]
    instruction = task == CAUSAL_LM and view.dataset_of(experiment).is_instruction
    return TokenizeJob(task=task, tokenize=tokenize, instruction=instruction)


def partition_job(view: ConfigView, experiment: str, split: str, part: str) -> PartitionJob:
    job = tokenize_job(view, experiment)
    return PartitionJob(
        task=job.task,
        tokenize=job.tokenize,
        instruction=job.instruction,
        split=split,
        part=int(part),
    )


def train_job(view: ConfigView, experiment: str) -> TrainJob:
    return TrainJob(
        task=view.experiment(experiment)["task"],
        model=view.section(ModelSettings, experiment, "model"),
        train=view.section(TrainSettings, experiment, "train"),
    )


def eval_job(view: ConfigView, experiment: str) -> EvalJob:
    evaluate = view.section(EvalSettings, experiment, "evaluate")
    train = view.section(TrainSettings, experiment, "train")
    return EvalJob(
        task=view.experiment(experiment)["task"],
        evaluate=evaluate,
        device=train.device,
        precision=train.precision,
        compile=train.compile if evaluate.compile == AUTO else evaluate.compile,
    )


def mlflow_settings(view: ConfigView) -> MlflowSettings:
    return from_dict(MlflowSettings, view.config["mlflow"])


def registered_model_name(mlflow: MlflowSettings, experiment: Mapping[str, Any]) -> str | None:
    """The experiment's registry name, or None when the config turns registration off."""
    if not mlflow.register_models:
        return None
    return experiment["registered_model_name"] or f"{mlflow.experiment_name}.{experiment['name']}"


def track_settings(view: ConfigView, experiment: str) -> TrackSettings:
    mlflow, exp = mlflow_settings(view), view.experiment(experiment)
    return TrackSettings(
        experiment=experiment,
        mlflow_experiment=mlflow.experiment_name,
        tracking_uri=mlflow.tracking_uri,
        config=exp,
        registered_model_name=registered_model_name(mlflow, exp),
    )


@dataclass(frozen=True, kw_only=True)
class ExperimentKeys:
    """The keys of an experiment entry besides its sections (read from the config as a dict;
    defined here for the schema)."""

    SECTION: ClassVar[str] = (
        "One entry per model to train; outputs go to <results_dir>/<name>/<stage>/."
    )

    name: str = setting(
        pattern="^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        errorMessage=(
            "is not a usable experiment name: it becomes a folder under results_dir, so use "
            "letters, digits, '_', '.' and '-', starting with a letter or digit"
        ),
        description="Experiment name; used in output paths and as the MLflow parent run's name.",
    )
    sweep: dict | None = setting(
        None,
        schema_default=False,
        type="object",
        description=(
            "Run this entry once per point (track/sweep.py): `grid` maps dotted keys such as "
            "train.lr or model.n_layer to lists of values (every combination is a point), "
            "`points` lists more points as {dotted key: value}. Each point becomes an "
            "experiment named <name>.<setting>-<value>..., validated like any other; "
            "results/sweeps/<name>/ gets a comparison table and plot, in the report and in "
            "MLflow. Expanded before the rest of the config is checked, so it never reaches a "
            "job."
        ),
    )
    swept: dict | None = setting(
        None,
        schema_default=False,
        type="object",
        properties={"of": {"type": "string"}, "point": {"type": "object"}},
        description=(
            "Set by the sweep expansion on each point (of, the sweep's name; point, its "
            "values); not written by hand."
        ),
    )
    registered_model_name: str = setting(
        "",
        description=(
            "Model Registry name the trained model is registered under "
            '(mlflow.register_models). Empty means "<mlflow.experiment_name>.<name>". Set it '
            "to collect versions from several configs under one name."
        ),
    )
    dataset: str = setting(description="A key of the datasets catalog.")
    task: str = setting(
        enum=TASKS,
        description="What the model learns. Classification needs the dataset's label_column.",
    )
    text_template: str | None = setting(
        None,
        description=(
            "Optional str.format template over the record's columns that builds each document, "
            'e.g. "Customer: {question}\\nAgent: {answer}". Empty uses the dataset\'s '
            "text_column. For instruction data (the dataset's response_column) the response's "
            "placeholder starts the response; the whitespace before it belongs to the response. "
            "Empty, for instruction data: a pretrained tokenizer's chat template when it has one, "
            'else "Question: {prompt}\\nAnswer: {response}".'
        ),
    )


@dataclass(frozen=True, kw_only=True)
class ConfigKeys:
    """The config's top-level keys besides its sections (defined here for the schema)."""

    SECTION: ClassVar[str] = (
        "snaketune configuration: a catalog of datasets, a list of experiments that use them, "
        "and where MLflow records the runs. Every key has a description and a default."
    )

    preset: str | None = setting(
        None,
        schema_default=False,
        type="string",
        description=(
            "A file of presets/ (its name without .yaml) layered over this config as "
            "`--configfile presets/<name>.yaml` would be, e.g. `snakemake --cores 2 --config "
            "preset=sms-spam`; other --config values still override it."
        ),
    )
    results_dir: str = setting(
        "results",
        description="Directory (relative to the working directory) that holds every output.",
    )
    local_gpus: list[int | str] = setting(
        factory=list,
        type="array",
        items={"type": ["integer", "string"]},
        description=(
            "This machine's GPU ids for local runs (snaketune.gpus): with `--resources gpu=N`, "
            "each running train job that asks for k GPUs (`--set-resources "
            "train_model:gpu=k`) gets k of these to itself as CUDA_VISIBLE_DEVICES. Empty: the "
            "CUDA_VISIBLE_DEVICES snakemake was started with, else the GPUs nvidia-smi lists. "
            "Inside a SLURM job, SLURM decides."
        ),
    )


SECTIONS = {
    "clean": CleanSettings,
    "split": SplitSettings,
    "tokenizer": TokenizerSettings,
    "tokenize": TokenizeSettings,
    "model": ModelSettings,
    "train": TrainSettings,
    "evaluate": EvalSettings,
}
"""The settings dataclass of each section of an experiment entry."""
