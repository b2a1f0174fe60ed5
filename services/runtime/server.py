"""Asyncio gRPC server bootstrap shared by the recall, ranking and gateway services.

Every service runs in the same frame: the standard health service, which reports NOT_SERVING
until the service declares itself ready (and SERVING for the liveness name all along),
server reflection for grpcurl and `buf curl`, bounded message sizes, a bound on the calls
run at once (the excess is answered RESOURCE_EXHAUSTED at once) and on the calls waiting
for the event loop to take them up, calls whose deadline has passed dropped before any
work, requests that do not decode answered INVALID_ARGUMENT, and a graceful stop.

    spec = ServiceSpec.of(
        recall_service_pb2.DESCRIPTOR.services_by_name["RecallService"],
        RecallServicer(...),
        recall_service_pb2_grpc.add_RecallServiceServicer_to_server,
    )
    async with serve(spec, host="0.0.0.0", port=50051) as running:
        await running.set_serving(True)
        await run_until_signalled(running, grace=20)
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar, cast

import grpc
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import SERVICE_NAME as HEALTH_SERVICE_NAME
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from services.runtime.health import LIVENESS_SERVICE_NAME, HealthServicer, set_serving_status
from services.runtime.logs import LogThrottle
from services.runtime.settings import DEFAULT_MAX_MESSAGE_BYTES

if TYPE_CHECKING:
    from google._upb import _message as upb

    _Handler = grpc.RpcMethodHandler[Any, Any]

logger = logging.getLogger(__name__)

DRAIN_SIGNALS = (signal.SIGTERM, signal.SIGINT)

_Request = TypeVar("_Request")
_Response = TypeVar("_Response")

#: A unary-unary method's behaviour: ``async (request, context) -> response``.
UnaryBehavior = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]
#: Wraps a unary-unary behaviour, given its service's full name and the method's name.
UnaryObserver = Callable[[str, str, UnaryBehavior], UnaryBehavior]
#: Given a service's full name and a method's, what to call for each of its calls counted.
MethodCounter = Callable[[str, str], Callable[[], None]]


@dataclass(frozen=True)
class CallCounters:
    """Where a server counts the calls it does not run: each is asked for a method's
    counter once, at registration, so the counters can exist (at 0) from the start."""

    #: Calls answered RESOURCE_EXHAUSTED because the server was at its limit.
    shed: MethodCounter
    #: Calls that ended before their handler ran: the caller cancelled, or its deadline
    #: passed, while the call waited for its request or its turn on the event loop.
    abandoned: MethodCounter
    #: Calls whose deadline had passed when their handler was to start: dropped unserved.
    expired: MethodCounter
    #: Calls whose answer gRPC could not send: the caller had cancelled, or its deadline
    #: passed, while the servicer worked on it.
    undelivered: MethodCounter


@dataclass(frozen=True)
class ServiceSpec:
    """One application service to serve: its full proto name and how to register it."""

    full_name: str
    servicer: object
    add_to_server: Callable[[Any, grpc.aio.Server], None]
    #: Method name -> full name of its request message, for the error a caller gets when
    #: its bytes are not that message.
    request_types: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def of(
        cls,
        # The generated modules' stubs type it as protobuf's class, the health-checking
        # stubs as upb's: at runtime they are the same class.
        descriptor: ServiceDescriptor | upb.ServiceDescriptor,
        servicer: object,
        add_to_server: Callable[[Any, grpc.aio.Server], None],
    ) -> ServiceSpec:
        request_types = {method.name: method.input_type.full_name for method in descriptor.methods}
        return cls(descriptor.full_name, servicer, add_to_server, request_types)

    def register(self, server: grpc.aio.Server, frame: _Frame, *, limited: bool) -> None:
        registrar = _Registrar(server, self, frame, limited)
        self.add_to_server(self.servicer, cast(grpc.aio.Server, registrar))
        if not registrar.registered:
            raise TypeError(
                f"{self.full_name}: its add_..._to_server registered no method handlers; "
                "regenerate its _pb2_grpc module with the pinned grpcio-tools"
            )


class _Undecodable:
    """What a request deserializer returns instead of raising: gRPC would answer UNKNOWN
    with the exception's class and log a traceback for every such call."""

    __slots__ = ("error",)

    def __init__(self, error: Exception):
        self.error = error


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        # The bytes are the caller's: whatever the parser objects to is the caller's fault.
        except Exception as error:
            return _Undecodable(error)

    return deserialize


