"""Load the four Taobao display-ad files exactly as published, quirks included.

Every loader reads its file as raw lines (CSV) or as columns (Parquet), checks the header
against the published one (:mod:`adrec.core.dataset`), and classifies each row with at
most one ``reject_reason``. A single aggregation over the classified rows yields the total
and the per-reason rejected counts (plus one example row per reason), so one bad row never
crashes a load and never vanishes silently. Clean rows come out with normalized column
names and explicit types.

The job loads with a ``staging`` folder: the classified rows are written there once as
Parquet, typed and compressed, and everything after (the counts, every later stage) reads
that copy. Nothing is cached in memory, so the load's memory does not grow with the
input, and the text is parsed once however often later stages read a table.

Lines are split on ``,`` rather than parsed by Spark's CSV reader because that reader
silently pads or truncates rows with the wrong number of fields; the published files never
quote a field, so splitting is exact.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypedDict, Unpack

from pyspark.errors import AnalysisException
from pyspark.sql import Column as SparkColumn
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as sf
from pyspark.sql import types as st

from adrec.core.dataset import (
    AD_FEATURE,
    BEHAVIOR_LOG,
    BTAGS,
    CHINA_UTC_OFFSET_SECONDS,
    FORMATS,
    NULL_BRAND,
    PIDS,
    RAW_SAMPLE,
    REJECT_REASONS,
    SECONDS_PER_DAY,
    TABLES,
    TEST_DAY,
    TRAIN_DAYS,
    USER_PROFILE,
    ColumnKind,
    ColumnSpec,
    Format,
    TableFormat,
)

log = logging.getLogger(__name__)

_SPARK_TYPE_BY_KIND: Mapping[ColumnKind, str] = {
    "id": "int",
    "brand": "int",
    "timestamp": "bigint",
    "label": "int",
    "pid": "string",
    "btag": "string",
    "price": "double",
    "level": "int",
}


class IngestError(Exception):
    """A file cannot be loaded at all: missing, empty, or not in the published format."""


#: Characters of a rejected row kept as its reason's example.
EXAMPLE_CHARS = 200


@dataclass
class LoadResult:
    """The clean rows of one table and an account of every rejected row."""

    table: str
    source: str
    data: DataFrame
    total_rows: int
    rejected: dict[str, int] = field(default_factory=dict)
    # One offending input row per reason, for reports.
    examples: dict[str, str] = field(default_factory=dict)

    @property
    def rejected_rows(self) -> int:
        return sum(self.rejected.values())

    @property
    def clean_rows(self) -> int:
        return self.total_rows - self.rejected_rows

    def report_lines(self) -> list[str]:
        lines = [
            f"{self.table}: {self.total_rows:,} rows, {self.clean_rows:,} clean, "
            f"{self.rejected_rows:,} rejected ({self.source})"
        ]
        lines += [
            f"  {reason}: {count:,} (e.g. {self.examples.get(reason, '')!r})"
            for reason, count in self.rejected.items()
        ]
        return lines


def output_schema(table: TableFormat) -> st.StructType:
    """The StructType of a loader's clean output (plus ``event_day`` for raw_sample).

    ``nullable`` marks the columns that can hold nulls in clean rows (missing brand and
    profile fields); Spark itself flags every loaded column as nullable.
    """

    spark_types = {
        "int": st.IntegerType(),
        "bigint": st.LongType(),
        "double": st.DoubleType(),
        "string": st.StringType(),
    }
    fields = [
        st.StructField(
            column.name,
            spark_types[_SPARK_TYPE_BY_KIND[column.kind]],
            nullable=column.optional or column.kind == "brand",
        )
        for column in table.columns
    ]
    if table is RAW_SAMPLE:
        fields.append(st.StructField("event_day", st.DateType(), nullable=False))
    return st.StructType(fields)


def event_day_column(time_stamp: SparkColumn) -> SparkColumn:
    """China-time calendar day of a Unix-seconds column, independent of the session time zone."""

    china_days = sf.floor((time_stamp + CHINA_UTC_OFFSET_SECONDS) / SECONDS_PER_DAY)
    return sf.date_from_unix_date(china_days.cast("int"))


def in_training_days(day: SparkColumn) -> SparkColumn:
    """Whether a China-time day column falls in the standard split's training days."""
    return day.between(sf.lit(TRAIN_DAYS[0]), sf.lit(TRAIN_DAYS[1]))


def on_test_day(day: SparkColumn) -> SparkColumn:
    return day == sf.lit(TEST_DAY)


def split_by_day(samples: DataFrame) -> tuple[DataFrame, DataFrame]:
    """(train, test) of the standard split (:func:`adrec.core.dataset.split_of`)."""
    day = sf.col("event_day")
    return samples.filter(in_training_days(day)), samples.filter(on_test_day(day))


def dataset_path(base: str, table: TableFormat, data_format: Format = "csv") -> str:
    """Path or URI of a table's file under a data directory or URI prefix."""
    return f"{base.rstrip('/')}/{table.file_name(data_format)}"


