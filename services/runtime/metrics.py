"""Prometheus metrics of the adrec services: the standard gRPC server metrics plus domain ones.

Every metric the services export is declared here, so dashboards and alert rules have one
place to read names and labels from. The gRPC metrics use the names, labels and code
spellings of go-grpc-prometheus (`grpc_code="OK"`, `"InvalidArgument"`, ...), which the
usual gRPC dashboards expect, on the server and, for the gateway's calls to recall and
ranking, on the client side. The domain metrics carry an `adrec_service` label because
`adrec serve all` runs the three services in one process behind one `/metrics`; it is not
called `service`, which the Prometheus Operator sets on every target it scrapes.

    metrics = Metrics()                          # its own registry
    async with serve(
        spec, observer=grpc_server_observer(metrics), counters=call_counters(metrics), ...
    ): ...
    endpoint = start_metrics_endpoint(metrics.registry, "0.0.0.0", 9464)
    recall = metrics.service("recall")
    recall.fallback("no_recall_set")
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import grpc
from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    gc_collector,
    make_wsgi_app,
    platform_collector,
    process_collector,
)

from services.runtime.server import CallCounters, UnaryBehavior, UnaryObserver

#: Latency buckets for calls that take milliseconds (seconds, as Prometheus wants).
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.003,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)
#: The label naming the service (recall, ranking, gateway) on every domain metric.
SERVICE_LABEL = "adrec_service"
#: Candidate list sizes: the job's recall lists hold 500, RankCandidates takes up to 1000.
CANDIDATE_BUCKETS = (0, 1, 10, 25, 50, 100, 200, 300, 400, 500, 750, 1000)
#: Events per ReportEvents batch, up to and past the default ADREC_EVENTS_MAX_BATCH_SIZE.
EVENT_BATCH_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000)

#: Status code names as go-grpc-prometheus spells them (Go's codes.Code.String()).
GRPC_CODE_NAMES = {
    grpc.StatusCode.OK: "OK",
    grpc.StatusCode.CANCELLED: "Canceled",
    grpc.StatusCode.UNKNOWN: "Unknown",
    grpc.StatusCode.INVALID_ARGUMENT: "InvalidArgument",
    grpc.StatusCode.DEADLINE_EXCEEDED: "DeadlineExceeded",
    grpc.StatusCode.NOT_FOUND: "NotFound",
    grpc.StatusCode.ALREADY_EXISTS: "AlreadyExists",
    grpc.StatusCode.PERMISSION_DENIED: "PermissionDenied",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "ResourceExhausted",
    grpc.StatusCode.FAILED_PRECONDITION: "FailedPrecondition",
    grpc.StatusCode.ABORTED: "Aborted",
    grpc.StatusCode.OUT_OF_RANGE: "OutOfRange",
    grpc.StatusCode.UNIMPLEMENTED: "Unimplemented",
    grpc.StatusCode.INTERNAL: "Internal",
    grpc.StatusCode.UNAVAILABLE: "Unavailable",
    grpc.StatusCode.DATA_LOSS: "DataLoss",
    grpc.StatusCode.UNAUTHENTICATED: "Unauthenticated",
}


def enum_labels(enum: EnumTypeWrapper) -> dict[int, str]:
    """The label value of each value of a proto enum but its zero one (`..._UNSPECIFIED`,
    which is never reported): its name less the enum's prefix, in lower case
    (`DEGRADATION_REASON_RANKING_UNAVAILABLE` -> "ranking_unavailable")."""
    prefix = enum.Name(0).removesuffix("UNSPECIFIED")
    return {value: name.removeprefix(prefix).lower() for name, value in enum.items() if value}


class Metrics:
    """Every metric family, registered in one registry (a fresh one unless given)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        for collector in (
            process_collector.ProcessCollector,
            platform_collector.PlatformCollector,
            gc_collector.GCCollector,
        ):
            collector(registry=self.registry)
        grpc_labels = ("grpc_type", "grpc_service", "grpc_method")
        self.grpc_started = Counter(
            "grpc_server_started_total",
            "RPCs started on the server.",
            grpc_labels,
            registry=self.registry,
        )
        self.grpc_handled = Counter(
            "grpc_server_handled_total",
            "RPCs completed on the server, by status code.",
            (*grpc_labels, "grpc_code"),
            registry=self.registry,
        )
        self.grpc_handling_seconds = Histogram(
            "grpc_server_handling_seconds",
            "Time from receiving an RPC to its completion on the server.",
            grpc_labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.grpc_msg_received = Counter(
            "grpc_server_msg_received_total",
            "Request messages received on the server.",
            grpc_labels,
            registry=self.registry,
        )
        self.grpc_msg_sent = Counter(
            "grpc_server_msg_sent_total",
            "Response messages sent by the server.",
            grpc_labels,
            registry=self.registry,
        )
        self.grpc_client_started = Counter(
            "grpc_client_started_total",
            "RPCs started on the client.",
            grpc_labels,
            registry=self.registry,
        )
        self.grpc_client_handled = Counter(
            "grpc_client_handled_total",
            "RPCs completed on the client, by status code.",
            (*grpc_labels, "grpc_code"),
            registry=self.registry,
        )
        self.grpc_client_handling_seconds = Histogram(
            "grpc_client_handling_seconds",
            "Time from starting an RPC to its completion on the client.",
            grpc_labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.shed = Counter(
            "adrec_shed_total",
            "RPCs answered RESOURCE_EXHAUSTED before any work: the server was at its limit "
            "of concurrent calls.",
            ("grpc_service", "grpc_method"),
            registry=self.registry,
        )
        self.abandoned = Counter(
            "adrec_abandoned_total",
            "RPCs that ended before their handler ran: the caller cancelled, or its deadline "
            "passed, while the call waited.",
            ("grpc_service", "grpc_method"),
            registry=self.registry,
        )
        self.expired = Counter(
            "adrec_expired_total",
            "RPCs whose deadline had passed when their handler was to start: answered "
            "DEADLINE_EXCEEDED without any work.",
            ("grpc_service", "grpc_method"),
            registry=self.registry,
        )
        self.undelivered = Counter(
            "adrec_undelivered_total",
            "RPCs whose answer could not be sent: the caller cancelled, or its deadline "
            "passed, while the server worked on it.",
            ("grpc_service", "grpc_method"),
            registry=self.registry,
        )
        self.candidates = Histogram(
            "adrec_candidates_per_request",
            "Candidate ads handled per request.",
            (SERVICE_LABEL,),
            buckets=CANDIDATE_BUCKETS,
            registry=self.registry,
        )
        self.fallbacks = Counter(
            "adrec_fallbacks_total",
            "Requests answered from a fallback, by the reason the primary source failed.",
            (SERVICE_LABEL, "reason"),
            registry=self.registry,
        )
        self.recommendations = Counter(
            "adrec_recommendations_total",
            "Recommend answers by requested mode and serving path.",
            (SERVICE_LABEL, "mode", "path"),
            registry=self.registry,
        )
        self.data_version = Gauge(
            "adrec_data_version_info",
            "Published data version loaded (value 1).",
            (SERVICE_LABEL, "version"),
            registry=self.registry,
        )
        self.model_version = Gauge(
            "adrec_model_version_info",
            "CTR model version loaded (value 1).",
            (SERVICE_LABEL, "version"),
            registry=self.registry,
        )
        self.version_loaded_at = Gauge(
            "adrec_data_version_loaded_timestamp_seconds",
            "When the loaded data version was loaded (Unix time).",
            (SERVICE_LABEL,),
            registry=self.registry,
        )
        self.version_created_at = Gauge(
            "adrec_data_version_created_timestamp_seconds",
            "When the loaded data version was created, from its metadata (Unix time).",
            (SERVICE_LABEL,),
            registry=self.registry,
        )
        self.model_reload_failures = Counter(
            "adrec_model_reload_failures_total",
            "Published versions refused by the ranking service; the previous one kept serving.",
            (SERVICE_LABEL, "reason"),
            registry=self.registry,
        )
        self.unknown_ads = Counter(
            "adrec_unknown_ads_total",
            "Candidate ads skipped because the loaded version has no features for them.",
            (SERVICE_LABEL,),
            registry=self.registry,
        )
        self.user_profiles_missing = Counter(
            "adrec_user_profiles_missing_total",
            "Ranked requests for users without a profile (scored with missing levels).",
            (SERVICE_LABEL,),
            registry=self.registry,
        )
        self.redis_latency = Histogram(
            "adrec_redis_latency_seconds",
            "Latency of Redis commands, by operation.",
            (SERVICE_LABEL, "op"),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.redis_errors = Counter(
            "adrec_redis_errors_total",
            "Failed Redis commands, by operation.",
            (SERVICE_LABEL, "op"),
            registry=self.registry,
        )
        self.redis_up = Gauge(
            "adrec_redis_up",
            "1 when the last Redis check succeeded.",
            (SERVICE_LABEL,),
            registry=self.registry,
        )
        self.redis_nodes_unreachable = Gauge(
            "adrec_redis_nodes_unreachable",
            "Redis nodes (a standalone server, or Redis Cluster primaries) that failed the last "
            "check.",
            (SERVICE_LABEL,),
            registry=self.registry,
        )
        self.data_loss = Gauge(
            "adrec_data_loss_detected",
            "1 while the last check found data of the loaded version gone from Redis: its "
            "sentinels, or the active version pointer.",
            (SERVICE_LABEL,),
            registry=self.registry,
        )
        self.sentinels_missing = Gauge(
            "adrec_version_sentinels_missing",
            "Sentinel keys of the loaded version the last check did not find on nodes that "
            "answered.",
            (SERVICE_LABEL,),
            registry=self.registry,
        )
        self.downstream_latency = Histogram(
            "adrec_downstream_latency_seconds",
            "Latency of the gateway's calls to recall and ranking, by outcome.",
            (SERVICE_LABEL, "downstream", "grpc_code"),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.events_accepted = Counter(
            "adrec_events_accepted_total",
            "Events appended to the event log, by kind (imp, clk, pv, cart, fav, buy).",
            (SERVICE_LABEL, "kind"),
            registry=self.registry,
        )
        self.event_batches_rejected = Counter(
            "adrec_event_batches_rejected_total",
            "ReportEvents batches of which nothing was logged, by reason.",
            (SERVICE_LABEL, "reason"),
            registry=self.registry,
        )
        self.event_batch_size = Histogram(
            "adrec_event_batch_size",
            "Events per ReportEvents batch received.",
            (SERVICE_LABEL,),
            buckets=EVENT_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.event_log_length = Gauge(
            "adrec_event_log_length",
            "Entries in the event log, as of the last batch appended.",
            (SERVICE_LABEL,),
            registry=self.registry,
        )

    def service(self, name: str) -> ServiceMetrics:
        return ServiceMetrics(self, name)


class ServiceMetrics:
    """The domain metrics of one service, label children cached for the request path.

    The service declares the closed sets of its label values (fallback reasons, reload
    failure reasons, Redis operations) so their counters are exported at 0 before the first
    event; a value outside them is still counted, from its first event on.
    """

    def __init__(self, metrics: Metrics, service: str):
        self.metrics = metrics
        self.service = service
        self.candidates = metrics.candidates.labels(service)
        self.unknown_ads = metrics.unknown_ads.labels(service)
        self.user_profiles_missing = metrics.user_profiles_missing.labels(service)
        self._redis_latency: dict[str, Any] = {}
        self._redis_errors: dict[str, Any] = {}
        self._fallbacks: dict[str, Any] = {}
        self._reload_failures: dict[str, Any] = {}
        self._data_version: str | None = None
        self._model_version: str | None = None

    def declare_fallback_reasons(self, reasons: Iterable[str]) -> None:
        """Export adrec_fallbacks_total at 0 for each of `reasons`."""
        for reason in reasons:
            self._child(self.metrics.fallbacks, self._fallbacks, reason)

    def declare_reload_failure_reasons(self, reasons: Iterable[str]) -> None:
        """Export adrec_model_reload_failures_total at 0 for each of `reasons`."""
        for reason in reasons:
            self._child(self.metrics.model_reload_failures, self._reload_failures, reason)

    def declare_redis_ops(self, ops: Iterable[str]) -> None:
        """Export adrec_redis_errors_total at 0 for each of `ops`.

        Their latency histograms stay born at the first command: a histogram child is a
        series per bucket, and no alert counts its first observation.
        """
        for op in ops:
            self._child(self.metrics.redis_errors, self._redis_errors, op)

    def fallback(self, reason: str) -> None:
        self._child(self.metrics.fallbacks, self._fallbacks, reason).inc()

    def redis_latency(self, op: str) -> Any:
        return self._child(self.metrics.redis_latency, self._redis_latency, op)

    def redis_error(self, op: str) -> None:
        self._child(self.metrics.redis_errors, self._redis_errors, op).inc()

    def set_redis_up(self, up: bool) -> None:
        self.metrics.redis_up.labels(self.service).set(1 if up else 0)

    def set_redis_nodes_unreachable(self, nodes: int) -> None:
        self.metrics.redis_nodes_unreachable.labels(self.service).set(nodes)

    def set_data_loss(self, lost: bool, sentinels_missing: int) -> None:
        self.metrics.data_loss.labels(self.service).set(1 if lost else 0)
        self.metrics.sentinels_missing.labels(self.service).set(sentinels_missing)

    def set_data_version(self, version: str, created_at: float | None = None) -> None:
        """Report `version` as loaded now; `created_at` is its creation time (Unix), None
        when its metadata does not say, which exports no creation time rather than a wrong one.
        """
        self._data_version = _swap_info(
            self.metrics.data_version, self.service, self._data_version, version
        )
        self.metrics.version_loaded_at.labels(self.service).set(time.time())
        if created_at is None:
            self.metrics.version_created_at.remove(self.service)
        else:
            self.metrics.version_created_at.labels(self.service).set(created_at)

    def set_model_version(self, version: str) -> None:
        self._model_version = _swap_info(
            self.metrics.model_version, self.service, self._model_version, version
        )

    def model_reload_failure(self, reason: str) -> None:
        self._child(self.metrics.model_reload_failures, self._reload_failures, reason).inc()

    def _child(self, family: Counter | Histogram, cache: dict[str, Any], value: str) -> Any:
        """The (service, value) child of `family`, created (so exported) on first use."""
        child = cache.get(value)
        if child is None:
            child = cache[value] = family.labels(self.service, value)
        return child


def _swap_info(gauge: Gauge, service: str, old: str | None, new: str) -> str:
    if old is not None and old != new:
        gauge.remove(service, old)
    gauge.labels(service, new).set(1)
    return new


def grpc_server_observer(metrics: Metrics) -> UnaryObserver:
    """A `serve(observer=...)` recording grpc_server_{started,handled}_total,
    grpc_server_msg_{received,sent}_total and _handling_seconds for each unary method it
    wraps.

    `serve` wraps the methods as it registers them, so every method's series, and its
    handled count for every status code, exist at 0 from the server's start. As in
    go-grpc-prometheus, a unary call has received its one message when it starts, and sends
    its one message only when it ends OK.
    """

    def observe(service: str, method: str, behavior: UnaryBehavior) -> UnaryBehavior:
        labels = ("unary", service, method)
        started = metrics.grpc_started.labels(*labels)
        received = metrics.grpc_msg_received.labels(*labels)
        sent = metrics.grpc_msg_sent.labels(*labels)
        seconds = metrics.grpc_handling_seconds.labels(*labels)
        handled_by_code = {
            code: metrics.grpc_handled.labels(*labels, code) for code in GRPC_CODE_NAMES.values()
        }

        async def observed(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            started.inc()
            received.inc()
            start = time.perf_counter()
            code = "OK"
            try:
                response = await behavior(request, context)
                if context.code() is not None:
                    code = GRPC_CODE_NAMES[context.code()]
                if code == "OK":
                    sent.inc()
                return response
            except asyncio.CancelledError:
                remaining = context.time_remaining()
                code = (
                    "DeadlineExceeded" if remaining is not None and remaining <= 0 else "Canceled"
                )
                raise
            except Exception:
                # An abort has set the code; any other exception reaches the client as UNKNOWN.
                set_code = context.code()
                code = GRPC_CODE_NAMES[set_code] if set_code is not None else "Unknown"
                raise
            finally:
                seconds.observe(time.perf_counter() - start)
                handled_by_code[code].inc()

        return observed

    return observe


class _ClientMethod:
    """The client-side series of one method, exported at 0 from their creation."""

    __slots__ = ("handled", "seconds", "started")

    def __init__(self, metrics: Metrics, full_method: str):
        service, _, method = full_method.lstrip("/").partition("/")
        labels = ("unary", service, method)
        self.started = metrics.grpc_client_started.labels(*labels)
        self.seconds = metrics.grpc_client_handling_seconds.labels(*labels)
        self.handled = {
            code: metrics.grpc_client_handled.labels(*labels, code)
            for code in GRPC_CODE_NAMES.values()
        }


class GrpcClientMetrics(grpc.aio.UnaryUnaryClientInterceptor):
    """A channel interceptor recording grpc_client_{started,handled}_total and
    grpc_client_handling_seconds for each unary call, as go-grpc-prometheus's client
    interceptor does.

    The methods of `service` (full proto name) are known up front, so their series exist at
    0 from the channel's creation; a call to any other method is counted from its first call.
    """

    def __init__(self, metrics: Metrics, service: str, methods: Iterable[str]):
        self._metrics = metrics
        self._methods = {
            full_method: _ClientMethod(metrics, full_method)
            for full_method in (f"/{service}/{method}" for method in methods)
        }

    async def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Awaitable[Any]],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        method = client_call_details.method
        full_method = method.decode() if isinstance(method, bytes) else method
        observed = self._methods.get(full_method)
        if observed is None:
            observed = self._methods[full_method] = _ClientMethod(self._metrics, full_method)
        observed.started.inc()
        start = time.perf_counter()
        code = "Unknown"
        try:
            response = await (await continuation(client_call_details, request))
            code = "OK"
            return response
        except grpc.aio.AioRpcError as error:
            code = GRPC_CODE_NAMES[error.code()]
            raise
        except asyncio.CancelledError:
            code = "Canceled"
            raise
        finally:
            observed.seconds.observe(time.perf_counter() - start)
            observed.handled[code].inc()


def call_counters(metrics: Metrics) -> CallCounters:
    """A `serve(counters=...)` counting adrec_shed_total, adrec_abandoned_total,
    adrec_expired_total and adrec_undelivered_total, each method's series at 0 from the
    server's start."""
    return CallCounters(
        shed=lambda service, method: metrics.shed.labels(service, method).inc,
        abandoned=lambda service, method: metrics.abandoned.labels(service, method).inc,
        expired=lambda service, method: metrics.expired.labels(service, method).inc,
        undelivered=lambda service, method: metrics.undelivered.labels(service, method).inc,
    )


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes every few seconds are not news."""


class _MetricsHTTPServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


@dataclasses.dataclass
class MetricsEndpoint:
    """A running `/metrics` HTTP server, in a daemon thread as prometheus_client runs it."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return self.server.server_port

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def start_metrics_endpoint(registry: CollectorRegistry, host: str, port: int) -> MetricsEndpoint:
    """Serve `registry` on http://host:port/metrics; port 0 binds a free port."""
    family = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0][0]
    server_class = type("MetricsHTTPServer", (_MetricsHTTPServer,), {"address_family": family})
    try:
        server: WSGIServer = make_server(
            host, port, make_wsgi_app(registry), server_class, handler_class=_QuietHandler
        )
    except OSError as error:
        raise OSError(f"cannot serve metrics on {host}:{port}: {error}") from error
    # A short poll keeps close() quick; the thread otherwise sleeps in select().
    thread = threading.Thread(
        target=server.serve_forever,
        kwargs={"poll_interval": 0.05},
        name="metrics-endpoint",
        daemon=True,
    )
    thread.start()
    return MetricsEndpoint(server, thread)
