"""A stage's manifest records its inputs by digest: a manifest read as an input (the tokenize
stage's, the track job's seven) is digested without its timing, so two runs of the same
config give the same digests, and a change to what it records still shows."""

from __future__ import annotations

import json

from snaketune.manifest import StageRecord, manifest_digest


def test_an_input_manifest_is_digested_without_its_seconds_but_with_everything_else(tmp_path):
    first, second, changed = (tmp_path / n / "manifest.json" for n in ("a", "b", "c"))
    for path, seconds, rows in ((first, 1.5, 10), (second, 2.25, 10), (changed, 1.5, 11)):
        path.parent.mkdir()
        path.write_text(
            json.dumps({"stage": "tokenize", "counts": {"rows": rows}, "seconds": seconds})
        )
    assert manifest_digest(first) == manifest_digest(second) != manifest_digest(changed)
    record = StageRecord(inputs={}, params={})
    assert record.add_input("m", first, "manifest.json") == record.add_input(
        "n", second, "manifest.json"
    )
    other = tmp_path / "a" / "notes.json"
    other.write_text(first.read_text())
    assert record.add_input("o", other, "manifest.json") != manifest_digest(first)  # the bytes'
