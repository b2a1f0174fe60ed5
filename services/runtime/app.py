"""Running a data-backed service: the gRPC server plus a watcher of Redis and the data version.

Each service implements :class:`VersionedService`: it names its gRPC service, prepares its
per-version state when the active version changes, and says when it is ready. The watcher
polls ``adrec:active`` and the active version's metadata (the same GETs double as the Redis
liveness check) and keeps the health status in step. Readiness means "this replica can
answer usefully now": SERVING once the service is ready and, for a service that needs Redis
on every request (recall, ranking), while Redis answers. A service that can answer from
memory (the gateway's popular lists) stays SERVING through a Redis outage, so an outage
does not take every replica out of rotation at once.

Each poll also checks every Redis node (a Redis Cluster's primaries, or the one server) in
one round trip each: a PING and the loaded version's sentinels (``keys.sentinel_keys``).
A cluster counts as reachable while the nodes that answer serve more than half the hash
slots; the keys of the nodes that do not answer fail at once meanwhile
(:class:`~services.runtime.data.ClusterGets`), so only their share of users degrades.
A sentinel gone from a node that answers, or the active version pointer gone while a
version is loaded, is data loss: Redis restarted or was flushed without the data coming
back. It is logged, counted (adrec_data_loss_detected, adrec_version_sentinels_missing) and
reported by the health name :data:`DATA_HEALTH_NAME`; readiness does not change, since
every replica reads the same Redis and taking them all out of rotation would turn a partial
loss into a full outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from typing import Protocol

from grpc_health.v1 import health_pb2
from redis.exceptions import RedisError

from adrec.core import keys
from adrec.core.metadata import VersionMeta
from services.runtime.data import NodeCheck, RedisOp, RedisReader
from services.runtime.logs import ServiceLogger
from services.runtime.metrics import Metrics, call_counters, grpc_server_observer
from services.runtime.server import RunningServer, ServiceSpec, serve
from services.runtime.settings import ServerSettings

#: Longest wait for the version watcher to finish its current check on shutdown.
WATCHER_STOP_SECONDS = 10.0
#: Health service name that reports SERVING while the loaded version's data is whole in
#: Redis, and NOT_SERVING once data loss is detected (or before a version is loaded).
DATA_HEALTH_NAME = "data"


class VersionedService(Protocol):
    name: str
    log: ServiceLogger

    @property
    def spec(self) -> ServiceSpec: ...

    @property
    def ready(self) -> bool:
        """True once the service can answer requests from a loaded version."""
        ...

    @property
    def answers_without_redis(self) -> bool:
        """Whether its answers stay useful while Redis is unreachable."""
        ...

    async def load_version(self, version: str, meta: VersionMeta | None) -> None:
        """Prepare the state of a newly active version, whose metadata is `meta` (None when
        it has none).

        Raise to be asked again at the next poll (e.g. Redis failed mid-load); return to be
        done with the version, including after refusing it.
        """
        ...


class VersionWatcher:
    def __init__(
        self,
        service: VersionedService,
        reader: RedisReader,
        running: RunningServer,
        interval: float,
    ):
        self.service = service
        self.reader = reader
        self.running = running
        self.interval = interval
        self.version: str | None = None
        self.identity: tuple[str, str | None] | None = None
        self.meta: VersionMeta | None = None
        self.redis_up: bool | None = None
        self.serving: bool | None = None
        self.data_lost: bool | None = None
        self.data_serving: bool | None = None
        self.nodes: list[NodeCheck] = []
        self._unreachable: frozenset[str] = frozenset()
        self._warned_no_version = False
        self._stopping = asyncio.Event()

    async def check(self) -> None:
        """Check the Redis nodes and the loaded version's sentinels, poll the pointer, load a
        new version, and update health."""
        log = self.service.log
        checked = self.identity
        self.nodes = await self.reader.check_nodes(*self._sentinels())
        pointer_lost = False
        failure: RedisError | None = None
        try:
            raw = await self.reader.get(keys.ACTIVE_VERSION, op=RedisOp.ACTIVE_VERSION)
            if raw is None:
                pointer_lost = self.version is not None
                if not self._warned_no_version and not pointer_lost:
                    log.warning("no active data version in Redis yet; publish one with the job")
                    self._warned_no_version = True
            else:
                version = raw.decode()
                meta = await self._meta(version)
                # A Redis that lost its data (restarted without persistence) hands out
                # version ids again, so the id alone can name other data: the publishing
                # run's id tells them apart.
                identity = (version, meta.run_id if meta is not None else None)
                if identity != self.identity:
                    await self.service.load_version(version, meta)
                    self.version, self.identity, self.meta = version, identity, meta
                    self._warned_no_version = False
        except RedisError as error:
            failure = error
        except Exception:
            log.exception("loading the active data version failed; retrying at the next poll")
        self._note_nodes()
        # A cluster with a node down still answers for the other nodes' slots, the active
        # version pointer's too or not: the slots decide.
        reachable = self._served_share_ok() and (failure is None or self.reader.cluster)
        self._set_redis_up(reachable, failure or self._node_failure())
        # Sentinels read before a newer version was loaded describe the older one.
        self._set_data_lost(pointer_lost, self.identity == checked)
        await self._update_health()

    def _sentinels(self) -> tuple[tuple[bytes, ...], str]:
        meta = self.meta
        if self.version is None or meta is None or not meta.sentinels:
            return (), ""
        return keys.sentinel_keys(self.version, meta.sentinels), meta.run_id

    def _served_share_ok(self) -> bool:
        served = sum(node.slots for node in self.nodes if node.reachable)
        return served * 2 > keys.CLUSTER_SLOTS

    def _node_failure(self) -> Exception | None:
        failed = [node for node in self.nodes if not node.reachable]
        if not failed:
            return None
        return RedisError(", ".join(f"{node.node}: {node.error}" for node in failed))

    def _note_nodes(self) -> None:
        unreachable = frozenset(node.node for node in self.nodes if not node.reachable)
        if unreachable != self._unreachable and len(self.nodes) > 1:
            if unreachable:
                self.service.log.warning(
                    "Redis nodes unreachable; reads of their keys fail at once until they "
                    "answer again",
                    extra={
                        "unreachable_nodes": sorted(unreachable),
                        "unreachable_slots": sum(
                            node.slots for node in self.nodes if not node.reachable
                        ),
                    },
                )
            else:
                self.service.log.info("every Redis node answers again")
        self._unreachable = unreachable
        self.reader.metrics.set_redis_nodes_unreachable(len(unreachable))

    def _set_data_lost(self, pointer_lost: bool, sentinels_current: bool) -> None:
        missing = sum(node.missing for node in self.nodes if node.reachable)
        if not sentinels_current:
            missing = 0
        lost = self.version is not None and (pointer_lost or missing > 0)
        if lost and not self.data_lost:
            self.service.log.error(
                "data loss: Redis no longer holds all of data version %s, which this "
                "service serves; Redis restarted or was flushed without its data. "
                "Publish again (run the job)",
                self.version,
                extra={
                    "version": self.version,
                    "active_pointer_lost": pointer_lost,
                    "sentinels_missing": missing,
                    "nodes_missing_data": sorted(
                        node.node for node in self.nodes if node.reachable and node.missing
                    ),
                },
            )
        elif self.data_lost and not lost:
            self.service.log.info(
                "data version %s is whole in Redis", self.version, extra={"version": self.version}
            )
        self.data_lost = lost
        self.reader.metrics.set_data_loss(lost, missing)

    async def _meta(self, version: str) -> VersionMeta | None:
        return await self.reader.read(keys.META, version, op=RedisOp.VERSION_META)

    async def run(self) -> None:
        """Check every interval until :meth:`stop`."""
        while not self._stopping.is_set():
            try:
                async with asyncio.timeout(self.interval):
                    await self._stopping.wait()
            except TimeoutError:
                await self.check()

    def stop(self) -> None:
        # An event rather than Task.cancel(): on Python 3.11, redis-py's asyncio.wait_for can
        # swallow a cancellation that arrives as its command completes, and the loop would
        # then run on.
        self._stopping.set()

    def _set_redis_up(self, up: bool, error: Exception | None = None) -> None:
        if up != self.redis_up:
            if up:
                self.service.log.info("Redis is reachable")
            else:
                self.service.log.warning("Redis is unreachable", extra={"error": str(error)})
        self.redis_up = up
        self.reader.metrics.set_redis_up(up)

    async def _update_health(self) -> None:
        serving = self.service.ready and (bool(self.redis_up) or self.service.answers_without_redis)
        if serving != self.serving:
            await self.running.set_serving(serving)
            self.service.log.info(
                "health status changed", extra={"serving": serving, "version": self.version}
            )
            self.serving = serving
        data_serving = self.service.ready and not self.data_lost
        if data_serving != self.data_serving:
            status = health_pb2.HealthCheckResponse
            await self.running.health.set(
                DATA_HEALTH_NAME, status.SERVING if data_serving else status.NOT_SERVING
            )
            self.data_serving = data_serving


@dataclasses.dataclass
class RunningService:
    service: VersionedService
    server: RunningServer
    watcher: VersionWatcher

    @property
    def port(self) -> int:
        return self.server.port


@contextlib.asynccontextmanager
async def running_service(
    service: VersionedService,
    reader: RedisReader,
    metrics: Metrics,
    settings: ServerSettings,
    *,
    host: str,
    port: int,
    max_concurrent_rpcs: int,
    max_streams_per_connection: int | None = None,
) -> AsyncIterator[RunningService]:
    """Serve `service` with health, reflection and metrics, watching the data version;
    calls past `max_concurrent_rpcs` at once are shed (adrec_shed_total), and a client
    connection may hold `max_streams_per_connection` calls open at once (unbounded when
    None)."""
    options = []
    if settings.max_connection_age_seconds > 0:
        age_ms = int(settings.max_connection_age_seconds * 1000)
        options += [
            ("grpc.max_connection_age_ms", age_ms),
            ("grpc.max_connection_age_grace_ms", int(settings.drain_seconds * 1000)),
        ]
    async with serve(
        service.spec,
        host=host,
        port=port,
        max_message_bytes=settings.max_message_bytes,
        observer=grpc_server_observer(metrics),
        max_concurrent_rpcs=max_concurrent_rpcs,
        max_streams_per_connection=max_streams_per_connection,
        counters=call_counters(metrics),
        options=options,
    ) as running:
        watcher = VersionWatcher(service, reader, running, settings.reload_interval_seconds)
        await watcher.check()
        polling = asyncio.create_task(watcher.run(), name=f"{service.name}-version-watcher")
        try:
            yield RunningService(service, running, watcher)
        finally:
            watcher.stop()
            # A check in progress ends within the Redis socket timeout.
            await asyncio.wait({polling}, timeout=WATCHER_STOP_SECONDS)
            polling.cancel()
