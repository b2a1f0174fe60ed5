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

from collections.abc import Iterable

from grpc_health.v1 import health_pb2
from grpc_health.v1.health import OVERALL_HEALTH
from grpc_health.v1.health import aio as health_aio

#: Health service name that reports SERVING for as long as the server runs.
LIVENESS_SERVICE_NAME = "liveness"


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
        status = health_pb2.HealthCheckResponse.SERVING
        ordered = [*names, OVERALL_HEALTH]
    else:
        status = health_pb2.HealthCheckResponse.NOT_SERVING
        ordered = [OVERALL_HEALTH, *names]
    for name in ordered:
        await health.set(name, status)
