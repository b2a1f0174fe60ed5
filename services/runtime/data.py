"""Redis reads of the services: timed single-key GETs, the per-version popular lists, and
the watcher's check of every Redis node."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import enum
import time
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import redis.asyncio
import redis.asyncio.cluster
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from adrec.core import keys
from adrec.core.dataset import PIDS
from adrec.core.redis_conn import RedisSettings, connect_async
from services.runtime.metrics import ServiceMetrics

Value = TypeVar("Value")


def model_version(data_version: str, feature_spec_id: str) -> str:
    """Opaque id of a published CTR model: the version it came with and its feature spec.

    The ranking service reports it for realtime scores and the gateway for the offline lists
    the job scored with the same model, so the two compare equal.
    """
    return f"{data_version}/{feature_spec_id}"


class RedisOp(enum.StrEnum):
    """What a service reads from Redis (or writes): the `op` label of
    adrec_redis_latency_seconds and adrec_redis_errors_total. Every reader exports the error
    count of each at 0."""

    ACTIVE_VERSION = "active_version"
    VERSION_META = "version_meta"
    POPULAR = "popular"
    RECALL = "recall"
    OFFLINE = "offline"
    USER_FEATURES = "user_features"
    LOAD_MODEL = "load_model"
    LOAD_ADS = "load_ads"
    LOAD_CATE_FACTORS = "load_cate_factors"
    #: The watcher's check of each node: a PING and the loaded version's sentinels.
    NODE_CHECK = "node_check"
    #: The event intake's one write: a batch appended to the event log in one transaction.
    APPEND_EVENTS = "append_events"
    #: A user's real-time state (interest and counts), kept by the stream job.
    REALTIME_STATE = "realtime_state"
    LOAD_CATEGORY_ADS = "load_category_ads"
    LOAD_BIDS = "load_bids"
    #: The gateway's controls: the ad state change counter, read per request, and the
    #: states themselves, read when it moved.
    AD_STATE_SEQ = "ad_state_seq"
    AD_STATE = "ad_state"
    #: The ads the gateway returned to a user lately (frequency caps): read, and added to.
    SERVED_COUNTS = "served_counts"
    RECORD_SERVED = "record_served"
    #: The admin API's commands: states and their change log read, a change written.
    AD_STATE_READ = "ad_state_read"
    AD_STATE_WRITE = "ad_state_write"
    AD_STATE_HISTORY = "ad_state_history"


#: Bound on reading a whole version's bulk data (the ad table, the largest value of a
#: version: its size at full scale is in docs/performance.md).
LOAD_TIMEOUT_SECONDS = 120.0


def client_without_socket_timeouts(settings: RedisSettings) -> Any:
    """An asyncio client for :class:`RedisReader`, which bounds every command itself.

    redis-py applies its socket timeouts through asyncio.wait_for, which costs a large share
    of a GET's CPU (docs/performance.md) and, on Python 3.11, can swallow a cancellation of
    the calling task. A cluster client goes without them too: a socket timeout is a
    redis-py error that makes it refresh its slot map, under a lock every command waits
    for, from a node picked at random, which may be the hung one.
    """
    return connect_async(settings, socket_timeouts=False)


#: GETs in flight at once per reader: a GET takes well under a millisecond on a healthy
#: Redis, so this covers bursts of thousands of calls a second without a connection each.
MAX_OPEN_CONNECTIONS = 32
#: Connections a reader keeps open between bursts.
MAX_IDLE_CONNECTIONS = 8


def _packed(*args: bytes | str | int) -> bytes:
    """One command in the protocol's wire form."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        value = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%b\r\n" % (len(value), value))
    return b"".join(parts)


async def _read_replies(connection: AbstractConnection, count: int) -> list[Any]:
    replies: list[Any] = []
    for _ in range(count):
        try:
            # redis-py leaves read_response unannotated.
            replies.append(await connection.read_response())
        except ResponseError as error:
            # The error reply itself was read: the next replies follow on the connection.
            replies.append(error)
    return replies


