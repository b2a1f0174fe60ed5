"""EventService over real gRPC and real redis-servers: what is logged, what is refused, and
that nothing is half-written or acknowledged without being stored."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import grpc
import pytest
import redis
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2
from grpc_helpers import health_status, loopback_channel
from redis_fixtures import RedisTarget
from service_data import PIDS, metric, publish_version, run, running_stack, wait_until

from adrec.api.events.v1 import event_service_pb2 as pb
from adrec.api.events.v1 import event_service_pb2_grpc
from adrec.api.gateway.v1 import gateway_service_pb2 as gateway_pb2
from adrec.core import keys
from adrec.core.events import LOG_FIELD, Event, Kind, decode_event, encode_event
from adrec.core.redis_conn import RedisSettings
from adrec.core.redis_server import private_redis
from services.events.service import MAX_REPORTED_PROBLEMS, REJECTION_REASONS
from services.runtime.health import LIVENESS_SERVICE_NAME
from services.runtime.metrics import SERVICE_LABEL

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE = {SERVICE_LABEL: "events"}
DAY = 86_400
PASSWORD = "intake-secret-51c2"


def events_port(stack) -> int:
    return stack.services["events"].port


async def report(channel: grpc.aio.Channel, events: list[pb.Event]) -> pb.ReportEventsResponse:
    stub = event_service_pb2_grpc.EventServiceStub(channel)
    return await stub.ReportEvents(pb.ReportEventsRequest(events=events), timeout=10)


async def refused(channel: grpc.aio.Channel, events: list[pb.Event]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await report(channel, events)
    return caught.value


def violations(error: grpc.aio.AioRpcError) -> list[tuple[str, str]]:
    """The google.rpc.BadRequest field violations of an error's status details."""
    found = []
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            for detail in status_pb2.Status.FromString(value).details:
                bad_request = error_details_pb2.BadRequest()
                assert detail.Unpack(bad_request)
                found += [(v.field, v.description) for v in bad_request.field_violations]
    return found


def behaviour(event_id: str, user: int, at: int, **fields: Any) -> tuple[pb.Event, Event]:
    kinds = {
        pb.BEHAVIOR_TYPE_PAGE_VIEW: Kind.PAGE_VIEW,
        pb.BEHAVIOR_TYPE_CART: Kind.CART,
        pb.BEHAVIOR_TYPE_FAVORITE: Kind.FAVOURITE,
        pb.BEHAVIOR_TYPE_BUY: Kind.BUY,
    }
    values = {"type": pb.BEHAVIOR_TYPE_CART, "cate_id": 6513, "brand_id": 0, **fields}
    message = pb.Event(event_id=event_id, user_id=user, time=at, behavior=pb.Behavior(**values))
    core = Event(
        kinds.get(values["type"], Kind.PAGE_VIEW),
        event_id,
        user,
        at,
        cate_id=values["cate_id"],
        brand_id=values["brand_id"],
    )
    return message, core


def shown(
    kind: str, event_id: str, user: int, at: int, ad_id: int, **fields: Any
) -> tuple[pb.Event, Event]:
    values = {"ad_id": ad_id, "pid": PIDS[0], "request_id": "", "model_version": "", **fields}
    payload = pb.Impression(**values) if kind == "impression" else pb.Click(**values)
    message = pb.Event(event_id=event_id, user_id=user, time=at, **{kind: payload})
    path = values.get("serving_path", 0)
    core = Event(
        Kind.IMPRESSION if kind == "impression" else Kind.CLICK,
        event_id,
        user,
        at,
        ad_id=values["ad_id"],
        pid=values["pid"],
        request_id=values["request_id"],
        serving_path=gateway_pb2.ServingPath.Name(path).removeprefix("SERVING_PATH_").lower()
        if path in gateway_pb2.ServingPath.values()[1:]
        else str(path or ""),
        model_version=values["model_version"],
    )
    return message, core


