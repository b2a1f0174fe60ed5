"""Settings of the services, from env vars and flags (see adrec.core.settings).

:data:`SETTINGS` maps each `adrec serve` target to its settings class; every service also
reads :class:`adrec.core.redis_conn.RedisSettings`. Deploy manifests and docs take env var
names and default ports from here:

    for service, cls in SETTINGS.items():
        print(service, env_names(cls) + env_names(RedisSettings))
"""

from __future__ import annotations

import dataclasses

from adrec.core.adstate import Cap, parse_caps
from adrec.core.redis_conn import RedisSettings
from adrec.core.settings import (
    env_names,
    in_range,
    one_of,
    parse_float,
    parse_int,
    port_number,
    setting,
)
from services.runtime.logs import LOG_LEVELS

# The largest legitimate message is a RankCandidates request of 1000 ids (about 10 KB) or a
# 500-ad Recommend response; 1 MiB leaves ample headroom while capping the memory one call
# can claim, a quarter of gRPC's 4 MiB receive default.
DEFAULT_MAX_MESSAGE_BYTES = 1024 * 1024
DEFAULT_RECALL_PORT = 50051
DEFAULT_RANKING_PORT = 50052
DEFAULT_GATEWAY_PORT = 50053
DEFAULT_EVENTS_PORT = 50054
DEFAULT_ADMIN_PORT = 50055
DEFAULT_METRICS_PORT = 9464

_PORT_HELP = "gRPC port of the {} service; 0 picks a free one"
_LIMIT_HELP = (
    "Calls the {} server runs at once; each one more is answered RESOURCE_EXHAUSTED at once "
    "(adrec_shed_total)"
)
_LIMIT_RANGE = in_range(1, 100_000)
# A call that would only wait past its caller's deadline is better refused at once: at
# about 1.6 ms of CPU per Recommend (docs/operations.md, "Scaling"), 256 in flight are two
# 200 ms request budgets of one core's work. Recall and ranking get twice as many, as each
# admitted gateway call makes one call to each and several gateways share them; in
# `serve all` the gateway's own calls downstream then always fit.
DEFAULT_GATEWAY_MAX_CONCURRENT_RPCS = 256
# HTTP/2's MAX_CONCURRENT_STREAMS on the gateway's port: a client's calls past it wait in
# its own channel instead of in the gateway's queue, where a burst from one client would
# hold every other client's calls behind it. Recall and ranking keep gRPC's unbounded
# default: each gateway multiplexes all its calls to them over one connection. 100 is the
# smallest value HTTP/2 recommends; far fewer get a steady caller's calls refused while the
# gateway stalls (a server counts a stream until it has released it, a client until the
# stream's end arrived).
DEFAULT_GATEWAY_MAX_STREAMS_PER_CONNECTION = 100
DEFAULT_BACKEND_MAX_CONCURRENT_RPCS = 512
# A ReportEvents call carries a whole batch, many Recommend calls' worth of work, and every
# accepted one is a Redis transaction that runs alone on the server: fewer are admitted.
DEFAULT_EVENTS_MAX_CONCURRENT_RPCS = 64
# Admin calls come from operators and their tools, a few at a time.
DEFAULT_ADMIN_MAX_CONCURRENT_RPCS = 16


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    """What every service process needs: where to listen, limits, polling, logs."""

    host: str = setting("ADREC_HOST", "0.0.0.0", "Address the gRPC and metrics servers listen on")
    metrics_port: int = setting(
        "ADREC_METRICS_PORT",
        DEFAULT_METRICS_PORT,
        "Port of the Prometheus /metrics endpoint; 0 picks a free one",
        parse=parse_int,
        check=port_number(allow_zero=True),
    )
    max_message_bytes: int = setting(
        "ADREC_MAX_MESSAGE_BYTES",
        DEFAULT_MAX_MESSAGE_BYTES,
        "Largest gRPC message received or sent",
        parse=parse_int,
        check=in_range(16 * 1024, 64 * 1024 * 1024),
    )
    drain_seconds: float = setting(
        "ADREC_DRAIN_SECONDS",
        20.0,
        "On SIGTERM, how long in-flight calls may finish (keep below the pod's grace period)",
        parse=parse_float,
        check=in_range(0.0, 600.0),
    )
    reload_interval_seconds: float = setting(
        "ADREC_RELOAD_INTERVAL_SECONDS",
        2.0,
        "How often Redis is checked and the active data version pointer polled",
        parse=parse_float,
        check=in_range(0.05, 300.0),
    )
    max_connection_age_seconds: float = setting(
        "ADREC_MAX_CONNECTION_AGE_SECONDS",
        300.0,
        "Clients are asked to reconnect after this long, so they re-resolve DNS and spread "
        "over new replicas; 0 disables",
        parse=parse_float,
        check=in_range(0.0, 86400.0),
    )
    log_level: str = setting(
        "ADREC_LOG_LEVEL",
        "info",
        "Log level",
        parse=str.lower,
        check=one_of(*LOG_LEVELS),
    )