class DirectGets:
    """GETs on connections made like the client pool's own, without its per-command work.

    redis-py's ``Redis.get`` spends most of a GET's CPU outside the socket (figures in
    docs/performance.md): pool locking, health and pending-data checks, retry wrappers and
    observability hooks.
    Here a GET takes an idle connection, writes the command and reads the reply. A
    connection goes back idle after every GET: either it read its whole reply, or redis-py
    disconnected it on the failure (cancellation included) and it reconnects on its next
    command. A reused connection the server has closed since (Redis restarted) is given one
    more try, as the pool's retry would.

    Connections are bounded: at most ``max_open`` GETs are in flight (a burst queues in the
    process, inside each read's time limit, instead of opening a connection per call), and
    at most ``max_idle`` connections stay open once a burst is over.
    """

    def __init__(
        self,
        pool: redis.asyncio.ConnectionPool,
        max_open: int = MAX_OPEN_CONNECTIONS,
        max_idle: int = MAX_IDLE_CONNECTIONS,
    ):
        self._pool = pool
        self._slots = asyncio.Semaphore(max_open)
        self._max_idle = max_idle
        self._idle: list[AbstractConnection] = []
        self._open: set[AbstractConnection] = set()

    @property
    def open_connections(self) -> int:
        return len(self._open)

    async def get(self, key: bytes) -> bytes | None:
        async with self._slots:
            # The hottest command of every service, packed without _packed's loop.
            replies = await self._execute(b"*2\r\n$3\r\nGET\r\n$%d\r\n%b\r\n" % (len(key), key), 1)
        # A GET replies with a bulk string or nil, never an error.
        reply: bytes | None = replies[0]
        return reply

    async def execute(self, commands: Sequence[Sequence[bytes | str | int]]) -> list[Any]:
        """Send `commands` together on one connection and read their replies, in order; a
        reply that is an error is the :class:`ResponseError` in its place."""
        packed = b"".join(_packed(*command) for command in commands)
        async with self._slots:
            return await self._execute(packed, len(commands))

    async def _execute(self, packed: bytes, replies: int) -> list[Any]:
        connection = self._idle.pop() if self._idle else self._make()
        reused = connection.is_connected
        try:
            try:
                await connection.send_packed_command(packed, check_health=False)
                return await _read_replies(connection, replies)
            except RedisConnectionError:
                if not reused:
                    raise
                await connection.send_packed_command(packed, check_health=False)
                return await _read_replies(connection, replies)
        finally:
            if len(self._idle) < self._max_idle:
                self._idle.append(connection)
            else:
                self._open.discard(connection)
                await connection.disconnect()

    def _make(self) -> AbstractConnection:
        # redis-py leaves make_connection unannotated; it builds the pool's connection_class.
        connection: AbstractConnection = self._pool.make_connection()  # type: ignore[no-untyped-call]
        self._open.add(connection)
        return connection

    async def aclose(self) -> None:
        for connection in self._open:
            await connection.disconnect()
        self._idle.clear()
        self._open.clear()


#: What redis-py's cluster client has raised from its own state, instead of a Redis error,
#: while a node restarted: the same failure to the caller, who has a fallback for it.
_CLUSTER_CLIENT_FAILURES = (AttributeError, KeyError, IndexError, TypeError)


class ClusterGets:
    """GETs sent straight to the node serving each key by the cluster client's slot map,
    failing at once for keys of a node known to be down.

    A node is down from a connection failure of a GET routed to it, or from failing the
    watcher's last check, until it passes a check again. Without this every read of a key
    on a dead node would wait for its own failure (a connection attempt, or the whole time
    limit on a hung node) while the reads of the other nodes' keys go on as usual.

    The GETs bypass the client's command path, whose error handling is for the whole
    client: a connection error makes the next command of any key rebuild the slot map
    first, and a node answering CLUSTERDOWN (as one that has just restarted does until it
    has rejoined) closes every connection of the client, so the reads of every other node
    failed with it. Here a failed GET fails alone and flags the slot map for a refresh,
    which the watcher's next node check does (:meth:`RedisReader.check_nodes`).
    """

    def __init__(self, client: redis.asyncio.cluster.RedisCluster):
        self._client = client
        self.down: frozenset[str] = frozenset()
        #: Set by a GET that found the slot map out of date or a node gone.
        self.refresh = False

    async def get(self, key: bytes) -> bytes | None:
        try:
            if not self._client.nodes_manager.slots_cache:
                await self._client.initialize()
            # redis-py types keys as str; it encodes bytes keys the same way.
            node = self._client.get_node_from_key(key)  # type: ignore[arg-type]
            if node is None:
                raise RedisError("no Redis Cluster node serves this key")
            if node.name in self.down:
                raise RedisConnectionError("the Redis Cluster node serving this key is down")
            try:
                # A client without decode_responses answers bytes; redis-py types it loosely.
                value: bytes | None = await node.execute_command("GET", key)
            except RedisConnectionError:
                self.down = self.down | {node.name}
                self.refresh = True
                raise
            except RedisError:
                # MOVED, ASK, CLUSTERDOWN, a slot not served: the slot map is out of date.
                self.refresh = True
                raise
        except _CLUSTER_CLIENT_FAILURES as error:
            self.refresh = True
            raise RedisError(
                f"the Redis Cluster client failed: {type(error).__name__}: {error}"
            ) from error
        return value

    def _node_of(self, key: bytes) -> str | None:
        """The node serving `key` by the client's slot map; None before it has one."""
        try:
            # redis-py types keys as str; it encodes bytes keys the same way.
            node = self._client.get_node_from_key(key)  # type: ignore[arg-type]
        except RedisError:
            return None
        return str(node.name) if node is not None else None


