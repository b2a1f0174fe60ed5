"""GatewayService: Recommend, composed from recall and ranking, degrading instead of failing.

REALTIME: recall -> rank. When ranking is down or late: the user's offline list; without
one: the candidates in recall order. When recall is down or late: the offline list, then
popular ads. A user without a personal recall set gets popular ads (recall serves them).
OFFLINE: the offline list; without one: recall order, or popular ads.

Every downstream call gets min(the caller's remaining time minus a reserve kept for the
fallback, that downstream's own budget); the offline-list read, itself a fallback, may
spend half of that reserve, so the answer from memory after it still comes in time. A
caller without a deadline gets the configured request budget. Popular lists are held in
memory per version, so an answer exists even while Redis and both downstream services are
unreachable.

On every path the ad-serving controls (services/gateway/controls.py) filter the
candidates: paused, capped, excluded and unknown ads never reach the answer, and the
diversity limits bound it per category, brand and customer. When they leave the path
short, the next paths fill in: after a ranked answer the offline list, then popular ads;
after the offline list the recall order (REALTIME: when recall answered), then popular.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from redis.exceptions import RedisError

from adrec.api.common.v1 import common_pb2
from adrec.api.gateway.v1 import gateway_service_pb2 as gateway_pb2
from adrec.api.gateway.v1 import gateway_service_pb2_grpc
from adrec.api.ranking.v1 import ranking_service_pb2, ranking_service_pb2_grpc
from adrec.api.recall.v1 import recall_service_pb2, recall_service_pb2_grpc
from adrec.core import keys
from adrec.core.events import MAX_REQUEST_ID_LENGTH
from adrec.core.metadata import VersionMeta
from adrec.core.scoring import RankBy
from services.gateway.controls import (
    DIVERSITY_HEADROOM,
    AdControls,
    AdScores,
    ControlSettings,
    RankedAds,
    RequestControls,
    ScoreLists,
    Selection,
    UserCounts,
    request_controls,
)
from services.gateway.explain import explanations
from services.gateway.versions import GatewayVersion
from services.runtime.data import RedisOp, RedisReader
from services.runtime.logs import LogThrottle, service_logger
from services.runtime.metrics import GRPC_CODE_NAMES, GrpcClientMetrics, Metrics, enum_labels
from services.runtime.requests import FieldChecks, grpc_errors, no_version_loaded
from services.runtime.server import ServiceSpec

MAX_COUNT = 500
#: Ads returned when a request leaves `count` at 0 (unset), as the proto documents.
DEFAULT_COUNT = 10
#: Even a call past its deadline gets this long for the offline list before falling back.
MIN_REDIS_WAIT_SECONDS = 0.001

ScoredAd = common_pb2.ScoredAd
#: The request's rank_by -> what the ranked paths order by, and the value answered.
_RANK_BY = {
    common_pb2.RANK_BY_UNSPECIFIED: (RankBy.PCTR, common_pb2.RANK_BY_PCTR),
    common_pb2.RANK_BY_PCTR: (RankBy.PCTR, common_pb2.RANK_BY_PCTR),
    common_pb2.RANK_BY_ECPM: (RankBy.ECPM, common_pb2.RANK_BY_ECPM),
}
RecommendResponse = gateway_pb2.RecommendResponse
REALTIME = gateway_pb2.RECOMMEND_MODE_REALTIME
OFFLINE = gateway_pb2.RECOMMEND_MODE_OFFLINE
PERSONAL = common_pb2.CANDIDATE_SOURCE_PERSONAL
POPULAR = common_pb2.CANDIDATE_SOURCE_POPULAR
Reason = gateway_pb2.DegradationReason
#: Degradation reason -> its name in metrics and logs ("ranking_unavailable", ...).
_REASON_NAMES = enum_labels(Reason)
#: Mode and serving path -> their names in adrec_recommendations_total.
_MODE_NAMES = enum_labels(gateway_pb2.RecommendMode)
_PATH_NAMES = enum_labels(gateway_pb2.ServingPath)

#: Downstream failure -> (reason when late, reason otherwise).
_DOWNSTREAM_REASONS = {
    "recall": (
        gateway_pb2.DEGRADATION_REASON_RECALL_DEADLINE_EXCEEDED,
        gateway_pb2.DEGRADATION_REASON_RECALL_UNAVAILABLE,
    ),
    "ranking": (
        gateway_pb2.DEGRADATION_REASON_RANKING_DEADLINE_EXCEEDED,
        gateway_pb2.DEGRADATION_REASON_RANKING_UNAVAILABLE,
    ),
}


@dataclasses.dataclass(frozen=True)
class Budgets:
    """Time budgets of one Recommend call, in seconds."""

    request: float
    recall: float
    ranking: float
    fallback_reserve: float
    #: One Redis read on the call's path (the offline list, the controls' state): a hung
    #: Redis must cost the answer from memory no more than this.
    redis_read: float


def downstream_channel(
    target: str, service: ServiceDescriptor, max_message_bytes: int, metrics: Metrics
) -> grpc.aio.Channel:
    """A channel spreading calls to `service` over every address `target` resolves to that
    reports it SERVING, never retrying, its calls counted in the grpc_client_* metrics.

    With a headless Kubernetes Service (`dns:///ranking:50052`) that is every ready pod, but
    the channel resolves again only when a connection ends, so a pod that turns NOT_SERVING
    would keep its share of the calls for minutes: the channel watches each backend's health
    service instead (client-side health checking) and leaves a backend out while it is not
    SERVING. With no backend SERVING a call fails at once, and the gateway falls back. A
    retry would spend the caller's deadline the fallback needs; reconnects are kept short so
    a restarted pod is used again within a second.
    """
    service_config: dict[str, Any] = {
        "loadBalancingConfig": [{"round_robin": {}}],
        "healthCheckConfig": {"serviceName": service.full_name},
    }
    return grpc.aio.insecure_channel(
        target,
        interceptors=[
            GrpcClientMetrics(metrics, service.full_name, [m.name for m in service.methods])
        ],
        options=[
            ("grpc.service_config", json.dumps(service_config)),
            ("grpc.enable_retries", 0),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ],
    )


class _Deadline:
    """The call's end, and the share of it each downstream call may use."""

    def __init__(self, time_remaining: float | None, budgets: Budgets):
        self.budgets = budgets
        total = budgets.request if time_remaining is None else time_remaining
        self.end = time.monotonic() + total

    def remaining(self) -> float:
        return self.end - time.monotonic()

    def for_downstream(self, cap: float) -> float:
        return min(self.remaining() - self.budgets.fallback_reserve, cap)

    def for_fallback_read(self, cap: float) -> float:
        """A read that is itself a fallback (the offline list) spends half the reserve; the
        other half stays for answering from memory (recall order, popular)."""
        return min(self.remaining() - self.budgets.fallback_reserve / 2, cap)