@dataclasses.dataclass(frozen=True)
class _RecallOptions:
    recall_port: int = setting(
        "ADREC_RECALL_PORT",
        DEFAULT_RECALL_PORT,
        _PORT_HELP.format("recall"),
        parse=parse_int,
        check=port_number(allow_zero=True),
    )
    recall_max_concurrent_rpcs: int = setting(
        "ADREC_RECALL_MAX_CONCURRENT_RPCS",
        DEFAULT_BACKEND_MAX_CONCURRENT_RPCS,
        _LIMIT_HELP.format("recall"),
        parse=parse_int,
        check=_LIMIT_RANGE,
    )


@dataclasses.dataclass(frozen=True)
class _RankingOptions:
    ranking_port: int = setting(
        "ADREC_RANKING_PORT",
        DEFAULT_RANKING_PORT,
        _PORT_HELP.format("ranking"),
        parse=parse_int,
        check=port_number(allow_zero=True),
    )
    ranking_max_concurrent_rpcs: int = setting(
        "ADREC_RANKING_MAX_CONCURRENT_RPCS",
        DEFAULT_BACKEND_MAX_CONCURRENT_RPCS,
        _LIMIT_HELP.format("ranking"),
        parse=parse_int,
        check=_LIMIT_RANGE,
    )


def _positive_ms(value: int) -> str | None:
    return None if 1 <= value <= 60_000 else "must be between 1 and 60000 ms"


@dataclasses.dataclass(frozen=True)
class _GatewayOptions:
    gateway_port: int = setting(
        "ADREC_GATEWAY_PORT",
        DEFAULT_GATEWAY_PORT,
        _PORT_HELP.format("gateway"),
        parse=parse_int,
        check=port_number(allow_zero=True),
    )
    gateway_max_concurrent_rpcs: int = setting(
        "ADREC_GATEWAY_MAX_CONCURRENT_RPCS",
        DEFAULT_GATEWAY_MAX_CONCURRENT_RPCS,
        _LIMIT_HELP.format("gateway"),
        parse=parse_int,
        check=_LIMIT_RANGE,
    )
    gateway_max_streams_per_connection: int = setting(
        "ADREC_GATEWAY_MAX_STREAMS_PER_CONNECTION",
        DEFAULT_GATEWAY_MAX_STREAMS_PER_CONNECTION,
        "Calls one client connection may have open on the gateway at once (HTTP/2 "
        "MAX_CONCURRENT_STREAMS); the client's further calls wait in its own channel",
        parse=parse_int,
        check=_LIMIT_RANGE,
    )
    recall_address: str = setting(
        "ADREC_RECALL_ADDRESS",
        f"127.0.0.1:{DEFAULT_RECALL_PORT}",
        "gRPC target of the recall service, e.g. dns:///recall:50051 (headless Service); "
        "`serve all` uses its own",
    )
    ranking_address: str = setting(
        "ADREC_RANKING_ADDRESS",
        f"127.0.0.1:{DEFAULT_RANKING_PORT}",
        "gRPC target of the ranking service, e.g. dns:///ranking:50052; `serve all` uses its own",
    )
    request_timeout_ms: int = setting(
        "ADREC_REQUEST_TIMEOUT_MS",
        200,
        "Time budget of a Recommend call whose caller set no deadline",
        parse=parse_int,
        check=_positive_ms,
    )
    recall_timeout_ms: int = setting(
        "ADREC_RECALL_TIMEOUT_MS",
        50,
        "Longest wait for the recall service within a call",
        parse=parse_int,
        check=_positive_ms,
    )
    ranking_timeout_ms: int = setting(
        "ADREC_RANKING_TIMEOUT_MS",
        80,
        "Longest wait for the ranking service within a call",
        parse=parse_int,
        check=_positive_ms,
    )
    redis_read_timeout_ms: int = setting(
        "ADREC_GATEWAY_REDIS_READ_TIMEOUT_MS",
        30,
        "Longest wait for one Redis read within a Recommend call (the offline list, the "
        "ad-serving controls' state), so a hung Redis leaves the answer from memory its time",
        parse=parse_int,
        check=_positive_ms,
    )
    fallback_reserve_ms: int = setting(
        "ADREC_FALLBACK_RESERVE_MS",
        50,
        "Part of the caller's deadline kept back from downstream calls to serve a fallback",
        parse=parse_int,
        check=in_range(0, 60_000),
    )

    gateway_frequency_caps: tuple[Cap, ...] = setting(
        "ADREC_GATEWAY_FREQUENCY_CAPS",
        (),
        "Frequency caps of every Recommend answer, e.g. 'ad:3/24h,campaign:10/24h,customer:20/72h' "
        "(impressions per user within whole clock hours, scopes ad, campaign, customer); a "
        "request may tighten them, never loosen them; empty for none",
        parse=parse_caps,
    )
    gateway_served_seconds: int = setting(
        "ADREC_GATEWAY_SERVED_SECONDS",
        300,
        "How long the ads a gateway returned count towards a user's frequency caps, on top of "
        "the reported impressions (keep it above the stream job's lag); 0 counts impressions "
        "alone",
        parse=parse_int,
        check=in_range(0, 3600),
    )
    gateway_max_per_category: int = setting(
        "ADREC_GATEWAY_MAX_PER_CATEGORY",
        0,
        "Most ads of one category in an answer, unless the request says; 0 for no limit",
        parse=parse_int,
        check=in_range(0, 500),
    )
    gateway_max_per_brand: int = setting(
        "ADREC_GATEWAY_MAX_PER_BRAND",
        0,
        "Most ads of one brand in an answer, unless the request says; 0 for no limit",
        parse=parse_int,
        check=in_range(0, 500),
    )
    gateway_max_per_customer: int = setting(
        "ADREC_GATEWAY_MAX_PER_CUSTOMER",
        0,
        "Most ads of one customer in an answer, unless the request says; 0 for no limit",
        parse=parse_int,
        check=in_range(0, 500),
    )

    def validate(self) -> list[str]:
        if self.fallback_reserve_ms >= self.request_timeout_ms:
            return ["ADREC_FALLBACK_RESERVE_MS must be smaller than ADREC_REQUEST_TIMEOUT_MS"]
        return []


