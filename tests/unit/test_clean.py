"""clean_corpus: every reader and filter does what it says and counts what it touched, and an
empty result names the filter that emptied it."""

from __future__ import annotations

import gzip
import json
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from snaketune.data.clean import stable_doc_id
from snaketune.data.settings import CleanSettings, ReadSettings
from snaketune.errors import CorpusError
from tests.support.repo import DEMO_CORPUS
from tests.support.stage_data import run_clean

# --- helpers -------------------------------------------------------------------------------------


def texts_of(tmp_path: Path, lines: list[str], settings: CleanSettings | None = None) -> list[str]:
    """Clean one document per jsonl record (jsonl keeps control characters and newlines intact)."""
    data = "".join(json.dumps({"text": line}) + "\n" for line in lines).encode()
    _, docs = run_clean(tmp_path, "docs.jsonl", data, ReadSettings(format="jsonl"), settings)
    return docs["text"].tolist()


def jsonl(records: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


# --- decoding ------------------------------------------------------------------------------------


def test_invalid_utf8_bytes_are_replaced_and_counted(tmp_path):
    report, docs = run_clean(tmp_path, "a.txt", b"good line\nbad \xff\xfe bytes\ncaf\xc3\n")

    assert docs["text"].tolist() == ["good line", "bad \ufffd\ufffd bytes", "caf\ufffd"]
    assert report.undecodable_bytes_replaced == 3


def test_bom_is_stripped_so_the_first_column_keeps_its_name(tmp_path):
    data = "\ufefftext,label\nhello there,greet\nbye now,leave\n".encode()
    read = ReadSettings(format="csv", label_column="label")

    report, docs = run_clean(tmp_path, "a.csv", data, read)

    assert docs["text"].tolist() == ["hello there", "bye now"]
    assert report.undecodable_bytes_replaced == 0


def test_bom_does_not_end_up_in_the_first_txt_document(tmp_path):
    _, docs = run_clean(tmp_path, "a.txt", b"\xef\xbb\xbffirst\nsecond\n")
    assert docs["text"].tolist() == ["first", "second"]


# --- cleaning filters ----------------------------------------------------------------------------


def test_nul_and_control_characters_are_removed_and_counted(tmp_path):
    report, docs = run_clean(
        tmp_path,
        "a.jsonl",
        jsonl([{"text": "a\x00b\x07c"}, {"text": "del\x7f and c1\x85\x9f end"}]),
        ReadSettings(format="jsonl"),
    )

    assert docs["text"].tolist() == ["abc", "del and c1 end"]
    assert report.control_chars_removed == 5


def test_tab_and_newline_are_not_counted_as_control_characters(tmp_path):
    report, docs = run_clean(
        tmp_path, "a.jsonl", jsonl([{"text": "col\tumn\nnext"}]), ReadSettings(format="jsonl")
    )
    assert docs["text"].tolist() == ["col umn\nnext"]
    assert report.control_chars_removed == 0


def test_form_feed_and_vertical_tab_separate_words_instead_of_gluing_them(tmp_path):
    report, docs = run_clean(tmp_path, "a.txt", b"page one\x0cpage two\x0bend\nnext\n")

    # One document per line: a form feed is not a line end in a text file.
    assert docs["text"].tolist() == ["page one page two end", "next"]
    assert report.control_chars_removed == 0


def test_jsonl_string_holding_raw_line_separators_is_one_record(tmp_path):
    # JSON allows U+2028 and NEL unescaped; json.dumps(ensure_ascii=False) writes them raw.
    record = {"text": "line\u2028sep and nel\x85 here"}
    data = (json.dumps(record, ensure_ascii=False) + "\n").encode()

    report, docs = run_clean(tmp_path, "a.jsonl", data, ReadSettings(format="jsonl"))

    assert docs["text"].tolist() == ["line\u2028sep and nel here"]
    assert (report.input_records, report.control_chars_removed) == (1, 1)


def test_crlf_line_endings_split_txt_records_and_leave_no_carriage_return(tmp_path):
    _, docs = run_clean(tmp_path, "a.txt", b"one line\r\ntwo  lines\r\n\r\nthree\r\n")
    assert docs["text"].tolist() == ["one line", "two lines", "three"]


def test_crlf_inside_a_document_becomes_a_plain_newline(tmp_path):
    assert texts_of(tmp_path, ["Dear team,\r\nthanks\r\n"]) == ["Dear team,\nthanks"]


def test_crlf_jsonl_file_is_read_record_by_record(tmp_path):
    data = b'{"text": "first"}\r\n{"text": "second"}\r\n'
    report, docs = run_clean(tmp_path, "a.jsonl", data, ReadSettings(format="jsonl"))
    assert docs["text"].tolist() == ["first", "second"]
    assert report.input_records == 2


def test_nfc_composes_combining_accents(tmp_path):
    (text,) = texts_of(tmp_path, ["caf\u0065\u0301 ole"])
    assert text == "caf\u00e9 ole"
    assert len(text) == 8  # one code point for the accented e


def test_nfc_off_keeps_the_decomposed_form(tmp_path):
    (text,) = texts_of(tmp_path, ["caf\u0065\u0301"], CleanSettings(nfc=False))
    assert text == "caf\u0065\u0301"


def test_strip_html_removes_tags_unescapes_entities_and_counts_documents(tmp_path):
    data = jsonl(
        [
            {"text": "<p>Hello <b>world</b> &amp; co</p>"},
            {"text": "no tags &amp; here"},  # entities are markup too, with or without tags
        ]
    )
    report, docs = run_clean(
        tmp_path, "a.jsonl", data, ReadSettings(format="jsonl"), CleanSettings(strip_html=True)
    )

    assert docs["text"].tolist() == ["Hello world & co", "no tags & here"]
    assert report.html_stripped == 2


def test_html_is_kept_unless_asked_to_strip_it(tmp_path):
    assert texts_of(tmp_path, ["<b>bold</b>"]) == ["<b>bold</b>"]


def test_redact_pii_replaces_email_phone_and_ip_with_placeholders(tmp_path):
    lines = [
        "Mail jane.doe+shop@example.co.uk or call +1 555 126 4920 today.",
        "Login from 192.168.10.20 by ops@example.com, costs $154.50.",
    ]
    data = jsonl([{"text": line} for line in lines])
    report, docs = run_clean(
        tmp_path, "a.jsonl", data, ReadSettings(format="jsonl"), CleanSettings(redact_pii=True)
    )

    assert docs["text"].tolist() == [
        "Mail <EMAIL> or call <PHONE> today.",
        "Login from <IP> by <EMAIL>, costs $154.50.",  # a price is not a phone number
    ]
    assert report.pii_redacted == {"email": 2, "phone": 1, "ip": 1}


def test_pii_is_kept_unless_asked_to_redact_it(tmp_path):
    assert texts_of(tmp_path, ["mail a@b.org"]) == ["mail a@b.org"]


def test_whitespace_is_collapsed_and_blank_line_runs_shortened(tmp_path):
    (text,) = texts_of(tmp_path, ["  many \t  spaces  \n\n\n\n  next\u000b line  "])
    assert text == "many spaces\n\nnext line"


def test_min_and_max_length_filters_are_counted(tmp_path):
    report, docs = run_clean(
        tmp_path,
        "a.txt",
        b"tiny\njust right text\n" + b"x" * 50 + b"\n",
        settings=CleanSettings(min_chars=5, max_chars=20),
    )

    assert docs["text"].tolist() == ["just right text"]
    assert report.removed == {"too_short": 1, "too_long": 1}
    assert (report.input_records, report.output_records) == (3, 1)


def test_exact_duplicates_up_to_case_and_whitespace_are_dropped_and_counted(tmp_path):
    lines = b"Hello World\nhello   world\nHELLO WORLD \nsomething else\n"

    report, docs = run_clean(tmp_path, "a.txt", lines)

    assert docs["text"].tolist() == ["Hello World", "something else"]  # the first form is kept
    assert report.removed == {"exact_duplicate": 2}


def test_dedup_off_keeps_duplicates(tmp_path):
    _, docs = run_clean(tmp_path, "a.txt", b"same\nsame\n", settings=CleanSettings(dedup=False))
    assert docs["text"].tolist() == ["same", "same"]


def test_records_without_a_label_are_dropped_and_counted(tmp_path):
    data = b"text,label\nhas a label,yes\nblank label,\nspaces only,  \n"
    report, docs = run_clean(
        tmp_path, "a.csv", data, ReadSettings(format="csv", label_column="label")
    )
    assert docs["text"].tolist() == ["has a label"]
    assert report.removed == {"missing_label": 2}
    assert report.labels == {"yes": 1}


# --- readers -------------------------------------------------------------------------------------


def test_text_template_builds_documents_from_jsonl_columns(tmp_path):
    records = [
        {"question": "Where is my parcel?", "answer": "On its way.", "intent": "shipping"},
        {"question": "Refund please", "answer": "Done.", "intent": "billing"},
        {"question": "And the other one?", "answer": "Also sent.", "intent": "shipping"},
    ]
    read = ReadSettings(
        format="jsonl", text_template="Q: {question}\nA: {answer}", label_column="intent"
    )

    report, docs = run_clean(tmp_path, "a.jsonl", jsonl(records), read)

    assert docs["text"].tolist() == [
        "Q: Where is my parcel?\nA: On its way.",
        "Q: Refund please\nA: Done.",
        "Q: And the other one?\nA: Also sent.",
    ]
    assert docs["label"].tolist() == ["shipping", "billing", "shipping"]
    assert report.labels == {"shipping": 2, "billing": 1}


@pytest.mark.parametrize(
    ("template", "response_column", "says"),
    [
        ("Q: {question} {", None, "ValueError: Single '{' encountered"),
        ("Q: {} A: {answer}", None, "IndexError: Replacement index 0 out of range"),
        ("Q: {question} ({topic:>8})", None, "KeyError: 'topic'"),
        ("Q: {question} ({question:d})\nA: {answer}", "answer", "Unknown format code 'd'"),
    ],
    ids=["lone-brace", "positional", "missing-column-with-spec", "instruction-spec"],
)
def test_a_text_template_str_format_cannot_fill_is_refused_by_key(
    tmp_path, template, response_column, says
):
    records = [{"question": "Where is my parcel?", "answer": "On its way."}]
    read = ReadSettings(format="jsonl", text_template=template, response_column=response_column)
    with pytest.raises(CorpusError) as caught:
        run_clean(tmp_path, "a.jsonl", jsonl(records), read)
    message = str(caught.value)
    assert message.startswith(f"text_template {template!r} cannot be filled in")
    assert says in message and "write a literal brace twice" in message


def test_csv_honours_quotes_with_commas_and_doubled_quotes(tmp_path):
    data = b'text,label\n"Hello, world",greet\n"She said ""hi""",greet\n'
    _, docs = run_clean(tmp_path, "a.csv", data, ReadSettings(format="csv", label_column="label"))
    assert docs["text"].tolist() == ["Hello, world", 'She said "hi"']


def test_tsv_without_header_and_quoting_keeps_quotes_literal(tmp_path):
    # SMS-Spam style: label<TAB>text, no header, and '"' is just a character.
    data = b'ham\tHe said "see you at 5\nspam\t"WIN" a prize now\nham\tok "fine" then\n'
    read = ReadSettings(
        format="tsv",
        header=False,
        column_names=["label", "text"],
        quoting=False,
        label_column="label",
    )

    report, docs = run_clean(tmp_path, "a.tsv", data, read)

    assert docs["text"].tolist() == ['He said "see you at 5', '"WIN" a prize now', 'ok "fine" then']
    assert docs["label"].tolist() == ["ham", "spam", "ham"]
    assert report.input_records == 3


def test_csv_with_crlf_line_endings(tmp_path):
    data = b"text,label\r\nfirst row,a\r\nsecond row,b\r\n"
    _, docs = run_clean(tmp_path, "a.csv", data, ReadSettings(format="csv", label_column="label"))
    assert docs["text"].tolist() == ["first row", "second row"]
    assert docs["label"].tolist() == ["a", "b"]


def test_parquet_input_is_read(tmp_path):
    source = tmp_path / "in.parquet"
    pd.DataFrame({"body": ["one doc", "two docs"], "n": [1, 2]}).to_parquet(source)
    _, docs = run_clean(
        tmp_path,
        "data.parquet",
        source.read_bytes(),
        ReadSettings(format="parquet", text_column="body"),
    )
    assert docs["text"].tolist() == ["one doc", "two docs"]


def test_txt_paragraphs_are_documents_when_asked(tmp_path):
    data = b"First:\nline one\n\n  \nSecond:\r\nline two\n\n\nthird alone\n"
    read = ReadSettings(format="txt", txt_document="paragraph")

    _, docs = run_clean(tmp_path, "a.txt", data, read)

    assert docs["text"].tolist() == ["First:\nline one", "Second:\nline two", "third alone"]


def test_txt_headings_start_documents_and_text_before_the_first_is_its_own(tmp_path):
    data = b"preface\n \n = One = \n \n body one \n = = Sub = = \n more \n \n = Two = \n body two\n"
    read = ReadSettings(format="txt", txt_document="heading")

    _, docs = run_clean(tmp_path, "a.txt", data, read)

    assert docs["text"].tolist() == [
        "preface",
        "= One =\n\nbody one\n= = Sub = =\nmore",
        "= Two =\nbody two",
    ]


def test_unknown_txt_document_unit_is_refused(tmp_path):
    with pytest.raises(CorpusError, match=r"txt_document 'page' is not one of"):
        run_clean(tmp_path, "a.txt", b"x\n", ReadSettings(format="txt", txt_document="page"))


def test_hidden_files_are_ignored_when_picking_the_raw_file(tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / ".snakemake_timestamp").write_text("x")
    _, docs = run_clean(tmp_path, "a.txt", b"only doc\n")
    assert docs["text"].tolist() == ["only doc"]


# --- errors --------------------------------------------------------------------------------------


def test_empty_result_names_the_filter_that_removed_most_records(tmp_path):
    data = b"text,label\nshort,a\nshort too,b\nalso short,a\na long enough text,\n"
    read = ReadSettings(format="csv", label_column="label")

    with pytest.raises(CorpusError) as caught:
        run_clean(tmp_path, "a.csv", data, read, CleanSettings(min_chars=12))

    message = str(caught.value)
    assert "removed all 4 records" in message
    assert "{'too_short': 3, 'missing_label': 1}" in message
    assert "most went to 'too_short'" in message
    # Nothing is written for a failed stage.
    assert not (tmp_path / "corpus.parquet").exists()
    assert not (tmp_path / "report.json").exists()
    assert not (tmp_path / "manifest.json").exists()


def test_empty_file_says_it_holds_no_records(tmp_path):
    with pytest.raises(CorpusError, match=r"holds no records"):
        run_clean(tmp_path, "a.txt", b"\n  \n")


def test_missing_column_lists_the_columns_the_file_has(tmp_path):
    data = jsonl([{"question": "q", "answer": "a", "intent": "i"}])

    with pytest.raises(CorpusError) as caught:
        run_clean(tmp_path, "a.jsonl", data, ReadSettings(format="jsonl", text_column="body"))

    message = str(caught.value)
    assert "['body'] not found" in message
    assert "['question', 'answer', 'intent']" in message


def test_missing_template_and_label_columns_are_all_named(tmp_path):
    read = ReadSettings(format="jsonl", text_template="{title}: {body}", label_column="topic")
    with pytest.raises(CorpusError, match=r"\['body', 'title', 'topic'\] not found"):
        run_clean(tmp_path, "a.jsonl", jsonl([{"text": "x"}]), read)


def test_unknown_format_is_refused(tmp_path):
    with pytest.raises(CorpusError, match=r"format 'xml'"):
        run_clean(tmp_path, "a.xml", b"<a/>", ReadSettings(format="xml"))


# --- output --------------------------------------------------------------------------------------


def test_demo_corpus_output_schema_ids_and_report_agree(tmp_path):
    read = ReadSettings(format="jsonl", text_column="question", label_column="intent")
    settings = CleanSettings(strip_html=True, redact_pii=True)

    raw = gzip.decompress(DEMO_CORPUS.read_bytes())

    report, docs = run_clean(tmp_path, "support.jsonl", raw, read, settings)

    schema = pq.read_schema(tmp_path / "corpus.parquet")
    assert schema.names == ["doc_id", "text", "label"]
    # Every record is either kept or counted under exactly one filter.
    assert report.input_records == report.output_records + sum(report.removed.values())
    assert report.output_records == len(docs)
    assert docs["doc_id"].tolist() == [stable_doc_id(t) for t in docs["text"]]
    assert docs["doc_id"].is_unique
    written = json.loads((tmp_path / "report.json").read_text())
    assert written == asdict(report)
    assert json.loads((tmp_path / "manifest.json").read_text())["counts"] == written
    assert report.input_records == raw.count(b"\n")
    assert report.labels == docs["label"].value_counts().to_dict()
    assert sum(report.pii_redacted.values()) > 0  # the demo corpus does hold phone numbers