def load_table(
    spark: SparkSession,
    table: TableFormat,
    path: str,
    *,
    data_format: Format = "csv",
    staging: str | None = None,
) -> LoadResult:
    """Load one published table from ``path`` (local path or any URI Spark reads).

    With ``staging`` (a folder every executor can reach) the classified rows are written
    there as Parquet in the only pass over the source; without it every use of ``data``
    parses the source again, which suits one-off inspection.
    """

    if data_format not in FORMATS:
        raise IngestError(f"{table.name}: unknown format {data_format!r}; use csv or parquet")
    fields, raw_row, field_count_ok = (
        _csv_fields(spark, table, path)
        if data_format == "csv"
        else _parquet_fields(spark, table, path)
    )
    values, reasons = _typed_values_and_reasons(table, fields)
    reason = sf.coalesce(sf.when(~field_count_ok, sf.lit("wrong_field_count")), *reasons)
    classified = fields.select(
        *(values[column.name].alias(column.name) for column in table.columns),
        reason.alias("reject_reason"),
        # A junk line can be megabytes long: reports show its start only.
        sf.when(reason.isNotNull(), sf.substring(raw_row, 1, EXAMPLE_CHARS)).alias("rejected_row"),
    )
    if staging is not None:
        staged = f"{staging.rstrip('/')}/{table.name}.parquet"
        classified.write.mode("overwrite").parquet(staged)
        classified = spark.read.parquet(staged)

    summary = (
        classified.groupBy("reject_reason")
        .agg(
            sf.count(sf.lit(1)).alias("rows"),
            sf.first("rejected_row", ignorenulls=True).alias("example"),
        )
        .collect()
    )
    total_rows = sum(row["rows"] for row in summary)
    by_reason = {row["reject_reason"]: row for row in summary if row["reject_reason"] is not None}
    rejected = {
        reason: by_reason[reason]["rows"] for reason in REJECT_REASONS if reason in by_reason
    }
    examples = {reason: by_reason[reason]["example"] for reason in rejected}

    clean = classified.filter(sf.col("reject_reason").isNull()).select(
        *(column.name for column in table.columns)
    )
    if table is RAW_SAMPLE:
        clean = clean.withColumn("event_day", event_day_column(sf.col("time_stamp")))
    result = LoadResult(
        table.name,
        path,
        clean,
        total_rows,
        rejected,
        examples,
    )
    if rejected:
        log.warning("%s", "\n".join(result.report_lines()))
    return result


def write_published_parquet(result: LoadResult, table: TableFormat, path: str) -> None:
    """The clean rows of a load as Parquet in the published layout (CSV header names)."""
    result.data.select(
        *(sf.col(column.name).alias(column.source) for column in table.columns)
    ).write.mode("overwrite").parquet(path)


class LoadOptions(TypedDict, total=False):
    """The keyword options of :func:`load_table` the per-table loaders pass on."""

    data_format: Format
    staging: str | None


def load_raw_sample(spark: SparkSession, path: str, **options: Unpack[LoadOptions]) -> LoadResult:
    return load_table(spark, RAW_SAMPLE, path, **options)


def load_ad_feature(spark: SparkSession, path: str, **options: Unpack[LoadOptions]) -> LoadResult:
    return load_table(spark, AD_FEATURE, path, **options)


def load_user_profile(spark: SparkSession, path: str, **options: Unpack[LoadOptions]) -> LoadResult:
    return load_table(spark, USER_PROFILE, path, **options)


def load_behavior_log(spark: SparkSession, path: str, **options: Unpack[LoadOptions]) -> LoadResult:
    return load_table(spark, BEHAVIOR_LOG, path, **options)


def load_dataset(
    spark: SparkSession, base: str, *, data_format: Format = "csv", staging: str | None = None
) -> dict[str, LoadResult]:
    """All four tables from a directory or URI prefix holding the published file names."""
    return {
        name: load_table(
            spark,
            table,
            dataset_path(base, table, data_format),
            data_format=data_format,
            staging=staging,
        )
        for name, table in TABLES.items()
    }


# The string fields, the raw row each came from, and whether it had the published field count.
_Fields = tuple[DataFrame, SparkColumn, SparkColumn]
# A column's typed value, and its reject reason (null when the field is fine).
_Validated = tuple[SparkColumn, SparkColumn]
_Validator = Callable[[ColumnSpec, SparkColumn], _Validated]


def _csv_fields(spark: SparkSession, table: TableFormat, path: str) -> _Fields:
    """One string column per published column, the raw line, and a field-count check."""

    lines = _read_or_explain(table, path, lambda: spark.read.text(path))
    first = lines.first()
    if first is None:
        raise IngestError(
            f"{table.name}: {path} is empty; expected the header line {table.header!r}"
        )
    if first["value"] != table.header:
        raise IngestError(
            f"{table.name}: {path} starts with {first['value']!r}, "
            f"not the published header {table.header!r}"
        )
    # Directories of part files repeat the header in every part.
    line = sf.col("value")
    parts = sf.split(line, ",", -1)
    fields = lines.filter(line != table.header).select(
        line.alias("raw_row"),
        (sf.size(parts) == len(table.columns)).alias("field_count_ok"),
        *(
            sf.try_element_at(parts, sf.lit(position + 1)).alias(column.source)
            for position, column in enumerate(table.columns)
        ),
    )
    return fields, sf.col("raw_row"), sf.col("field_count_ok")


