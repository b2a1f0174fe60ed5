"""The shared server bootstrap, exercised over real loopback gRPC with a RecallService."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import random
import signal
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pool
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_helpers import health_status, loopback_channel, run_buf
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from adrec.api.common.v1 import common_pb2
from adrec.api.recall.v1 import recall_service_pb2, recall_service_pb2_grpc
from services.runtime.health import LIVENESS_SERVICE_NAME, wait_until_serving
from services.runtime.metrics import Metrics, call_counters, grpc_server_observer
from services.runtime.server import RunningServer, ServiceSpec, run_until_signalled, serve

RECALL = recall_service_pb2.DESCRIPTOR.services_by_name["RecallService"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
HOLD = "hold"


class FixedRecallServicer(recall_service_pb2_grpc.RecallServiceServicer):
    """Answers every user with `limit` consecutive ids from 101 (three when unset).

    A request whose request_id is HOLD waits until the test releases it, to have a call in
    flight while the server stops.
    """

    def __init__(self) -> None:
        self.held_call_started = asyncio.Event()
        self.release_held_calls = asyncio.Event()
        self.held_calls = 0

    async def GetCandidates(self, request, context):
        if request.request_id == "abort":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "limit: too big")
        if request.request_id == "crash":
            raise RuntimeError("a bug")
        if request.request_id == HOLD:
            self.held_calls += 1
            self.held_call_started.set()
            await self.release_held_calls.wait()
        return recall_service_pb2.GetCandidatesResponse(
            ad_ids=range(101, 101 + (request.limit or 3)),
            source=common_pb2.CANDIDATE_SOURCE_PERSONAL,
            data_version="test-version",
        )


@asynccontextmanager
async def recall_server(
    **serve_options: Any,
) -> AsyncIterator[tuple[RunningServer, FixedRecallServicer]]:
    servicer = FixedRecallServicer()
    spec = ServiceSpec.of(
        recall_service_pb2.DESCRIPTOR.services_by_name["RecallService"],
        servicer,
        recall_service_pb2_grpc.add_RecallServiceServicer_to_server,
    )
    async with serve(spec, **serve_options) as running:
        yield running, servicer


def run(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), timeout=60))


async def get_candidates(channel: grpc.aio.Channel, **request: Any):
    stub = recall_service_pb2_grpc.RecallServiceStub(channel)
    return await stub.GetCandidates(recall_service_pb2.GetCandidatesRequest(**request), timeout=10)


async def wait_until(condition: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def wait_until_connections_refused(port: int, timeout: float = 20) -> None:
    """Poll with health checks on fresh connections until the server refuses them."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        async with loopback_channel(port) as channel:
            try:
                await health_status(channel)
            except grpc.aio.AioRpcError as error:
                # A call racing the shutdown on an accepted connection is CANCELLED instead.
                if error.code() == grpc.StatusCode.UNAVAILABLE:
                    return
        await asyncio.sleep(0.01)
    raise AssertionError("the server kept accepting connections")


def test_serves_the_application_rpc():
    async def scenario():
        async with recall_server() as (running, _), loopback_channel(running.port) as channel:
            response = await get_candidates(channel, user_id=7)
            assert list(response.ad_ids) == [101, 102, 103]
            assert response.source == common_pb2.CANDIDATE_SOURCE_PERSONAL
            assert response.data_version == "test-version"

    run(scenario)


def test_health_is_not_serving_until_set_for_the_server_and_each_service_together():
    async def scenario():
        async with recall_server() as (running, _), loopback_channel(running.port) as channel:
            assert await health_status(channel, "") == NOT_SERVING
            assert await health_status(channel, RECALL) == NOT_SERVING

            await running.set_serving(True)
            assert await health_status(channel, "") == SERVING
            assert await health_status(channel, RECALL) == SERVING

            await running.set_serving(False)
            assert await health_status(channel, "") == NOT_SERVING
            assert await health_status(channel, RECALL) == NOT_SERVING

            with pytest.raises(grpc.aio.AioRpcError) as unknown:
                await health_status(channel, "adrec.nope.v1.NopeService")
            assert unknown.value.code() == grpc.StatusCode.NOT_FOUND

    run(scenario)