#: A path's candidates for filling in a short answer: (path, ad ids, their scores or None),
#: or None when the path has none.
_Candidates = tuple[gateway_pb2.ServingPath, Any, AdScores | None] | None


@dataclasses.dataclass
class _Call:
    """One Recommend call: what was asked, and the answer being put together."""

    user_id: int
    pid: str
    count: int
    mode: gateway_pb2.RecommendMode
    request_id: str
    version: GatewayVersion
    deadline: _Deadline
    controls: RequestControls
    #: The controls' reads for this call, running beside its first downstream call.
    prepared: asyncio.Future[UserCounts]
    rank_by: RankBy = RankBy.PCTR
    rank_by_value: common_pb2.RankBy = common_pb2.RANK_BY_PCTR
    debug: bool = False
    #: With `debug`: ranking's explanations of the ads it ranked on this call.
    ranked_explanations: Sequence[ranking_service_pb2.AdExplanation] = ()
    selection: Selection | None = None
    recalled: recall_service_pb2.GetCandidatesResponse | None = None
    reasons: list[gateway_pb2.DegradationReason] = dataclasses.field(default_factory=list)
    fills: list[gateway_pb2.FillIn] = dataclasses.field(default_factory=list)
    path: gateway_pb2.ServingPath = gateway_pb2.SERVING_PATH_UNSPECIFIED
    source: common_pb2.CandidateSource = common_pb2.CANDIDATE_SOURCE_UNSPECIFIED
    data_version: str = ""
    model_version: str = ""

    @property
    def chosen(self) -> Selection:
        assert self.selection is not None, "the controls are prepared first"
        return self.selection

    def unscored(
        self,
        path: gateway_pb2.ServingPath,
        source: common_pb2.CandidateSource,
        ad_ids: Any,
        data_version: str,
    ) -> None:
        self.path, self.source, self.data_version = path, source, data_version
        self.chosen.offer(ad_ids)

    def response(self) -> RecommendResponse:
        return RecommendResponse(
            ads=self.chosen.ads,
            serving_path=self.path,
            degradation_reasons=self.reasons,
            candidate_source=self.source,
            mode=self.mode,
            data_version=self.data_version,
            model_version=self.model_version,
            request_id=self.request_id,
            filled_from=self.fills,
            filtered=self.chosen.filtered_counts(),
            rank_by=self.rank_by_value,
        )


