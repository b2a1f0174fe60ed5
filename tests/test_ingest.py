"""Spark loaders on hand-written files in the exact published format, quirks and bad rows."""

from __future__ import annotations

from datetime import date, datetime

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from adrec.core.dataset import (
    AD_FEATURE,
    BEHAVIOR_LOG,
    CHINA_TIME,
    RAW_SAMPLE,
    TABLES,
    USER_PROFILE,
    china_day,
    split_of,
)
from jobs.ingest import (
    EXAMPLE_CHARS,
    IngestError,
    load_ad_feature,
    load_behavior_log,
    load_dataset,
    load_raw_sample,
    load_table,
    load_user_profile,
    output_schema,
    split_by_day,
)

pytestmark = pytest.mark.spark

# China-time midnights around the test day.
MAY_13_CHINA = 1494604800
MAY_14_CHINA = 1494691200

RAW_SAMPLE_CSV = f"""user,time_stamp,adgroup_id,pid,nonclk,clk
581738,1494137644,1,430548_1007,1,0
449818,{MAY_13_CHINA - 1},3,430548_1007,1,0
914836,{MAY_13_CHINA},4,430539_1007,0,1
914836,{MAY_14_CHINA - 1},4,430539_1007,1,0
914836,{MAY_14_CHINA},5,430539_1007,1,0
1,1494137644,1
2,1494137644,1,430548_1007,1,0,0
abc,1494137644,1,430548_1007,1,0
3,1494137644,1.5,430548_1007,1,0
-4,1494137644,1,430548_1007,1,0
5,0,1,430548_1007,1,0
6,-1494137644,1,430548_1007,1,0
7,,1,430548_1007,1,0
8,1494137644,1,430548_1008,1,0
9,1494137644,1,,1,0
10,1494137644,1,430548_1007,1,1
11,1494137644,1,430548_1007,0,2
12,1494137644,1,430548_1007,x,0

"""

AD_FEATURE_CSV = """adgroup_id,cate_id,campaign_id,customer,brand,price
63133,6406,83237,1,95471,170.0
110847,7211,135256,2,145952,32.99
375706,4520,387991,6,NULL,99.0
639794,6261,70206,14,37004,89.9
1,1,1,1,1,0.01
2,2,2,2,,100000000.0
3,3,3,3,3,-1.0
4,4,4,4,4,abc
5,5,5,5,4.5,10.0
6,x,6,6,6,10.0
7,7,7,7,7
"""

# The published header line ends with a space.
USER_PROFILE_CSV = (
    USER_PROFILE.header
    + """
234,0,5,2,5,,3,0,3
523,5,2,2,2,1,3,1,2
612,0,8,1,2,2,3,0,
1670,0,4,2,4,,1,0,
2545,0,10,1,4,,3,0,4
3,96,12,3,2,1,3,0,1
4,0,13,1,2,1,3,0,1
5,0,1,1,7,1,3,0,1
6,0,1,1,2,4,3,0,1
7,0,1,1,2,1,0,0,1
8,0,1,1,2,1,3,2,1
9,0,1,1,2,1,3,0,5
10,0,1,1,x,1,3,0,1
,0,1,1,2,1,3,0,1
"""
)

BEHAVIOR_LOG_CSV = """user,time_stamp,btag,cate,brand
558157,1493741625,pv,6250,91286
558157,1493741626,pv,6250,91286
728690,1493776998,cart,11800,62353
332634,1493809895,fav,1101,365477
857237,1493816945,buy,1043,110616
1,0,pv,1,1
2,-1,pv,1,1
3,1493741625,click,1,1
4,1493741625,PV,1,1
5,1493741625,pv,,1
6,1493741625,pv,1,NULL
7,1493741625,pv,1
"""


def columns_and_types(schema) -> list[tuple[str, str]]:
    return [(field.name, field.dataType.simpleString()) for field in schema.fields]