def test_wait_until_serving_polls_the_overall_status_of_a_started_process():
    async def scenario():
        async with recall_server() as (running, _):
            address = f"127.0.0.1:{running.port}"
            assert not await asyncio.to_thread(wait_until_serving, address, 0.5)
            await running.set_serving(True)
            assert await asyncio.to_thread(wait_until_serving, address, 20)

    run(scenario)


def test_the_liveness_name_is_serving_whatever_the_readiness_status():
    async def scenario():
        async with recall_server() as (running, _), loopback_channel(running.port) as channel:
            assert await health_status(channel, LIVENESS_SERVICE_NAME) == SERVING
            assert await health_status(channel, "") == NOT_SERVING
            await running.set_serving(True)
            assert await health_status(channel, LIVENESS_SERVICE_NAME) == SERVING
            await running.set_serving(False)
            assert await health_status(channel, LIVENESS_SERVICE_NAME) == SERVING

    run(scenario)


def describe_over_reflection(port: int) -> dict[str, Any]:
    """Resolve RecallService through server reflection alone, into a fresh descriptor pool."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        pool = descriptor_pool.DescriptorPool(database)
        service = pool.FindServiceByName(RECALL)
        method = service.methods_by_name["GetCandidates"]
        source = method.output_type.fields_by_name["source"]
        return {
            "services": set(database.get_services()),
            "file": service.file.name,
            "dependencies": [dependency.name for dependency in service.file.dependencies],
            "request_fields": [field.name for field in method.input_type.fields],
            "source_enum": source.enum_type.full_name,
            "source_values": [value.name for value in source.enum_type.values],
            "scored_ad_fields": [
                field.name
                for field in pool.FindMessageTypeByName("adrec.common.v1.ScoredAd").fields
            ],
        }


def test_reflection_lists_services_and_resolves_imported_protos():
    async def scenario():
        async with recall_server() as (running, _):
            # The sync reflection client blocks; the server shares this thread's event loop.
            described = await asyncio.to_thread(describe_over_reflection, running.port)
        assert described == {
            "services": {
                RECALL,
                "grpc.health.v1.Health",
                "grpc.reflection.v1alpha.ServerReflection",
            },
            "file": "adrec/recall/v1/recall_service.proto",
            "dependencies": ["adrec/common/v1/common.proto"],
            "request_fields": ["user_id", "pid", "limit", "request_id"],
            "source_enum": "adrec.common.v1.CandidateSource",
            "source_values": [
                "CANDIDATE_SOURCE_UNSPECIFIED",
                "CANDIDATE_SOURCE_PERSONAL",
                "CANDIDATE_SOURCE_POPULAR",
            ],
            "scored_ad_fields": ["ad_id", "ctr", "pctr", "bid", "ecpm"],
        }

    run(scenario)


def test_buf_curl_lists_and_calls_methods_through_reflection():
    async def scenario():
        async with recall_server() as (running, _):
            await running.set_serving(True)
            base = f"http://127.0.0.1:{running.port}"
            curl = ("curl", "--protocol", "grpc", "--http2-prior-knowledge", "--reflect")

            code, services, errors = await run_buf(*curl, "--list-services", base)
            assert code == 0, errors
            assert RECALL in services.split()

            code, methods, errors = await run_buf(*curl, "--list-methods", base)
            assert code == 0, errors
            assert f"{RECALL}/GetCandidates" in methods.split()

            code, output, errors = await run_buf(
                *curl, "--data", '{"userId": "7", "limit": 2}', f"{base}/{RECALL}/GetCandidates"
            )
            assert code == 0, errors
            assert json.loads(output) == {
                "adIds": ["101", "102"],
                "source": "CANDIDATE_SOURCE_PERSONAL",
                "dataVersion": "test-version",
            }

            code, output, errors = await run_buf(
                *curl,
                "--data",
                json.dumps({"service": RECALL}),
                f"{base}/grpc.health.v1.Health/Check",
            )
            assert code == 0, errors
            assert json.loads(output) == {"status": "SERVING"}

    run(scenario)


def test_messages_over_the_size_bound_are_rejected_both_ways():
    async def scenario():
        async with (
            recall_server(max_message_bytes=1024) as (running, _),
            loopback_channel(running.port) as channel,
        ):
            with pytest.raises(grpc.aio.AioRpcError) as oversized_request:
                await get_candidates(channel, user_id=7, request_id="x" * 2000)
            assert oversized_request.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

            with pytest.raises(grpc.aio.AioRpcError) as oversized_response:
                await get_candidates(channel, user_id=7, limit=1000)
            assert oversized_response.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

            # The bound rejects single calls, not the server.
            assert len((await get_candidates(channel, user_id=7, limit=100)).ad_ids) == 100

    run(scenario)


def test_graceful_stop_refuses_new_calls_and_lets_an_in_flight_call_finish():
    async def scenario():
        async with (
            recall_server() as (running, servicer),
            loopback_channel(running.port) as channel,
        ):
            await running.set_serving(True)
            held = asyncio.ensure_future(get_candidates(channel, user_id=7, request_id=HOLD))
            await servicer.held_call_started.wait()

            started = time.monotonic()
            # A grace far beyond the bound below: stop must end with the last call.
            stopping = asyncio.ensure_future(running.stop(grace=120))
            await wait_until_connections_refused(running.port)
            assert not held.done()

            servicer.release_held_calls.set()
            assert list((await held).ad_ids) == [101, 102, 103]
            await stopping
            assert time.monotonic() - started < 20

    run(scenario)


def test_stop_cancels_calls_still_running_when_grace_ends():
    async def scenario():
        async with (
            recall_server() as (running, servicer),
            loopback_channel(running.port) as channel,
        ):
            held = asyncio.ensure_future(get_candidates(channel, user_id=7, request_id=HOLD))
            await servicer.held_call_started.wait()

            started = time.monotonic()
            await running.stop(grace=0.3)
            assert 0.3 <= time.monotonic() - started < 20
            with pytest.raises(grpc.aio.AioRpcError) as cancelled:
                await held
            assert cancelled.value.code() == grpc.StatusCode.UNAVAILABLE

    run(scenario)


def test_sigterm_reports_not_serving_then_drains_in_flight_calls():
    async def scenario():
        async with (
            recall_server() as (running, servicer),
            loopback_channel(running.port) as channel,
        ):
            await running.set_serving(True)
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service=RECALL)
            )
            assert (await watch.read()).status == SERVING
            held = asyncio.ensure_future(get_candidates(channel, user_id=7, request_id=HOLD))
            await servicer.held_call_started.wait()

            handler_before = signal.getsignal(signal.SIGTERM)
            draining = asyncio.ensure_future(run_until_signalled(running, grace=10))
            # Sending SIGTERM before the handler is in place would kill the test run.
            await wait_until(lambda: signal.getsignal(signal.SIGTERM) is not handler_before)
            os.kill(os.getpid(), signal.SIGTERM)

            assert (await watch.read()).status == NOT_SERVING
            watch.cancel()
            assert not held.done()
            servicer.release_held_calls.set()
            assert list((await held).ad_ids) == [101, 102, 103]
            assert await draining == signal.SIGTERM
            await wait_until_connections_refused(running.port)

    run(scenario)


def test_run_until_signalled_returns_when_the_server_stops_otherwise():
    async def scenario():
        async with recall_server() as (running, _):
            waiting = asyncio.ensure_future(run_until_signalled(running, grace=1))
            await asyncio.sleep(0)
            await running.stop(grace=0)
            assert await waiting is None

    run(scenario)


def test_serve_rejects_services_reflection_could_not_describe():
    async def scenario():
        servicer = FixedRecallServicer()
        add = recall_service_pb2_grpc.add_RecallServiceServicer_to_server
        with pytest.raises(ValueError, match=r"adrec\.nope\.v1\.NopeService"):
            async with serve(ServiceSpec("adrec.nope.v1.NopeService", servicer, add)):
                pass
        with pytest.raises(ValueError, match="twice"):
            async with serve(
                ServiceSpec(RECALL, servicer, add), ServiceSpec(RECALL, servicer, add)
            ):
                pass

    run(scenario)


def test_a_port_in_use_fails_loudly_instead_of_sharing_traffic():
    async def scenario():
        async with recall_server() as (running, _):
            with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{running.port}"):
                async with recall_server(port=running.port):
                    pass

    run(scenario)


class MethodRecorder:
    """An observer noting which methods it wraps and which wrapped methods are called."""

    def __init__(self) -> None:
        self.wrapped: set[tuple[str, str]] = set()
        self.calls: list[str] = []

    def __call__(self, service: str, method: str, behavior):
        self.wrapped.add((service, method))

        async def observed(request, context):
            self.calls.append(f"/{service}/{method}")
            return await behavior(request, context)

        return observed


def test_the_observer_wraps_the_unary_methods_of_the_services_and_health():
    async def scenario():
        recorder = MethodRecorder()
        async with (
            recall_server(observer=recorder) as (running, _),
            loopback_channel(running.port) as channel,
        ):
            await get_candidates(channel, user_id=7)
            await health_status(channel)
        # Health's streaming Watch and reflection pass through unwrapped.
        assert recorder.wrapped == {
            (RECALL, "GetCandidates"),
            ("grpc.health.v1.Health", "Check"),
            ("grpc.health.v1.Health", "List"),
        }
        assert recorder.calls == [
            f"/{RECALL}/GetCandidates",
            "/grpc.health.v1.Health/Check",
        ]

    run(scenario)


def test_grpc_server_metrics_count_each_call_by_its_status_code():
    async def scenario():
        metrics = Metrics()
        async with (
            recall_server(observer=grpc_server_observer(metrics)) as (running, servicer),
            loopback_channel(running.port) as channel,
        ):
            await get_candidates(channel, user_id=7)
            for request_id, code in (
                ("abort", grpc.StatusCode.INVALID_ARGUMENT),
                ("crash", grpc.StatusCode.UNKNOWN),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as failure:
                    await get_candidates(channel, user_id=7, request_id=request_id)
                assert failure.value.code() == code
            stub = recall_service_pb2_grpc.RecallServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as late:
                await stub.GetCandidates(
                    recall_service_pb2.GetCandidatesRequest(user_id=7, request_id=HOLD), timeout=0.2
                )
            assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

            def handled(code: str) -> float | None:
                return metrics.registry.get_sample_value(
                    "grpc_server_handled_total",
                    {
                        "grpc_type": "unary",
                        "grpc_service": RECALL,
                        "grpc_method": "GetCandidates",
                        "grpc_code": code,
                    },
                )

            await wait_until(lambda: handled("DeadlineExceeded") == 1)
            servicer.release_held_calls.set()
        labels = {"grpc_type": "unary", "grpc_service": RECALL, "grpc_method": "GetCandidates"}
        assert {code: handled(code) for code in ("OK", "InvalidArgument", "Unknown")} == {
            "OK": 1,
            "InvalidArgument": 1,
            "Unknown": 1,
        }
        assert metrics.registry.get_sample_value("grpc_server_started_total", labels) == 4
        assert metrics.registry.get_sample_value("grpc_server_handling_seconds_count", labels) == 4

    run(scenario)


# ------------------------------------------------------------------ overload and bad bytes

LIMIT = 8
SHED_DETAILS = f"server busy: at its limit of {LIMIT} concurrent calls; retry later"


@asynccontextmanager
async def limited_recall_server() -> AsyncIterator[
    tuple[RunningServer, FixedRecallServicer, Metrics]
]:
    """A recall server admitting LIMIT calls at once, counted as the services count them."""
    metrics = Metrics()
    async with recall_server(
        observer=grpc_server_observer(metrics),
        max_concurrent_rpcs=LIMIT,
        counters=call_counters(metrics),
    ) as (running, servicer):
        yield running, servicer, metrics


def counted(
    metrics: Metrics, name: str, service: str = RECALL, method: str = "GetCandidates", **labels: str
) -> float | None:
    return metrics.registry.get_sample_value(
        name, {"grpc_service": service, "grpc_method": method, **labels}
    )


def handled(
    metrics: Metrics, code: str, service: str = RECALL, method: str = "GetCandidates"
) -> float | None:
    return counted(
        metrics, "grpc_server_handled_total", service, method, grpc_type="unary", grpc_code=code
    )


def held_call(channel: grpc.aio.Channel, timeout: float = 20) -> asyncio.Future[Any]:
    stub = recall_service_pb2_grpc.RecallServiceStub(channel)
    return asyncio.ensure_future(
        stub.GetCandidates(
            recall_service_pb2.GetCandidatesRequest(user_id=7, request_id=HOLD), timeout=timeout
        )
    )


def test_a_burst_over_the_limit_gets_resource_exhausted_at_once_and_each_is_counted():
    excess = 40

    async def scenario():
        async with (
            limited_recall_server() as (running, servicer, metrics),
            loopback_channel(running.port) as channel,
        ):
            calls = [held_call(channel) for _ in range(LIMIT + excess)]
            # The admitted calls wait for the release; the others are answered meanwhile.
            await wait_until(
                lambda: (
                    sum(call.done() for call in calls) >= excess and servicer.held_calls == LIMIT
                )
            )
            assert running.calls_running == LIMIT
            # Health is never shed: probes answer while the service is at its limit.
            assert await health_status(channel, LIVENESS_SERVICE_NAME) == SERVING
            shed = [call.exception() for call in calls if call.done()]
            assert len(shed) == excess
            assert {(error.code(), error.details()) for error in shed} == {
                (grpc.StatusCode.RESOURCE_EXHAUSTED, SHED_DETAILS)
            }
            servicer.release_held_calls.set()
            answers = await asyncio.gather(*(call for call in calls if not call.done()))
            assert [list(answer.ad_ids) for answer in answers] == [[101, 102, 103]] * LIMIT
            await wait_until(lambda: running.calls_running == 0)

        assert counted(metrics, "adrec_shed_total") == excess
        assert handled(metrics, "ResourceExhausted") == excess
        assert handled(metrics, "OK") == LIMIT
        assert handled(metrics, "Unknown") == 0
        assert counted(metrics, "grpc_server_started_total", grpc_type="unary") == LIMIT + excess
        assert counted(metrics, "adrec_abandoned_total") == 0

    run(scenario)


def test_one_connections_calls_past_its_stream_bound_never_run_ahead_of_another_connections():
    streams = 4
    # Channels with the same arguments would share one connection.
    own_connection = {"grpc.use_local_subchannel_pool": 1}

    async def scenario():
        async with (
            recall_server(max_streams_per_connection=streams) as (running, servicer),
            loopback_channel(running.port, **own_connection) as busy,
            loopback_channel(running.port, **own_connection) as other,
        ):
            # A client learns the bound with the connection's settings.
            await get_candidates(busy, user_id=1)
            calls = [held_call(busy) for _ in range(3 * streams)]
            await wait_until(lambda: servicer.held_calls == streams)
            await asyncio.sleep(0.3)
            assert servicer.held_calls == streams
            assert not any(call.done() for call in calls)
            # The server runs the other connection's call while the first one's wait.
            answer = await get_candidates(other, user_id=1)
            assert list(answer.ad_ids) == [101, 102, 103]
            servicer.release_held_calls.set()
            ended = await asyncio.gather(*calls, return_exceptions=True)
        answered = [e for e in ended if isinstance(e, recall_service_pb2.GetCandidatesResponse)]
        refused = [e for e in ended if isinstance(e, grpc.aio.AioRpcError)]
        assert len(answered) + len(refused) == len(calls)
        assert len(answered) >= streams
        # A server counts a stream until it has released it, its client only until the end
        # arrived: a waiting call sent into that gap is refused unprocessed (REFUSED_STREAM),
        # which a caller may retry.
        assert {error.code() for error in refused} <= {grpc.StatusCode.UNAVAILABLE}
        assert servicer.held_calls == len(answered)

    run(scenario)


def test_a_stream_bound_must_be_positive():
    async def scenario():
        with pytest.raises(ValueError, match="max_streams_per_connection must be positive"):
            async with recall_server(max_streams_per_connection=0):
                pass

    run(scenario)


def test_calls_within_the_limit_are_never_shed_and_free_their_place_however_they_end():
    async def scenario():
        async with (
            limited_recall_server() as (running, servicer, metrics),
            loopback_channel(running.port) as channel,
        ):
            stub = recall_service_pb2_grpc.RecallServiceStub(channel)
            calls = [held_call(channel) for _ in range(LIMIT)]
            await wait_until(lambda: servicer.held_calls == LIMIT)
            assert running.calls_running == LIMIT
            servicer.release_held_calls.set()
            await asyncio.gather(*calls)

            # A full set of calls ending every other way: cancelled by the caller, past its
            # deadline, aborted by the handler, crashed in it.
            servicer.release_held_calls = asyncio.Event()
            cancelled = [held_call(channel) for _ in range(2)]
            late = [held_call(channel, timeout=0.3) for _ in range(2)]
            failing = [
                asyncio.ensure_future(
                    stub.GetCandidates(
                        recall_service_pb2.GetCandidatesRequest(user_id=7, request_id=kind),
                        timeout=20,
                    )
                )
                for kind in ("abort", "abort", "crash", "crash")
            ]
            await wait_until(lambda: servicer.held_calls == LIMIT + 4)
            for call in cancelled:
                call.cancel()
            outcomes = await asyncio.gather(*cancelled, *late, *failing, return_exceptions=True)
            assert [
                "cancelled" if isinstance(outcome, asyncio.CancelledError) else outcome.code()
                for outcome in outcomes
            ] == ["cancelled"] * 2 + [grpc.StatusCode.DEADLINE_EXCEEDED] * 2 + [
                grpc.StatusCode.INVALID_ARGUMENT
            ] * 2 + [grpc.StatusCode.UNKNOWN] * 2
            await wait_until(lambda: running.calls_running == 0)

            # Every place is free again: a full set is admitted once more.
            calls = [held_call(channel) for _ in range(LIMIT)]
            await wait_until(lambda: servicer.held_calls == 2 * LIMIT + 4)
            servicer.release_held_calls.set()
            assert len(await asyncio.gather(*calls)) == LIMIT

        assert counted(metrics, "adrec_shed_total") == 0
        assert handled(metrics, "ResourceExhausted") == 0
        assert handled(metrics, "OK") == 2 * LIMIT
        assert handled(metrics, "DeadlineExceeded") == 2
        assert handled(metrics, "Canceled") == 2

    run(scenario)


def test_a_call_that_ends_before_its_handler_runs_is_counted_as_abandoned():
    """A caller that gives up while its call waits, here for a request that never comes,
    leaves no handler to count it: the call is counted when it ends, and its place is freed."""

    async def scenario():
        async with (
            limited_recall_server() as (running, servicer, metrics),
            loopback_channel(running.port) as channel,
        ):
            never = asyncio.Event()

            async def no_request():
                await never.wait()
                yield b""

            # Streaming the request lets the call start without it.
            unsent = channel.stream_unary(f"/{RECALL}/GetCandidates")
            cancelled = asyncio.ensure_future(unsent(no_request(), timeout=20))
            late = asyncio.ensure_future(unsent(no_request(), timeout=0.3))
            await wait_until(lambda: running.calls_running == 2)
            cancelled.cancel()
            outcomes = await asyncio.gather(cancelled, late, return_exceptions=True)
            assert isinstance(outcomes[0], asyncio.CancelledError)
            assert outcomes[1].code() == grpc.StatusCode.DEADLINE_EXCEEDED
            await wait_until(lambda: counted(metrics, "adrec_abandoned_total") == 2)
            assert running.calls_running == 0
            assert servicer.held_calls == 0

        assert counted(metrics, "grpc_server_started_total", grpc_type="unary") == 0
        assert counted(metrics, "adrec_shed_total") == 0

    run(scenario)


#: Bytes no request message parses: an unfinished varint, a field number 0 with an
#: invalid wire type, and seeded random bytes (checked below to be invalid too).
GARBAGE = (b"\xff" * 8, bytes(range(256)), random.Random(16).randbytes(100))


def test_bytes_that_are_no_request_get_invalid_argument_counted_and_logged_throttled(caplog, capfd):
    caplog.set_level(logging.DEBUG)
    for garbage in GARBAGE:
        for message in (recall_service_pb2.GetCandidatesRequest, health_pb2.HealthCheckRequest):
            with pytest.raises(DecodeError):
                message.FromString(garbage)
    calls = 30

    async def scenario():
        async with (
            limited_recall_server() as (running, _, metrics),
            loopback_channel(running.port) as channel,
        ):
            # No serializers: the bytes go out as they are.
            raw = channel.unary_unary(f"/{RECALL}/GetCandidates")
            started = time.monotonic()
            for index in range(calls):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await raw(GARBAGE[index % len(GARBAGE)], timeout=10)
                assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert refused.value.details() == (
                    "request is not a valid adrec.recall.v1.GetCandidatesRequest"
                )
            elapsed = time.monotonic() - started
            # Health's methods get the same treatment, the streaming Watch included.
            with pytest.raises(grpc.aio.AioRpcError) as check:
                await channel.unary_unary("/grpc.health.v1.Health/Check")(GARBAGE[0], timeout=10)
            with pytest.raises(grpc.aio.AioRpcError) as watch:
                async for _ in channel.unary_stream("/grpc.health.v1.Health/Watch")(
                    GARBAGE[0], timeout=10
                ):
                    pass
            for refusal in (check, watch):
                assert refusal.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert refusal.value.details() == (
                    "request is not a valid grpc.health.v1.HealthCheckRequest"
                )
            assert list((await get_candidates(channel, user_id=7)).ad_ids) == [101, 102, 103]
            await wait_until(lambda: running.calls_running == 0)
            return metrics, elapsed

    metrics, elapsed = asyncio.run(asyncio.wait_for(scenario(), timeout=60))
    assert handled(metrics, "InvalidArgument") == calls
    assert handled(metrics, "Unknown") == 0
    assert handled(metrics, "OK") == 1
    assert handled(metrics, "InvalidArgument", "grpc.health.v1.Health", "Check") == 1

    output = capfd.readouterr()
    assert "Traceback" not in output.out + output.err + caplog.text
    assert [record for record in caplog.records if record.exc_info] == []
    lines = [
        record
        for record in caplog.records
        if record.getMessage() == "refused a request that does not decode"
        and getattr(record, "method", None) == f"/{RECALL}/GetCandidates"
    ]
    # One line a second at most, each saying how many were held back before it.
    assert 1 <= len(lines) <= 1 + math.ceil(elapsed)
    assert len(lines) + sum(record.held_back for record in lines[1:]) <= calls


def test_a_call_whose_deadline_passed_before_its_handler_is_dropped_unserved_and_counted():
    async def scenario():
        async with (
            limited_recall_server() as (running, _, metrics),
            loopback_channel(running.port) as channel,
        ):
            assert list((await get_candidates(channel, user_id=7)).ad_ids) == [101, 102, 103]
            stub = recall_service_pb2_grpc.RecallServiceStub(channel)
            late = asyncio.ensure_future(
                stub.GetCandidates(recall_service_pb2.GetCandidatesRequest(user_id=7), timeout=0.2)
            )
            # Started, so its bytes leave with gRPC's own threads, but not yet taken up.
            await asyncio.sleep(0)
            # A saturated event loop: the call's deadline passes before the server takes it up.
            time.sleep(0.4)
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await late
            assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            await wait_until(
                lambda: (
                    (counted(metrics, "adrec_expired_total") or 0)
                    + (counted(metrics, "adrec_abandoned_total") or 0)
                    == 1
                )
            )
            await wait_until(lambda: running.calls_running == 0)
            return metrics

    metrics = asyncio.run(asyncio.wait_for(scenario(), timeout=60))
    # However far it got, the servicer never worked on it.
    assert handled(metrics, "OK") == 1
    assert counted(metrics, "adrec_undelivered_total") is not None


def test_grpc_core_tracebacks_for_undeliverable_answers_become_counted_throttled_lines(caplog):
    from services.runtime import server as runtime_server

    caplog.set_level(logging.DEBUG)

    class ExecuteBatchError(Exception):
        """Named as grpc's own: the filter knows it by its name."""

    core = logging.getLogger("grpc._cython.cygrpc")

    async def scenario():
        async with limited_recall_server() as (_, _, metrics):
            for _ in range(20):
                try:
                    raise ExecuteBatchError("Failed execute_batch")
                except ExecuteBatchError:
                    core.exception(
                        "ExecuteBatchError raised in core by servicer method [%s]",
                        f"/{RECALL}/GetCandidates",
                    )
            return metrics

    metrics = asyncio.run(asyncio.wait_for(scenario(), timeout=60))
    assert counted(metrics, "adrec_undelivered_total") == 20
    assert [record for record in caplog.records if record.exc_info] == []
    lines = [r for r in caplog.records if r.name == runtime_server.__name__ and "answer" in r.msg]
    assert 1 <= len(lines) <= 2