def mixed_batch(ad_ids: list[int], now: int) -> list[tuple[pb.Event, Event]]:
    """Every kind of event once, a new user among them, request ids on some."""
    return [
        shown(
            "impression",
            "imp-1",
            1001,
            now - 30,
            ad_ids[0],
            request_id="req-7",
            serving_path=gateway_pb2.SERVING_PATH_REALTIME_RANKED,
            model_version="v3/behaviour-v1-0123456789ab",
        ),
        shown(
            "click",
            "clk-1",
            1001,
            now - 20,
            ad_ids[0],
            pid=PIDS[1],
            request_id="req-7",
            serving_path=gateway_pb2.SERVING_PATH_POPULAR,
        ),
        behaviour("pv-1", 1002, now - 3600, type=pb.BEHAVIOR_TYPE_PAGE_VIEW, brand_id=77),
        behaviour("cart-1", 1002, now - 10, type=pb.BEHAVIOR_TYPE_CART),
        behaviour("fav-1", 987_654_321, now, type=pb.BEHAVIOR_TYPE_FAVORITE, cate_id=1),
        behaviour("buy-1", 1003, now + 60, type=pb.BEHAVIOR_TYPE_BUY, brand_id=2**31 - 1),
        shown("impression", "imp-2", 1003, now - DAY + 600, ad_ids[1]),
    ]


def logged(client: Any) -> list[tuple[bytes, bytes]]:
    """(entry id, line) of every event log entry, oldest first."""
    return [(entry, fields[LOG_FIELD]) for entry, fields in client.xrange(keys.EVENT_LOG)]


def test_a_valid_mixed_batch_is_logged_as_its_encoded_lines_in_order(redis_target: RedisTarget):
    """On a standalone server, a Redis Cluster and a TLS server with a password."""
    client = redis_target.client()
    data = publish_version(client, users=20, ads=1000, categories=10)
    ad_ids = data.ads["adgroup_id"][:2].tolist()

    async def scenario():
        async with (
            running_stack(redis_target.settings, "events") as stack,
            loopback_channel(events_port(stack)) as channel,
        ):
            await wait_until(lambda: stack.services["events"].service.known_ads is not None)
            assert await health_status(channel) == SERVING
            batch = mixed_batch(ad_ids, int(time.time()))
            response = await report(channel, [message for message, _ in batch])
            entries = logged(client)
            assert [line for _, line in entries] == [encode_event(core) for _, core in batch]
            assert [decode_event(line) for _, line in entries] == [core for _, core in batch]
            assert response.accepted == len(batch)
            assert response.log_position == entries[-1][0].decode()

            second = await report(
                channel,
                [behaviour("pv-2", 1004, int(time.time()), type=pb.BEHAVIOR_TYPE_PAGE_VIEW)[0]],
            )
            assert second.accepted == 1 and client.xlen(keys.EVENT_LOG) == len(batch) + 1
            assert second.log_position > response.log_position

            for kind, count in {"imp": 2, "clk": 1, "pv": 2, "cart": 1, "fav": 1, "buy": 1}.items():
                assert metric(stack, "adrec_events_accepted_total", **SERVICE, kind=kind) == count
            assert metric(stack, "adrec_event_batch_size_count", **SERVICE) == 2
            assert metric(stack, "adrec_event_batch_size_sum", **SERVICE) == len(batch) + 1
            assert metric(stack, "adrec_event_log_length", **SERVICE) == len(batch) + 1

    run(scenario)
    client.close()


def _now() -> int:
    return int(time.time())


