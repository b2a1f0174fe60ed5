"""One service process: the services of an `adrec serve` target wired together and run.

:func:`serving` starts a target's services (recall, ranking, gateway, the event intake, the
admin API, or all five in one process and one event loop) on one Redis client and one `/metrics`
endpoint; :func:`run`
serves them until SIGTERM or SIGINT and drains them. `adrec serve` is these two behind
argument parsing:

    async with serving("ranking", RankingSettings(), RedisSettings()) as stack:
        port = stack.services["ranking"].port
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
from collections.abc import AsyncIterator
from typing import Any

from adrec.api.ranking.v1 import ranking_service_pb2
from adrec.api.recall.v1 import recall_service_pb2
from adrec.core import settings as settings_mod
from adrec.core.events import TimeBounds
from adrec.core.redis_conn import RedisSettings, redacted
from services.admin.service import AdminService
from services.events.log import EventLog
from services.events.service import EventService, Limits
from services.gateway.controls import ControlSettings
from services.gateway.service import Budgets, GatewayService, downstream_channel
from services.ranking.service import RankingService
from services.recall.service import RecallService
from services.runtime.app import RunningService, running_service
from services.runtime.data import RedisReader, client_without_socket_timeouts
from services.runtime.metrics import Metrics, start_metrics_endpoint
from services.runtime.server import run_until_signalled
from services.runtime.settings import SETTINGS

#: `adrec serve` targets: one service each, or all of them in one process (local use).
TARGETS = tuple(SETTINGS)
#: Drain order: the gateway first, so its in-flight calls can still reach the others; the
#: event intake and the admin API call none of them.
SERVICE_ORDER = ("gateway", "recall", "ranking", "events", "admin")

log = logging.getLogger("adrec.serve")


@dataclasses.dataclass
class Stack:
    """The services of one process and its metrics endpoint."""

    services: dict[str, RunningService]
    metrics: Metrics
    metrics_port: int


@contextlib.asynccontextmanager
async def serving(
    target: str, service_settings: Any, redis_settings: RedisSettings
) -> AsyncIterator[Stack]:
    """Start `target`'s services (all of them for "all") with their metrics endpoint."""
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    metrics = Metrics()
    host = service_settings.host
    endpoint = start_metrics_endpoint(metrics.registry, host, service_settings.metrics_port)
    client = client_without_socket_timeouts(redis_settings)
    services: dict[str, RunningService] = {}
    readers: list[RedisReader] = []

    def reader(name: str) -> RedisReader:
        readers.append(RedisReader(client, metrics.service(name), redis_settings.socket_timeout_s))
        return readers[-1]

    try:
        async with contextlib.AsyncExitStack() as stack:
            for name, service_class in (("recall", RecallService), ("ranking", RankingService)):
                if target in (name, "all"):
                    service = service_class(reader(name))
                    services[name] = await stack.enter_async_context(
                        running_service(
                            service,
                            service.reader,
                            metrics,
                            service_settings,
                            host=host,
                            port=getattr(service_settings, f"{name}_port"),
                            max_concurrent_rpcs=getattr(
                                service_settings, f"{name}_max_concurrent_rpcs"
                            ),
                        )
                    )
            if target in ("gateway", "all"):
                if target == "all":
                    local = local_host(host)
                    recall_target = f"{local}:{services['recall'].port}"
                    ranking_target = f"{local}:{services['ranking'].port}"
                else:
                    recall_target = service_settings.recall_address
                    ranking_target = service_settings.ranking_address
                recall_channel, ranking_channel = (
                    downstream_channel(
                        address,
                        api.DESCRIPTOR.services_by_name[name],
                        service_settings.max_message_bytes,
                        metrics,
                    )
                    for address, api, name in (
                        (recall_target, recall_service_pb2, "RecallService"),
                        (ranking_target, ranking_service_pb2, "RankingService"),
                    )
                )
                for channel in (recall_channel, ranking_channel):
                    stack.push_async_callback(channel.close)
                gateway = GatewayService(
                    reader("gateway"),
                    recall_channel,
                    ranking_channel,
                    Budgets(
                        request=service_settings.request_timeout_ms / 1000,
                        recall=service_settings.recall_timeout_ms / 1000,
                        ranking=service_settings.ranking_timeout_ms / 1000,
                        fallback_reserve=service_settings.fallback_reserve_ms / 1000,
                        redis_read=service_settings.redis_read_timeout_ms / 1000,
                    ),
                    ControlSettings(
                        caps=service_settings.gateway_frequency_caps,
                        served_seconds=service_settings.gateway_served_seconds,
                        max_per_category=service_settings.gateway_max_per_category,
                        max_per_brand=service_settings.gateway_max_per_brand,
                        max_per_customer=service_settings.gateway_max_per_customer,
                    ),
                )
                # After the server has stopped: its last answers' served ads are written.
                stack.push_async_callback(gateway.controls.aclose)
                services["gateway"] = await stack.enter_async_context(
                    running_service(
                        gateway,
                        gateway.reader,
                        metrics,
                        service_settings,
                        host=host,
                        port=service_settings.gateway_port,
                        max_concurrent_rpcs=service_settings.gateway_max_concurrent_rpcs,
                        max_streams_per_connection=(
                            service_settings.gateway_max_streams_per_connection
                        ),
                    )
                )
            if target in ("events", "all"):
                events_reader = reader("events")
                intake = EventService(
                    events_reader,
                    EventLog(
                        client,
                        events_reader.metrics,
                        service_settings.events_log_max_length,
                        redis_settings.socket_timeout_s,
                    ),
                    Limits(
                        max_batch_size=service_settings.events_max_batch_size,
                        time_bounds=TimeBounds(
                            max_age_seconds=service_settings.events_max_age_seconds,
                            max_ahead_seconds=service_settings.events_max_ahead_seconds,
                        ),
                    ),
                )
                services["events"] = await stack.enter_async_context(
                    running_service(
                        intake,
                        events_reader,
                        metrics,
                        service_settings,
                        host=host,
                        port=service_settings.events_port,
                        max_concurrent_rpcs=service_settings.events_max_concurrent_rpcs,
                    )
                )
            if target in ("admin", "all"):
                admin = AdminService(reader("admin"))
                services["admin"] = await stack.enter_async_context(
                    running_service(
                        admin,
                        admin.reader,
                        metrics,
                        service_settings,
                        host=host,
                        port=service_settings.admin_port,
                        max_concurrent_rpcs=service_settings.admin_max_concurrent_rpcs,
                    )
                )
            yield Stack(services, metrics, endpoint.port)
    finally:
        for each in readers:
            await each.aclose()
        await client.aclose()
        endpoint.close()


async def run(target: str, service_settings: Any, redis_settings: RedisSettings) -> int:
    """Serve `target` until SIGTERM or SIGINT, then drain; bound addresses go to stdout."""
    log.info(
        "starting",
        extra={
            "target": target,
            "redis": redacted(redis_settings.url),
            "settings": settings_mod.describe(service_settings),
        },
    )
    async with serving(target, service_settings, redis_settings) as stack:
        # Everything allocated so far lives as long as the process: keeping it out of the
        # collector's full passes shortens the pause each of them causes
        # (docs/performance.md).
        gc.freeze()
        for name, running in stack.services.items():
            print(f"{name} listening on {running.server.address}", flush=True)
        print(f"metrics listening on {service_settings.host}:{stack.metrics_port}", flush=True)
        servers = [stack.services[name].server for name in SERVICE_ORDER if name in stack.services]
        signum = await run_until_signalled(servers, grace=service_settings.drain_seconds)
    log.info("stopped", extra={"signal": signum.name if signum else None})
    return 0


def local_host(host: str) -> str:
    """Where this process's own servers are reached when they listen on `host`."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host
