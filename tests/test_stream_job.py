"""The stream job: its transforms on small DataFrames, then the real query on a real Redis."""

from __future__ import annotations

import datetime
import os
import selectors
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import redis

from adrec.cli import main
from adrec.core import events, keys, realtime, store
from adrec.core.events import Event, Kind, Scope
from adrec.core.store import VersionWriter
from jobs.stream.main import MAX_MODEL_VERSIONS, StreamMetrics, shuffle_partitions
from jobs.stream.sink import Attribution, BatchOutcome
from jobs.stream.transform import (
    USER,
    AdLookup,
    batch_summary,
    deduplicated,
    fold_contributions,
    parse_lines,
    state_contributions,
)

NOW = int(time.time())
HOUR = events.bucket_of(NOW)
RECEIVED = datetime.datetime.fromtimestamp(NOW, tz=datetime.UTC)
PID = "430548_1007"
# adgroup_id, cate_id, campaign_id, customer_id
ADS = [(101, 7, 31, 41), (102, 7, 32, 41), (103, 8, 33, 42)]


def _line(event: Event) -> str:
    return events.encode_event(event).decode()


def _raw(spark, lines):
    rows = [(f"{i}-0", RECEIVED, line) for i, line in enumerate(lines, start=1)]
    return spark.createDataFrame(rows, "position string, received timestamp, line string")


def _ad_table() -> dict[str, np.ndarray]:
    columns = np.array(ADS, dtype=np.int64).T
    return dict(zip(("adgroup_id", "cate_id", "campaign_id", "customer_id"), columns, strict=True))


def test_the_ad_lookup_gives_0_for_ads_the_table_lacks():
    found = AdLookup(_ad_table()).of([103, 999, 101, 0])
    assert found == {
        "cate_id": [8, 0, 7, 0],
        "campaign_id": [33, 0, 31, 0],
        "customer_id": [42, 0, 41, 0],
    }
    empty = {name: np.zeros(0, np.int64) for name in _ad_table()}
    assert AdLookup(empty).of([5]) == {"cate_id": [0], "campaign_id": [0], "customer_id": [0]}


def test_shuffle_partitions_follow_the_local_master_not_the_machine():
    assert shuffle_partitions("local[2]") == 4
    assert shuffle_partitions("local[3,2]") == 6
    assert shuffle_partitions("local[*]") == 2 * (os.cpu_count() or 2)


def test_online_ctr_series_are_labelled_by_path_and_model_and_stay_bounded():
    metrics = StreamMetrics(port=0)

    def value(name: str, **labels: str) -> float:
        return metrics.registry.get_sample_value(name, labels) or 0.0

    assert (
        value("adrec_stream_clicks_total", pid=PID, serving_path="popular", model_version="unknown")
        == 0
        and metrics.registry.get_sample_value(
            "adrec_stream_clicks_total",
            {"pid": PID, "serving_path": "popular", "model_version": "unknown"},
        )
        is not None
    )
    served = Attribution(PID, "realtime_ranked", "v3/behaviour-v1-0123456789ab")
    unattributed = Attribution(PID, "", "")
    many = {Attribution(PID, "realtime_ranked", f"v{i}/x"): 1 for i in range(40)}
    metrics.record(
        BatchOutcome(
            0, {"imp": 5, "clk": 2}, {served: 2}, {served: 4, unattributed: 1}, 3, 0.1, None
        )
    )
    metrics.record(BatchOutcome(1, {"imp": 40}, {}, many, 40, 0.1, None))
    ranked = {"pid": PID, "serving_path": "realtime_ranked"}
    assert value("adrec_stream_clicks_total", **ranked, model_version=served.model_version) == 2
    assert (
        value("adrec_stream_impressions_total", **ranked, model_version=served.model_version) == 4
    )
    assert (
        value(
            "adrec_stream_impressions_total",
            pid=PID,
            serving_path="unknown",
            model_version="unknown",
        )
        == 1
    )
    labelled = {
        sample.labels["model_version"]
        for family in metrics.registry.collect()
        if family.name == "adrec_stream_impressions"
        for sample in family.samples
    }
    assert len(labelled - {"other"}) == MAX_MODEL_VERSIONS
    assert value("adrec_stream_impressions_total", **ranked, model_version="other") == 40 - (
        MAX_MODEL_VERSIONS - 2
    )