#: A bad event's payload and fields, built around a good event of its kind, and the field
#: its refusal must name.
BAD_EVENTS = {
    "missing event_id": (lambda ad: behaviour("", 1001, _now()), "events[2].event_id"),
    "event_id with a space": (lambda ad: behaviour("a b", 1001, _now()), "events[2].event_id"),
    "zero user": (lambda ad: behaviour("e", 0, _now()), "events[2].user_id"),
    "negative user": (lambda ad: shown("click", "e", -4, _now(), ad), "events[2].user_id"),
    "user past int32": (lambda ad: behaviour("e", 2**31, _now()), "events[2].user_id"),
    "time too old": (lambda ad: behaviour("e", 1001, _now() - DAY - 120), "events[2].time"),
    "time too far ahead": (lambda ad: behaviour("e", 1001, _now() + 900), "events[2].time"),
    "time in milliseconds": (lambda ad: behaviour("e", 1001, _now() * 1000), "events[2].time"),
    "unknown pid": (
        lambda ad: shown("impression", "e", 1001, _now(), ad, pid="430548_9999"),
        "events[2].impression.pid",
    ),
    "missing pid": (
        lambda ad: shown("click", "e", 1001, _now(), ad, pid=""),
        "events[2].click.pid",
    ),
    "unknown ad": (
        lambda ad: shown("impression", "e", 1001, _now(), 1_999_999_999),
        "events[2].impression.ad_id",
    ),
    "zero ad": (lambda ad: shown("click", "e", 1001, _now(), 0), "events[2].click.ad_id"),
    "request id too long": (
        lambda ad: shown("impression", "e", 1001, _now(), ad, request_id="r" * 129),
        "events[2].impression.request_id",
    ),
    "unknown serving path": (
        lambda ad: shown("click", "e", 1001, _now(), ad, serving_path=42),
        "events[2].click.serving_path",
    ),
    "model version with a space": (
        lambda ad: shown("impression", "e", 1001, _now(), ad, model_version="v1 x"),
        "events[2].impression.model_version",
    ),
    "model version too long": (
        lambda ad: shown("impression", "e", 1001, _now(), ad, model_version="v" * 129),
        "events[2].impression.model_version",
    ),
    "zero category": (
        lambda ad: behaviour("e", 1001, _now(), cate_id=0),
        "events[2].behavior.cate_id",
    ),
    "negative brand": (
        lambda ad: behaviour("e", 1001, _now(), brand_id=-1),
        "events[2].behavior.brand_id",
    ),
    "no behaviour type": (
        lambda ad: behaviour("e", 1001, _now(), type=pb.BEHAVIOR_TYPE_UNSPECIFIED),
        "events[2].behavior.type",
    ),
    "unknown behaviour type": (
        lambda ad: behaviour("e", 1001, _now(), type=9),
        "events[2].behavior.type",
    ),
    "no payload": (
        lambda ad: (pb.Event(event_id="e", user_id=1001, time=_now()), None),
        "events[2].payload",
    ),
}


@pytest.mark.parametrize("case", BAD_EVENTS)
def test_a_batch_with_one_bad_event_is_refused_naming_it_and_writes_nothing(
    redis_client, redis_url, case
):
    data = publish_version(redis_client, users=20, ads=1000, categories=10)
    ad_ids = data.ads["adgroup_id"][:2].tolist()
    make, field = BAD_EVENTS[case]

    async def scenario():
        async with (
            running_stack(redis_url, "events") as stack,
            loopback_channel(events_port(stack)) as channel,
        ):
            await wait_until(lambda: stack.services["events"].service.known_ads is not None)
            good = [message for message, _ in mixed_batch(ad_ids, _now())]
            assert (await report(channel, good)).accepted == len(good)
            before = logged(redis_client)
            bad, _ = make(ad_ids[0])
            error = await refused(channel, [*good[:2], bad, *good[2:]])
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert error.details().startswith(f"{field}: ")
            assert [name for name, _ in violations(error)] == [field]
            assert logged(redis_client) == before
            assert (
                metric(
                    stack, "adrec_event_batches_rejected_total", **SERVICE, reason="invalid_event"
                )
                == 1
            )
            assert metric(stack, "adrec_events_accepted_total", **SERVICE, kind="imp") == 2

    run(scenario)