class GatewayService(gateway_service_pb2_grpc.GatewayServiceServicer):
    """Recommend for ad-serving systems.

    Readiness (health): Redis reachable and an active version loaded. It does not wait for
    recall or ranking: without them it still answers from its fallbacks, and taking every
    gateway out of rotation because a downstream is down would turn a degradation into an
    outage.
    """

    name = "gateway"

    def __init__(
        self,
        reader: RedisReader,
        recall_channel: grpc.aio.Channel,
        ranking_channel: grpc.aio.Channel,
        budgets: Budgets,
        controls: ControlSettings | None = None,
    ):
        self.reader = reader
        self.metrics = reader.metrics
        self.log = service_logger(self.name)
        # The gRPC code generator writes no annotations.
        self.recall = recall_service_pb2_grpc.RecallServiceStub(recall_channel)  # type: ignore[no-untyped-call]
        self.ranking = ranking_service_pb2_grpc.RankingServiceStub(ranking_channel)  # type: ignore[no-untyped-call]
        self.budgets = budgets
        self.control_settings = controls or ControlSettings()
        self.controls = AdControls(
            reader, self.control_settings, self.log, self.metrics.metrics.registry
        )
        self.current: GatewayVersion | None = None
        #: Error class of the last failed load of an active version, for the answer while
        #: none is loaded.
        self._load_failure: str | None = None
        self.metrics.declare_fallback_reasons(_REASON_NAMES.values())
        recommendations = self.metrics.metrics.recommendations
        # At 0 from the start too: the answers are the fallback ratios' denominator.
        self._answers = {
            (mode, path): recommendations.labels(self.name, mode_name, path_name)
            for mode, mode_name in _MODE_NAMES.items()
            for path, path_name in _PATH_NAMES.items()
        }
        self._downstream_latency: dict[tuple[str, str], Any] = {}
        self._failure_logs = LogThrottle()
        self._degraded_logs = LogThrottle()

    @property
    def spec(self) -> ServiceSpec:
        return ServiceSpec.of(
            gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"],
            self,
            gateway_service_pb2_grpc.add_GatewayServiceServicer_to_server,
        )

    @property
    def answers_without_redis(self) -> bool:
        # The popular lists in memory answer every request.
        return True

    @property
    def ready(self) -> bool:
        return self.current is not None

    async def load_version(self, version: str, meta: VersionMeta | None) -> None:
        try:
            # The controls' ad table first: a version is served only with it.
            await self.controls.load_version(version)
            self.current = await GatewayVersion.read(self.reader, version, meta, self.log)
        except Exception as error:
            self._load_failure = type(error).__name__
            raise
        self.metrics.set_data_version(version, meta.created_at_unix if meta else None)
        if self.current.model_version:
            self.metrics.set_model_version(self.current.model_version)
        self.log.info("following data version %s", version, extra={"version": version})

    @grpc_errors
    async def Recommend(
        self,
        request: gateway_pb2.RecommendRequest,
        context: grpc.aio.ServicerContext[gateway_pb2.RecommendRequest, RecommendResponse],
    ) -> RecommendResponse:
        checks = FieldChecks()
        user_id = checks.positive_id("user_id", request.user_id)
        pid = checks.known_pid("pid", request.pid, required=True)
        count = checks.in_range("count", request.count or DEFAULT_COUNT, 1, MAX_COUNT)
        request_id = checks.bounded_text("request_id", request.request_id, MAX_REQUEST_ID_LENGTH)
        mode = request.mode or REALTIME
        if mode not in (REALTIME, OFFLINE):
            checks.add("mode", f"unknown mode {mode}")
        controls = request_controls(checks, request, self.control_settings)
        rank_by = _RANK_BY.get(request.rank_by)
        if rank_by is None:
            checks.add("rank_by", f"unknown value {request.rank_by}")
        checks.raise_if_any()
        assert rank_by is not None  # checked above
        current = self.current
        if current is None:
            raise no_version_loaded(self.reader.last_failure, self._why_no_version())
        if rank_by[0] is RankBy.ECPM and current.bids is None:
            checks.add(
                "rank_by",
                f"RANK_BY_ECPM needs bids, and data version {current.version} has none",
            )
            checks.raise_if_any()

        deadline = _Deadline(context.time_remaining(), self.budgets)
        prepared = asyncio.ensure_future(
            self.controls.prepare(
                user_id,
                controls,
                max(deadline.for_fallback_read(self.budgets.redis_read), MIN_REDIS_WAIT_SECONDS),
            )
        )
        call = _Call(
            user_id=user_id,
            pid=pid,
            count=count,
            mode=mode,
            request_id=request_id or uuid.uuid4().hex,
            version=current,
            deadline=deadline,
            controls=controls,
            prepared=prepared,
            rank_by=rank_by[0],
            rank_by_value=rank_by[1],
            debug=request.debug,
        )
        try:
            await (self._realtime(call) if mode == REALTIME else self._offline(call))
        finally:
            # A call cancelled before the controls were awaited leaves nothing running.
            prepared.cancel()
        self._record(call)
        if controls.caps:
            self.controls.record_served(user_id, [ad.ad_id for ad in call.chosen.ads], time.time())
        response = call.response()
        if call.debug:
            response.explanations.extend(
                explanations(response, call.recalled, call.ranked_explanations, self.controls)
            )
        return response

    async def _prepare(self, call: _Call) -> Selection:
        if call.selection is None:
            counts = await call.prepared
            call.selection = self.controls.selection(call.count, call.controls, counts)
        return call.selection

    async def _fill(self, call: _Call, paths: list[Callable[[], Awaitable[_Candidates]]]) -> None:
        """When the controls left the answer short, let `paths` fill it in, in turn."""
        chosen = call.chosen
        if chosen.full or not chosen.filtered:
            return
        call.reasons.append(gateway_pb2.DEGRADATION_REASON_FILTERED_SHORT)
        for candidates_of in paths:
            candidates = await candidates_of()
            if candidates is None:
                continue
            path, ad_ids, scores = candidates
            appended = chosen.offer(ad_ids, scores)
            if appended:
                call.fills.append(gateway_pb2.FillIn(serving_path=path, ads=appended))
            if chosen.full:
                return

    def _why_no_version(self) -> str:
        """Why no version is loaded while Redis answers the version watcher's polls."""
        if self._load_failure is not None:
            return (
                "no data version loaded: loading the active version failed "
                f"({self._load_failure}); see the gateway's log"
            )
        return (
            "no data version loaded: Redis is reachable but has no active version; "
            "publish one with the job"
        )

    async def _realtime(self, call: _Call) -> None:
        recalled = await self._recall(call)
        chosen = await self._prepare(call)
        popular = self._popular_candidates(call)
        if recalled is None:
            if await self._offline_list(call):
                await self._fill(call, [popular])
            else:
                self._popular(call)
            return
        if recalled.source != PERSONAL:
            call.reasons.append(gateway_pb2.DEGRADATION_REASON_NO_RECALL_SET)
            call.unscored(
                gateway_pb2.SERVING_PATH_POPULAR, POPULAR, recalled.ad_ids, recalled.data_version
            )
            return
        offline = self._offline_candidates(call)
        candidates = chosen.for_ranking(recalled.ad_ids)
        if not len(candidates):
            # The controls left nothing to rank: the answer is the fill-ins'.
            call.path, call.source = gateway_pb2.SERVING_PATH_REALTIME_RANKED, PERSONAL
            call.data_version = recalled.data_version
            await self._fill(call, [offline, popular])
            return
        ranked: ranking_service_pb2.RankCandidatesResponse | None = await self._call(
            "ranking",
            self.ranking.RankCandidates,
            ranking_service_pb2.RankCandidatesRequest(
                user_id=call.user_id,
                pid=call.pid,
                ad_ids=candidates,
                top_k=call.count * DIVERSITY_HEADROOM if call.controls.limits.any else call.count,
                request_id=call.request_id,
                rank_by=call.rank_by_value,
                explain=call.debug,
            ),
            call.deadline.for_downstream(self.budgets.ranking),
            call,
        )
        if ranked is not None and not ranked.ads:
            # Every candidate is unknown to the ad table: an empty "ranked" answer would
            # look healthy while serving nothing.
            call.reasons.append(gateway_pb2.DEGRADATION_REASON_NO_KNOWN_CANDIDATES)
            if await self._offline_list(call):
                await self._fill(call, [popular])
            else:
                self._popular(call)
            return
        if ranked is not None:
            call.ranked_explanations = ranked.explanations
            if not chosen.take_ranked(ranked.ads, ranked.data_version):
                ad_ids = [ad.ad_id for ad in ranked.ads]
                chosen.offer(ad_ids, RankedAds(ranked.ads), checked=True)
            call.path, call.source = gateway_pb2.SERVING_PATH_REALTIME_RANKED, PERSONAL
            call.data_version, call.model_version = ranked.data_version, ranked.model_version
            await self._fill(call, [offline, popular])
            return
        if await self._offline_list(call):
            await self._fill(call, [self._recall_order_candidates(recalled), popular])
            return
        call.unscored(
            gateway_pb2.SERVING_PATH_RECALL_ORDER, PERSONAL, recalled.ad_ids, recalled.data_version
        )
        await self._fill(call, [popular])

    async def _offline(self, call: _Call) -> None:
        await self._prepare(call)
        popular = self._popular_candidates(call)
        if await self._offline_list(call):
            await self._fill(call, [self._recall_order_candidates(None, call), popular])
            return
        recalled = await self._recall(call)
        if recalled is None:
            self._popular(call)
        elif recalled.source != PERSONAL:
            call.reasons.append(gateway_pb2.DEGRADATION_REASON_NO_RECALL_SET)
            call.unscored(
                gateway_pb2.SERVING_PATH_POPULAR, POPULAR, recalled.ad_ids, recalled.data_version
            )
        else:
            call.unscored(
                gateway_pb2.SERVING_PATH_RECALL_ORDER,
                PERSONAL,
                recalled.ad_ids,
                recalled.data_version,
            )
            await self._fill(call, [popular])

    def _offline_candidates(self, call: _Call) -> Callable[[], Awaitable[_Candidates]]:
        async def candidates() -> _Candidates:
            scored = await self._read_offline(call)
            if scored is None:
                return None
            return (gateway_pb2.SERVING_PATH_OFFLINE_RANKED, *scored)

        return candidates

    def _recall_order_candidates(
        self,
        recalled: recall_service_pb2.GetCandidatesResponse | None,
        call: _Call | None = None,
    ) -> Callable[[], Awaitable[_Candidates]]:
        """The personal recall set in recall order; recalled now when `call` is given."""

        async def candidates() -> _Candidates:
            answer = recalled if call is None else await self._recall(call)
            if answer is None or answer.source != PERSONAL:
                return None
            return (gateway_pb2.SERVING_PATH_RECALL_ORDER, answer.ad_ids, None)

        return candidates

    def _popular_candidates(self, call: _Call) -> Callable[[], Awaitable[_Candidates]]:
        async def candidates() -> _Candidates:
            return (gateway_pb2.SERVING_PATH_POPULAR, call.version.popular.for_pid(call.pid), None)

        return candidates

    async def _recall(self, call: _Call) -> recall_service_pb2.GetCandidatesResponse | None:
        recalled: recall_service_pb2.GetCandidatesResponse | None = await self._call(
            "recall",
            self.recall.GetCandidates,
            recall_service_pb2.GetCandidatesRequest(
                user_id=call.user_id, pid=call.pid, request_id=call.request_id
            ),
            call.deadline.for_downstream(self.budgets.recall),
            call,
        )
        if recalled is not None:
            self.metrics.candidates.observe(len(recalled.ad_ids))
            call.recalled = recalled
        return recalled

    async def _call(
        self, downstream: str, method: Any, request: Any, timeout: float, call: _Call
    ) -> Any:
        """The downstream's answer, or None with the degradation reason recorded."""
        late, failed = _DOWNSTREAM_REASONS[downstream]
        if timeout <= 0:
            call.reasons.append(late)
            return None
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            return await method(request, timeout=timeout)
        except grpc.aio.AioRpcError as error:
            code = error.code()
            call.reasons.append(late if code == grpc.StatusCode.DEADLINE_EXCEEDED else failed)
            held_back = self._failure_logs.allow((downstream, code))
            if held_back is not None:
                self.log.warning(
                    "%s call failed: %s",
                    downstream,
                    error.details(),
                    extra={
                        "request_id": call.request_id,
                        "grpc_code": code.name,
                        "similar_failures_not_logged": held_back,
                    },
                )
            return None
        finally:
            self._observe_downstream(downstream, code, time.perf_counter() - start)

    async def _offline_list(self, call: _Call) -> bool:
        """Answer from the user's offline list; False (reason recorded) when there is none."""
        scored = await self._read_offline(call)
        if scored is None:
            call.reasons.append(gateway_pb2.DEGRADATION_REASON_NO_OFFLINE_LIST)
            return False
        call.chosen.offer(*scored)
        current = call.version
        call.path, call.source = gateway_pb2.SERVING_PATH_OFFLINE_RANKED, PERSONAL
        call.data_version, call.model_version = current.version, current.model_version
        return True

    async def _read_offline(self, call: _Call) -> tuple[Any, ScoreLists] | None:
        """The user's offline list and its scores at the call's placement, in the call's
        order; None without one."""
        current = call.version
        try:
            scored = await self.reader.read(
                keys.OFFLINE,
                current.version,
                call.user_id,
                op=RedisOp.OFFLINE,
                # A hung Redis must leave the answer from memory its time too.
                timeout=max(
                    call.deadline.for_fallback_read(self.budgets.redis_read), MIN_REDIS_WAIT_SECONDS
                ),
            )
        except RedisError as error:
            held_back = self._failure_logs.allow(("redis", type(error)))
            if held_back is not None:
                self.log.warning(
                    "cannot read the offline list: %s",
                    error,
                    extra={"request_id": call.request_id, "similar_failures_not_logged": held_back},
                )
            scored = None
        if scored is None or not len(scored[0]):
            return None
        ad_ids, stored = scored
        served = current.offline_scores(call.pid, ad_ids, stored, call.rank_by)
        return served.ad_ids, ScoreLists.of(served.ctrs, served.pctrs, served.bids, served.ecpms)

    def _popular(self, call: _Call) -> None:
        call.unscored(
            gateway_pb2.SERVING_PATH_POPULAR,
            POPULAR,
            call.version.popular.for_pid(call.pid),
            call.version.version,
        )

    def _record(self, call: _Call) -> None:
        self._answers[(call.mode, call.path)].inc()
        for filtered, candidates in call.chosen.filtered.items():
            self.controls.filtered_counters[filtered].inc(candidates)
        if not call.reasons:
            return
        reasons = [_REASON_NAMES[reason] for reason in call.reasons]
        for reason in reasons:
            self.metrics.fallback(reason)
        # Every degraded answer is counted; an outage degrades every request, so the log
        # gets one line a second per kind, with how many like it were not logged.
        held_back = self._degraded_logs.allow((call.path, *call.reasons))
        if held_back is not None:
            self.log.info(
                "degraded answer",
                extra={
                    "request_id": call.request_id,
                    "reasons": reasons,
                    "serving_path": gateway_pb2.ServingPath.Name(call.path),
                    "similar_answers_not_logged": held_back,
                },
            )

    def _observe_downstream(self, downstream: str, code: grpc.StatusCode, seconds: float) -> None:
        key = (downstream, code.name)
        child = self._downstream_latency.get(key)
        if child is None:
            child = self._downstream_latency[key] = self.metrics.metrics.downstream_latency.labels(
                self.name, downstream, GRPC_CODE_NAMES[code]
            )
        child.observe(seconds)