@dataclasses.dataclass(frozen=True)
class _EventsOptions:
    events_port: int = setting(
        "ADREC_EVENTS_PORT",
        DEFAULT_EVENTS_PORT,
        _PORT_HELP.format("event intake"),
        parse=parse_int,
        check=port_number(allow_zero=True),
    )
    events_max_concurrent_rpcs: int = setting(
        "ADREC_EVENTS_MAX_CONCURRENT_RPCS",
        DEFAULT_EVENTS_MAX_CONCURRENT_RPCS,
        _LIMIT_HELP.format("event intake"),
        parse=parse_int,
        check=_LIMIT_RANGE,
    )
    events_max_batch_size: int = setting(
        "ADREC_EVENTS_MAX_BATCH_SIZE",
        1000,
        "Most events one ReportEvents call may carry; a larger batch is INVALID_ARGUMENT",
        parse=parse_int,
        check=in_range(1, 100_000),
    )
    events_log_max_length: int = setting(
        "ADREC_EVENTS_LOG_MAX_LENGTH",
        5_000_000,
        "Entries the event log keeps: each append trims it to about this many (XADD MAXLEN ~)",
        parse=parse_int,
        check=in_range(1_000, 1_000_000_000),
    )
    events_max_age_seconds: int = setting(
        "ADREC_EVENTS_MAX_AGE_SECONDS",
        86_400,
        "Oldest event time accepted, in seconds before the server's clock; raise it to "
        "backfill older events",
        parse=parse_int,
        check=in_range(0, 10 * 365 * 86_400),
    )
    events_max_ahead_seconds: int = setting(
        "ADREC_EVENTS_MAX_AHEAD_SECONDS",
        300,
        "Newest event time accepted, in seconds after the server's clock (clock skew)",
        parse=parse_int,
        check=in_range(0, 86_400),
    )


@dataclasses.dataclass(frozen=True)
class _AdminOptions:
    admin_port: int = setting(
        "ADREC_ADMIN_PORT",
        DEFAULT_ADMIN_PORT,
        _PORT_HELP.format("admin"),
        parse=parse_int,
        check=port_number(allow_zero=True),
    )
    admin_max_concurrent_rpcs: int = setting(
        "ADREC_ADMIN_MAX_CONCURRENT_RPCS",
        DEFAULT_ADMIN_MAX_CONCURRENT_RPCS,
        _LIMIT_HELP.format("admin"),
        parse=parse_int,
        check=_LIMIT_RANGE,
    )


@dataclasses.dataclass(frozen=True)
class RecallSettings(ServerSettings, _RecallOptions):
    pass


@dataclasses.dataclass(frozen=True)
class RankingSettings(ServerSettings, _RankingOptions):
    pass


@dataclasses.dataclass(frozen=True)
class GatewaySettings(ServerSettings, _GatewayOptions):
    pass


@dataclasses.dataclass(frozen=True)
class EventsSettings(ServerSettings, _EventsOptions):
    pass


@dataclasses.dataclass(frozen=True)
class AdminSettings(ServerSettings, _AdminOptions):
    pass


@dataclasses.dataclass(frozen=True)
class AllInOneSettings(
    ServerSettings,
    _RecallOptions,
    _RankingOptions,
    _GatewayOptions,
    _EventsOptions,
    _AdminOptions,
):
    """`adrec serve all`: every service in one process, one /metrics for all."""


#: `adrec serve` target -> its settings class (each service also reads RedisSettings).
SETTINGS: dict[str, type[ServerSettings]] = {
    "recall": RecallSettings,
    "ranking": RankingSettings,
    "gateway": GatewaySettings,
    "events": EventsSettings,
    "admin": AdminSettings,
    "all": AllInOneSettings,
}


def service_env_names(target: str) -> list[str]:
    """Every env var a `adrec serve <target>` process reads."""
    return env_names(SETTINGS[target]) + env_names(RedisSettings)