class _Call:
    """One admitted call, until its task ends."""

    __slots__ = ("reached_handler",)

    def __init__(self) -> None:
        self.reached_handler = False


# Set by the gate in the call's task, which then runs the handler: the handler marks it.
_CURRENT_CALL: ContextVar[_Call | None] = ContextVar("adrec_current_call", default=None)


@dataclass
class _Route:
    """What the gate knows of one unary method."""

    limited: bool
    #: The handler answering RESOURCE_EXHAUSTED, for a limited method.
    shed: _Handler | None
    count_abandoned: Callable[[], None] | None


class _Gate(grpc.aio.ServerInterceptor):
    """Admits each unary call when gRPC looks its handler up, and follows it to its end.

    This is the first point a call reaches Python code of ours, before gRPC has read its
    request: a call over the limit gets the shed handler, which answers RESOURCE_EXHAUSTED
    without parsing the request or running the servicer, so a burst costs each excess call
    a status instead of queueing it behind the others until every caller's deadline is
    gone. An admitted call counts against the limit until its task ends, however it ends;
    one that ends before its handler ran (cancelled, or past its deadline, while waiting)
    is counted as abandoned. The limit is per server: in `adrec serve all` the gateway's
    own calls to recall and ranking are admitted by those servers, never against the
    gateway's calls. Health is not limited, so probes keep answering under any load.
    """

    def __init__(self, limit: int | None):
        if limit is not None and limit <= 0:
            raise ValueError(f"max_concurrent_rpcs must be positive, got {limit}")
        self.limit = limit
        self.running = 0
        self.routes: dict[str, _Route] = {}

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[_Request, _Response] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[_Request, _Response] | None:
        route = self.routes.get(handler_call_details.method)
        # grpc.aio runs the interceptors in the call's own task, the one its handler runs
        # in and that ends with the call (tests/test_server_runtime.py holds it to that).
        task = asyncio.current_task()
        if route is None or task is None:
            return await continuation(handler_call_details)
        if route.limited:
            if self.limit is not None and self.running >= self.limit:
                assert route.shed is not None
                return route.shed
            self.running += 1
        call = _Call()
        _CURRENT_CALL.set(call)
        task.add_done_callback(functools.partial(self._ended, route, call))
        return await continuation(handler_call_details)

    def _ended(self, route: _Route, call: _Call, task: asyncio.Task[Any]) -> None:
        if route.limited:
            self.running -= 1
        if not call.reached_handler and route.count_abandoned is not None:
            route.count_abandoned()


#: grpc.aio's own logger, where its server logs what goes wrong in a call.
_CORE_LOGGER = "grpc._cython.cygrpc"


class _UndeliveredAnswers(logging.Filter):
    """Turns grpc.aio's traceback for an answer it could not send into a count and at most
    one line a second per method.

    grpc.aio logs ExecuteBatchError with a traceback when a call's caller went away (it
    cancelled, or its deadline passed) between the servicer's answer and its sending,
    unless it had noticed the caller leave first: under overload, a traceback per call.
    """

    def __init__(self) -> None:
        super().__init__()
        self.counters: dict[str, Callable[[], None]] = {}
        self.throttle = LogThrottle()

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        # A private class of grpc's extension module: known by its name alone.
        if error is None or type(error).__name__ != "ExecuteBatchError":
            return True
        message = record.getMessage()
        method = message[message.rfind("[") + 1 : message.rfind("]")]
        count = self.counters.get(method)
        if count is not None:
            count()
        held = self.throttle.allow(method)
        if held is not None:
            logger.warning(
                "could not send an answer: its caller had cancelled or run out of time",
                extra={"method": method, "held_back": held},
            )
        return False


_UNDELIVERED = _UndeliveredAnswers()


