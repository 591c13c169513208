"""A raw dataset file as records: decoded (a byte-order mark, a configured codec, or UTF-8),
parsed by format, and made into document texts. Whatever cannot be read is refused with the
file, the line and what to do: never a traceback, never a silently garbled corpus.

Decoding: a few undecodable bytes (a stray byte in a large file) are replaced by U+FFFD and
counted in the cleaning report; a file in which more than MAX_UNDECODABLE_SHARE of the bytes
(and at least MIN_UNDECODABLE_REFUSED of them) do not decode is in another encoding, and is
refused naming the likely one.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd

from snaketune.data.settings import FORMATS, TXT_DOCUMENTS, ReadSettings
from snaketune.errors import CorpusError

MAX_UNDECODABLE_SHARE = 0.001
MIN_UNDECODABLE_REFUSED = 8
# UTF-32-LE's mark begins with UTF-16-LE's, so the longer marks are looked for first.
BYTE_ORDER_MARKS = (
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)
SAMPLE_BYTES = 1 << 20


# --- decoding ----------------------------------------------------------------------------------


def with_byte_order_mark(raw: bytes) -> tuple[str, int]:
    """(codec, length of the mark) that the bytes start with; UTF-8 without one."""
    for mark, codec in BYTE_ORDER_MARKS:
        if raw.startswith(mark):
            return codec, len(mark)
    return "utf-8", 0


def decode_counting(raw: bytes, codec: str = "utf-8") -> tuple[str, int, int]:
    """Decode, replacing what does not decode with U+FFFD: the text, how many bytes were
    replaced, and the offset of the first (-1 if none)."""
    bad, first = 0, -1

    def count_and_replace(err: UnicodeDecodeError):
        nonlocal bad, first
        first = err.start if first < 0 else first
        bad += err.end - err.start
        return ("\ufffd", err.end)

    name = "snaketune-count-" + str(id(count_and_replace))
    codecs.register_error(name, count_and_replace)
    return raw.decode(codec, errors=name), bad, first


def likely_encoding(raw: bytes) -> str:
    """A guess at the codec of bytes that are not UTF-8, for the error message."""
    sample = raw[:SAMPLE_BYTES]
    if sample.count(0) > len(sample) // 4:
        odd_zeros = sample[1::2].count(0) > sample[0::2].count(0)
        return "utf-16-le" if odd_zeros else "utf-16-be"
    try:
        sample.decode("cp1252")
    except UnicodeDecodeError:
        return "latin-1"
    return "cp1252"


def decode_file(path: Path, raw: bytes, encoding: str | None) -> tuple[str, int]:
    """The text of a data file and how many bytes were replaced (see the module docstring)."""
    codec, skip = (encoding, 0) if encoding else with_byte_order_mark(raw)
    text, bad, first = decode_counting(raw[skip:], codec)
    if bad >= MIN_UNDECODABLE_REFUSED and bad > MAX_UNDECODABLE_SHARE * len(raw):
        line = raw[: skip + first].count(b"\n") + 1
        guess = likely_encoding(raw)
        raise CorpusError(
            f"{path}: {bad / len(raw):.1%} of its bytes ({bad:,}) are not valid {codec}, the "
            f"first on line {line}; it looks like {guess} text. Set the dataset's encoding in "
            f"config.yaml (datasets.<name>.encoding: {guess}), or fix the file."
        )
    return text, bad


# --- records by format -------------------------------------------------------------------------


def split_lines(text: str) -> list[str]:
    r"""Split on \n, \r\n or \r only. str.splitlines also breaks on U+2028, NEL and form feed,
    which a JSON string may hold unescaped and which do not end a line of a text file."""
    return re.split(r"\r\n?|\n", text)


def read_records(path: Path, settings: ReadSettings) -> tuple[pd.DataFrame, int]:
    """Return the raw records as a DataFrame of strings and the count of replaced bytes."""
    if settings.format not in FORMATS:
        raise CorpusError(f"format {settings.format!r} is not one of {FORMATS}")
    if settings.format == "parquet":
        frame, bad = parquet_records(path), 0
    else:
        text, bad = decode_file(path, Path(path).read_bytes(), settings.encoding)
        if settings.format == "txt":
            documents = txt_documents(text, settings.txt_document)
            frame = pd.DataFrame({settings.text_column: documents}, dtype="string")
        elif settings.format == "jsonl":
            frame = jsonl_records(path, text)
        else:
            frame = delimited_records(path, text, settings)
    if frame.empty:
        raise CorpusError(
            f"{path} holds no records (it is empty, or blank lines only); check the dataset's "
            "url, member and format in config.yaml"
        )
    return frame, bad


def parquet_records(path: Path) -> pd.DataFrame:
    import pyarrow

    try:
        frame = pd.read_parquet(path)
    except (pyarrow.ArrowException, OSError) as err:
        raise CorpusError(f"{path} is not a readable Parquet file ({err})") from err
    nested = [
        c
        for c in frame.columns
        if frame[c].dtype == object and frame[c].map(lambda v: hasattr(v, "tolist")).any()
    ]
    for column in nested:  # lists of structs (a conversation's turns) as JSON, as in jsonl
        frame[column] = frame[column].map(lambda v: as_text(plain(v)))
    return frame.astype("string")


def plain(value):
    """Arrow's nested values, as pandas gives them (numpy arrays of dicts), as lists."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def jsonl_records(path: Path, text: str) -> pd.DataFrame:
    rows = []
    for number, line in enumerate(split_lines(text), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise CorpusError(
                f"{path}, line {number}: not valid JSON ({err.msg} at column {err.colno}); a "
                "jsonl file holds one JSON object per line"
            ) from err
        if not isinstance(row, dict):
            raise CorpusError(
                f"{path}, line {number}: a JSON {type(row).__name__} where a JSON object was "
                'expected; a jsonl file holds one object per line, e.g. {"text": "..."}'
            )
        rows.append({k: as_text(v) for k, v in row.items()})
    return pd.DataFrame(rows).astype("string")


def as_text(value):
    """A record's value as the string columns hold it: lists and objects (a conversation's
    turns) as JSON, which snaketune.data.reading.cleaned_turns reads back."""
    return json.dumps(value, ensure_ascii=False) if isinstance(value, list | dict) else value


def delimited_records(path: Path, text: str, settings: ReadSettings) -> pd.DataFrame:
    if not text.strip():
        return pd.DataFrame()
    try:
        return pd.read_csv(
            io.StringIO(text),
            sep="," if settings.format == "csv" else "\t",
            header=0 if settings.header else None,
            names=settings.column_names,
            quoting=csv.QUOTE_MINIMAL if settings.quoting else csv.QUOTE_NONE,
            dtype="string",
            keep_default_na=False,
        )
    except (pd.errors.ParserError, csv.Error) as err:
        raise CorpusError(
            f"{path}: {err}. Check the dataset's format, header, column_names and quoting"
        ) from err


# A MediaWiki top-level heading as WikiText writes it: ' = Title = ' (subsections are '= = ').
_TOP_HEADING = re.compile(r"^\s*= (?!=).*[^=] =\s*$")


def txt_documents(text: str, unit: str) -> list[str]:
    """Split a plain-text file into documents: see ReadSettings.txt_document."""
    if unit not in TXT_DOCUMENTS:
        raise CorpusError(f"txt_document {unit!r} is not one of {TXT_DOCUMENTS}")
    lines = split_lines(text)
    if unit == "line":
        return [line for line in lines if line.strip()]
    documents: list[list[str]] = [[]]
    for i, line in enumerate(lines):
        if starts_document(lines, i, unit):
            documents.append([])
        documents[-1].append(line)
    texts = ("\n".join(doc).strip("\n") for doc in documents)
    return [doc for doc in texts if doc.strip()]


def starts_document(lines: list[str], i: int, unit: str) -> bool:
    if unit == "paragraph":
        return not lines[i].strip()
    # WikiText puts a blank line before every heading; formula lines such as ' = 1 k = ' have none.
    return bool(_TOP_HEADING.match(lines[i])) and (i == 0 or not lines[i - 1].strip())


# --- documents ---------------------------------------------------------------------------------


def require_columns(frame: pd.DataFrame, needed: list[str]) -> None:
    missing = sorted(set(needed) - set(frame.columns))
    if missing:
        raise CorpusError(
            f"column(s) {missing} not found; the file has columns {list(frame.columns)}. "
            "Set text_column / label_column / prompt_column / response_column / text_template "
            "in the config."
        )


PROMPT_MARKER = "\x00prompt\x00"
"""Stands for a request's text while a prompt template for serving is rendered."""


@dataclass(frozen=True)
class Instructions:
    """Instruction data composed: each record's prompt and response, and the prompt as MLflow's
    prompt_template (`{prompt}` for a request's text), or None where a request cannot fill it."""

    prompts: pd.Series
    responses: pd.Series
    format: str
    """"text_template", or "chat_template" (the tokenizer's)."""
    serving_template: str | None
    flaws: pd.Series | None = None
    """Per record, why it cannot be learned as it looks (RECORD_FLAWS), or "": cleaning drops
    and counts those records."""


EMPTY_PROMPT, EMPTY_RESPONSE, SPECIAL_TOKEN_TEXT = (
    "empty_prompt",
    "empty_response",
    "special_token_text",
)
RECORD_FLAWS = (EMPTY_PROMPT, EMPTY_RESPONSE, SPECIAL_TOKEN_TEXT)
"""An example with no prompt (it would be learned as an answer to nothing, and all such look
alike), with no answer (only the end marker would be learned, and an empty generation scored
as exact), or whose fields hold a special token's text (the tokenizer would encode `<|endoftext|>`
inside an answer as a real end of text, and HTML stripping would take it for a tag)."""


def special_texts(chat) -> tuple[str, ...]:
    """The special tokens' texts of the tokenizer the examples will be encoded with: the chat
    template's pretrained tokenizer, else (None) the BPE the pipeline trains."""
    from snaketune.data.tokenizer import EOS, PAD

    specials = {EOS, PAD} if chat is None else set(chat.all_special_tokens)
    return tuple(sorted(s for s in specials if s))


def record_flaw(prompt: list[str], response: str, raw: list[str], specials) -> str:
    """Why one example cannot be learned as it looks (cleaned prompt and response fields, the
    raw fields), or ""."""
    if any(special in value for value in raw for special in specials):
        return SPECIAL_TOKEN_TEXT
    if not response.strip():
        return EMPTY_RESPONSE
    if not any(value.strip() for value in prompt):
        return EMPTY_PROMPT
    return ""


def compose_instruction(frame: pd.DataFrame, settings: ReadSettings, clean) -> Instructions:
    """Instruction data: each record's fields cleaned (`clean`, str -> str), then composed as
    the tokenizer's chat template renders a user turn and the assistant's answer (when the
    experiment gives no text_template and its pretrained tokenizer has one), or as the
    template's two parts (settings.ReadSettings.instruction)."""
    if settings.messages_column:
        return message_instructions(frame, settings, clean)
    template = settings.instruction
    require_columns(frame, template.columns)
    raw = frame[template.columns].fillna("").astype(str)
    fields = raw.map(clean)
    records = fields.to_dict("records")
    prompt_columns = re.findall(r"{(\w+)}", template.prompt)
    (response_column,) = re.findall(r"{(\w+)}", template.response)
    chat = chat_tokenizer(settings)
    specials = special_texts(chat)
    flaws = pd.Series(
        [
            record_flaw(
                [r[c] for c in prompt_columns], r[response_column], list(w.values()), specials
            )
            for r, w in zip(records, raw.to_dict("records"), strict=True)
        ],
        index=frame.index,
        dtype="string",
    )
    if chat is not None:
        user, answer = settings.prompt_column, settings.response_column
        conversations = [
            [{"role": "user", "content": r[user]}, {"role": "assistant", "content": r[answer]}]
            for r in records
        ]
        composed = chat_instructions(chat, conversations, settings, frame.index)
        return replace(composed, flaws=flaws)
    parts = [
        filled(part, records, frame.index, settings.text_template)
        for part in (template.prompt, template.response)
    ]
    names = set(prompt_columns)
    serving = (
        template.prompt.replace("{" + names.pop() + "}", "{prompt}") if len(names) == 1 else None
    )
    return Instructions(*parts, "text_template", serving, flaws)


def chat_tokenizer(settings: ReadSettings):
    """The pretrained tokenizer whose chat template composes the examples, or None."""
    if settings.text_template or not settings.chat_tokenizer:
        return None
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(settings.chat_tokenizer)
    except (OSError, ValueError) as err:
        raise CorpusError(
            f"tokenizer {settings.chat_tokenizer!r}, whose chat template would compose the "
            f"instruction examples, cannot be loaded ({err}); download it, or set the "
            "experiment's text_template"
        ) from err
    return tokenizer if tokenizer.chat_template else None


def message_instructions(frame: pd.DataFrame, settings: ReadSettings, clean) -> Instructions:
    """A messages column: each record's conversation (role/content turns, the last the
    assistant's answer, which alone is learned), its contents cleaned, composed by the chat
    template."""
    column = settings.messages_column
    require_columns(frame, [column])
    chat = chat_tokenizer(settings)
    if chat is None:
        raise CorpusError(
            f"tokenizer {settings.chat_tokenizer!r} has no chat template, which the "
            f"conversations of column {column!r} need; use a tokenizer that has one"
        )
    values = frame[column].tolist()
    conversations = [
        cleaned_turns(value, clean, f"record {number} of column {column!r}")
        for number, value in enumerate(values, start=1)
    ]
    specials = special_texts(chat)
    flaws = pd.Series(
        [
            record_flaw(
                [t["content"] for t in turns[:-1]],
                turns[-1]["content"],
                [str(value)],  # the raw conversation, before cleaning
                specials,
            )
            for turns, value in zip(conversations, values, strict=True)
        ],
        index=frame.index,
        dtype="string",
    )
    return replace(chat_instructions(chat, conversations, settings, frame.index), flaws=flaws)


def cleaned_turns(value, clean, where: str) -> list[dict[str, str]]:
    """A conversation as the chat template takes it, checked: role/content turns, the last the
    assistant's."""
    try:
        turns = json.loads(value) if isinstance(value, str) else None
    except json.JSONDecodeError:
        turns = None
    if not turns or not all(isinstance(t, dict) and {"role", "content"} <= set(t) for t in turns):
        raise CorpusError(
            f"{where} is not a list of {{'role': ..., 'content': ...}} turns: {str(value)[:80]!r}"
        )
    if turns[-1]["role"] != "assistant":
        raise CorpusError(
            f"{where} ends with a {turns[-1]['role']!r} turn; its last turn is the answer a "
            "model learns, the assistant's"
        )
    return [{"role": str(t["role"]), "content": clean(str(t["content"] or ""))} for t in turns]


def chat_instructions(
    tokenizer, conversations: list[list[dict]], settings: ReadSettings, index
) -> Instructions:
    """Each conversation as the chat template renders it: all turns but the last, with the
    generation prompt, are the prompt; the rest of the whole conversation is the response."""
    prompts, responses = [], []
    for number, turns in enumerate(conversations, start=1):
        where = f"record {number}"
        prompt = rendered(tokenizer, turns[:-1], settings, where, add_generation_prompt=True)
        whole = rendered(tokenizer, turns, settings, where)
        if not whole.startswith(prompt):
            raise CorpusError(
                f"the chat template of {settings.chat_tokenizer!r} renders a conversation that "
                "does not start with its own generation prompt, so the answer cannot be told "
                "from the prompt; set the experiment's text_template"
            )
        prompts.append(prompt)
        responses.append(whole[len(prompt) :])
    request = [{"role": "user", "content": PROMPT_MARKER}]
    prompt = rendered(tokenizer, request, settings, "a serving request", add_generation_prompt=True)
    serving = prompt.replace("{", "{{").replace("}", "}}").replace(PROMPT_MARKER, "{prompt}")
    return Instructions(
        pd.Series(prompts, index=index, dtype="string"),
        pd.Series(responses, index=index, dtype="string"),
        "chat_template",
        serving,
    )


def rendered(tokenizer, turns: list[dict], settings: ReadSettings, where: str, **options) -> str:
    """`turns` as the tokenizer's chat template renders them. A template may refuse a
    conversation (raise_exception in the template: roles that do not alternate, a system turn
    it does not take): that is refused naming the record and the tokenizer."""
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(turns, tokenize=False, **options)
    except TemplateError as err:
        raise CorpusError(
            f"{where}: the chat template of {settings.chat_tokenizer!r} cannot render its turns "
            f"{[t['role'] for t in turns]} ({err}); set the experiment's text_template, or fix "
            "the data"
        ) from err


def compose_texts(frame: pd.DataFrame, settings: ReadSettings) -> pd.Series:
    """The document text of each record: the template filled in, or the text column."""
    needed = re.findall(r"{(\w+)}", settings.text_template or "") or [settings.text_column]
    if settings.label_column:
        needed = [*needed, settings.label_column]
    require_columns(frame, needed)
    if not settings.text_template:
        return frame[settings.text_column].fillna("")
    rows = frame.fillna("").to_dict("records")
    return filled(settings.text_template, rows, frame.index, settings.text_template)


def filled(template: str, rows: list[dict], index, text_template: str | None) -> pd.Series:
    """`template` (the experiment's text_template, or the prompt or response part of it) filled
    in from each record's columns. A template str.format cannot fill (a lone brace, a
    positional {} or {0}, a format spec that does not fit text, a column inside {name:...} or
    {name!r} that the file lacks) is refused naming the setting."""
    try:
        return pd.Series([template.format(**row) for row in rows], index=index, dtype="string")
    except (ValueError, IndexError, KeyError, AttributeError) as err:
        raise CorpusError(
            f"text_template {text_template!r} cannot be filled in from a record's columns "
            f"({type(err).__name__}: {err}); name each column as {{column}}, and write a "
            "literal brace twice ({{ or }})"
        ) from err
