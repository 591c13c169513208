"""Every stage's settings as typed dataclasses, built from the validated config in one place.

A dataclass named after a config section (`CleanSettings` for an experiment's `clean:`, ...) has
exactly that section's keys and defaults; a unit test compares them with the schema. A rule
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
from typing import Any, get_args, get_origin, get_type_hints
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
GPT2, LLAMA, LSTM = "gpt2", "llama", "lstm"
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


# --- the datasets catalog ------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetSettings:
    """One entry of the config's `datasets:` catalog."""

    url: str
    sha256: str
    format: str
    member: str | None = None
    text_column: str = "text"
    label_column: str | None = None
    prompt_column: str | None = None
    """Instruction data: the column a model answers (see response_column)."""
    response_column: str | None = None
    """Instruction data: the answer's column. Set, a causal LM learns the answers only."""
    messages_column: str | None = None
    """Instruction data as conversations: lists of role/content turns, the last the assistant's
    answer (composed by a pretrained tokenizer's chat template)."""
    header: bool = True
    column_names: list[str] | None = None
    quoting: bool = True
    txt_document: str = "line"
    encoding: str | None = None
    """The text files' encoding (a Python codec name); None reads a byte-order mark, else UTF-8."""
    max_unpacked_bytes: int = 4294967296

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
    if it has one, composes each example (snaketune.reading.compose_instruction)."""
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
    nfc: bool = True
    strip_html: bool = False
    redact_pii: bool = False
    min_chars: int = 1
    max_chars: int = 100_000
    dedup: bool = True
    min_alpha_ratio: float = 0.0
    """Drop documents whose non-space characters are less than this share letters (0 = off)."""
    max_repeated_line_fraction: float = 1.0
    """Drop documents with more than this share of repeated non-blank lines (1 = off)."""
    min_mean_word_length: float = 0.0
    """Drop documents whose words are shorter than this on average (0 = off)."""
    max_mean_word_length: float | None = None
    """Drop documents whose words are longer than this on average (None = off)."""

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
    enabled: bool = True
    """Remove near-duplicates within and across splits."""
    threshold: float = 0.8
    """Estimated Jaccard similarity of two documents' shingle sets at or above which they count
    as near-duplicates. Lower catches looser copies (and more false matches)."""
    shingle_size: int = 5
    """Characters per shingle of the normalized (casefolded, single-spaced) text."""
    num_perm: int = 128
    """MinHash permutations: more gives a finer similarity estimate, at a linear cost."""
    seed: int = 1
    """Seeds the permutations; a fixed seed makes the removals identical on every run."""

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
    train: float = 0.8
    val: float = 0.1
    test: float = 0.1
    salt: str = ""
    """Change to draw a different (still deterministic) split."""
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
    kind: str = "bpe"
    """'bpe' trains a byte-level BPE on the train split; 'pretrained' loads name_or_path."""
    vocab_size: int = 2000
    min_frequency: int = 2
    name_or_path: str | None = None
    trust_remote_code: bool = False

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
    block_size: int = 128
    """causal_lm: tokens per training row (the model's context length)."""
    max_length: int = 128
    """sequence_classification: longest example kept, in tokens; longer ones are truncated."""
    shard_rows: int = 4096
    """Rows per Parquet shard; bounds shard size and the memory of one write."""
    read_batch_rows: int = 1024
    """Documents per call of the batch encoder; bounds the memory of one batch."""
    partitions: int | str = AUTO
    """Jobs for the train split's rows, or "auto": every split sized by its text (see
    snaketune.tokenize.plan)."""
    packing: str = ACROSS_DOCUMENTS
    """causal_lm: whether a row may span documents, and whether they then see each other (see
    snaketune.tokenize.packing)."""
    encoder: str = AUTO
    """Which encoder turns text into ids: "auto" (gigatoken when it gives the ids tokenizers
    gives on a sample of the train split, else tokenizers), "hf" or "gigatoken" (required)."""

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
        (snaketune.batches.TokenRows.separator)."""
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
    arch: str = GPT2
    """'gpt2': a transformer (GPT-2 when built here; with init 'pretrained', the family the
    checkpoint's config names); 'llama': a Llama built here (rotary positions, RMSNorm,
    SwiGLU); 'lstm': the LSTM baseline."""
    init: str = "scratch"
    """'scratch' builds from the sizes below; 'pretrained' loads name_or_path."""
    name_or_path: str | None = None
    trust_remote_code: bool = False
    n_layer: int = 2
    n_embd: int = 128
    n_head: int = 4
    dropout: float = 0.1
    attention: str = "auto"
    """'eager', 'sdpa' (torch's fused attention), or 'auto': sdpa (see models.attention)."""
    lora_rank: int = 0
    """LoRA adapter rank through peft; 0 trains every weight."""
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = field(default_factory=list)
    """Module names to adapt; empty uses peft's default for the architecture."""
    gradient_checkpointing: bool = False
    """Recompute each block's activations in the backward pass instead of keeping them: less
    memory for longer contexts or larger batches, about a third more compute (transformers)."""
    dtype: str = AUTO
    """The weights' dtype, one of WEIGHT_DTYPES ('auto': snaketune.models.weights_dtype)."""
    quantization: str = NO_QUANTIZATION
    """One of QUANTIZATIONS: a pretrained checkpoint's frozen weights loaded in 4 or 8 bits
    (bitsandbytes, CUDA) under LoRA adapters (QLoRA)."""
    save_merged: bool = False
    """LoRA on a pretrained causal LM saves the adapter alone with the base model's identity;
    true saves the adapters merged into a whole model instead."""

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
    max_steps: int = 200
    batch_size: int | str = 16
    """Rows per micro-batch, per process; "auto": the largest micro-batch that fits, found
    before the first step (snaketune.train.search_micro_batch), grad_accum then being the
    examples per step (as at batch_size 1)."""
    grad_accum: int = 1
    memory_retries: int = 4
    """A step that runs out of memory is taken again with a smaller micro-batch and more
    micro-batches (the same batch per step) up to this many times (0: it is an error)."""
    max_memory_gb: float | None = None
    """The memory a train job may plan to use (snaketune.memory_plan); None: the local GPU's."""
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    eval_every: int = 50
    log_every: int = 10
    """Steps between reads of the loss from the device (on CUDA each read waits for the GPU)."""
    eval_rows: int = 4096
    """Validation rows per estimate: the whole split when it is smaller."""
    checkpoint_every: int = 50
    keep_checkpoints: int = 1
    """Checkpoints kept in the state folder: the latest and the keep - 1 before it."""
    keep_final_state: bool = True
    """Keep the last checkpoint after training ends, so that a larger max_steps continues."""
    early_stopping_patience: int = 0
    """Stop after this many evaluations without a better val loss (0: off); keeps the best."""
    compile: bool | str = False
    """torch.compile the model, in the given mode (true: "default"; see COMPILE_MODES), for
    training, validation and evaluation (worth it on GPUs; slow to start on CPU)."""
    processes: int = 1
    """Processes launched by torchrun (DDP: NCCL on GPUs, gloo on CPU), per node."""
    nodes: int = 1
    """Nodes, one torchrun agent each, joined by a c10d rendezvous (snaketune.launch)."""
    strategy: str = "ddp"
    """With several processes: "ddp" (each holds the whole model) or "fsdp" (PyTorch's FSDP2:
    parameters, gradients and optimizer state sharded over the processes)."""
    seed: int = 1234
    device: str = "auto"
    """'auto' uses CUDA when present, else CPU."""
    precision: str = "auto"
    """'auto': bf16 autocast on a CUDA device with bf16, fp16 (scaled) on one without, fp32 on
    the CPU (snaketune.devices)."""
    threads: int = 0
    """CPU threads for torch; 0 leaves torch's default."""
    deterministic: bool | str = "auto"
    """Deterministic kernels; 'auto' is on for the CPU (exact resume), off on CUDA (fast)."""

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
    batch_size: int = 32
    prompts: list[str] = field(default_factory=list)
    """causal_lm: prompts whose continuations go to the samples table (samples.csv)."""
    max_new_tokens: int = 40
    decoding: str = GREEDY
    """How every generation picks tokens (the prompts', the test answers', the served model's):
    "greedy" (the most likely token) or "sample" (top_k at temperature, seeded)."""
    temperature: float = 0.8
    top_k: int = 20
    seed: int = 1234
    answer_examples: int = 200
    """Instruction data: test examples whose answers are generated and scored (0: all)."""
    context_length: int = 0
    """causal_lm: tokens per scoring window; 0 means the training block size."""
    stride: int = 0
    """causal_lm: tokens between window starts; 0 means context_length - 1 (windows share one
    token, so each token is predicted once). Smaller gives the sliding-window estimate; a
    stride of context_length or more is refused (snaketune.checks, and evaluate_lm)."""


@dataclass(frozen=True)
class EvalJob:
    task: str
    evaluate: EvalSettings = field(default_factory=EvalSettings)
    device: str = "auto"
    """Where the model is evaluated: the train section's device and precision."""
    precision: str = "auto"
    compile: bool | str = False
    """The train section's compile: the model scored compiled (snaketune.lm_loss.scoring)."""

    @property
    def compile_mode(self) -> str | None:
        return compile_mode(self.compile)

    def __post_init__(self) -> None:
        check_task(self.task)


# --- tracking -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class MlflowSettings:
    """The config's `mlflow:` section."""

    tracking_uri: str = ""
    experiment_name: str = "snaketune"
    register_models: bool = True


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
"""The key the sweep expansion (snaketune.sweep) sets on each point's experiment entry:
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
        compile=train.compile,
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
