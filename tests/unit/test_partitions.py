"""How the tokenize stage cuts splits into partitions: row ranges that cover every row once, the
"auto" size rule, and reading exactly a range's rows across row groups."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from snaketune.tokenize.partition import read_row_range
from snaketune.tokenize.plan import (
    auto_partition_count,
    fixed_partition_counts,
    partition_names,
    plan_splits,
    row_ranges,
)


@pytest.mark.parametrize(("rows", "count"), [(10, 3), (7, 7), (3, 5), (0, 2), (100_003, 1000)])
def test_row_ranges_cover_every_row_once_in_near_equal_parts(rows, count):
    ranges = row_ranges(rows, count)
    sizes = [end - start for start, end in ranges]

    assert len(ranges) == count
    assert ranges[0][0] == 0 and ranges[-1][1] == rows
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
    assert max(sizes) - min(sizes) <= 1


def test_auto_count_is_one_per_target_bytes_rounded_up_within_one_and_the_row_count():
    assert auto_partition_count(rows=1000, text_bytes=0, target_bytes=100) == 1
    assert auto_partition_count(rows=1000, text_bytes=100, target_bytes=100) == 1
    assert auto_partition_count(rows=1000, text_bytes=101, target_bytes=100) == 2
    assert auto_partition_count(rows=3, text_bytes=10_000, target_bytes=100) == 3
    assert auto_partition_count(rows=0, text_bytes=0, target_bytes=100) == 1


def write_split(path: Path, rows: int, row_group_rows: int) -> Path:
    texts = [f"document {i} " + "word " * (i % 13) for i in range(rows)]
    frame = pd.DataFrame({"doc_id": [f"{i:04d}" for i in range(rows)], "text": texts})
    frame.to_parquet(path, index=False, row_group_size=row_group_rows)
    return path


def test_a_fixed_count_cuts_train_and_keeps_val_and_test_whole(tmp_path):
    splits = {name: write_split(tmp_path / f"{name}.parquet", 50, 8) for name in ("train", "val")}

    plans = plan_splits(splits, partitions=4)

    assert fixed_partition_counts(4) == {"train": 4, "val": 1, "test": 1}
    assert plans["train"].ranges == [(0, 12), (12, 25), (25, 37), (37, 50)]
    assert plans["val"].ranges == [(0, 50)]


def test_auto_sizes_each_split_by_its_text_bytes(tmp_path):
    splits = {
        "train": write_split(tmp_path / "train.parquet", 400, 64),
        "val": write_split(tmp_path / "val.parquet", 40, 64),
    }

    plans = plan_splits(splits, partitions="auto", target_bytes=4000)

    assert fixed_partition_counts("auto") is None
    for plan in plans.values():
        assert plan.text_bytes > 0
        assert len(plan.ranges) == -(-plan.text_bytes // 4000)
    assert len(plans["train"].ranges) > len(plans["val"].ranges) >= 1


@pytest.mark.parametrize(("start", "end"), [(0, 100), (5, 6), (7, 8), (13, 61), (95, 100), (9, 9)])
def test_read_row_range_yields_exactly_the_rows_asked_for(tmp_path, start, end):
    split = write_split(tmp_path / "train.parquet", 100, row_group_rows=8)

    batches = list(read_row_range(split, start, end, ["doc_id"], batch_rows=5))
    ids = [i for b in batches for i in b.column("doc_id").to_pylist()]

    assert ids == [f"{i:04d}" for i in range(start, end)]
    assert all(0 < b.num_rows <= 5 for b in batches)


def test_partition_names_sort_in_row_order():
    names = partition_names({"train": 12, "val": 1})

    assert names[:3] == [("train", "00000"), ("train", "00001"), ("train", "00002")]
    assert names[-1] == ("val", "00000")
    assert [p for s, p in names if s == "train"] == sorted(p for s, p in names if s == "train")