def test_parse_lines_marks_lines_that_are_not_events(spark):
    good = _line(Event(Kind.CART, "e1", 5, NOW, cate_id=7, brand_id=9))
    shown = _line(
        Event(Kind.CLICK, "e2", 5, NOW, ad_id=3, pid=PID, serving_path="popular", model_version="m")
    )
    older = "1\t" + "\t".join(good.split("\t")[1:10])  # the first format: no attribution
    parsed = parse_lines(
        _raw(
            spark,
            [
                good,
                "garbage",
                good.replace("2\t", "9\t", 1),
                "2\tzap" + good[6:],
                shown,
                older,
                "1" + good[1:],  # format 1 with format 2's fields
            ],
        )
    ).collect()
    assert [row.valid for row in parsed] == [True, False, False, False, True, True, False]
    first = parsed[0]
    assert (first.kind, first.event_id, first.user_id, first.time) == ("cart", "e1", 5, NOW)
    assert (first.cate_id, first.brand_id, first.ad_id, first.pid) == (7, 9, 0, "")
    assert (parsed[4].serving_path, parsed[4].model_version) == ("popular", "m")
    assert (parsed[5].kind, parsed[5].cate_id, parsed[5].serving_path) == ("cart", 7, "")


def test_contributions_fold_into_counts_and_interest(spark):
    batch = [
        Event(Kind.IMPRESSION, "i1", 5, NOW, ad_id=101, pid=PID),
        Event(Kind.IMPRESSION, "i2", 5, NOW, ad_id=102, pid=PID),
        Event(Kind.CLICK, "c1", 5, NOW, ad_id=101, pid=PID),
        Event(Kind.CART, "b1", 5, NOW - 1800, cate_id=8, brand_id=9),
        Event(Kind.PAGE_VIEW, "b2", 6, NOW, cate_id=8, brand_id=0),
        Event(Kind.CLICK, "c2", 6, NOW, ad_id=999, pid=PID),  # not in the ad table
    ]
    frame = parse_lines(_raw(spark, [_line(event) for event in batch])).where("valid")
    # A task's part of a batch, as the sink hands it over: columns as Python lists.
    rows = frame.collect()
    columns = {name: [row[name] for row in rows] for name in frame.columns}
    contributions = list(state_contributions(columns, AdLookup(_ad_table())))
    updates = {
        u.key: u for u in fold_contributions(contributions, realtime.INTEREST_HALF_LIFE_SECONDS)
    }
    assert batch_summary(columns) == {
        (Kind.IMPRESSION.value, PID, "", ""): 2,
        (Kind.CLICK.value, PID, "", ""): 2,
        (Kind.CART.value, "", "", ""): 1,
        (Kind.PAGE_VIEW.value, "", "", ""): 1,
    }

    def field(kind: Kind, scope: Scope, member: int, bucket: int = HOUR) -> str:
        return events.count_field(kind, scope, member, bucket)

    user5 = updates[keys.REALTIME_USER.key(5)]
    cart_hour = events.bucket_of(NOW - 1800)
    assert dict(user5.counts) == {
        field(Kind.IMPRESSION, Scope.AD, 101): 1,
        field(Kind.IMPRESSION, Scope.AD, 102): 1,
        field(Kind.IMPRESSION, Scope.CATEGORY, 7): 2,
        field(Kind.IMPRESSION, Scope.CAMPAIGN, 31): 1,
        field(Kind.IMPRESSION, Scope.CAMPAIGN, 32): 1,
        field(Kind.IMPRESSION, Scope.CUSTOMER, 41): 2,
        field(Kind.CLICK, Scope.AD, 101): 1,
        field(Kind.CLICK, Scope.CATEGORY, 7): 1,
        field(Kind.CLICK, Scope.CAMPAIGN, 31): 1,
        field(Kind.CLICK, Scope.CUSTOMER, 41): 1,
        field(Kind.CART, Scope.CATEGORY, 8, cart_hour): 1,
        field(Kind.CART, Scope.BRAND, 9, cart_hour): 1,
    }
    # The click names category 7 through its ad; the cart half an hour ago has halved.
    interest = {i.cate_id: (i.score, i.time) for i in user5.interest}
    assert interest[7] == (pytest.approx(events.INTEREST_WEIGHTS[Kind.CLICK]), NOW)
    assert interest[8] == (pytest.approx(events.INTEREST_WEIGHTS[Kind.CART]), NOW - 1800)

    user6 = updates[keys.REALTIME_USER.key(6)]
    # A page view shows no deliberate interest; brand 0 is no brand; the unknown ad still
    # counts for the ad itself.
    assert user6.interest == []
    assert dict(user6.counts) == {
        field(Kind.PAGE_VIEW, Scope.CATEGORY, 8): 1,
        field(Kind.CLICK, Scope.AD, 999): 1,
    }
    assert dict(updates[keys.REALTIME_AD.key(101)].counts) == {
        field(Kind.IMPRESSION, Scope.AD, 101): 1,
        field(Kind.CLICK, Scope.AD, 101): 1,
    }


