"""Asyncio gRPC server bootstrap shared by the recall, ranking and gateway services.

Every service runs in the same frame: the standard health service, which reports NOT_SERVING
until the service declares itself ready (and SERVING for the liveness name all along),
server reflection for grpcurl and `buf curl`, bounded message sizes, and a graceful stop.

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
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import SERVICE_NAME as HEALTH_SERVICE_NAME
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from services.runtime.health import LIVENESS_SERVICE_NAME, set_serving_status
from services.runtime.settings import DEFAULT_MAX_MESSAGE_BYTES

if TYPE_CHECKING:
    from google._upb import _message as upb

logger = logging.getLogger(__name__)

DRAIN_SIGNALS = (signal.SIGTERM, signal.SIGINT)

#: A unary-unary method's behaviour: ``async (request, context) -> response``.
UnaryBehavior = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]
#: Wraps a unary-unary behaviour, given its service's full name and the method's name.
UnaryObserver = Callable[[str, str, UnaryBehavior], UnaryBehavior]


@dataclass(frozen=True)
class ServiceSpec:
    """One application service to serve: its full proto name and how to register it."""

    full_name: str
    servicer: object
    add_to_server: Callable[[Any, grpc.aio.Server], None]
    #: The methods an observer wraps (streaming ones pass through).
    unary_methods: tuple[str, ...] = ()

    @classmethod
    def of(
        cls,
        # The generated modules' stubs type it as protobuf's class, the health-checking
        # stubs as upb's: at runtime they are the same class.
        descriptor: ServiceDescriptor | upb.ServiceDescriptor,
        servicer: object,
        add_to_server: Callable[[Any, grpc.aio.Server], None],
    ) -> ServiceSpec:
        unary = tuple(
            method.name
            for method in descriptor.methods
            if not method.client_streaming and not method.server_streaming
        )
        return cls(descriptor.full_name, servicer, add_to_server, unary)

    def register(self, server: grpc.aio.Server, observer: UnaryObserver | None) -> None:
        servicer = self.servicer
        if observer is not None and self.unary_methods:
            servicer = _ObservedServicer(servicer, self.full_name, self.unary_methods, observer)
        self.add_to_server(servicer, server)


class _ObservedServicer:
    """A servicer as the generated ``add_..._to_server`` reads it: its unary methods wrapped.

    Wrapping each method once at registration costs a call nothing beyond the wrapper
    itself, where a server interceptor runs for every call before the handler is found.
    """

    def __init__(
        self, servicer: object, service: str, methods: tuple[str, ...], observer: UnaryObserver
    ):
        self._servicer = servicer
        self._service = service
        self._methods = frozenset(methods)
        self._observer = observer

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._servicer, name)
        if name in self._methods:
            return self._observer(self._service, name, attribute)
        return attribute


@dataclass
class RunningServer:
    """A started server: where it listens and the handles to manage it."""

    server: grpc.aio.Server
    host: str
    port: int
    health: health_aio.HealthServicer
    service_names: tuple[str, ...]

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
    options: Iterable[tuple[str, Any]] = (),
) -> AsyncIterator[RunningServer]:
    """Start a server for `services` plus health and reflection; stop it on exit.

    `observer`, when given, wraps every unary method of the services and of health (the
    gRPC server metrics). `port=0` binds a free port, reported as `RunningServer.port`.
    Health starts NOT_SERVING for "" and every service until `RunningServer.set_serving(True)`;
    the liveness name (LIVENESS_SERVICE_NAME) is SERVING until the server stops. Leaving the
    context stops the server at once; call `RunningServer.stop` first for a graceful stop.
    """
    service_names = _validated_service_names(services)
    if max_message_bytes <= 0:
        raise ValueError(f"max_message_bytes must be positive, got {max_message_bytes}")

    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            # A second process on the same port must fail to bind rather than silently
            # share the traffic.
            ("grpc.so_reuseport", 0),
            *options,
        ],
    )
    health = health_aio.HealthServicer()
    health_spec = ServiceSpec.of(
        health_pb2.DESCRIPTOR.services_by_name["Health"],
        health,
        health_pb2_grpc.add_HealthServicer_to_server,
    )
    for spec in (*services, health_spec):
        spec.register(server, observer)
    await set_serving_status(health, service_names, serving=False)
    await health.set(LIVENESS_SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (*service_names, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    try:
        bound_port = server.add_insecure_port(_host_port(host, port))
    except RuntimeError as error:
        raise OSError(f"cannot listen on {_host_port(host, port)}: {error}") from error
    await server.start()
    running = RunningServer(server, host, bound_port, health, service_names)
    logger.info("gRPC server listening on %s serving %s", running.address, ", ".join(service_names))
    try:
        yield running
    finally:
        await running.stop(grace=None)


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
