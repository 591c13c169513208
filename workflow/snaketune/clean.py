"""Stage 2, clean_corpus: read a raw dataset file into documents and clean them.

Each filter counts what it touched, so the report says exactly where documents went. An empty
result is an error that names the filter that removed the most.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import html
import io
import json
import re
import unicodedata
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from snaketune.errors import CorpusError
from snaketune.fileio import PARQUET_ROW_GROUP_ROWS, atomic_path, files_in, write_json
from snaketune.manifest import stage_manifest
from snaketune.quality import quality_problem
from snaketune.settings import FORMATS, TXT_DOCUMENTS, CleanJob, CleanSettings, ReadSettings
from snaketune.stages import CleanPaths


@dataclass
class CleanReport:
    input_records: int = 0
    undecodable_bytes_replaced: int = 0
    html_stripped: int = 0
    control_chars_removed: int = 0
    pii_redacted: dict[str, int] = field(default_factory=dict)
    removed: dict[str, int] = field(default_factory=dict)
    output_records: int = 0
    labels: dict[str, int] = field(default_factory=dict)


# --- reading -----------------------------------------------------------------------------------


def decode_counting(raw: bytes) -> tuple[str, int]:
    """Decode UTF-8 (dropping a BOM), replacing undecodable bytes; return text and their count."""
    bad = 0

    def count_and_replace(err: UnicodeDecodeError):
        nonlocal bad
        bad += err.end - err.start
        return ("\ufffd", err.end)

    name = "snaketune-count-" + str(id(count_and_replace))
    codecs.register_error(name, count_and_replace)
    text = raw.decode("utf-8-sig", errors=name)
    return text, bad


def split_lines(text: str) -> list[str]:
    r"""Split on \n, \r\n or \r only. str.splitlines also breaks on U+2028, NEL and form feed,
    which a JSON string may hold unescaped and which do not end a line of a text file."""
    return re.split(r"\r\n?|\n", text)


def read_records(path: Path, settings: ReadSettings) -> tuple[pd.DataFrame, int]:
    """Return the raw records as a DataFrame of strings and the count of replaced bytes."""
    if settings.format not in FORMATS:
        raise CorpusError(f"format {settings.format!r} is not one of {FORMATS}")
    if settings.format == "parquet":
        return pd.read_parquet(path).astype("string"), 0
    text, bad = decode_counting(Path(path).read_bytes())
    if settings.format == "txt":
        documents = txt_documents(text, settings.txt_document)
        return pd.DataFrame({settings.text_column: documents}, dtype="string"), bad
    if settings.format == "jsonl":
        rows = [json.loads(line) for line in split_lines(text) if line.strip()]
        return pd.DataFrame(rows).astype("string"), bad
    frame = pd.read_csv(
        io.StringIO(text),
        sep="," if settings.format == "csv" else "\t",
        header=0 if settings.header else None,
        names=settings.column_names,
        quoting=csv.QUOTE_MINIMAL if settings.quoting else csv.QUOTE_NONE,
        dtype="string",
        keep_default_na=False,
    )
    return frame, bad


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


def compose_texts(frame: pd.DataFrame, settings: ReadSettings) -> pd.Series:
    """The document text of each record: the template filled in, or the text column."""
    needed = re.findall(r"{(\w+)}", settings.text_template or "") or [settings.text_column]
    if settings.label_column:
        needed = [*needed, settings.label_column]
    missing = sorted(set(needed) - set(frame.columns))
    if missing:
        raise CorpusError(
            f"column(s) {missing} not found; the file has columns {list(frame.columns)}. "
            "Set text_column / label_column / text_template in the dataset's config."
        )
    if not settings.text_template:
        return frame[settings.text_column].fillna("")
    filled = frame.fillna("")
    return pd.Series(
        [settings.text_template.format(**row) for row in filled.to_dict("records")],
        index=frame.index,
        dtype="string",
    )


# --- cleaning ----------------------------------------------------------------------------------

_TAG = re.compile(r"<[^>]{0,200}>")
# \v and \f are left to _HSPACE, which turns them into a space instead of gluing words together.
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f-\x9f]")
_HSPACE = re.compile(r"[ \t\r\f\v]+")
_BLANK_LINES = re.compile(r"\n{3,}")
PII_PATTERNS = {
    "email": (re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b"), "<EMAIL>"),
    "ip": (re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}\b"), "<IP>"),
    "phone": (re.compile(r"(?<![\w#$])\+?\d[\d ().-]{7,}\d\b"), "<PHONE>"),
}


def normalize_for_match(text: str) -> str:
    """The form two texts share when they count as the same document (dedup and split)."""
    return " ".join(unicodedata.normalize("NFC", text).casefold().split())


def stable_doc_id(text: str) -> str:
    return hashlib.sha256(normalize_for_match(text).encode("utf-8")).hexdigest()[:16]


def clean_text(text: str, settings: CleanSettings, report: CleanReport) -> str:
    if settings.nfc:
        text = unicodedata.normalize("NFC", text)
    if settings.strip_html and _TAG.search(text):
        text = html.unescape(_TAG.sub(" ", text))
        report.html_stripped += 1
    text, n_control = _CONTROL.subn("", text)
    report.control_chars_removed += n_control
    if settings.redact_pii:
        for kind, (pattern, placeholder) in PII_PATTERNS.items():
            text, n = pattern.subn(placeholder, text)
            if n:
                report.pii_redacted[kind] = report.pii_redacted.get(kind, 0) + n
    lines = (_HSPACE.sub(" ", line).strip() for line in text.split("\n"))
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


def clean_documents(
    texts: pd.Series, labels: pd.Series | None, settings: CleanSettings, report: CleanReport
) -> pd.DataFrame:
    removed: Counter[str] = Counter()
    seen: set[str] = set()
    rows = []
    label_values = labels.tolist() if labels is not None else [None] * len(texts)
    for raw_text, label in zip(texts.tolist(), label_values, strict=True):
        text = clean_text(raw_text, settings, report)
        if labels is not None and (label is None or pd.isna(label) or not str(label).strip()):
            removed["missing_label"] += 1
            continue
        if len(text) < settings.min_chars:
            removed["too_short"] += 1
            continue
        if len(text) > settings.max_chars:
            removed["too_long"] += 1
            continue
        problem = quality_problem(text, settings)
        if problem:
            removed[problem] += 1
            continue
        doc_id = stable_doc_id(text)
        if settings.dedup and doc_id in seen:
            removed["exact_duplicate"] += 1
            continue
        seen.add(doc_id)
        rows.append((doc_id, text, None if label is None else str(label).strip()))
    report.removed = dict(removed)
    return pd.DataFrame(rows, columns=["doc_id", "text", "label"]).astype("string")


def clean_corpus(paths: CleanPaths, job: CleanJob) -> CleanReport:
    read, settings = job.read, job.clean
    source = pick_member(paths.raw, job.member)
    with stage_manifest(paths, job) as record:
        frame, bad = read_records(source, read)
        report = CleanReport(input_records=len(frame), undecodable_bytes_replaced=bad)
        texts = compose_texts(frame, read)
        labels = frame[read.label_column] if read.label_column else None
        docs = clean_documents(texts, labels, settings, report)
        report.output_records = len(docs)
        if read.label_column:
            report.labels = {str(k): int(v) for k, v in docs["label"].value_counts().items()}
        if docs.empty:
            raise CorpusError(empty_corpus_message(report))
        with atomic_path(paths.corpus) as tmp:
            docs.to_parquet(tmp, index=False, row_group_size=PARQUET_ROW_GROUP_ROWS)
        write_json(paths.report, asdict(report))
        record.counts = asdict(report)
    return report


def empty_corpus_message(report: CleanReport) -> str:
    if report.input_records == 0:
        return "the dataset file holds no records; check the url and format in config.yaml"
    worst = max(report.removed.items(), key=lambda kv: kv[1])
    return (
        f"cleaning removed all {report.input_records} records "
        f"(by filter: {report.removed}); most went to '{worst[0]}'. "
        "Loosen that filter in the experiment's clean settings, or check the text/label columns."
    )


def pick_member(raw_dir: Path, member: str | None) -> Path:
    if member:
        path = raw_dir / member
        if not path.is_file():
            raise CorpusError(f"member {member!r} not found in {raw_dir}")
        return path
    # Hidden files are bookkeeping (e.g. Snakemake's .snakemake_timestamp), never data.
    files = [p for p in files_in(raw_dir) if not p.name.startswith(".")]
    if len(files) != 1:
        names = [p.relative_to(raw_dir).as_posix() for p in files]
        raise CorpusError(f"{raw_dir} holds {names}; name one with the dataset's 'member' key")
    return files[0]
