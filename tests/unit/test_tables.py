"""The HTML pages the Snakemake report shows inline: the metrics, samples, cleaning counts and a
sweep's points as tables."""

from __future__ import annotations

from html.parser import HTMLParser

import pandas as pd

from snaketune import tables

METRICS = {
    "perplexity": 12.5,
    "bits_per_byte": 1.25,
    "test_rows": 3,
    "protocol": "windows of 128 tokens <every 127>",
    "baselines": {"kneser_ney_bigram": {"perplexity": 20.0, "method": "counted"}},
    "per_class": {"a": {"f1": 0.5}},
    "confusion_matrix": [[2, 1], [0, 3]],
    "label_names": ["a", "b"],
}


class _Tables(HTMLParser):
    """Each table's rows of cell texts (header rows included)."""

    def __init__(self):
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.in_cell = False

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self.tables[-1][-1].append("")
            self.in_cell = True

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.in_cell = False

    def handle_data(self, data):
        if self.in_cell:
            self.tables[-1][-1][-1] += data


def tables_of(page) -> list[list[list[str]]]:
    parser = _Tables()
    parser.feed(page.read_text())
    return parser.tables


def test_the_metrics_page_shows_the_headline_metrics_beside_the_baselines(tmp_path):
    page = tmp_path / "metrics.html"
    tables.metrics_page(METRICS, page)
    scores, matrix, values = tables_of(page)
    assert scores[:2] == [
        ["metric", "this model", "kneser_ney_bigram"],
        ["perplexity", "12.5", "20"],
    ]
    assert scores[2] == ["bits_per_byte", "1.25", ""]
    assert matrix[1:] == [["a", "2", "1"], ["b", "0", "3"]]
    named = dict(values[1:])
    assert named["per_class.a.f1"] == "0.5" and named["test_rows"] == "3"
    text = page.read_text()
    assert "windows of 128 tokens &lt;every 127&gt;" in text  # the protocol, escaped, as text


def test_a_csv_page_shows_every_row_and_cell_as_written(tmp_path):
    csv = tmp_path / "samples.csv"
    pd.DataFrame({"prompt": ["Q: <b>hi</b>\nA:", "x"], "f1": ["", 0.5]}).to_csv(csv, index=False)
    page = tmp_path / "samples.html"
    tables.csv_page(csv, page, "Samples")
    assert "2 rows" in page.read_text() and "&lt;b&gt;hi&lt;/b&gt;" in page.read_text()
    (shown,) = tables_of(page)
    assert shown == [["prompt", "f1"], ["Q: <b>hi</b>\nA:", ""], ["x", "0.5"]]


def test_the_counts_page_names_each_nested_count(tmp_path):
    page = tmp_path / "report.html"
    tables.counts_page({"input_records": 10, "removed": {"exact_duplicate": 2}}, page, "Cleaning")
    (shown,) = tables_of(page)
    assert shown[1:] == [["input_records", "10"], ["removed.exact_duplicate", "2"]]