def write(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_raw_sample_counts_every_reason_and_keeps_clean_rows(spark, tmp_path):
    result = load_raw_sample(spark, write(tmp_path, "raw_sample.csv", RAW_SAMPLE_CSV))

    assert result.rejected == {
        "wrong_field_count": 3,  # too few, too many, and the blank line
        "non_numeric_id": 2,
        "negative_id": 1,
        "bad_timestamp": 3,
        "unknown_pid": 2,
        "bad_label": 2,
        "non_numeric_value": 1,
    }
    assert result.total_rows == 19
    assert result.clean_rows == 5
    assert result.examples["unknown_pid"] == "8,1494137644,1,430548_1008,1,0"
    assert columns_and_types(result.data.schema) == columns_and_types(output_schema(RAW_SAMPLE))
    rows = [tuple(row) for row in result.data.orderBy("time_stamp").collect()]
    assert rows == [
        (581738, 1494137644, 1, "430548_1007", 1, 0, date(2017, 5, 7)),
        (449818, MAY_13_CHINA - 1, 3, "430548_1007", 1, 0, date(2017, 5, 12)),
        (914836, MAY_13_CHINA, 4, "430539_1007", 0, 1, date(2017, 5, 13)),
        (914836, MAY_14_CHINA - 1, 4, "430539_1007", 1, 0, date(2017, 5, 13)),
        (914836, MAY_14_CHINA, 5, "430539_1007", 1, 0, date(2017, 5, 14)),
    ]
    report = "\n".join(result.report_lines())
    assert "19 rows, 5 clean, 14 rejected" in report
    assert "bad_timestamp: 3" in report


def test_a_staged_load_parses_the_source_once_and_reads_its_parquet_copy(spark, tmp_path):
    source = tmp_path / "raw_sample.csv"
    source.write_text(RAW_SAMPLE_CSV)
    result = load_raw_sample(spark, str(source), staging=str(tmp_path / "staging"))
    # Later stages must not depend on the source: they read the staged copy.
    source.unlink()

    assert (tmp_path / "staging" / "raw_sample.parquet").is_dir()
    assert result.total_rows == 19
    assert result.rejected["bad_timestamp"] == 3
    assert result.data.count() == 5
    assert columns_and_types(result.data.schema) == columns_and_types(output_schema(RAW_SAMPLE))


def test_day_split_is_at_china_midnight(spark, tmp_path):
    result = load_raw_sample(spark, write(tmp_path, "raw_sample.csv", RAW_SAMPLE_CSV))
    train, test = split_by_day(result.data)

    assert sorted(row.time_stamp for row in train.collect()) == [1494137644, MAY_13_CHINA - 1]
    assert sorted(row.time_stamp for row in test.collect()) == [MAY_13_CHINA, MAY_14_CHINA - 1]
    assert china_day(MAY_13_CHINA - 1) == date(2017, 5, 12)
    assert china_day(MAY_13_CHINA) == date(2017, 5, 13)
    assert [split_of(china_day(ts)) for ts in (MAY_13_CHINA - 1, MAY_13_CHINA, MAY_14_CHINA)] == [
        "train",
        "test",
        None,
    ]


def test_samples_before_the_first_day_are_in_neither_split(spark, tmp_path):
    before = int(datetime(2017, 5, 5, 12, tzinfo=CHINA_TIME).timestamp())
    csv = RAW_SAMPLE_CSV + f"7,{before},1,430548_1007,1,0\n"
    result = load_raw_sample(spark, write(tmp_path, "raw_sample.csv", csv))
    train, test = split_by_day(result.data)

    assert before not in {row.time_stamp for row in train.collect() + test.collect()}
    assert split_of(date(2017, 5, 5)) is None
    assert split_of(date(2017, 5, 6)) == "train"


def test_day_column_ignores_session_time_zone(spark, tmp_path):
    path = write(tmp_path, "raw_sample.csv", RAW_SAMPLE_CSV)
    spark.conf.set("spark.sql.session.timeZone", "America/Los_Angeles")
    try:
        days = load_raw_sample(spark, path).data.select("event_day").collect()
    finally:
        spark.conf.set("spark.sql.session.timeZone", "UTC")
    assert sorted(row.event_day for row in days)[1:3] == [date(2017, 5, 12), date(2017, 5, 13)]


def test_ad_feature_null_brand_and_prices(spark, tmp_path):
    result = load_ad_feature(spark, write(tmp_path, "ad_feature.csv", AD_FEATURE_CSV))

    assert result.rejected == {
        "wrong_field_count": 1,
        "non_numeric_id": 2,  # brand 4.5, cate_id x
        "non_numeric_value": 1,  # price abc
        "negative_price": 1,
    }
    assert columns_and_types(result.data.schema) == columns_and_types(output_schema(AD_FEATURE))
    rows = {row.adgroup_id: tuple(row) for row in result.data.collect()}
    assert rows == {
        63133: (63133, 6406, 83237, 1, 95471, 170.0),
        110847: (110847, 7211, 135256, 2, 145952, 32.99),
        375706: (375706, 4520, 387991, 6, None, 99.0),
        639794: (639794, 6261, 70206, 14, 37004, 89.9),
        1: (1, 1, 1, 1, 1, 0.01),
        2: (2, 2, 2, 2, None, 1e8),
    }


def test_user_profile_trailing_space_header_and_missing_fields(spark, tmp_path):
    assert USER_PROFILE_CSV.startswith(
        "userid,cms_segid,cms_group_id,final_gender_code,age_level,pvalue_level,"
        "shopping_level,occupation,new_user_class_level \n"
    )
    result = load_user_profile(spark, write(tmp_path, "user_profile.csv", USER_PROFILE_CSV))

    assert result.rejected == {
        "non_numeric_id": 1,  # empty userid
        # gender 3, group 13, age 7, pvalue 4, shopping 0, occupation 2, new user class 5
        "out_of_domain": 7,
        "non_numeric_value": 1,
    }
    assert result.data.columns == [
        "user_id",
        "cms_segid",
        "cms_group_id",
        "gender",
        "age_level",
        "pvalue_level",
        "shopping_level",
        "occupation",
        "new_user_class_level",
    ]
    rows = {row.user_id: tuple(row) for row in result.data.collect()}
    assert rows == {
        234: (234, 0, 5, 2, 5, None, 3, 0, 3),
        523: (523, 5, 2, 2, 2, 1, 3, 1, 2),
        612: (612, 0, 8, 1, 2, 2, 3, 0, None),
        1670: (1670, 0, 4, 2, 4, None, 1, 0, None),
        2545: (2545, 0, 10, 1, 4, None, 3, 0, 4),
    }


def test_behavior_log_btags_and_bad_timestamps(spark, tmp_path):
    result = load_behavior_log(spark, write(tmp_path, "behavior_log.csv", BEHAVIOR_LOG_CSV))

    assert result.rejected == {
        "wrong_field_count": 1,
        "non_numeric_id": 1,
        "bad_timestamp": 2,
        "unknown_btag": 2,  # btags are lower case
    }
    assert result.data.columns == ["user_id", "time_stamp", "btag", "cate_id", "brand_id"]
    rows = sorted(tuple(row) for row in result.data.collect())
    assert rows == [
        (6, 1493741625, "pv", 1, None),
        (332634, 1493809895, "fav", 1101, 365477),
        (558157, 1493741625, "pv", 6250, 91286),
        (558157, 1493741626, "pv", 6250, 91286),
        (728690, 1493776998, "cart", 11800, 62353),
        (857237, 1493816945, "buy", 1043, 110616),
    ]


@pytest.mark.parametrize(
    ("table", "header"),
    [
        (RAW_SAMPLE, "user,time_stamp,adgroup_id,pid,clk,nonclk"),
        (AD_FEATURE, "adgroup_id,cate_id,campaign_id,customer_id,brand,price"),
        # The published header has a trailing space; the "cleaned" one is not accepted.
        (USER_PROFILE, USER_PROFILE.header.rstrip()),
        (BEHAVIOR_LOG, "58157,1493741625,pv,6250,91286"),
    ],
)
def test_wrong_header_names_file_and_expected_header(spark, tmp_path, table, header):
    path = write(tmp_path, table.csv_file, header + "\n")
    with pytest.raises(IngestError) as error:
        load_table(spark, table, path)
    assert path in str(error.value)
    assert repr(table.header) in str(error.value)


def test_missing_and_empty_files_fail_clearly(spark, tmp_path):
    missing = str(tmp_path / "nowhere" / "raw_sample.csv")
    with pytest.raises(IngestError, match=r"no such file or directory: .*nowhere"):
        load_raw_sample(spark, missing)

    empty = write(tmp_path, "ad_feature.csv", "")
    with pytest.raises(IngestError, match="is empty; expected the header line"):
        load_ad_feature(spark, empty)


def test_header_only_file_loads_no_rows(spark, tmp_path):
    result = load_behavior_log(spark, write(tmp_path, "b.csv", BEHAVIOR_LOG.header + "\n"))
    assert (result.total_rows, result.rejected, result.data.count()) == (0, {}, 0)


def test_directory_of_part_files_with_repeated_headers(spark, tmp_path):
    lines = AD_FEATURE_CSV.splitlines()
    folder = tmp_path / "ad_feature.csv"
    folder.mkdir()
    (folder / "part-0.csv").write_text("\n".join([lines[0], *lines[1:3]]) + "\n")
    (folder / "part-1.csv").write_text("\n".join([lines[0], *lines[3:5]]) + "\n")

    result = load_ad_feature(spark, str(folder))
    assert (result.total_rows, result.rejected) == (4, {})


def test_parquet_with_published_column_names(spark, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    pq.write_table(
        pa.table(
            {
                "adgroup_id": [63133, 375706, 3],
                "cate_id": [6406, 4520, 3],
                "campaign_id": [83237, 387991, 3],
                "customer": [1, 6, 3],
                "brand": [95471, None, 3],
                "price": [170.0, 99.0, -1.0],
            }
        ),
        folder / "ad_feature.parquet",
    )
    pq.write_table(
        pa.table(
            {
                "user": ["581738", "x"],
                "time_stamp": [1494137644, 1494137644],
                "adgroup_id": [1, 1],
                "pid": ["430548_1007", "430548_1007"],
                "nonclk": [1, 1],
                "clk": [0, 0],
            }
        ),
        folder / "raw_sample.parquet",
    )

    ads = load_table(spark, AD_FEATURE, str(folder / "ad_feature.parquet"), data_format="parquet")
    assert ads.rejected == {"negative_price": 1}
    assert ads.examples["negative_price"] == "3,3,3,3,3,-1.0"
    assert sorted(tuple(row) for row in ads.data.collect()) == [
        (63133, 6406, 83237, 1, 95471, 170.0),
        (375706, 4520, 387991, 6, None, 99.0),
    ]
    samples = load_raw_sample(spark, str(folder / "raw_sample.parquet"), data_format="parquet")
    assert samples.rejected == {"non_numeric_id": 1}
    assert samples.data.first().event_day == date(2017, 5, 7)


def test_parquet_with_other_columns_is_refused(spark, tmp_path):
    path = tmp_path / "behavior_log.parquet"
    pq.write_table(
        pa.table({"user_id": [1], "time_stamp": [1], "btag": ["pv"], "cate": [1], "brand": [1]}),
        path,
    )
    with pytest.raises(IngestError, match="not the published columns"):
        load_behavior_log(spark, str(path), data_format="parquet")


def test_load_dataset_reads_all_four_files_from_a_directory(spark, tmp_path):
    for name, text in (
        ("raw_sample", RAW_SAMPLE_CSV),
        ("ad_feature", AD_FEATURE_CSV),
        ("user_profile", USER_PROFILE_CSV),
        ("behavior_log", BEHAVIOR_LOG_CSV),
    ):
        write(tmp_path, f"{name}.csv", text)
    results = load_dataset(spark, f"file://{tmp_path}")
    assert list(results) == list(TABLES)
    assert {name: result.clean_rows for name, result in results.items()} == {
        "raw_sample": 5,
        "ad_feature": 6,
        "user_profile": 5,
        "behavior_log": 6,
    }


def test_a_huge_junk_row_is_reported_by_its_start_only(spark, tmp_path):
    junk = "9," + "x" * 1_000_000
    result = load_raw_sample(
        spark, write(tmp_path, "raw_sample.csv", f"{RAW_SAMPLE.header}\n{junk}\n")
    )
    example = result.examples["wrong_field_count"]
    assert example == junk[:EXAMPLE_CHARS]
    assert all(len(line) < 400 for line in result.report_lines())


def test_data_convert_writes_parquet_the_job_loads_to_the_same_clean_rows(
    spark, tiny_data, tmp_path, capsys
):
    from adrec.cli import main

    out = tmp_path / "parquet"
    assert main(["data", "convert", str(tiny_data), "--out", str(out)]) == 0
    assert "behavior_log" in capsys.readouterr().out
    assert not (out / ".staging").exists()
    from_csv = load_dataset(spark, str(tiny_data))
    from_parquet = load_dataset(spark, str(out), data_format="parquet")
    for name, csv_result in from_csv.items():
        parquet_result = from_parquet[name]
        assert parquet_result.rejected == {}
        assert parquet_result.clean_rows == csv_result.clean_rows
        columns = sorted(csv_result.data.columns)
        # Exactly the same rows: nothing is in one load and not the other.
        assert (
            parquet_result.data.select(*columns).exceptAll(csv_result.data.select(*columns)).count()
            == 0
        )