@dataclass
class _Frame:
    """What one server wraps its methods in, shared by its services."""

    gate: _Gate
    observer: UnaryObserver | None
    counters: CallCounters | None
    undecodable: LogThrottle = field(default_factory=LogThrottle)
    shed_log: LogThrottle = field(default_factory=LogThrottle)
    #: Method -> its undelivered counter, for the core log filter while the server runs.
    undelivered: dict[str, Callable[[], None]] = field(default_factory=dict)


class _Registrar:
    """Stands in for the server in a generated ``add_..._to_server``: registers its method
    handlers with a tolerant request deserializer and its unary behaviours observed.

    Wrapping the methods once at registration costs a call nothing beyond the wrappers
    themselves; only the admission, which must come before gRPC reads the request, runs
    for every call, in the gate. A limited method's observer is asked twice, for its
    handler and for its shed handler, so both are counted alike.
    """

    def __init__(self, server: grpc.aio.Server, spec: ServiceSpec, frame: _Frame, limited: bool):
        self._server = server
        self._spec = spec
        self._frame = frame
        self._limited = limited
        self.registered = False

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        """The generated code adds the same handlers twice, generic and registered; they
        are taken from the registered call, wrapped, and added both ways from there."""

    def add_registered_method_handlers(
        self, service_name: str, handlers: dict[str, _Handler]
    ) -> None:
        wrapped = {method: self._wrap(method, handler) for method, handler in handlers.items()}
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service_name, wrapped),)
        )
        self._server.add_registered_method_handlers(service_name, wrapped)
        self.registered = True

    def _wrap(self, method: str, handler: Any) -> _Handler:
        # A streamed request is decoded inside the servicer's own reads: passed through.
        if handler.request_streaming:
            return cast("_Handler", handler)
        frame, service = self._frame, self._spec.full_name
        full_method = f"/{service}/{method}"
        if frame.counters is not None:
            frame.undelivered[full_method] = frame.counters.undelivered(service, method)
        refuse = _refusal(
            full_method, self._spec.request_types.get(method, "request message"), frame.undecodable
        )
        deserializer = _tolerant(handler.request_deserializer)
        if handler.response_streaming:
            return cast(
                "_Handler",
                handler._replace(
                    request_deserializer=deserializer,
                    unary_stream=_decoded_stream(handler.unary_stream, refuse),
                ),
            )
        observe = frame.observer or (lambda _service, _method, behavior: behavior)
        shed = None
        if self._limited and frame.gate.limit is not None:
            count_shed = frame.counters.shed(service, method) if frame.counters else None
            # The request is never parsed: the bytes go to the shed behaviour as they came.
            shed = handler._replace(
                request_deserializer=None,
                unary_unary=observe(
                    service,
                    method,
                    _shedding(full_method, frame.gate.limit, count_shed, frame.shed_log),
                ),
            )
        frame.gate.routes[full_method] = _Route(
            self._limited,
            shed,
            frame.counters.abandoned(service, method) if frame.counters else None,
        )
        count_expired = frame.counters.expired(service, method) if frame.counters else None
        behavior = observe(service, method, _decoded(handler.unary_unary, refuse, count_expired))
        return cast(
            "_Handler",
            handler._replace(request_deserializer=deserializer, unary_unary=behavior),
        )


def _shedding(
    full_method: str, limit: int, count: Callable[[], None] | None, throttle: LogThrottle
) -> UnaryBehavior:
    details = f"server busy: at its limit of {limit} concurrent calls; retry later"

    async def shed(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        if count is not None:
            count()
        # One line a second at most: an overload repeats it for every call shed.
        held = throttle.allow(full_method)
        if held is not None:
            logger.warning(
                "shedding calls over the concurrency limit",
                extra={"method": full_method, "limit": limit, "held_back": held},
            )
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, details)

    return shed


_Refusal = Callable[[_Undecodable, grpc.aio.ServicerContext[Any, Any]], Awaitable[None]]


def _refusal(full_method: str, message: str, throttle: LogThrottle) -> _Refusal:
    details = f"request is not a valid {message}"

    async def refuse(request: _Undecodable, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        # One line a second at most: any caller can send such bytes as fast as it likes.
        held = throttle.allow(full_method)
        if held is not None:
            logger.warning(
                "refused a request that does not decode",
                extra={
                    "method": full_method,
                    "peer": context.peer(),
                    "error": str(request.error)[:200],
                    "held_back": held,
                },
            )
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, details)

    return refuse


