"""Each real dataset's format, read as its preset in config.yaml says: a few lines copied byte for
byte from the real files (tests/fixtures/real_formats) give the right columns, labels and
documents, quirks included."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml

from snaketune.data.clean import clean_corpus
from snaketune.data.paths import CleanPaths
from snaketune.data.reading import compose_texts, read_records
from snaketune.data.settings import CleanJob, DatasetSettings, read_settings_for
from tests.support.repo import REPO

FIXTURES = REPO / "tests" / "fixtures" / "real_formats"
CATALOG = yaml.safe_load((REPO / "config.yaml").read_text())["datasets"]


def read_as_preset(fixture: str, preset: str, task: str = "sequence_classification"):
    settings = read_settings_for(DatasetSettings(**CATALOG[preset]), task, None)
    frame, replaced = read_records(FIXTURES / fixture, settings)
    assert replaced == 0
    return frame, settings


def clean_as_preset(tmp_path: Path, fixture: str, preset: str, task: str) -> pd.DataFrame:
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / fixture).write_bytes((FIXTURES / fixture).read_bytes())
    read = read_settings_for(DatasetSettings(**CATALOG[preset]), task, None)
    out = tmp_path / "corpus.parquet"
    clean_corpus(
        CleanPaths(raw, out, tmp_path / "report.json", tmp_path / "m.json"), CleanJob(read)
    )
    return pd.read_parquet(out)


def test_sst2_header_labels_and_the_space_before_each_tab(tmp_path):
    frame, _ = read_as_preset("sst2_dev.tsv", "sst2-dev")

    assert list(frame.columns) == ["sentence", "label"] and len(frame) == 6
    assert frame["label"].tolist() == ["1", "0", "1", "1", "0", "1"]
    assert frame["sentence"][0] == "it 's a charming and often affecting journey . "
    docs = clean_as_preset(tmp_path, "sst2_dev.tsv", "sst2-dev", "sequence_classification")
    assert docs["text"][0] == "it 's a charming and often affecting journey ."


def test_ag_news_quoted_fields_without_header():
    frame, settings = read_as_preset("ag_news_test.csv", "ag-news")

    assert list(frame.columns) == ["class", "title", "description"] and len(frame) == 7
    assert frame["class"].tolist() == ["3", "4", "4", "4", "4", "2", "1"]
    assert frame["title"][0] == "Fears for T N pension after talks"
    assert 'a ""Music Manifesto"" campaign' not in frame["description"][2]
    assert 'a "Music Manifesto" campaign' in frame["description"][2]  # "" is one quote
    assert "A second\\team of rocketeers" in frame["description"][1]  # backslash kept as is
    assert settings.text_column == "description"


def test_ag_news_title_and_description_join_through_a_template():
    settings = read_settings_for(
        DatasetSettings(**CATALOG["ag-news"]), "sequence_classification", "{title}\n{description}"
    )
    frame, _ = read_records(FIXTURES / "ag_news_test.csv", settings)

    texts = compose_texts(frame, settings)
    assert texts[5].startswith("Giddy Phelps Touches Gold for First Time\nMichael Phelps won")


def test_sms_spam_keeps_unbalanced_quotes_inside_messages():
    frame, _ = read_as_preset("SMSSpamCollection", "sms-spam")

    assert list(frame.columns) == ["label", "text"] and len(frame) == 7
    assert frame["label"].value_counts().to_dict() == {"ham": 4, "spam": 3}
    assert frame["text"][5] == (
        'Did you hear about the new "Divorce Barbie"? It comes with all of Ken\'s stuff!'
    )
    assert 'so happy about "the cave". I\'m sorry' in frame["text"][3]


def test_wikitext_articles_start_at_top_level_headings_only():
    frame, _ = read_as_preset("wikitext2.txt", "wikitext-2-valid", "causal_lm")

    assert list(frame.columns) == ["text"] and len(frame) == 2
    first, second = frame["text"]
    assert first.startswith(" = Homarus gammarus = \n")
    assert " = = Description = = " in first
    assert " = 1 <unk> / s and a nominal <unk> k = " in first  # a formula line, not a heading
    assert second.startswith(" = The <unk> = \n")


def test_tiny_shakespeare_speeches_are_documents(tmp_path):
    frame, _ = read_as_preset("tinyshakespeare.txt", "tiny-shakespeare", "causal_lm")

    assert len(frame) == 6
    assert frame["text"][0] == "First Citizen:\nBefore we proceed any further, hear me speak."
    assert frame["text"][1] == "All:\nSpeak, speak."
    docs = clean_as_preset(tmp_path, "tinyshakespeare.txt", "tiny-shakespeare", "causal_lm")
    assert docs["text"].tolist() == frame["text"].tolist()


@pytest.mark.parametrize("preset", ["sst2", "ag-news", "sms-spam"])
def test_classification_presets_name_a_label_column(preset):
    assert read_settings_for(
        DatasetSettings(**CATALOG[preset]), "sequence_classification", None
    ).label_column
    assert (
        read_settings_for(DatasetSettings(**CATALOG[preset]), "causal_lm", None).label_column
        is None
    )
