"""Serving status of the standard health service (`grpc.health.v1.Health`).

Two kinds of status, for the two kinds of probe:

- readiness: the whole server ("") and each application service, set together by
  :func:`set_serving_status`: SERVING only while the service can answer (data loaded,
  Redis reachable);
- liveness: :data:`LIVENESS_SERVICE_NAME`, SERVING from start until shutdown whatever
  Redis does. Answering it at all shows the event loop runs, which is what a liveness
  probe should restart a pod for; a Redis outage only takes pods out of rotation.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import OVERALL_HEALTH
from grpc_health.v1.health import aio as health_aio

#: Health service name that reports SERVING for as long as the server runs.
LIVENESS_SERVICE_NAME = "liveness"

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class HealthServicer(health_aio.HealthServicer):
    """grpcio-health-checking's asyncio servicer, with the `List` the health service
    declares: the library leaves it UNIMPLEMENTED, though reflection advertises it.

    It keeps its own copy of the statuses, as the library's is private; both follow the
    same rules: `set` is ignored once the graceful shutdown has begun, which turns every
    status NOT_SERVING.
    """

    def __init__(self) -> None:
        super().__init__()
        self._statuses: dict[str, int] = {OVERALL_HEALTH: _SERVING}
        self._shutting_down = False

    async def set(self, service: str, status: int) -> None:
        if not self._shutting_down:
            self._statuses[service] = status
        await super().set(service, status)

    async def enter_graceful_shutdown(self) -> None:
        self._shutting_down = True
        self._statuses = dict.fromkeys(self._statuses, _NOT_SERVING)
        await super().enter_graceful_shutdown()

    # types-grpcio-health-checking declares neither List nor its messages.
    async def List(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        return health_pb2.HealthListResponse(  # type: ignore[attr-defined]
            statuses={
                name: health_pb2.HealthCheckResponse(status=status)
                for name, status in self._statuses.items()
            }
        )


async def set_serving_status(
    health: health_aio.HealthServicer, service_names: Iterable[str], *, serving: bool
) -> None:
    """Set the status of the whole server ("") and of each named service together.

    Probes usually ask for "" while clients may ask for a service name, so the two must not
    disagree. The overall status is set last when turning SERVING and first when turning
    NOT_SERVING, so it never claims more than the individual services do.
    """
    names = list(service_names)
    if serving:
        status: int = health_pb2.HealthCheckResponse.SERVING
        ordered = [*names, OVERALL_HEALTH]
    else:
        status = health_pb2.HealthCheckResponse.NOT_SERVING
        ordered = [OVERALL_HEALTH, *names]
    for name in ordered:
        await health.set(name, status)


def wait_until_serving(address: str, timeout: float) -> bool:
    """Poll the server at ``address`` until its overall status is SERVING.

    For whoever starts servers as processes (the demo, benchmarks); False when it is not
    SERVING within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            with contextlib.suppress(grpc.RpcError):
                # types-grpcio-health-checking declares HealthStub without its methods.
                check = stub.Check  # type: ignore[attr-defined]
                status = check(health_pb2.HealthCheckRequest(), timeout=1.0).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return True
            time.sleep(0.1)
    return False
