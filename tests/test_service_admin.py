"""AdminService over real gRPC and real redis-servers: states set, read and listed, every
change recorded, and bad input refused naming the field with nothing changed."""

from __future__ import annotations

import time

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_helpers import health_status, loopback_channel
from redis_fixtures import RedisTarget
from service_data import metric, publish_version, run, running_stack
from test_service_events import violations

from adrec.api.admin.v1 import admin_service_pb2 as pb
from adrec.api.admin.v1 import admin_service_pb2_grpc
from adrec.core import keys
from adrec.core.redis_server import free_port

SERVING = health_pb2.HealthCheckResponse.SERVING
ADGROUP, CAMPAIGN, CUSTOMER = pb.AD_LEVEL_ADGROUP, pb.AD_LEVEL_CAMPAIGN, pb.AD_LEVEL_CUSTOMER
PAUSED, ACTIVE = pb.AD_STATUS_PAUSED, pb.AD_STATUS_ACTIVE


def stub(channel: grpc.aio.Channel) -> admin_service_pb2_grpc.AdminServiceStub:
    return admin_service_pb2_grpc.AdminServiceStub(channel)


def ref(level: int, id: int) -> pb.AdRef:
    return pb.AdRef(level=level, id=id)


async def refused(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


def test_states_are_set_read_listed_and_every_change_recorded(redis_target: RedisTarget):
    client = redis_target.client()
    data = publish_version(client)
    ad = int(data.ads["adgroup_id"][0])
    campaign = int(data.ads["campaign_id"][0])
    customer = int(data.ads["customer_id"][0])

    async def scenario():
        async with (
            running_stack(redis_target.settings, "admin") as stack,
            loopback_channel(stack.services["admin"].port) as channel,
        ):
            admin = stub(channel)
            assert await health_status(channel, "adrec.admin.v1.AdminService") == SERVING
            assert (await admin.ListAdStates(pb.ListAdStatesRequest())).last_change_id == 0
            before = int(time.time() * 1000)
            set_campaign = await admin.SetAdState(
                pb.SetAdStateRequest(
                    target=ref(CAMPAIGN, campaign), status=PAUSED, reason="budget spent"
                )
            )
            change = set_campaign.change
            assert change.change_id == 1 and change.previous_status == pb.AD_STATUS_UNSPECIFIED
            assert change.state.paused_now and change.state.reason == "budget spent"
            assert change.state.changed_at_ms >= before
            end = int(time.time()) + 3600
            await admin.SetAdState(
                pb.SetAdStateRequest(
                    target=ref(CUSTOMER, customer), status=ACTIVE, reason="flight", end_time=end
                )
            )

            shown = await admin.GetAdState(pb.GetAdStateRequest(target=ref(ADGROUP, ad)))
            assert shown.paused  # by its campaign
            assert (shown.campaign_id, shown.customer_id) == (campaign, customer)
            assert [(s.target.level, s.target.id) for s in shown.states] == [
                (CAMPAIGN, campaign),
                (CUSTOMER, customer),
            ]
            assert shown.states[1].end_time == end and not shown.states[1].paused_now

            resumed = await admin.SetAdState(
                pb.SetAdStateRequest(target=ref(CAMPAIGN, campaign), status=ACTIVE, reason="ok")
            )
            assert resumed.change.previous_status == PAUSED
            shown = await admin.GetAdState(pb.GetAdStateRequest(target=ref(ADGROUP, ad)))
            assert not shown.paused

            listed = await admin.ListAdStates(pb.ListAdStatesRequest())
            assert listed.last_change_id == 3
            assert [(s.target.level, s.status) for s in listed.states] == [
                (CAMPAIGN, ACTIVE),
                (CUSTOMER, ACTIVE),
            ]
            history = await admin.ListAdStateChanges(pb.ListAdStateChangesRequest())
            assert [c.change_id for c in history.changes] == [3, 2, 1]
            assert [c.state.reason for c in history.changes] == ["ok", "flight", "budget spent"]
            of_campaign = await admin.ListAdStateChanges(
                pb.ListAdStateChangesRequest(target=ref(CAMPAIGN, campaign), limit=1)
            )
            assert [c.change_id for c in of_campaign.changes] == [3]
            assert client.get(keys.AD_STATE_SEQ) == b"3"
            assert (
                metric(
                    stack,
                    "adrec_redis_errors_total",
                    adrec_service="admin",
                    op="ad_state_write",
                )
                == 0
            )

    try:
        run(scenario)
    finally:
        client.close()


@pytest.mark.parametrize(
    ("request_fields", "expected"),
    [
        ({"target": {"level": ADGROUP, "id": 1}, "status": PAUSED, "reason": "x"}, ["target.id"]),
        (
            {"target": {"level": CAMPAIGN, "id": -5}, "status": PAUSED, "reason": "x"},
            ["target.id"],
        ),
        ({"target": {"id": 5}, "status": PAUSED, "reason": "x"}, ["target.level"]),
        ({"target": {"level": CAMPAIGN, "id": 1}, "reason": "x"}, ["target.id", "status"]),
        ({"status": PAUSED, "reason": ""}, ["target.level", "target.id", "reason"]),
        ("end_before_start", ["end_time"]),
        ("end_in_the_past", ["end_time"]),
    ],
)
def test_bad_changes_are_invalid_argument_naming_the_field_and_change_nothing(
    redis_client, redis_url, request_fields, expected
):
    data = publish_version(redis_client)
    known = int(data.ads["adgroup_id"][0])
    now = int(time.time())
    if request_fields == "end_before_start":
        request_fields = {
            "target": {"level": ADGROUP, "id": known},
            "status": PAUSED,
            "reason": "x",
            "start_time": now + 100,
            "end_time": now + 50,
        }
    elif request_fields == "end_in_the_past":
        request_fields = {
            "target": {"level": ADGROUP, "id": known},
            "status": PAUSED,
            "reason": "x",
            "end_time": now - 50,
        }

    async def scenario():
        async with (
            running_stack(redis_url, "admin") as stack,
            loopback_channel(stack.services["admin"].port) as channel,
        ):
            error = await refused(stub(channel).SetAdState(pb.SetAdStateRequest(**request_fields)))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert [field for field, _ in violations(error)] == expected
            assert redis_client.exists(keys.AD_STATE, keys.AD_STATE_SEQ, keys.AD_STATE_HISTORY) == 0

    run(scenario)


def test_an_id_unknown_to_the_ad_table_is_named(redis_client, redis_url):
    publish_version(redis_client)

    async def scenario():
        async with (
            running_stack(redis_url, "admin") as stack,
            loopback_channel(stack.services["admin"].port) as channel,
        ):
            error = await refused(
                stub(channel).SetAdState(
                    pb.SetAdStateRequest(
                        target=ref(CAMPAIGN, 99_999_999), status=PAUSED, reason="typo"
                    )
                )
            )
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            ((field, description),) = violations(error)
            assert field == "target.id" and "99999999 is not a campaign" in description
            limit = await refused(
                stub(channel).ListAdStateChanges(pb.ListAdStateChangesRequest(limit=5000))
            )
            assert [field for field, _ in violations(limit)] == ["limit"]

    run(scenario)


def test_before_any_publish_states_read_but_cannot_change(redis_url):
    async def scenario():
        async with (
            running_stack(redis_url, "admin") as stack,
            loopback_channel(stack.services["admin"].port) as channel,
        ):
            listed = await stub(channel).ListAdStates(pb.ListAdStatesRequest())
            assert list(listed.states) == []
            error = await refused(
                stub(channel).SetAdState(
                    pb.SetAdStateRequest(target=ref(CAMPAIGN, 5), status=PAUSED, reason="x")
                )
            )
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            assert "no data version loaded" in error.details()

    run(scenario)


def test_an_unreachable_redis_is_unavailable_without_its_address():
    port = free_port()

    async def scenario():
        async with (
            running_stack(f"redis://127.0.0.1:{port}/0", "admin") as stack,
            loopback_channel(stack.services["admin"].port) as channel,
        ):
            error = await refused(stub(channel).ListAdStates(pb.ListAdStatesRequest()))
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            assert "Redis is unreachable" in error.details()
            assert str(port) not in error.details()
            assert (
                metric(stack, "adrec_redis_errors_total", adrec_service="admin", op="ad_state_read")
                == 1
            )

    run(scenario)
