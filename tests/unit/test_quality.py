"""Quality filters: each measures what it says, is off by default, removes only what fails it,
and counts its removals under its own name in the cleaning report."""

from __future__ import annotations

import json

import pytest

from snaketune.data.quality import (
    alpha_ratio,
    mean_word_length,
    quality_problem,
    repeated_line_fraction,
)
from snaketune.data.settings import CleanSettings, ReadSettings
from tests.support.stage_data import run_clean

PROSE = "The parcel arrived on Monday, two days late, but nothing inside was broken."
TABLE = "| 2019 | 1,204 | 3.5% |\n| 2020 | 1,377 | 4.1% |\n| 2021 | 1,590 | 4.9% |"
MENU = "Home\nProducts\nContact\nHome\nProducts\nContact\nHome\nProducts\nContact\nAbout us"
SHREDDED = "a b c d e f g h i j k l m n o p"
RUN_TOGETHER = "thisisalongrunoftextwithoutanyspacesinitwhatsoever andsoonandsoforth"


# --- measures ------------------------------------------------------------------------------------


def test_alpha_ratio_counts_letters_of_any_script_among_visible_characters():
    assert alpha_ratio("abc 123") == pytest.approx(0.5)
    assert alpha_ratio("Ελληνικά") == 1.0
    assert alpha_ratio("   ") == 0.0


def test_repeated_line_fraction_counts_lines_that_repeat_an_earlier_one():
    assert repeated_line_fraction("a\nb\na\na") == pytest.approx(0.5)
    assert repeated_line_fraction("one line") == 0.0
    assert repeated_line_fraction("a\n\n\nb") == 0.0  # blank lines are not lines of text


def test_mean_word_length():
    assert mean_word_length("ab abcd") == 3.0
    assert mean_word_length("") == 0.0


# --- filters -------------------------------------------------------------------------------------


def test_every_filter_is_off_by_default():
    for text in (PROSE, TABLE, MENU, SHREDDED, RUN_TOGETHER):
        assert quality_problem(text, CleanSettings()) is None


@pytest.mark.parametrize(
    ("settings", "bad", "reason"),
    [
        (CleanSettings(min_alpha_ratio=0.7), TABLE, "low_alpha_ratio"),
        (CleanSettings(max_repeated_line_fraction=0.3), MENU, "repeated_lines"),
        (CleanSettings(min_mean_word_length=3), SHREDDED, "short_words"),
        (CleanSettings(max_mean_word_length=10), RUN_TOGETHER, "long_words"),
    ],
    ids=["alpha", "repeated", "short", "long"],
)
def test_each_filter_removes_only_what_fails_it_and_counts_it(tmp_path, settings, bad, reason):
    records = [PROSE, bad, PROSE.replace("Monday", "Tuesday")]
    data = "".join(json.dumps({"text": t}) + "\n" for t in records).encode()

    report, docs = run_clean(tmp_path, "docs.jsonl", data, ReadSettings(format="jsonl"), settings)

    assert docs["text"].tolist() == [records[0], records[2]]
    assert report.removed == {reason: 1}
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["removed"] == {reason: 1}
    assert saved["output_records"] == 2


def test_filters_run_after_cleaning_so_stripped_markup_does_not_count(tmp_path):
    html = "<p><b>" + PROSE + "</b></p>"
    data = (json.dumps({"text": html}) + "\n").encode()
    settings = CleanSettings(strip_html=True, min_alpha_ratio=0.75)

    report, docs = run_clean(tmp_path, "docs.jsonl", data, ReadSettings(format="jsonl"), settings)

    assert docs["text"].tolist() == [PROSE] and report.removed == {}