_EXPIRED_DETAILS = "the call's deadline passed before the server could start on it"


def _decoded(
    behavior: UnaryBehavior, refuse: _Refusal, count_expired: Callable[[], None] | None
) -> UnaryBehavior:
    async def decoded(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        call = _CURRENT_CALL.get()
        if call is not None:
            call.reached_handler = True
        # grpc.aio reports a passed deadline as 0 left. Under a backlog a call can wait past
        # it for the event loop: its caller has given up, so any work would be wasted.
        if context.time_remaining() == 0:
            if count_expired is not None:
                count_expired()
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, _EXPIRED_DETAILS)
        if type(request) is _Undecodable:
            await refuse(request, context)
        return await behavior(request, context)

    return decoded


def _decoded_stream(behavior: Callable[..., Any], refuse: _Refusal) -> Callable[..., Any]:
    async def decoded(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        if type(request) is _Undecodable:
            await refuse(request, context)
        # A coroutine writes its responses itself; an async generator yields them.
        responses = behavior(request, context)
        if inspect.isasyncgen(responses):
            async for response in responses:
                await context.write(response)
        else:
            await responses

    return decoded


@dataclass
class RunningServer:
    """A started server: where it listens and the handles to manage it."""

    server: grpc.aio.Server
    host: str
    port: int
    health: health_aio.HealthServicer
    service_names: tuple[str, ...]
    _gate: _Gate

    @property
    def calls_running(self) -> int:
        """Calls of the services admitted and not yet ended (health calls aside)."""
        return self._gate.running

    @property
    def address(self) -> str:
        return _host_port(self.host, self.port)

    async def set_serving(self, serving: bool) -> None:
        """Report SERVING or NOT_SERVING for the whole server and each of its services."""
        await set_serving_status(self.health, self.service_names, serving=serving)

    async def stop(self, grace: float | None) -> None:
        """Report NOT_SERVING for good, refuse new RPCs, and give in-flight ones `grace` seconds.

        RPCs still running after `grace` are cancelled; `None` cancels them at once.
        """
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


@asynccontextmanager
async def serve(
    *services: ServiceSpec,
    host: str = "127.0.0.1",
    port: int = 0,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    observer: UnaryObserver | None = None,
    max_concurrent_rpcs: int | None = None,
    max_streams_per_connection: int | None = None,
    counters: CallCounters | None = None,
    options: Iterable[tuple[str, Any]] = (),
) -> AsyncIterator[RunningServer]:
    """Start a server for `services` plus health and reflection; stop it on exit.

    `observer`, when given, wraps every unary method of the services and of health (the
    gRPC server metrics). `max_concurrent_rpcs`, when given, bounds the unary calls of the
    services (health aside) running at once: each call over it is answered
    RESOURCE_EXHAUSTED before its request is read. `max_streams_per_connection`, when
    given, is the HTTP/2 MAX_CONCURRENT_STREAMS the server announces: one connection's
    calls past it wait in the client's channel, so one client's burst queues there rather
    than ahead of every other client's calls. `counters`, when given, counts those
    calls and the ones that end before their handler runs. A request whose bytes do not
    decode is answered INVALID_ARGUMENT. `port=0` binds a free port, reported as
    `RunningServer.port`.
    Health starts NOT_SERVING for "" and every service until `RunningServer.set_serving(True)`;
    the liveness name (LIVENESS_SERVICE_NAME) is SERVING until the server stops. Leaving the
    context stops the server at once; call `RunningServer.stop` first for a graceful stop.
    """
    service_names = _validated_service_names(services)
    if max_message_bytes <= 0:
        raise ValueError(f"max_message_bytes must be positive, got {max_message_bytes}")
    if max_streams_per_connection is not None and max_streams_per_connection <= 0:
        raise ValueError(
            f"max_streams_per_connection must be positive, got {max_streams_per_connection}"
        )
    streams = (
        []
        if max_streams_per_connection is None
        else [("grpc.max_concurrent_streams", max_streams_per_connection)]
    )

    frame = _Frame(_Gate(max_concurrent_rpcs), observer, counters)
    server = grpc.aio.server(
        interceptors=[frame.gate],
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            # A second process on the same port must fail to bind rather than silently
            # share the traffic.
            ("grpc.so_reuseport", 0),
            *streams,
            *options,
        ],
    )
    health = HealthServicer()
    health_spec = ServiceSpec.of(
        health_pb2.DESCRIPTOR.services_by_name["Health"],
        health,
        health_pb2_grpc.add_HealthServicer_to_server,
    )
    for spec in services:
        spec.register(server, frame, limited=True)
    health_spec.register(server, frame, limited=False)
    await set_serving_status(health, service_names, serving=False)
    await health.set(LIVENESS_SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (*service_names, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    try:
        bound_port = server.add_insecure_port(_host_port(host, port))
    except RuntimeError as error:
        raise OSError(f"cannot listen on {_host_port(host, port)}: {error}") from error
    _UNDELIVERED.counters.update(frame.undelivered)
    logging.getLogger(_CORE_LOGGER).addFilter(_UNDELIVERED)
    try:
        await server.start()
        running = RunningServer(server, host, bound_port, health, service_names, frame.gate)
        logger.info(
            "gRPC server listening on %s serving %s", running.address, ", ".join(service_names)
        )
        try:
            yield running
        finally:
            await running.stop(grace=None)
    finally:
        for method, count in frame.undelivered.items():
            if _UNDELIVERED.counters.get(method) is count:
                del _UNDELIVERED.counters[method]


async def run_until_signalled(
    running: RunningServer | Sequence[RunningServer],
    grace: float,
    signals: Iterable[signal.Signals] = DRAIN_SIGNALS,
) -> signal.Signals | None:
    """Serve until one of `signals` arrives, then drain and return the signal.

    Draining reports NOT_SERVING, refuses new RPCs and waits up to `grace` seconds for the
    in-flight ones. Several servers (one process running several services) are drained one
    after the other in the given order, so a front service can finish calls that still need
    the ones behind it. Returns None without draining when a server stops some other way.
    Must run in the main thread (signal handlers can only be installed there).
    """
    servers = [running] if isinstance(running, RunningServer) else list(running)
    loop = asyncio.get_running_loop()
    received: asyncio.Future[signal.Signals] = loop.create_future()

    def on_signal(signum: signal.Signals) -> None:
        if not received.done():
            received.set_result(signum)

    watched = list(signals)
    for signum in watched:
        loop.add_signal_handler(signum, on_signal, signum)
    # Never cancelled: in grpc.aio that would cancel the server's own shutdown as well.
    terminations = [
        asyncio.ensure_future(server.server.wait_for_termination()) for server in servers
    ]
    try:
        awaited: set[asyncio.Future[Any]] = {received, *terminations}
        await asyncio.wait(awaited, return_when=asyncio.FIRST_COMPLETED)
    finally:
        # Restoring the default handlers first lets a second signal end a drain that hangs.
        for signum in watched:
            loop.remove_signal_handler(signum)
    if not received.done():
        received.cancel()
        return None
    signum = received.result()
    logger.info("received %s: draining for up to %.1f s", signum.name, grace)
    for server, terminated in zip(servers, terminations, strict=True):
        await server.stop(grace)
        await terminated
    return signum


def _validated_service_names(services: Sequence[ServiceSpec]) -> tuple[str, ...]:
    if not services:
        raise ValueError("serve() needs at least one ServiceSpec")
    names = tuple(spec.full_name for spec in services)
    if len(set(names)) != len(names):
        raise ValueError(f"services registered twice: {sorted(names)}")
    pool = descriptor_pool.Default()
    for name in names:
        # Reflection serves descriptors from the default pool; a service missing from it
        # would be listed but could not be described.
        try:
            pool.FindServiceByName(name)
        except KeyError:
            raise ValueError(
                f"service {name!r} is not in the protobuf descriptor pool: "
                "import its generated _pb2 module and pass its descriptor's full_name"
            ) from None
    return names


def _host_port(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"
