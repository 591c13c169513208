"""Stage 2, clean_corpus: read a raw dataset file into documents (snaketune.data.reading) and clean
them.

Each filter counts what it touched, so the report says exactly where documents went. An empty
result is an error that names the filter that removed the most.

Labels are classes by one rule (`label_class`): surrounding whitespace removed, a whole number
written without a fractional part ('1.0' and ' 1 ' are '1'), and booleans as numbers ('True' is
'1', 'false' is '0'). When a class was written in more than one way, the report lists the ways.
"""

from __future__ import annotations

import hashlib
import html
import re
import unicodedata
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from snaketune import tables
from snaketune.context import IN_PROCESS, JobContext
from snaketune.data.paths import CleanPaths
from snaketune.data.quality import quality_problem
from snaketune.data.reading import EMPTY_RESPONSE, compose_instruction, compose_texts, read_records
from snaketune.data.settings import CleanJob, CleanSettings, inside_folder
from snaketune.errors import CorpusError
from snaketune.fileio import PARQUET_ROW_GROUP_ROWS, atomic_path, files_in, write_json
from snaketune.manifest import stage_manifest
from snaketune.names import INSTRUCTION_COLUMNS


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
    label_forms: dict[str, list[str]] = field(default_factory=dict)
    """The classes written in more than one way, with each way found (see label_class)."""


# --- cleaning ----------------------------------------------------------------------------------

_TAG = re.compile(r"<[^>]{0,200}>")
_ENTITY = re.compile(r"&(#\d+|#[xX][0-9a-fA-F]+|[A-Za-z][A-Za-z0-9]*);?")
# \v and \f are left to _HSPACE, which turns them into a space instead of gluing words together.
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f-\x9f]")
# Spaces and tabs, and the Unicode space separators (a no-break space, &nbsp;, is a space like
# any other); line and paragraph separators are left as they are.
_HSPACE = re.compile("[ \t\r\f\v\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]+")
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
    if settings.strip_html and (_TAG.search(text) or _ENTITY.search(text)):
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


_WHOLE_NUMBER = re.compile(r"([+-]?\d+)\.0*")
_BOOLEANS = {"true": "1", "false": "0"}


def label_class(value: str) -> str:
    """The class a label value stands for (the rule in the module docstring)."""
    text = value.strip()
    whole = _WHOLE_NUMBER.fullmatch(text)
    if whole:
        return whole[1]
    return _BOOLEANS.get(text.casefold(), text)


def clean_documents(
    texts: pd.Series,
    labels: pd.Series | None,
    settings: CleanSettings,
    report: CleanReport,
    responses: pd.Series | None = None,
    flaws: pd.Series | None = None,
) -> pd.DataFrame:
    """Cleaned documents (doc_id, text, label). Instruction data (`responses` given, `texts`
    their prompts, both composed from fields cleaned already: snaketune.data.reading) also keeps
    each document's prompt and response, the text being the two end to end; the filters and the
    duplicate checks see that text. A record with a flaw (reading.RECORD_FLAWS) is dropped and
    counted by it."""
    removed: Counter[str] = Counter()
    seen: set[str] = set()
    forms: defaultdict[str, set[str]] = defaultdict(set)
    rows = []
    label_values = labels.tolist() if labels is not None else [None] * len(texts)
    response_values = responses.tolist() if responses is not None else [None] * len(texts)
    flaw_values = flaws.tolist() if flaws is not None else [""] * len(texts)
    for raw_text, label, raw_response, flaw in zip(
        texts.tolist(), label_values, response_values, flaw_values, strict=True
    ):
        parts = ()
        if flaw:
            removed[flaw] += 1
            continue
        if raw_response is None:
            text = clean_text(raw_text, settings, report)
        else:
            if not raw_response.strip():
                removed[EMPTY_RESPONSE] += 1
                continue
            parts = (raw_text, raw_response)
            text = "".join(parts)
        if labels is not None and (label is None or pd.isna(label) or not str(label).strip()):
            removed["missing_label"] += 1
            continue
        if label is not None:
            forms[label_class(str(label))].add(str(label))
            label = label_class(str(label))
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
        rows.append((doc_id, text, label, *parts))
    report.removed = dict(removed)
    report.label_forms = {k: sorted(v) for k, v in sorted(forms.items()) if len(v) > 1}
    columns = ["doc_id", "text", "label", *(INSTRUCTION_COLUMNS if responses is not None else [])]
    return pd.DataFrame(rows, columns=columns).astype("string")


def clean_corpus(paths: CleanPaths, job: CleanJob, context: JobContext = IN_PROCESS) -> CleanReport:
    read, settings = job.read, job.clean
    source = pick_member(paths.raw, job.member)
    with stage_manifest(paths, job, context=context) as record:
        frame, bad = read_records(source, read)
        report = CleanReport(input_records=len(frame), undecodable_bytes_replaced=bad)
        # Composed first: it names every missing column at once.
        if read.is_instruction:
            composed = compose_instruction(frame, read, lambda v: clean_text(v, settings, report))
            texts, responses, flaws = composed.prompts, composed.responses, composed.flaws
            record.extra["instruction"] = {
                "format": composed.format,
                "serving_template": composed.serving_template,
            }
        else:
            texts, responses, flaws = compose_texts(frame, read), None, None
        labels = frame[read.label_column] if read.label_column else None
        docs = clean_documents(texts, labels, settings, report, responses, flaws)
        report.output_records = len(docs)
        if read.label_column:
            report.labels = {str(k): int(v) for k, v in docs["label"].value_counts().items()}
        if docs.empty:
            raise CorpusError(empty_corpus_message(report))
        with atomic_path(paths.corpus) as tmp:
            docs.to_parquet(tmp, index=False, row_group_size=PARQUET_ROW_GROUP_ROWS)
        write_json(paths.report, asdict(report))
        tables.counts_page(asdict(report), paths.report_html, "What cleaning changed")
        record.counts = asdict(report)
    return report


def empty_corpus_message(report: CleanReport) -> str:
    worst = max(report.removed.items(), key=lambda kv: kv[1])
    return (
        f"cleaning removed all {report.input_records} records "
        f"(by filter: {report.removed}); most went to '{worst[0]}'. "
        "Loosen that filter in the experiment's clean settings, or check the text/label columns."
    )


def pick_member(raw_dir: Path, member: str | None) -> Path:
    if member:
        if not inside_folder(member):
            raise CorpusError(f"member {member!r} is not a path inside {raw_dir}")
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
