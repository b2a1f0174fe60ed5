"""Running a data-backed service: the gRPC server plus a watcher of Redis and the data version.

Each service implements :class:`VersionedService`: it names its gRPC service, prepares its
per-version state when the active version changes, and says when it is ready. The watcher
polls ``adrec:active`` and the active version's metadata (the same GETs double as the Redis
liveness check) and keeps the health status in step. Readiness means "this replica can
answer usefully now": SERVING once the service is ready and, for a service that needs Redis
on every request (recall, ranking), while Redis answers. A service that can answer from
memory (the gateway's popular lists) stays SERVING through a Redis outage, so an outage
does not take every replica out of rotation at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from typing import Protocol

from redis.exceptions import RedisError

from adrec.core import keys
from adrec.core.metadata import VersionMeta
from services.runtime.data import RedisOp, RedisReader
from services.runtime.logs import ServiceLogger
from services.runtime.metrics import Metrics, call_counters, grpc_server_observer
from services.runtime.server import RunningServer, ServiceSpec, serve
from services.runtime.settings import ServerSettings

#: Longest wait for the version watcher to finish its current check on shutdown.
WATCHER_STOP_SECONDS = 10.0


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
        self.redis_up: bool | None = None
        self.serving: bool | None = None
        self._warned_no_version = False
        self._stopping = asyncio.Event()

    async def check(self) -> None:
        """Poll Redis and the pointer once, load a new version, and update health."""
        log = self.service.log
        try:
            raw = await self.reader.get(keys.ACTIVE_VERSION, op=RedisOp.ACTIVE_VERSION)
            if raw is None:
                if not self._warned_no_version:
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
                    self.version, self.identity = version, identity
                    self._warned_no_version = False
            self._set_redis_up(True)
        except RedisError as error:
            self._set_redis_up(False, error)
        except Exception:
            log.exception("loading the active data version failed; retrying at the next poll")
        await self._update_health()

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
) -> AsyncIterator[RunningService]:
    """Serve `service` with health, reflection and metrics, watching the data version;
    calls past `max_concurrent_rpcs` at once are shed (adrec_shed_total)."""
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
