"""The data stages on the real public files (../shared/data), served over HTTP on 127.0.0.1 and
fetched as config.yaml's presets define them (their sha256 included; only the host differs):
download verifies the digest, clean reads every row with the right labels, and split removes
near-copies and keeps the rest. Counts are those the data's README documents."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from snaketune.data.clean import clean_corpus
from snaketune.data.download import download_dataset
from snaketune.data.paths import CleanPaths, DownloadPaths, SplitPaths
from snaketune.data.reading import read_records
from snaketune.data.settings import (
    CleanJob,
    CleanSettings,
    DatasetSettings,
    DownloadSettings,
    SplitSettings,
    read_settings_for,
)
from snaketune.data.split import split_corpus
from snaketune.names import SPLITS
from tests.support.repo import REPO, SHARED_DATA
from tests.support.workflow import layered

pytestmark = [
    pytest.mark.slow,  # ~6 s for all of them
    pytest.mark.skipif(
        not SHARED_DATA.is_dir(), reason=f"the real data files are not at {SHARED_DATA}"
    ),
]


@dataclass(frozen=True)
class Case:
    preset: str
    """A dataset of config.yaml's catalog."""
    file: str
    """The same file under ../shared/data."""
    settings_from: str
    """The presets/*.yaml whose experiment's task, template, clean and split settings apply."""
    rows: int
    """Records in the file, as the data's README counts them."""
    labels: dict[str, int] = field(default_factory=dict)
    lines: int | None = None
    """Lines of a plain-text file, as the data's README counts them."""
    stages: tuple[str, ...] = ("clean", "split")


CASES = [
    Case(
        "sms-spam",
        "sms_spam_collection/SMSSpamCollection",
        "sms-spam",
        5574,
        {"ham": 4827, "spam": 747},
    ),
    Case(
        "ag-news", "ag_news/test.csv", "ag-news", 7600, {"1": 1900, "2": 1900, "3": 1900, "4": 1900}
    ),
    Case("sst2-dev", "sst2/dev.tsv", "sst2", 872, {"0": 428, "1": 444}),
    # The 67,349-row train file is only downloaded and read here: the split of ~50k phrases is
    # what the near-duplicate timing in the README measures.
    Case("sst2", "sst2/train.tsv", "sst2", 67349, {"0": 29780, "1": 37569}, stages=()),
    # Documents of plain text: speeches, and the 60 articles of WikiText-2's validation split.
    Case("tiny-shakespeare", "tinyshakespeare/input.txt", "tiny-shakespeare", 7222, lines=40000),
    Case("wikitext-2-valid", "wikitext-2/valid.txt", "wikitext-2", 60, lines=3760),
]


def preset_experiment(name: str) -> dict:
    """The first experiment of presets/<name>.yaml, layered on config.yaml, defaults filled."""
    return layered(REPO / "presets" / f"{name}.yaml")["experiments"][0]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.preset)
def test_preset_downloads_verifies_and_prepares_the_real_file(case, origin, tmp_path):
    preset = yaml.safe_load((REPO / "config.yaml").read_text())["datasets"][case.preset]
    experiment = preset_experiment(case.settings_from)
    body = (SHARED_DATA / case.file).read_bytes()
    if case.lines is not None:
        assert body.count(b"\n") == case.lines
    url = origin.serve("/" + case.file, body)

    # The preset's own sha256: a mismatch would fail here.
    raw = tmp_path / "download" / "files"
    target = DownloadPaths(raw, tmp_path / "d.json")
    files = download_dataset(target, DownloadSettings(url, preset["sha256"]))
    assert files == [Path(case.file).name]

    dataset = DatasetSettings(**preset)
    read = read_settings_for(dataset, experiment["task"], experiment["text_template"])
    frame, replaced = read_records(raw / files[0], read)
    assert (len(frame), replaced) == (case.rows, 0)
    if case.labels:
        assert frame[read.label_column].value_counts().to_dict() == case.labels
    if "clean" in case.stages:
        check_clean_and_split(raw, tmp_path, read, experiment, case)


def check_clean_and_split(raw: Path, out: Path, read, experiment: dict, case: Case) -> None:
    corpus = out / "clean" / "corpus.parquet"
    clean = CleanPaths(raw, corpus, out / "clean" / "report.json", out / "clean" / "manifest.json")
    report = clean_corpus(clean, CleanJob(read, CleanSettings(**experiment["clean"])))
    assert report.input_records == case.rows
    assert report.output_records == case.rows - sum(report.removed.values()) > 0
    if case.labels:
        assert sum(report.labels.values()) == report.output_records
        assert report.labels.keys() == case.labels.keys()

    paths = {name: out / "split" / f"{name}.parquet" for name in SPLITS}
    split = SplitPaths(corpus, **paths, manifest=out / "split" / "manifest.json")
    counts = split_corpus(split, SplitSettings(**experiment["split"]))
    manifest = json.loads((out / "split" / "manifest.json").read_text())
    removed = manifest["counts"]["near_duplicates_removed"]
    dropped = sum(n for by_kept in removed.values() for n in by_kept.values())
    assert sum(counts.values()) + dropped == report.output_records
    assert all(counts[name] > 0 for name in SPLITS)
