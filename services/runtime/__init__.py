"""What the three services share, so none copies code from another.

- ``server``: the gRPC server bootstrap (health, reflection, message bounds, shedding past a
  concurrency limit, undecodable requests refused, graceful drain);
- ``app``: running a data-backed service with a watcher of Redis and the active version;
- ``settings``: every service's env vars and flags (``SETTINGS``), importable without grpc;
- ``metrics``: the standard gRPC server metrics, domain metrics, ``/metrics``;
- ``data``: timed Redis reads and per-version popular lists;
- ``requests``: request checks and their mapping to gRPC status codes;
- ``logs``: JSON log lines.

Nothing here imports a service: :mod:`services.process` composes them.
"""
