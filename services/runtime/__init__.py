"""What the three services share, so none copies code from another.

- ``server``: the gRPC server bootstrap (health, reflection, message bounds, graceful drain);
- ``app``: running a data-backed service with a watcher of Redis and the active version;
- ``process``: the services of an ``adrec serve`` target wired together, run and drained;
- ``settings``: every service's env vars and flags (``SETTINGS``);
- ``metrics``: the standard gRPC server metrics, domain metrics, ``/metrics``;
- ``data``: timed Redis reads and per-version popular lists;
- ``requests``: request checks and their mapping to gRPC status codes;
- ``logs``: JSON log lines.
"""

from adrec.services.runtime.health import LIVENESS_SERVICE_NAME, set_serving_status
from adrec.services.runtime.server import (
    DEFAULT_MAX_MESSAGE_BYTES,
    RunningServer,
    ServiceSpec,
    run_until_signalled,
    serve,
)

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "LIVENESS_SERVICE_NAME",
    "RunningServer",
    "ServiceSpec",
    "run_until_signalled",
    "serve",
    "set_serving_status",
]
