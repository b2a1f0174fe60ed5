"""The event log's writer: each batch appended in one MULTI/EXEC transaction.

Every entry goes to one stream (``keys.EVENT_LOG``) under one field
(``events.LOG_FIELD``), so a transaction touches one key: it is atomic on Redis Cluster as
well, and a batch is logged whole or not at all. Each XADD trims the log to about its
maximum length (``MAXLEN ~``), which Redis does by dropping whole internal nodes, cheaply.
The transaction ends with an XLEN, so every append also reports the log's length.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import redis.asyncio
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from adrec.core import keys
from adrec.core.events import LOG_FIELD
from services.runtime.data import RedisOp
from services.runtime.metrics import ServiceMetrics

#: Appends in flight at once: Redis runs one transaction at a time, so more connections
#: would only queue there.
MAX_APPENDS_IN_FLIGHT = 8


@dataclasses.dataclass(frozen=True)
class Appended:
    #: Stream entry id of the batch's last event.
    last_id: str
    #: Entries in the log right after the append (and its trimming).
    length: int


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%b\r\n" % (len(value), value)


def _command(*args: bytes) -> bytes:
    return b"*%d\r\n%b" % (len(args), b"".join(_bulk(arg) for arg in args))


class EventLog:
    """Appends batches of encoded events (:func:`adrec.core.events.encode_event` lines).

    With a standalone client the transaction is written as one packed buffer on a
    connection of the client's pool and its replies read back directly: redis-py's
    pipeline spends most of a large batch's time on per-command bookkeeping
    (docs/performance.md, "Event intake"). A cluster client uses its transactional
    pipeline, which routes the transaction to the stream's node.

    Each append is bounded by `timeout` seconds; any failure, the time limit included,
    raises a RedisError, and the connection it used is closed, so no reply of a failed
    transaction is ever read as another's.
    """

    def __init__(self, client: Any, metrics: ServiceMetrics, max_length: int, timeout: float):
        self.client = client
        self.metrics = metrics
        self.max_length = max_length
        self.timeout = timeout
        self._slots = asyncio.Semaphore(MAX_APPENDS_IN_FLIGHT)
        self._standalone = isinstance(client, redis.asyncio.Redis)
        bound = str(max_length).encode()
        # Every XADD but its last argument, the line: written once, reused for each event.
        self._xadd_head = b"*8\r\n" + b"".join(
            _bulk(arg) for arg in (b"XADD", keys.EVENT_LOG, b"MAXLEN", b"~", bound, b"*", LOG_FIELD)
        )
        self._multi = _command(b"MULTI")
        self._xlen_exec = _command(b"XLEN", keys.EVENT_LOG) + _command(b"EXEC")

    async def append(self, lines: Sequence[bytes]) -> Appended:
        """Log `lines` (at least one) in order, all or none."""
        latency = self.metrics.redis_latency(RedisOp.APPEND_EVENTS)
        start = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout), self._slots:
                if self._standalone:
                    replies = await self._transact(lines)
                else:
                    replies = await self._transact_on_cluster(lines)
        except TimeoutError:
            self.metrics.redis_error(RedisOp.APPEND_EVENTS)
            raise RedisTimeoutError("Redis did not answer the append in time") from None
        except Exception:
            self.metrics.redis_error(RedisOp.APPEND_EVENTS)
            raise
        finally:
            latency.observe(time.perf_counter() - start)
        *ids, length = replies
        last_id = ids[-1]
        return Appended(last_id.decode() if isinstance(last_id, bytes) else str(last_id), length)

    async def _transact(self, lines: Sequence[bytes]) -> list[Any]:
        pool = self.client.connection_pool
        connection: AbstractConnection = await pool.get_connection()
        try:
            head = self._xadd_head
            packed = b"".join(
                [
                    self._multi,
                    *(b"%b$%d\r\n%b\r\n" % (head, len(line), line) for line in lines),
                    self._xlen_exec,
                ]
            )
            await connection.send_packed_command(packed, check_health=False)
            # MULTI's OK, then QUEUED for every XADD and the XLEN: an error reply raises,
            # the connection is closed below, and Redis discards the open transaction.
            for _ in range(len(lines) + 2):
                await connection.read_response()
            replies = await connection.read_response()
        except BaseException:
            await connection.disconnect(nowait=True)
            raise
        finally:
            await pool.release(connection)
        return _checked(replies, len(lines))

    async def _transact_on_cluster(self, lines: Sequence[bytes]) -> list[Any]:
        async with self.client.pipeline(transaction=True) as pipe:
            for line in lines:
                pipe.xadd(
                    keys.EVENT_LOG, {LOG_FIELD: line}, maxlen=self.max_length, approximate=True
                )
            pipe.xlen(keys.EVENT_LOG)
            replies = await pipe.execute()
        return _checked(replies, len(lines))


def _checked(replies: Any, appended: int) -> list[Any]:
    """EXEC's replies, raising the first error among them."""
    if not isinstance(replies, list) or len(replies) != appended + 1:
        raise ResponseError(f"unexpected reply to the event log's transaction: {replies!r:.80}")
    for reply in replies:
        if isinstance(reply, RedisError):
            raise reply
    return replies