def _parquet_fields(spark: SparkSession, table: TableFormat, path: str) -> _Fields:
    """Parquet columns (named like the CSV header) as strings, validated like CSV fields."""

    frame = _read_or_explain(table, path, lambda: spark.read.parquet(path))
    expected = [column.source for column in table.columns]
    if sorted(frame.columns) != sorted(expected):
        raise IngestError(
            f"{table.name}: {path} has columns {frame.columns}, "
            f"not the published columns {expected} (header {table.header!r})"
        )
    as_text = [sf.col(f"`{name}`").cast("string").alias(name) for name in expected]
    fields = frame.select(*as_text)
    raw_row = sf.concat_ws(
        ",", *(sf.coalesce(sf.col(f"`{name}`"), sf.lit("")) for name in expected)
    )
    return fields, raw_row, sf.lit(True)


def _read_or_explain(table: TableFormat, path: str, read: Callable[[], DataFrame]) -> DataFrame:

    try:
        return read()
    except AnalysisException as exc:
        if exc.getCondition() == "PATH_NOT_FOUND":
            raise IngestError(f"{table.name}: no such file or directory: {path}") from exc
        raise


def _typed_values_and_reasons(
    table: TableFormat, fields: DataFrame
) -> tuple[dict[str, SparkColumn], list[SparkColumn]]:
    """Per column: the typed value, and a reason expression that is null when the field is fine."""

    values: dict[str, SparkColumn] = {}
    reasons: list[SparkColumn] = []
    for column in table.columns:
        text = sf.col(f"`{column.source}`")
        value, reason = _VALIDATORS[column.kind](column, text)
        values[column.name] = value
        reasons.append(reason)
    if table is RAW_SAMPLE:
        clicked, not_clicked = values["clk"], values["nonclk"]
        reasons.append(sf.when(clicked + not_clicked != 1, sf.lit("bad_label")))
    return values, reasons


def _missing(text: SparkColumn) -> SparkColumn:
    return text.isNull() | (text == "")


def _validate_id(column: ColumnSpec, text: SparkColumn) -> _Validated:

    value = text.try_cast("int")
    reason = sf.when(value.isNull(), sf.lit("non_numeric_id")).when(
        value < 0, sf.lit("negative_id")
    )
    return value, reason


def _validate_brand(column: ColumnSpec, text: SparkColumn) -> _Validated:

    # The published files write a missing brand as the literal NULL.
    absent = _missing(text) | (text == NULL_BRAND)
    value = sf.when(~absent, text.try_cast("int"))
    reason = (
        sf.when(absent, sf.lit(None))
        .when(value.isNull(), sf.lit("non_numeric_id"))
        .when(value < 0, sf.lit("negative_id"))
    )
    return value, reason


def _validate_timestamp(column: ColumnSpec, text: SparkColumn) -> _Validated:

    value = text.try_cast("bigint")
    return value, sf.when(value.isNull() | (value <= 0), sf.lit("bad_timestamp"))


def _validate_label(column: ColumnSpec, text: SparkColumn) -> _Validated:

    value = text.try_cast("int")
    reason = sf.when(value.isNull(), sf.lit("non_numeric_value")).when(
        ~value.isin(0, 1), sf.lit("bad_label")
    )
    return value, reason


def _validate_choice(allowed: tuple[str, ...], reason_name: str) -> _Validator:
    def validate(column: ColumnSpec, text: SparkColumn) -> _Validated:

        return text, sf.when(text.isNull() | ~text.isin(*allowed), sf.lit(reason_name))

    return validate


def _validate_price(column: ColumnSpec, text: SparkColumn) -> _Validated:

    value = text.try_cast("double")
    not_finite = value.isNull() | sf.isnan(value) | (sf.abs(value) == float("inf"))
    reason = sf.when(not_finite, sf.lit("non_numeric_value")).when(
        value < 0, sf.lit("negative_price")
    )
    return value, reason


def _validate_level(column: ColumnSpec, text: SparkColumn) -> _Validated:

    absent = _missing(text) if column.optional else sf.lit(False)
    value = sf.when(~absent, text.try_cast("int"))
    low, high = column.domain if column.domain else (0, None)
    outside = value < low if high is None else ~value.between(low, high)
    reason = (
        sf.when(absent, sf.lit(None))
        .when(value.isNull(), sf.lit("non_numeric_value"))
        .when(outside, sf.lit("out_of_domain"))
    )
    return value, reason


_VALIDATORS: Mapping[ColumnKind, _Validator] = {
    "id": _validate_id,
    "brand": _validate_brand,
    "timestamp": _validate_timestamp,
    "label": _validate_label,
    "pid": _validate_choice(PIDS, "unknown_pid"),
    "btag": _validate_choice(BTAGS, "unknown_btag"),
    "price": _validate_price,
    "level": _validate_level,
}
