"""The Taobao display-ad data set's published format: file names, headers, value domains, days.

Declared once here, without pyspark, so the batch job's loaders, the synthetic generator
and the checks on either all read the same definitions.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from typing import Literal

CHINA_TIME = timezone(timedelta(hours=8), "UTC+8")
CHINA_UTC_OFFSET_SECONDS = 8 * 3600
SECONDS_PER_DAY = 86_400

# raw_sample covers 8 China-time days; the last one is the standard test day.
SAMPLE_FIRST_DAY = date(2017, 5, 6)
TEST_DAY = date(2017, 5, 13)
#: The standard split (China-time days, inclusive): the first seven sample days train, the
#: eighth tests. Everything that trains or evaluates uses this one definition.
TRAIN_DAYS = (SAMPLE_FIRST_DAY, TEST_DAY - timedelta(days=1))
Split = Literal["train", "test"]
# behavior_log covers the 22 China-time days that end with the sample window.
BEHAVIOR_FIRST_DAY = date(2017, 4, 22)

PIDS = ("430548_1007", "430539_1007")
BTAGS = ("pv", "cart", "fav", "buy")
NULL_BRAND = "NULL"

Format = Literal["csv", "parquet"]
FORMATS: tuple[Format, ...] = ("csv", "parquet")

# Every reason a row can be rejected for, in the order they are checked and reported.
REJECT_REASONS = (
    "wrong_field_count",
    "non_numeric_id",
    "negative_id",
    "bad_timestamp",
    "unknown_pid",
    "unknown_btag",
    "bad_label",
    "non_numeric_value",
    "negative_price",
    "out_of_domain",
)

ColumnKind = Literal["id", "brand", "timestamp", "label", "pid", "btag", "price", "level"]


@dataclass(frozen=True)
class ColumnSpec:
    """One published column: its header name, normalized name and validation rule."""

    source: str
    name: str
    kind: ColumnKind
    # Inclusive bounds for "level" columns; None means any non-negative integer.
    domain: tuple[int, int] | None = None
    # Whether an empty field means "missing" (kept as null) rather than a bad row.
    optional: bool = False


@dataclass(frozen=True)
class TableFormat:
    name: str
    columns: tuple[ColumnSpec, ...]

    @property
    def header(self) -> str:
        """The exact published header line, without the line break."""
        return ",".join(column.source for column in self.columns)

    @property
    def csv_file(self) -> str:
        return f"{self.name}.csv"

    def file_name(self, data_format: Format) -> str:
        return f"{self.name}.{data_format}"


RAW_SAMPLE = TableFormat(
    "raw_sample",
    (
        ColumnSpec("user", "user_id", "id"),
        ColumnSpec("time_stamp", "time_stamp", "timestamp"),
        ColumnSpec("adgroup_id", "adgroup_id", "id"),
        ColumnSpec("pid", "pid", "pid"),
        ColumnSpec("nonclk", "nonclk", "label"),
        ColumnSpec("clk", "clk", "label"),
    ),
)
AD_FEATURE = TableFormat(
    "ad_feature",
    (
        ColumnSpec("adgroup_id", "adgroup_id", "id"),
        ColumnSpec("cate_id", "cate_id", "id"),
        ColumnSpec("campaign_id", "campaign_id", "id"),
        ColumnSpec("customer", "customer_id", "id"),
        ColumnSpec("brand", "brand_id", "brand"),
        ColumnSpec("price", "price", "price"),
    ),
)
USER_PROFILE = TableFormat(
    "user_profile",
    (
        ColumnSpec("userid", "user_id", "id"),
        ColumnSpec("cms_segid", "cms_segid", "level", (0, 96), optional=True),
        ColumnSpec("cms_group_id", "cms_group_id", "level", (0, 12), optional=True),
        ColumnSpec("final_gender_code", "gender", "level", (1, 2), optional=True),
        ColumnSpec("age_level", "age_level", "level", (0, 6), optional=True),
        ColumnSpec("pvalue_level", "pvalue_level", "level", (1, 3), optional=True),
        ColumnSpec("shopping_level", "shopping_level", "level", (1, 3), optional=True),
        ColumnSpec("occupation", "occupation", "level", (0, 1), optional=True),
        # The published header really has a trailing space in this last name.
        ColumnSpec("new_user_class_level ", "new_user_class_level", "level", (1, 4), optional=True),
    ),
)
BEHAVIOR_LOG = TableFormat(
    "behavior_log",
    (
        ColumnSpec("user", "user_id", "id"),
        ColumnSpec("time_stamp", "time_stamp", "timestamp"),
        ColumnSpec("btag", "btag", "btag"),
        ColumnSpec("cate", "cate_id", "id"),
        ColumnSpec("brand", "brand_id", "brand"),
    ),
)
#: Profile fields stored per user, in storage order (see codecs.UserFeatures); the profile's
#: columns but ``user_id``.
USER_PROFILE_FIELDS = (
    "cms_segid",
    "cms_group_id",
    "gender",
    "age_level",
    "pvalue_level",
    "shopping_level",
    "occupation",
    "new_user_class_level",
)
TABLES: dict[str, TableFormat] = {
    table.name: table for table in (RAW_SAMPLE, AD_FEATURE, USER_PROFILE, BEHAVIOR_LOG)
}

#: Side file the synthetic generator writes next to raw_sample: each sample's true click
#: probability, so the job can report the oracle AUC. The real data set has none.
TRUTH_FILE = "raw_sample_truth.csv"
#: What the synthetic generator planted (preset, seed, counts), next to the four files.
MANIFEST_FILE = "manifest.json"
#: Optional file of advertiser bids per adgroup (a price per click), next to the four
#: files: a header line, then one ``adgroup_id,bid`` row per ad with a bid. The real data
#: set has none; without it a version has no bids.
BIDS_FILE = "bids.csv"
BIDS_HEADER = "adgroup_id,bid"


def china_day(time_stamp: int) -> date:
    """The China-time (UTC+8) calendar day of a Unix timestamp in seconds."""
    return datetime.fromtimestamp(time_stamp, CHINA_TIME).date()


def split_of(day: date) -> Split | None:
    """The side of the standard split a China-time day's samples fall on; None outside it."""
    if TRAIN_DAYS[0] <= day <= TRAIN_DAYS[1]:
        return "train"
    return "test" if day == TEST_DAY else None