def test_every_problem_of_a_batch_is_named_up_to_a_bound(redis_client, redis_url):
    data = publish_version(redis_client, users=20, ads=1000, categories=10)
    ad = int(data.ads["adgroup_id"][0])

    async def scenario():
        async with (
            running_stack(redis_url, "events") as stack,
            loopback_channel(events_port(stack)) as channel,
        ):
            await wait_until(lambda: stack.services["events"].service.known_ads is not None)
            now = _now()
            two_problems = shown("impression", "", 1001, now, 1_999_999_999)[0]
            error = await refused(channel, [behaviour("ok", 1001, now)[0], two_problems])
            assert violations(error) == [
                ("events[1].event_id", "is required (it makes a resent event count once)"),
                (
                    "events[1].impression.ad_id",
                    f"1999999999 is not an ad of the active data version {data.version}",
                ),
            ]

            many = [behaviour(f"e{i}", 0, now)[0] for i in range(50)]
            many.append(shown("click", "last", 1001, now, ad, pid="nope")[0])
            error = await refused(channel, many)
            found = violations(error)
            assert len(found) == MAX_REPORTED_PROBLEMS + 1
            assert found[0][0] == "events[0].user_id"
            assert (
                found[MAX_REPORTED_PROBLEMS - 1][0]
                == f"events[{MAX_REPORTED_PROBLEMS - 1}].user_id"
            )
            assert found[-1] == (
                "events",
                f"51 problems in all; the first {MAX_REPORTED_PROBLEMS} are listed",
            )
            assert redis_client.xlen(keys.EVENT_LOG) == 0

    run(scenario)


def test_an_oversized_batch_is_refused_and_an_empty_one_accepts_nothing(redis_client, redis_url):
    async def scenario():
        async with (
            running_stack(redis_url, "events", ADREC_EVENTS_MAX_BATCH_SIZE=10) as stack,
            loopback_channel(events_port(stack)) as channel,
        ):
            now = _now()
            error = await refused(channel, [behaviour(f"e{i}", 1001, now)[0] for i in range(11)])
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert error.details() == "events: holds 11 events; at most 10 per batch"
            assert (
                metric(stack, "adrec_event_batches_rejected_total", **SERVICE, reason="too_large")
                == 1
            )

            empty = await report(channel, [])
            assert empty.accepted == 0 and empty.log_position == ""
            assert redis_client.exists(keys.EVENT_LOG) == 0

            full = await report(channel, [behaviour(f"e{i}", 1001, now)[0] for i in range(10)])
            assert full.accepted == 10 and redis_client.xlen(keys.EVENT_LOG) == 10

    run(scenario)


def test_before_any_publish_behaviour_is_logged_and_ad_events_wait_for_an_ad_table(
    redis_client, redis_url
):
    async def scenario():
        async with (
            running_stack(redis_url, "events") as stack,
            loopback_channel(events_port(stack)) as channel,
        ):
            # Readiness needs Redis, not a data version.
            assert await health_status(channel) == SERVING
            now = _now()
            assert (await report(channel, [behaviour("pv-0", 1001, now)[0]])).accepted == 1

            ad_event = shown("impression", "imp-0", 1001, now, 5)[0]
            error = await refused(channel, [behaviour("pv-1", 1001, now)[0], ad_event])
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            assert "no data version loaded yet" in error.details()
            assert redis_client.xlen(keys.EVENT_LOG) == 1
            assert (
                metric(stack, "adrec_event_batches_rejected_total", **SERVICE, reason="no_ad_table")
                == 1
            )
            # A bad event is the caller's to fix first, table or not.
            error = await refused(channel, [shown("impression", "", 1001, now, 5)[0]])
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT

            # The intake follows the active version: a publish brings its ad table, and the
            # next one replaces it.
            first = await asyncio.to_thread(publish_version, redis_client, seed=3, ads=1000)
            await wait_until(lambda: stack.services["events"].service.known_ads is not None)
            old_ad = int(first.ads["adgroup_id"][0])
            assert (
                await report(channel, [shown("click", "c1", 1001, now, old_ad)[0]])
            ).accepted == 1
            second = await asyncio.to_thread(publish_version, redis_client, seed=4, ads=1000)
            await wait_until(
                lambda: stack.services["events"].service.known_ads.version == second.version
            )
            new_ad = int(second.ads["adgroup_id"][0])
            assert old_ad not in second.ads["adgroup_id"]
            assert (
                await report(channel, [shown("click", "c2", 1001, now, new_ad)[0]])
            ).accepted == 1
            error = await refused(channel, [shown("click", "c3", 1001, now, old_ad)[0]])
            assert violations(error) == [
                (
                    "events[0].click.ad_id",
                    f"{old_ad} is not an ad of the active data version {second.version}",
                )
            ]
            assert redis_client.xlen(keys.EVENT_LOG) == 3

    run(scenario)