def test_interest_of_one_batch_combines_like_the_state_script():
    rows = [
        (USER, 5, None, None, 7, 1.0, NOW - 1800),
        (USER, 5, None, None, 7, 1.0, NOW),
    ]
    (update,) = fold_contributions(rows, 1800.0)
    assert [(i.cate_id, i.time) for i in update.interest] == [(7, NOW)]
    assert update.interest[0].score == pytest.approx(1.5)


def test_resent_events_count_once(spark, tmp_path):
    event = _line(Event(Kind.CART, "same", 5, NOW, cate_id=7))
    other = _line(Event(Kind.CART, "other", 5, NOW, cate_id=7))
    source = tmp_path / "in"
    source.mkdir()
    (source / "a.txt").write_text(f"{event}\n{event}\n{other}\n")
    stream = (
        spark.readStream.format("text")
        .load(str(source))
        .selectExpr("'f' as position", "current_timestamp() as received", "value as line")
    )
    query = (
        deduplicated(parse_lines(stream), 600)
        .writeStream.format("memory")
        .queryName("dedup_test")
        .option("checkpointLocation", str(tmp_path / "checkpoint"))
        .trigger(availableNow=True)
        .start()
    )
    query.awaitTermination(120)
    ids = Counter(row.event_id for row in spark.sql("select event_id from dedup_test").collect())
    assert ids == {"same": 1, "other": 1}


# ---------------------------------------------------------------- the real query


def _publish_ads(client: redis.Redis) -> str:
    version = store.allocate_version(client)
    columns = np.array(ADS, dtype=np.int32).T
    VersionWriter(client, version).put_ad_table(
        {
            "adgroup_id": columns[0],
            "cate_id": columns[1],
            "campaign_id": columns[2],
            "customer_id": columns[3],
        }
    )
    # The stream job reads only the pointer and the ad table of a version.
    client.set(keys.ACTIVE_VERSION, version)
    return version


def _log(client: redis.Redis, batch: list[Event], first_ms: int, step_ms: int) -> None:
    pipe = client.pipeline(transaction=False)
    for index, event in enumerate(batch):
        pipe.xadd(
            keys.EVENT_LOG,
            {events.LOG_FIELD: events.encode_event(event)},
            id=f"{first_ms + index * step_ms}-0",
        )
    pipe.execute()


def _stream_job(redis_url: str, checkpoint, batches: int) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "ADREC_STREAM_CHECKPOINT": str(checkpoint),
        "ADREC_STREAM_MAX_BATCH_SECONDS": "1",
        "ADREC_STREAM_TRIGGER_MS": "0",
        "ADREC_STREAM_METRICS_PORT": "0",
        "ADREC_STREAM_BATCHES": str(batches),
        "ADREC_STREAM_LOCAL_MEMORY": "1g",
        "ADREC_STREAM_NICENESS": "5",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "adrec", "stream", "run"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _batches_until(process: subprocess.Popen[str], wanted: int, timeout: float) -> int:
    """Batch lines the stream job printed, reading until ``wanted`` or ``timeout``."""
    assert process.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    deadline, seen = time.monotonic() + timeout, 0
    while seen < wanted and time.monotonic() < deadline:
        if not selector.select(timeout=1):
            continue
        line = process.stdout.readline()
        if not line:
            break
        seen += "values changed" in line
    selector.close()
    return seen


