"""JSON logs: one line per event with ts, level, service, msg and any context fields.

    configure_logging("info")
    log = service_logger("ranking")
    log.info("model refused", extra={"version": "v18", "reason": "..."})

prints ``{"ts": "...", "level": "info", "service": "ranking", "msg": "model refused",
"version": "v18", "reason": "..."}`` on stderr, where log shippers expect it.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
import time
from collections.abc import Hashable, MutableMapping
from typing import Any, TextIO

LOG_LEVELS = ("debug", "info", "warning", "error")

# Attributes every LogRecord has; anything else on a record came from `extra`.
_STANDARD_ATTRIBUTES = frozenset(
    vars(logging.LogRecord("", logging.INFO, "", 0, "", None, None))
) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def __init__(self, default_service: str = "adrec"):
        super().__init__()
        # Records from shared code (server bootstrap, libraries) carry no service of their own.
        self.default_service = default_service

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "service": getattr(record, "service", self.default_service),
            "msg": record.getMessage(),
            "logger": record.name,
        }
        for name, value in vars(record).items():
            if name not in _STANDARD_ATTRIBUTES and name not in document:
                document[name] = value
        if record.exc_info:
            document["exc"] = self.formatException(record.exc_info)
        return json.dumps(document, default=str, separators=(",", ":"))


def configure_logging(level: str, service: str = "adrec", stream: TextIO | None = None) -> None:
    """Send every log record, ours and the libraries', to `stream` as JSON lines."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class ServiceLogger(logging.LoggerAdapter[logging.Logger]):
    """Adds the service name to every record, keeping the call's own `extra` fields."""

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        kwargs["extra"] = {**(self.extra or {}), **kwargs.get("extra", {})}
        return msg, kwargs


def service_logger(service: str) -> ServiceLogger:
    return ServiceLogger(logging.getLogger(f"services.{service}"), {"service": service})


class LogThrottle:
    """Lets one log line a second through per kind of event, counting the ones held back.

    An outage repeats the same failure on every request; one line a second with a count says
    as much without the log volume growing with the traffic.
    """

    def __init__(self, interval: float = 1.0):
        self.interval = interval
        self._last: dict[Hashable, float] = {}
        self._held: dict[Hashable, int] = {}

    def allow(self, kind: Hashable) -> int | None:
        """None to hold this line back, else how many of its kind were held back since."""
        now = time.monotonic()
        if now - self._last.get(kind, -self.interval) < self.interval:
            self._held[kind] = self._held.get(kind, 0) + 1
            return None
        self._last[kind] = now
        return self._held.pop(kind, 0)
