"""Redis reads of the services: timed single-key GETs and the per-version popular lists."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Mapping
from typing import Any

from redis.exceptions import TimeoutError as RedisTimeoutError

from adrec.core import codecs, keys
from adrec.core.features import KNOWN_PIDS
from adrec.core.redis_conn import RedisSettings, connect_async
from adrec.services.runtime.metrics import ServiceMetrics


def model_version(data_version: str, feature_spec_id: str) -> str:
    """Opaque id of a published CTR model: the version it came with and its feature spec.

    The ranking service reports it for realtime scores and the gateway for the offline lists
    the job scored with the same model, so the two compare equal.
    """
    return f"{data_version}/{feature_spec_id}"


#: Bound on reading a whole version's bulk data (the ad table is tens of MB at full scale).
LOAD_TIMEOUT_SECONDS = 120.0


def client_without_socket_timeouts(settings: RedisSettings) -> Any:
    """An asyncio client for :class:`RedisReader`, which bounds every command itself.

    redis-py applies its socket timeouts through asyncio.wait_for, which costs about 40% of
    a GET's CPU and, on Python 3.11, can swallow a cancellation of the calling task.
    """
    return connect_async(dataclasses.replace(settings, socket_timeout_s=None))


class RedisReader:
    """GETs through the service's asyncio Redis client, recording latency and errors by op.

    Each GET is bounded by `timeout` seconds (REDIS_TIMEOUT_SECONDS) unless told otherwise;
    running out raises redis' TimeoutError, a RedisError like every other Redis failure.
    """

    def __init__(self, client: Any, metrics: ServiceMetrics, timeout: float):
        self.client = client
        self.metrics = metrics
        self.timeout = timeout

    async def get(self, key: bytes, op: str, timeout: float | None = None) -> bytes | None:
        latency = self.metrics.redis_latency(op)
        start = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout if timeout is None else timeout):
                return await self.client.get(key)
        except TimeoutError:
            self.metrics.redis_error(op)
            raise RedisTimeoutError(f"Redis did not answer {op} in time") from None
        except Exception:
            self.metrics.redis_error(op)
            raise
        finally:
            latency.observe(time.perf_counter() - start)


@dataclasses.dataclass(frozen=True)
class PopularLists:
    """A version's popular fallback lists as Python ints, ready to put in responses."""

    by_scope: Mapping[str, tuple[int, ...]]

    def for_pid(self, pid: str) -> tuple[int, ...]:
        """The placement's list, or the list over all placements when it has none."""
        ids = self.by_scope.get(pid)
        return ids if ids else self.by_scope.get(keys.POPULAR_ALL, ())

    @classmethod
    async def read(cls, reader: RedisReader, version: str) -> PopularLists:
        by_scope = {}
        for scope in (keys.POPULAR_ALL, *KNOWN_PIDS):
            raw = await reader.get(keys.POPULAR.key(version, scope), op="popular")
            if raw is not None:
                by_scope[scope] = tuple(codecs.decode_ad_ids(raw).tolist())
        return cls(by_scope)