def _niceness(pid: int) -> int:
    # /proc/<pid>/stat: "pid (comm) state ...", the niceness 17 fields after the state.
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[16])


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(child) for child in text.split()]


def _user_counts(client: redis.Redis, users: range) -> dict[int, dict[str, int]]:
    out = {}
    for user in users:
        raw = client.get(keys.REALTIME_USER.key(user))
        out[user] = dict(realtime.decode_state(raw).counts) if raw else {}
    return out


@pytest.mark.spark
def test_killed_and_restarted_mid_run_loses_nothing_and_applies_nothing_twice(
    redis_client, redis_url, tmp_path
):
    _publish_ads(redis_client)
    users = range(1, 41)
    # 12 s of log at one event every 25 ms: twelve one-second batches.
    batch = [
        Event(Kind.CLICK, f"e{i}", users[i % 40], NOW, ad_id=101, pid=PID)
        if i % 3 == 0
        else Event(Kind.CART, f"e{i}", users[i % 40], NOW, cate_id=8, brand_id=9)
        for i in range(480)
    ]
    base_ms = (NOW - 60) * 1000
    _log(redis_client, batch, base_ms, 25)
    # A resend of the first 30 events, as a client retrying after a timeout would.
    _log(redis_client, batch[:30], base_ms + 12_000, 1)

    checkpoint = tmp_path / "checkpoint"
    first = _stream_job(redis_url, checkpoint, batches=0)
    seen = _batches_until(first, 3, timeout=240)
    # The job and Spark's JVM run at the niceness asked for, beneath the caller.
    lowered = min(os.nice(0) + 5, 19)
    assert [_niceness(pid) for pid in (first.pid, *_children(first.pid))][:2] == [lowered] * 2
    first.send_signal(signal.SIGKILL)
    first.wait(30)
    assert seen == 3, "the first run never applied three batches"
    partial = _user_counts(redis_client, users)

    second = _stream_job(redis_url, checkpoint, batches=0)
    expected: dict[int, Counter[str]] = {user: Counter() for user in users}
    for event in batch:
        if event.kind is Kind.CART:
            expected[event.user_id][events.count_field(Kind.CART, Scope.CATEGORY, 8, HOUR)] += 1
            expected[event.user_id][events.count_field(Kind.CART, Scope.BRAND, 9, HOUR)] += 1
        else:
            for scope, member in ((Scope.AD, 101), (Scope.CATEGORY, 7), (Scope.CAMPAIGN, 31)):
                expected[event.user_id][events.count_field(Kind.CLICK, scope, member, HOUR)] += 1
            expected[event.user_id][events.count_field(Kind.CLICK, Scope.CUSTOMER, 41, HOUR)] += 1
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if _user_counts(redis_client, users) == {u: dict(c) for u, c in expected.items()}:
                break
            time.sleep(1)
    finally:
        second.send_signal(signal.SIGTERM)
        try:
            second.wait(60)
        except subprocess.TimeoutExpired:
            second.kill()
    assert partial != {u: dict(c) for u, c in expected.items()}, "killed after everything"
    assert _user_counts(redis_client, users) == {u: dict(c) for u, c in expected.items()}
    clicked = realtime.decode_state(redis_client.get(keys.REALTIME_USER.key(users[0])))
    assert 7 in clicked.interest


def test_a_round_trip_size_below_one_is_refused_naming_the_setting(tmp_path, capsys):
    code = main(
        ["stream", "run", "--checkpoint", str(tmp_path), "--stream-writes-per-round-trip", "0"]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "ADREC_STREAM_WRITES_PER_ROUND_TRIP)='0': must be between 1 and 10000" in err
    assert "Traceback" not in err
