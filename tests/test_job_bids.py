"""The bids file: read when present, refused with the file, line and field when bad.

Real local Spark over files written here.
"""

from __future__ import annotations

import numpy as np
import pytest

from jobs.bids import BidsError, read_bids

pytestmark = pytest.mark.spark


def folder_with(tmp_path, text):
    (tmp_path / "bids.csv").write_text(text)
    return str(tmp_path)


def test_no_file_means_no_bids(spark, tmp_path):
    assert read_bids(spark, str(tmp_path)) is None


def test_bids_are_read_ascending_by_ad(spark, tmp_path):
    bids = read_bids(spark, folder_with(tmp_path, "adgroup_id,bid\n9,0.5\n3, 1.25\n7,2\n"))
    assert bids is not None
    assert bids.ad_ids.tolist() == [3, 7, 9]
    assert bids.bids.tolist() == [1.25, 2.0, 0.5]
    kept = bids.of_ads(np.array([7, 9, 11]))
    assert kept.ad_ids.tolist() == [7, 9] and kept.bids.tolist() == [2.0, 0.5]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("adgroup,bid\n1,0.5\n", ["line 1", "'adgroup,bid'", "adgroup_id,bid"]),
        ("", ["empty", "adgroup_id,bid"]),
        ("adgroup_id,bid\n1,0.5\n2,abc\n", ["line 3", "field bid", "'abc'", "positive number"]),
        ("adgroup_id,bid\n1,0\n", ["line 2", "field bid", "'0'"]),
        ("adgroup_id,bid\n1,inf\n", ["line 2", "field bid", "'inf'"]),
        ("adgroup_id,bid\n1,NaN\n", ["line 2", "field bid"]),
        ("adgroup_id,bid\nx1,0.5\n", ["line 2", "field adgroup_id", "'x1'", "positive id"]),
        ("adgroup_id,bid\n-4,0.5\n", ["line 2", "field adgroup_id", "'-4'"]),
        ("adgroup_id,bid\n1,0.5,7\n", ["line 2", "has 3 fields", "expected 2"]),
        (
            "adgroup_id,bid\n1,0.5\n2,0.6\n1,0.7\n",
            ["field adgroup_id", "1 is listed 2 times", "lines 2, 4"],
        ),
        (
            "adgroup_id,bid\n" + "".join(f"{n},bad\n" for n in range(1, 8)),
            ["line 2", "line 3", "line 4", "and 4 more bad rows"],
        ),
    ],
)
def test_a_bad_file_names_file_line_and_field(spark, tmp_path, text, expected):
    with pytest.raises(BidsError) as refused:
        read_bids(spark, folder_with(tmp_path, text))
    message = str(refused.value)
    assert "bids.csv" in message
    for part in expected:
        assert part in message, message


def test_lines_are_numbered_in_file_order_across_partitions(spark, tmp_path):
    rows = "".join(f"{n},1.5\n" for n in range(1, 2001))
    folder = folder_with(tmp_path, "adgroup_id,bid\n" + rows + "2001,-1\n")
    spark.conf.set("spark.sql.files.maxPartitionBytes", "4096")
    try:
        assert spark.read.text(folder + "/bids.csv").rdd.getNumPartitions() > 3
        with pytest.raises(BidsError, match=r"line 2002, field bid"):
            read_bids(spark, folder)
    finally:
        spark.conf.unset("spark.sql.files.maxPartitionBytes")
