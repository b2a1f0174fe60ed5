"""`adrec events send` as a command, into a real intake over loopback and real redis-servers."""

from __future__ import annotations

import asyncio
import collections
import csv
import time
from pathlib import Path

import redis
from service_data import ADREC, metric, publish_version, run, running_stack, wait_until

from adrec.cli import main
from adrec.core import keys
from adrec.core.dataset import BEHAVIOR_LOG, BTAGS, RAW_SAMPLE
from adrec.core.events import LOG_FIELD, Kind, decode_event
from adrec.core.redis_server import private_redis
from services.runtime.metrics import SERVICE_LABEL

#: Oldest event the intake under test accepts: enough for every file written here.
THIRTY_DAYS = 30 * 86_400


async def send(port: int, *args: str, scheme: str = "") -> tuple[int, str, str]:
    """`adrec events send ARGS` against the intake on `port`: exit code, stdout, stderr."""
    process = await asyncio.create_subprocess_exec(
        *ADREC,
        "events",
        "send",
        *args,
        "--events",
        f"{scheme}127.0.0.1:{port}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=120)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


def logged(client: redis.Redis) -> list:
    return [decode_event(fields[LOG_FIELD]) for _, fields in client.xrange(keys.EVENT_LOG)]


def write(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def test_a_raw_sample_file_is_replayed_deterministically_and_bad_rows_are_left_out(
    redis_client, redis_url, tmp_path
):
    data = publish_version(redis_client, users=20, ads=1000, categories=10)
    ads = data.ads["adgroup_id"][:40].tolist()
    base = 1_494_000_000
    rows = [
        f"{100 + i % 7},{base + 37 * i},{ads[i % 40]},{'430548_1007' if i % 3 else '430539_1007'},"
        f"{0 if i % 9 == 0 else 1},{1 if i % 9 == 0 else 0}"
        for i in range(300)
    ]
    bad = [
        "1,2,3",  # wrong_field_count
        f"x1,{base},{ads[0]},430548_1007,1,0",  # non_numeric_id
        f"5,-7,{ads[0]},430548_1007,1,0",  # bad_timestamp
        f"5,{base},{ads[0]},999_1007,1,0",  # unknown_pid
        f"5,{base},{ads[0]},430548_1007,1,1",  # bad_label
        f"0,{base},{ads[0]},430548_1007,1,0",  # out_of_domain: the intake takes positive ids
    ]
    source = write(tmp_path / "raw_sample.csv", RAW_SAMPLE.header, [*rows[:100], *bad, *rows[100:]])
    clicks = sum(1 for i in range(300) if i % 9 == 0)

    async def scenario():
        async with running_stack(redis_url, "events") as stack:
            port = stack.services["events"].port
            code, out, err = await send(port, str(source), "--batch", "64")
            assert (code, err) == (0, "")
            lines = out.splitlines()
            assert lines[0] == (
                "bad rows: 6 not sent (wrong_field_count 1, non_numeric_id 1, bad_timestamp 1, "
                "unknown_pid 1, bad_label 1, out_of_domain 1)"
            )
            assert lines[1].startswith(
                f"raw_sample: rows read 306, events sent {300 + clicks}, rejected 0, "
                "retried calls 0, "
            )
            first = logged(redis_client)
            assert len(first) == 300 + clicks
            kinds = collections.Counter(event.kind for event in first)
            assert kinds == {Kind.IMPRESSION: 300, Kind.CLICK: clicks}

            # Rebased: every time moved by the same amount, the latest to now.
            def row_of(line: int) -> int:
                return line - 2 if line < 102 else line - 2 - len(bad)

            lines_of = [int(event.event_id.split("-")[1]) for event in first]
            shifts = {
                event.time - (base + 37 * row_of(line))
                for event, line in zip(first, lines_of, strict=True)
            }
            assert len(shifts) == 1
            assert abs(max(event.time for event in first) - time.time()) < 120
            assert all(event.event_id.startswith(("imp-", "clk-")) for event in first)
            by_id = {event.event_id: event for event in first}
            assert len(by_id) == len(first)

            # A resend makes the same ids, so the stream job counts each event once.
            code, out, _ = await send(port, str(source), "--batch", "1000", scheme="http://")
            assert code == 0
            second = logged(redis_client)[len(first) :]
            assert sorted(event.event_id for event in second) == sorted(by_id)
            # ... and the same rows in another file are other events.
            copy = write(tmp_path / "raw_sample_copy.csv", RAW_SAMPLE.header, rows)
            assert (await send(port, str(copy)))[0] == 0
            third = logged(redis_client)[2 * len(first) :]
            assert not {event.event_id for event in third} & set(by_id)

    run(scenario, timeout=180)


def test_times_are_rebased_keeping_their_spacing_or_sent_as_written(
    redis_client, redis_url, tmp_path
):
    now = int(time.time())
    stamps = [now - 5000, now - 100, now - 4000, now - 3000]
    rows = [f"7,{stamp},{btag},12,NULL" for stamp, btag in zip(stamps, BTAGS, strict=True)]
    source = write(tmp_path / "behavior_log.csv", BEHAVIOR_LOG.header, rows)

    async def scenario():
        async with running_stack(redis_url, "events") as stack:
            port = stack.services["events"].port
            assert (await send(port, str(source), "--no-rebase-time"))[0] == 0
            as_written = logged(redis_client)
            assert [event.time for event in as_written] == stamps
            assert [event.kind.value for event in as_written] == list(BTAGS)
            assert {event.brand_id for event in as_written} == {0}

            redis_client.delete(keys.EVENT_LOG)
            assert (await send(port, str(source)))[0] == 0
            rebased = logged(redis_client)
            shift = rebased[0].time - stamps[0]
            assert [event.time for event in rebased] == [stamp + shift for stamp in stamps]
            assert abs(max(event.time for event in rebased) - time.time()) < 120

    run(scenario)


def test_a_behavior_log_slice_of_the_synthetic_data_lands_in_the_log(
    redis_client, redis_url, tiny_data
):
    source = tiny_data / BEHAVIOR_LOG.csv_file
    with source.open() as handle:
        every = list(csv.reader(handle))[1:]
    # A slice holding the first of the data set's bad timestamps, and not the whole file.
    limit = next(i for i, row in enumerate(every) if int(row[1]) <= 0) + 1000
    assert limit < len(every)
    rows = every[:limit]
    good = [row for row in rows if int(row[1]) > 0]
    left_out = len(rows) - len(good)

    async def scenario():
        # The synthetic log spans weeks: a backfill of it needs an older bound.
        async with running_stack(
            redis_url, "events", ADREC_EVENTS_MAX_AGE_SECONDS=THIRTY_DAYS
        ) as stack:
            port = stack.services["events"].port
            code, out, err = await send(port, str(source), "--limit", str(limit))
            assert (code, err) == (0, "")
            assert (
                out.splitlines()[0] == f"bad rows: {left_out} not sent (bad_timestamp {left_out})"
            )
            assert f"rows read {limit:,}, events sent {len(good):,}, rejected 0" in out
            events = logged(redis_client)
            assert len(events) == redis_client.xlen(keys.EVENT_LOG) == len(good)
            assert collections.Counter(event.kind.value for event in events) == collections.Counter(
                row[2] for row in good
            )
            assert collections.Counter(
                (e.user_id, e.cate_id) for e in events
            ) == collections.Counter((int(row[0]), int(row[3])) for row in good)

    run(scenario, timeout=180)


def test_a_refused_batch_stops_the_replay_naming_the_row(redis_client, redis_url, tmp_path):
    data = publish_version(redis_client, users=20, ads=1000, categories=10)
    ads = data.ads["adgroup_id"][:10].tolist()
    now = int(time.time())
    rows = [f"{1 + i},{now - i},{ads[i % 10]},430548_1007,1,0" for i in range(80)]
    rows[24] = f"25,{now},1999999999,430548_1007,1,0"  # line 26: an ad of no version
    source = write(tmp_path / "raw_sample.csv", RAW_SAMPLE.header, rows)

    async def scenario():
        async with running_stack(redis_url, "events") as stack:
            port = stack.services["events"].port
            code, out, err = await send(port, str(source), "--batch", "10")
            assert code == 1
            assert err == (
                "adrec events send: error: the intake refused line 26: "
                "events[4].impression.ad_id: 1999999999 is not an ad of the active data "
                f"version {data.version}\n"
            )
            assert "rejected 10" in out
            # The refused batch (lines 22..31) is not in the log, in part or whole.
            logged_users = {event.user_id for event in logged(redis_client)}
            assert not logged_users & set(range(21, 31))
            assert len(logged_users) % 10 == 0

    run(scenario)


def test_unavailable_is_retried_with_backoff_a_bounded_number_of_times(tmp_path):
    now = int(time.time())
    source = write(
        tmp_path / "behavior_log.csv",
        BEHAVIOR_LOG.header,
        [f"{1 + i},{now - i},pv,3,4" for i in range(50)],
    )
    with private_redis() as server:
        client = redis.Redis.from_url(server.url)

        async def scenario():
            async with running_stack(server.url, "events") as stack:
                port = stack.services["events"].port
                await asyncio.to_thread(server.stop)
                # Redis comes back while the command backs off: it gets through.
                replay = asyncio.create_task(send(port, str(source)))
                await wait_until(
                    lambda: (
                        metric(
                            stack,
                            "adrec_event_batches_rejected_total",
                            **{SERVICE_LABEL: "events"},
                            reason="redis_unavailable",
                        )
                        >= 1
                    ),
                    timeout=60,
                )
                await asyncio.to_thread(server.restart)
                code, out, err = await replay
                assert (code, err) == (0, "")
                assert "events sent 50, rejected 0, retried calls 0," not in out
                assert "events sent 50, rejected 0, retried calls " in out
                assert client.xlen(keys.EVENT_LOG) == 50

                # Redis stays away: the command gives up after its attempts, in one line.
                await asyncio.to_thread(server.stop)
                code, out, err = await send(port, str(source))
                assert code == 1
                assert err.startswith(
                    f"adrec events send: error: the intake at 127.0.0.1:{port} did not take a "
                    "batch after 6 attempts (UNAVAILABLE): cannot log events: Redis "
                )
                assert err.count("\n") == 1
                assert "events sent 0, rejected 50, retried calls 5," in out

        run(scenario, timeout=120)
        client.close()


def test_bad_input_is_refused_in_one_line(tmp_path, capsys):
    assert main(["events", "send", str(tmp_path / "missing.csv")]) == 2
    assert "adrec events: error: cannot read" in capsys.readouterr().err

    other = write(tmp_path / "ad_feature.csv", "adgroup_id,cate_id,campaign_id", ["1,2,3"])
    assert main(["events", "send", str(other)]) == 2
    err = capsys.readouterr().err
    assert "the header of neither raw_sample" in err and BEHAVIOR_LOG.header in err

    good = write(tmp_path / "behavior_log.csv", BEHAVIOR_LOG.header, ["1,2,pv,3,4"])
    assert main(["events", "send", str(good), "--batch", "0", "--rate", "-1"]) == 2
    err = capsys.readouterr().err
    assert "--batch: must be between 1 and 100000, got 0" in err
    assert "--rate: must be 0 (no limit) or more, got -1" in err
    assert main(["events", "send", str(good), "--events", "https://intake:50054"]) == 2
    assert "plaintext gRPC" in capsys.readouterr().err


def test_a_batch_over_the_message_limit_stops_at_once_naming_the_flag(redis_url, tmp_path):
    now = int(time.time())
    source = write(
        tmp_path / "behavior_log.csv",
        BEHAVIOR_LOG.header,
        [f"{1 + i},{now - i},cart,3,4" for i in range(600)],
    )

    async def scenario():
        async with running_stack(redis_url, "events", ADREC_MAX_MESSAGE_BYTES=16 * 1024) as stack:
            port = stack.services["events"].port
            code, out, err = await send(port, str(source), "--batch", "600")
            assert code == 1
            assert "retried calls 0," in out
            assert err.startswith(
                "adrec events send: error: a batch of 600 events is larger than the intake at "
            )
            assert err.rstrip().endswith("send smaller ones with --batch")
            assert (await send(port, str(source), "--batch", "100"))[0] == 0

    run(scenario)
