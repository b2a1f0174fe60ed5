"""Shared server bootstrap: health, reflection, message bounds and graceful drain."""

from adrec.services.runtime.health import set_serving_status
from adrec.services.runtime.server import (
    DEFAULT_MAX_MESSAGE_BYTES,
    RunningServer,
    ServiceSpec,
    run_until_signalled,
    serve,
)

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "RunningServer",
    "ServiceSpec",
    "run_until_signalled",
    "serve",
    "set_serving_status",
]
