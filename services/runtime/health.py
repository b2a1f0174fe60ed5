"""Serving status of the standard health service (`grpc.health.v1.Health`)."""

from __future__ import annotations

from collections.abc import Iterable

from grpc_health.v1 import health_pb2
from grpc_health.v1.health import OVERALL_HEALTH
from grpc_health.v1.health import aio as health_aio


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
