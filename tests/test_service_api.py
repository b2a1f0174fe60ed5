"""What a caller of the API meets: every bad field in one answer, with BadRequest details;
an omitted count; the protoset as a schema; health List; and Redis outages said plainly."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest
import redis
from google.rpc import code_pb2, error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_helpers import REPO_ROOT, health_status, loopback_channel, run_buf
from grpc_status import rpc_status
from service_data import PIDS, publish_version, rank, recommend, run, running_stack, wait_until

from adrec.api.recall.v1 import recall_service_pb2, recall_service_pb2_grpc
from adrec.core.redis_server import free_port, private_redis
from services.gateway.service import DEFAULT_COUNT
from services.runtime.health import LIVENESS_SERVICE_NAME
from services.runtime.requests import ECHO_LIMIT

PROTOSET = REPO_ROOT / "protos" / "adrec.protoset.binpb"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
RECALL = "adrec.recall.v1.RecallService"


async def candidates(channel: grpc.aio.Channel, **request):
    stub = recall_service_pb2_grpc.RecallServiceStub(channel)
    return await stub.GetCandidates(recall_service_pb2.GetCandidatesRequest(**request), timeout=5)


def field_violations(error: grpc.aio.AioRpcError) -> dict[str, str]:
    """Field -> description, from the google.rpc.BadRequest in the status details."""
    status = rpc_status.from_call(error)
    assert status is not None, "no google.rpc.Status in the trailing metadata"
    assert status.code == code_pb2.INVALID_ARGUMENT
    (detail,) = status.details
    bad_request = error_details_pb2.BadRequest()
    assert detail.Unpack(bad_request)
    return {violation.field: violation.description for violation in bad_request.field_violations}


def test_every_bad_field_is_reported_at_once_with_bad_request_details(redis_client, redis_url):
    publish_version(redis_client)

    async def scenario():
        async with running_stack(redis_url) as stack:
            ports = {name: stack.services[name].port for name in ("recall", "ranking", "gateway")}
            async with (
                loopback_channel(ports["recall"]) as recall,
                loopback_channel(ports["ranking"]) as ranking,
                loopback_channel(ports["gateway"]) as gateway,
            ):
                calls = {
                    "gateway": (
                        lambda: recommend(
                            gateway,
                            user_id=-4,
                            pid="p" * 400_000,
                            count=501,
                            mode=7,
                            request_id="r" * 400_000,
                        ),
                        ["user_id", "pid", "count", "request_id", "mode"],
                    ),
                    "recall": (
                        lambda: candidates(recall, user_id=0, pid="nope", limit=-1),
                        ["user_id", "pid", "limit"],
                    ),
                    "ranking": (
                        lambda: rank(ranking, user_id=0, pid="", ad_ids=[5, 0, -7, 9], top_k=1001),
                        ["user_id", "pid", "top_k", "ad_ids"],
                    ),
                }
                found = {}
                for service, (call, fields) in calls.items():
                    with pytest.raises(grpc.aio.AioRpcError) as error:
                        await call()
                    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, service
                    violations = field_violations(error.value)
                    assert list(violations) == fields, service
                    # The message is the same list, readable, and bounded however large the
                    # values it names.
                    assert error.value.details() == "; ".join(
                        f"{field}: {description}" for field, description in violations.items()
                    )
                    assert len(error.value.details()) < 600, service
                    found[service] = violations

        gateway, ranking = found["gateway"], found["ranking"]
        assert gateway["pid"].startswith(f"{'p' * ECHO_LIMIT!r}... is not a known placement")
        assert gateway["request_id"].startswith("holds 400000 characters; at most 128")
        assert gateway["count"] == "must be between 1 and 500, got 501"
        assert ranking["ad_ids"] == "ids must be positive; ad_ids[1] is 0, and 1 more are not"

    run(scenario)


def test_an_omitted_count_means_the_default_and_the_protoset_is_a_schema(redis_client, redis_url):
    """buf curl reads the API from the shipped protoset alone, not from reflection."""
    data = publish_version(redis_client)
    user = data.users_with_factors[0]

    async def scenario():
        async with (
            running_stack(redis_url) as stack,
            loopback_channel(stack.services["gateway"].port) as gateway,
        ):
            assert len((await recommend(gateway, user_id=user, pid=PIDS[0])).ads) == DEFAULT_COUNT
            code, output, errors = await run_buf(
                "curl",
                "--schema",
                str(PROTOSET),
                "--protocol",
                "grpc",
                "--http2-prior-knowledge",
                "--data",
                json.dumps({"userId": str(user), "pid": PIDS[0]}),
                f"http://127.0.0.1:{stack.services['gateway'].port}"
                "/adrec.gateway.v1.GatewayService/Recommend",
            )
            assert code == 0, errors
            answer = json.loads(output)
            assert answer["servingPath"] == "SERVING_PATH_REALTIME_RANKED"
            assert len(answer["ads"]) == DEFAULT_COUNT == 10

    run(scenario)


def test_health_list_answers_every_status_check_gives(redis_client, redis_url):
    async def statuses(channel: grpc.aio.Channel) -> dict[str, int]:
        stub = health_pb2_grpc.HealthStub(channel)
        listed = await stub.List(health_pb2.HealthListRequest(), timeout=5)
        return {name: response.status for name, response in listed.statuses.items()}

    async def checked(channel: grpc.aio.Channel, names) -> dict[str, int]:
        return {name: await health_status(channel, name) for name in names}

    async def scenario():
        async with (
            running_stack(redis_url, "recall") as stack,
            loopback_channel(stack.services["recall"].port) as channel,
        ):
            before = await statuses(channel)
            assert {"", RECALL, LIVENESS_SERVICE_NAME} <= set(before)
            assert before == await checked(channel, before)
            assert (before[""], before[RECALL], before[LIVENESS_SERVICE_NAME]) == (
                NOT_SERVING,
                NOT_SERVING,
                SERVING,
            )

            await asyncio.to_thread(publish_version, redis_client)

            async def serving():
                return (await statuses(channel))[""] == SERVING

            await wait_until(serving)
            after = await statuses(channel)
            assert set(after) == set(before)
            assert after == await checked(channel, after)
            assert after[RECALL] == SERVING

            # Draining turns every status NOT_SERVING for good, in List as in Check.
            health = stack.services["recall"].server.health
            await health.enter_graceful_shutdown()
            await health.set(RECALL, SERVING)
            drained = await statuses(channel)
            assert drained == dict.fromkeys(after, NOT_SERVING)
            assert drained == await checked(channel, drained)

    run(scenario)


def test_recall_and_ranking_say_when_redis_is_unreachable():
    port = free_port()
    # Nothing listens there: every connection is refused.
    closed = f"redis://127.0.0.1:{port}/0"

    async def refusals(url: str, **request) -> dict[str, str]:
        """Each service's UNAVAILABLE message for a well-formed request."""
        async with (
            running_stack(url) as stack,
            loopback_channel(stack.services["recall"].port) as recall,
            loopback_channel(stack.services["ranking"].port) as ranking,
        ):
            if "stop" in request:
                await asyncio.to_thread(request.pop("stop"))
            found = {}
            for service, call in (
                ("recall", lambda: candidates(recall, user_id=request["user_id"])),
                ("ranking", lambda: rank(ranking, ad_ids=[1, 2], pid=PIDS[0], **request)),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as error:
                    await call()
                assert error.value.code() == grpc.StatusCode.UNAVAILABLE, service
                found[service] = error.value.details()
            return found

    async def scenario():
        never_reached = await refusals(closed, user_id=5)
        for message in never_reached.values():
            assert message == "no data version loaded: Redis is unreachable (ConnectionError)"

        with private_redis() as server:
            data = publish_version(redis.Redis.from_url(server.url))
            user = data.users_with_factors[0]
            # Loaded, then Redis goes away: each read says which read Redis failed.
            lost = await refusals(server.url, user_id=user, stop=server.stop)
        assert lost == {
            "recall": "cannot read the recall set: Redis is unreachable (ConnectionError)",
            "ranking": "cannot read the user's features: Redis is unreachable (ConnectionError)",
        }
        for message in (*never_reached.values(), *lost.values()):
            assert str(port) not in message
            assert str(server.port) not in message

    run(scenario)