@dataclasses.dataclass(frozen=True)
class NodeCheck:
    """One Redis node's answer to the watcher's check."""

    #: host:port (the path of a unix socket).
    node: str
    #: Hash slots it serves; a standalone server holds them all.
    slots: int
    reachable: bool
    #: Sentinels of the loaded version it should hold and does not (or holds another run's).
    missing: int = 0
    #: Why it is unreachable: the error's class.
    error: str | None = None


class RedisReader:
    """GETs through the service's asyncio Redis client, recording latency and errors by op.

    Each GET is bounded by `timeout` seconds (REDIS_TIMEOUT_SECONDS) unless told otherwise;
    running out raises redis' TimeoutError, a RedisError like every other Redis failure.
    A standalone client's GETs go through :class:`DirectGets`; a cluster client's through
    :class:`ClusterGets`, which routes them by slot.

    `last_failure` names the error class the last GET failed with (None once one
    succeeds): a service without data, whose only GETs are then the version watcher's
    polls, tells an unreachable Redis from one without a published version by it.
    """

    def __init__(self, client: Any, metrics: ServiceMetrics, timeout: float):
        self.client = client
        self.metrics = metrics
        metrics.declare_redis_ops(RedisOp)
        self.timeout = timeout
        self.last_failure: str | None = None
        self._direct: DirectGets | None = None
        self._cluster: ClusterGets | None = None
        if isinstance(client, redis.asyncio.Redis):
            self._direct = DirectGets(client.connection_pool)
            self._get = self._direct.get
        else:
            self._cluster = ClusterGets(client)
            self._get = self._cluster.get

    @property
    def cluster(self) -> bool:
        """Whether the client is a Redis Cluster client."""
        return self._cluster is not None

    async def get(self, key: bytes, op: RedisOp, timeout: float | None = None) -> bytes | None:
        latency = self.metrics.redis_latency(op)
        start = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout if timeout is None else timeout):
                value = await self._get(key)
        except TimeoutError:
            self.metrics.redis_error(op)
            self.last_failure = RedisTimeoutError.__name__
            raise RedisTimeoutError(f"Redis did not answer {op} in time") from None
        except Exception as error:
            self.metrics.redis_error(op)
            self.last_failure = type(error).__name__
            raise
        finally:
            latency.observe(time.perf_counter() - start)
        self.last_failure = None
        return value

    async def get_many(
        self, reads: Sequence[tuple[bytes, RedisOp]], timeout: float
    ) -> list[bytes | None]:
        """GETs of several keys in one round trip (concurrent GETs, each to its node, on a
        cluster), each op's latency observed as the whole read's; any failure fails them
        all."""
        start = time.perf_counter()
        try:
            async with asyncio.timeout(timeout):
                if self._direct is not None:
                    replies = await self._direct.execute([(b"GET", key) for key, _ in reads])
                else:
                    replies = list(await asyncio.gather(*(self._get(key) for key, _ in reads)))
        except TimeoutError:
            self._failed(reads, RedisTimeoutError.__name__)
            raise RedisTimeoutError("Redis did not answer in time") from None
        except Exception as error:
            self._failed(reads, type(error).__name__)
            raise
        finally:
            seconds = time.perf_counter() - start
            for _, op in reads:
                self.metrics.redis_latency(op).observe(seconds)
        for reply in replies:
            if isinstance(reply, ResponseError):
                self._failed(reads, type(reply).__name__)
                raise reply
        self.last_failure = None
        return replies

    def _failed(self, reads: Sequence[tuple[bytes, RedisOp]], error: str) -> None:
        for _, op in reads:
            self.metrics.redis_error(op)
        self.last_failure = error

    async def execute(
        self, commands: Sequence[Sequence[bytes | str | int]], op: RedisOp, timeout: float
    ) -> None:
        """Write `commands` in one round trip (one per node on a cluster), bounded by
        `timeout` seconds; a failure, or an error reply to any of them, raises a
        RedisError."""
        start = time.perf_counter()
        try:
            async with asyncio.timeout(timeout):
                if self._direct is not None:
                    replies = await self._direct.execute(commands)
                else:
                    pipe = self.client.pipeline()
                    for command in commands:
                        pipe.execute_command(*command)
                    replies = await pipe.execute(raise_on_error=False)
        except TimeoutError:
            self.metrics.redis_error(op)
            raise RedisTimeoutError(f"Redis did not answer {op} in time") from None
        except Exception:
            self.metrics.redis_error(op)
            raise
        finally:
            self.metrics.redis_latency(op).observe(time.perf_counter() - start)
        for reply in replies:
            if isinstance(reply, Exception):
                self.metrics.redis_error(op)
                raise reply

    async def read(
        self,
        family: keys.KeyFamily[Value],
        version: str,
        member: int | str | None = None,
        *,
        op: RedisOp,
        timeout: float | None = None,
    ) -> Value | None:
        """One key of `family`, decoded by the family's codec; None when it does not exist."""
        raw = await self.get(family.key(version, member), op=op, timeout=timeout)
        return family.decode(raw) if raw is not None else None

    async def check_nodes(self, sentinels: Sequence[bytes], run_id: str) -> list[NodeCheck]:
        """Ask every node, in one round trip each, whether it answers and holds its share of
        `sentinels` with `run_id` in them; a cluster's GETs then skip the nodes that did not
        answer (:class:`ClusterGets`)."""
        expected = keys.SENTINEL.encode(run_id)
        if self._cluster is None:
            kwargs = self.client.connection_pool.connection_kwargs
            name = kwargs.get("path") or f"{kwargs.get('host')}:{kwargs.get('port')}"
            pipe = self.client.pipeline(transaction=False)
            return [await self._check_node(name, keys.CLUSTER_SLOTS, pipe, sentinels, expected)]
        try:
            async with asyncio.timeout(self.timeout):
                await self.client.initialize()
                if self._cluster.refresh:
                    # Cleared first: a GET failing during the refresh flags the next one.
                    self._cluster.refresh = False
                    await self.client.nodes_manager.initialize()
        except (RedisError, TimeoutError, *_CLUSTER_CLIENT_FAILURES) as error:
            # No node answered with the cluster's slots: nothing is known of any node.
            self._cluster.refresh = True
            self.metrics.redis_error(RedisOp.NODE_CHECK)
            return [NodeCheck("cluster", keys.CLUSTER_SLOTS, False, error=type(error).__name__)]
        slot_map = self.client.nodes_manager.slots_cache
        slots = collections.Counter(nodes[0].name for nodes in slot_map.values() if nodes)
        by_node: dict[str, list[bytes]] = {node.name: [] for node in self.client.get_primaries()}
        for key in sentinels:
            node = self._cluster._node_of(key)
            if node is not None:
                by_node.setdefault(node, []).append(key)
        checks = await asyncio.gather(
            *(
                self._check_node(
                    name,
                    slots[name],
                    self.client.pipeline(),
                    node_keys,
                    expected,
                    target=self.client.get_node(node_name=name),
                )
                for name, node_keys in by_node.items()
            )
        )
        self._cluster.down = frozenset(check.node for check in checks if not check.reachable)
        return list(checks)

    async def _check_node(
        self,
        name: str,
        slots: int,
        pipe: Any,
        sentinels: Sequence[bytes],
        expected: bytes,
        target: Any = None,
    ) -> NodeCheck:
        if target is not None:
            pipe.execute_command("PING", target_nodes=target)
        else:
            pipe.ping()
        for key in sentinels:
            pipe.get(key)
        latency = self.metrics.redis_latency(RedisOp.NODE_CHECK)
        start = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout):
                replies = await pipe.execute(raise_on_error=False)
        except (RedisError, TimeoutError, *_CLUSTER_CLIENT_FAILURES) as error:
            self.metrics.redis_error(RedisOp.NODE_CHECK)
            kind = RedisTimeoutError if isinstance(error, TimeoutError) else type(error)
            return NodeCheck(name, slots, False, error=kind.__name__)
        finally:
            latency.observe(time.perf_counter() - start)
        # A reply that is an error (a slot moved meanwhile) tells nothing of the key.
        missing = sum(
            1 for reply in replies[1:] if not isinstance(reply, Exception) and reply != expected
        )
        return NodeCheck(name, slots, True, missing)

    async def aclose(self) -> None:
        """Close the connections of this reader's own (the client's pool closes its own)."""
        if self._direct is not None:
            await self._direct.aclose()


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
        for scope in (keys.POPULAR_ALL, *PIDS):
            ids = await reader.read(keys.POPULAR, version, scope, op=RedisOp.POPULAR)
            if ids is not None:
                by_scope[scope] = tuple(ids.tolist())
        return cls(by_scope)