def test_redis_down_answers_unavailable_acknowledges_nothing_and_recovers():
    with private_redis(extra_args=("--requirepass", PASSWORD)) as server:
        settings = RedisSettings(url=server.url, password=PASSWORD)
        client = redis.Redis.from_url(server.url, password=PASSWORD)

        async def scenario():
            async with (
                running_stack(settings, "events") as stack,
                loopback_channel(events_port(stack)) as channel,
            ):
                now = _now()
                assert (await report(channel, [behaviour("before", 1001, now)[0]])).accepted == 1
                await asyncio.to_thread(server.stop)
                attempts = []
                for index in range(5):
                    batch = [behaviour(f"down-{index}-{i}", 1001, now)[0] for i in range(100)]
                    attempts.append(await refused(channel, batch))
                for error in attempts:
                    assert error.code() == grpc.StatusCode.UNAVAILABLE
                    assert error.details().startswith("cannot log events: Redis ")
                    assert PASSWORD not in error.details()
                    assert "127.0.0.1" not in error.details()
                assert (
                    metric(
                        stack,
                        "adrec_event_batches_rejected_total",
                        **SERVICE,
                        reason="redis_unavailable",
                    )
                    == 5
                )
                assert metric(stack, "adrec_events_accepted_total", **SERVICE, kind="cart") == 1
                # Out of rotation, not restarted.
                await wait_until(lambda: _status(channel, NOT_SERVING))
                assert await health_status(channel, LIVENESS_SERVICE_NAME) == SERVING

                # The server comes back empty (no persistence): none of the refused batches
                # reached it, and the intake works again.
                await asyncio.to_thread(server.restart)
                await wait_until(lambda: _status(channel, SERVING))
                assert client.exists(keys.EVENT_LOG) == 0
                after = await report(channel, [behaviour("after", 1001, _now())[0]])
                assert after.accepted == 1
                assert [decode_event(line).event_id for _, line in logged(client)] == ["after"]

        run(scenario)
        client.close()


async def _status(channel: grpc.aio.Channel, wanted: int) -> bool:
    with contextlib.suppress(grpc.aio.AioRpcError):
        return await health_status(channel) == wanted
    return False


def test_the_log_is_trimmed_to_about_its_maximum_length(redis_client, redis_url):
    maximum = 1000
    node = int(redis_client.config_get("stream-node-max-entries")["stream-node-max-entries"])

    async def scenario():
        async with (
            running_stack(redis_url, "events", ADREC_EVENTS_LOG_MAX_LENGTH=maximum) as stack,
            loopback_channel(events_port(stack)) as channel,
        ):
            now = _now()
            for batch in range(6):
                events = [behaviour(f"e{batch}-{i}", 1001, now)[0] for i in range(1000)]
                assert (await report(channel, events)).accepted == 1000
            length = redis_client.xlen(keys.EVENT_LOG)
            assert maximum <= length < maximum + node
            assert metric(stack, "adrec_event_log_length", **SERVICE) == length
            # What is kept is the newest: the last batch whole.
            last = [decode_event(line).event_id for _, line in logged(redis_client)[-1000:]]
            assert last == [f"e5-{i}" for i in range(1000)]

    run(scenario)


def test_a_fresh_intake_exports_its_counters_at_0(redis_client, redis_url):
    async def scenario():
        async with running_stack(redis_url, "events") as stack:
            registry = stack.metrics.registry
            for kind in Kind:
                value = registry.get_sample_value(
                    "adrec_events_accepted_total", {**SERVICE, "kind": kind.value}
                )
                assert value == 0, kind
            for reason in REJECTION_REASONS:
                value = registry.get_sample_value(
                    "adrec_event_batches_rejected_total", {**SERVICE, "reason": reason}
                )
                assert value == 0, reason
            assert registry.get_sample_value("adrec_event_log_length", SERVICE) == 0
            assert registry.get_sample_value("adrec_event_batch_size_count", SERVICE) == 0
            value = registry.get_sample_value(
                "adrec_redis_errors_total", {**SERVICE, "op": "append_events"}
            )
            assert value == 0

    run(scenario)
