"""HTML pages of the stages' tables for the Snakemake report: it shows an HTML item inline and
any other file (JSON, CSV) only as a link to download. Each stage writes its page beside the
file it renders, from the same values; the JSON and CSV stay the files to read by program."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from snaketune.fileio import atomic_path

STYLE = """<style>
body { font-family: sans-serif; font-size: 14px; margin: 1em; }
table { border-collapse: collapse; margin-bottom: 1.5em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td { white-space: pre-wrap; max-width: 40em; }
</style>"""
PROTOCOLS = ("protocol", "answer_protocol")
"""metrics.json's sentences on how its numbers were measured (shown as text, not in a cell)."""


def _leaves(values: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Every scalar of a nested dict under its dotted name (lists are shown elsewhere)."""
    rows: list[tuple[str, Any]] = []
    for key, value in values.items():
        if isinstance(value, dict):
            rows += _leaves(value, f"{prefix}{key}.")
        elif not isinstance(value, list):
            rows.append((f"{prefix}{key}", value))
    return rows


def _cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _row(tag: str, cells: list[Any]) -> str:
    return "<tr>" + "".join(f"<{tag}>{html.escape(str(c))}</{tag}>" for c in cells) + "</tr>"


def html_table(head: list[str], rows: list[list[Any]]) -> str:
    """Cells escaped and kept as written (pandas' to_html would show a newline as '\\n')."""
    lines = [_row("th", head), *(_row("td", row) for row in rows)]
    return "<table>\n" + "\n".join(lines) + "\n</table>"


def key_value_table(values: dict[str, Any], head: tuple[str, str]) -> str:
    return html_table(list(head), [[name, _cell(value)] for name, value in _leaves(values)])


def write_page(out: Path, title: str, sections: list[tuple[str, str]]) -> None:
    """A page of (heading, HTML) sections; the headings are escaped, the HTML is not."""
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'>{STYLE}</head><body>"]
    parts.append(f"<h2>{html.escape(title)}</h2>")
    for heading, body in sections:
        parts.append(f"<h3>{html.escape(heading)}</h3>\n{body}")
    parts.append("</body></html>\n")
    with atomic_path(out) as tmp:
        tmp.write_text("\n".join(parts), encoding="utf-8")


def scores_table(metrics: dict[str, Any]) -> str:
    """The headline metrics beside each baseline's on the same test split."""
    from snaketune.track.model_card import HEADLINE, headline

    ours, baselines = headline(metrics), metrics.get("baselines") or {}
    names = [k for k in HEADLINE if k in ours]
    rows = [
        [name, _cell(ours[name]), *(_cell(b.get(name, "")) for b in baselines.values())]
        for name in names
    ]
    return html_table(["metric", "this model", *baselines], rows)


def metrics_page(metrics: dict[str, Any], out: Path) -> None:
    """metrics.json as tables: the headline metrics and baselines, the confusion matrix, every
    other value; with the protocol it was measured by."""
    sections = [("Headline metrics and baselines (test split)", scores_table(metrics))]
    protocols = [html.escape(str(metrics[k])) for k in PROTOCOLS if k in metrics]
    sections.append(("Protocol", "".join(f"<p>{text}</p>" for text in protocols) or "n/a"))
    if metrics.get("confusion_matrix"):
        matrix = metrics["confusion_matrix"]
        labels = metrics.get("label_names") or [str(i) for i in range(len(matrix))]
        rows = [[label, *row] for label, row in zip(labels, matrix, strict=True)]
        heading = "Confusion matrix (rows: true label, columns: prediction)"
        sections.append((heading, html_table(["", *labels], rows)))
    rest = {k: v for k, v in metrics.items() if k not in PROTOCOLS}
    sections.append(("Every value", key_value_table(rest, ("name", "value"))))
    write_page(out, "Held-out metrics", sections)


def csv_page(table: Path, out: Path, title: str) -> None:
    """A CSV file (samples, a sweep's points) as one table, cells as written."""
    import pandas as pd

    frame = pd.read_csv(table, keep_default_na=False, dtype=str)
    shown = html_table(list(frame.columns), frame.values.tolist())
    write_page(out, title, [(f"{len(frame)} rows", shown)])


def counts_page(counts: dict[str, Any], out: Path, title: str) -> None:
    """A stage's counts (the cleaning report) as a table of name and count."""
    write_page(out, title, [("Counts", key_value_table(counts, ("count", "value")))])
