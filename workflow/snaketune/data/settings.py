"""The data stages' settings: the datasets catalog, how a dataset file is read, cleaning,
near-duplicate removal, the split and the tokenizer; and the builders of their rules' settings."""

from __future__ import annotations

import codecs
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path, PurePosixPath
from typing import ClassVar
from urllib.parse import urlparse

from snaketune.names import SPLITS
from snaketune.settings import ConfigView, SettingsError, from_dict, raise_problems, setting
from snaketune.tasks import task_of

FORMATS = ("txt", "jsonl", "csv", "tsv", "parquet")


TXT_DOCUMENTS = ("line", "paragraph", "heading")


TOKENIZER_KINDS = ("bpe", "pretrained")


URL_SCHEMES = ("http", "https", "file", "hf")


@dataclass(frozen=True, kw_only=True)
class DatasetSource:
    """Where a dataset file comes from: the first keys of a catalog entry."""

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


@dataclass(frozen=True, kw_only=True)
class FileLayout:
    """How a dataset file's records are laid out: its format and its columns. Defined once, for
    the catalog's entries (DatasetSettings) and for the clean job that reads them
    (ReadSettings, which the workflow fills from the entry)."""

    format: str = setting(
        enum=FORMATS,
        description=(
            "Format of the (decompressed) data file. A .gz, .zip or .tar.gz URL is unpacked first."
        ),
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

    @property
    def is_instruction(self) -> bool:
        return bool(self.response_column or self.messages_column)


@dataclass(frozen=True, kw_only=True)
class DatasetSettings(FileLayout, DatasetSource):
    """One entry of the config's `datasets:` catalog: its source, its layout, and these."""

    SECTION: ClassVar[str] = (
        "Catalog of datasets by name; experiments refer to these names. A name becomes a "
        "folder under results_dir (datasets/<name>/download), so it is letters, digits, "
        "'_', '.' and '-'."
    )

    member: str | None = setting(
        None, description="For archives holding several files, the path of the data file inside."
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


@dataclass(frozen=True, kw_only=True)
class ReadSettings(FileLayout):
    """How one experiment reads its dataset's records: the catalog entry's layout (the columns
    its task does not use left out), and these."""

    text_template: str | None = None
    """A str.format template over the record's columns, e.g. 'Q: {question}\\nA: {answer}'."""
    chat_tokenizer: str | None = None
    """Instruction data without a text_template: the pretrained tokenizer whose chat template,
    if it has one, composes each example (snaketune.data.reading.compose_instruction)."""

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


def resolve_url(url: str, base_dir: Path) -> str:
    """URLs stay as they are; a relative path is relative to base_dir, wherever snakemake runs."""
    if urlparse(url).scheme in URL_SCHEMES:
        return url
    return url if os.path.isabs(url) else os.path.join(base_dir, url)


def dataset_settings(view: ConfigView, name: str) -> DatasetSettings:
    return from_dict(DatasetSettings, view.config["datasets"][name])


def dataset_of(view: ConfigView, experiment: str) -> DatasetSettings:
    return dataset_settings(view, view.experiment(experiment)["dataset"])


def download_settings(view: ConfigView, dataset: str) -> DownloadSettings:
    """The url as configured: a relative path is resolved by the job (JobContext.repository),
    so that a moved or cloned checkout has the same download params and nothing to rerun."""
    ds = dataset_settings(view, dataset)
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
    lm = task_of(task).predicts_tokens
    chat = (
        tokenizer.name_or_path
        if lm and dataset.is_instruction and not text_template and tokenizer
        else None
    )
    layout = {f.name: getattr(dataset, f.name) for f in fields(FileLayout)}
    unused = LM_ONLY_COLUMNS if not lm else ("label_column",)
    layout.update(dict.fromkeys(unused))  # a column the task does not read: None
    return ReadSettings(**layout, text_template=text_template, chat_tokenizer=chat)


LM_ONLY_COLUMNS = ("prompt_column", "response_column", "messages_column")
"""The instruction data's columns, which a classifier does not read."""


def clean_job(view: ConfigView, experiment: str) -> CleanJob:
    exp, dataset = view.experiment(experiment), dataset_of(view, experiment)
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
