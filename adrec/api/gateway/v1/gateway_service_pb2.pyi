from adrec.api.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CandidateOrigin(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CANDIDATE_ORIGIN_UNSPECIFIED: _ClassVar[CandidateOrigin]
    CANDIDATE_ORIGIN_ALS_CATEGORY: _ClassVar[CandidateOrigin]
    CANDIDATE_ORIGIN_REALTIME_INTEREST: _ClassVar[CandidateOrigin]
    CANDIDATE_ORIGIN_POPULAR: _ClassVar[CandidateOrigin]
    CANDIDATE_ORIGIN_OFFLINE_LIST: _ClassVar[CandidateOrigin]

class CapScope(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CAP_SCOPE_UNSPECIFIED: _ClassVar[CapScope]
    CAP_SCOPE_AD: _ClassVar[CapScope]
    CAP_SCOPE_CAMPAIGN: _ClassVar[CapScope]
    CAP_SCOPE_CUSTOMER: _ClassVar[CapScope]

class FilterReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FILTER_REASON_UNSPECIFIED: _ClassVar[FilterReason]
    FILTER_REASON_PAUSED: _ClassVar[FilterReason]
    FILTER_REASON_CAPPED: _ClassVar[FilterReason]
    FILTER_REASON_EXCLUDED: _ClassVar[FilterReason]
    FILTER_REASON_DIVERSITY: _ClassVar[FilterReason]
    FILTER_REASON_UNKNOWN_AD: _ClassVar[FilterReason]

class RecommendMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RECOMMEND_MODE_UNSPECIFIED: _ClassVar[RecommendMode]
    RECOMMEND_MODE_REALTIME: _ClassVar[RecommendMode]
    RECOMMEND_MODE_OFFLINE: _ClassVar[RecommendMode]

class ServingPath(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SERVING_PATH_UNSPECIFIED: _ClassVar[ServingPath]
    SERVING_PATH_REALTIME_RANKED: _ClassVar[ServingPath]
    SERVING_PATH_OFFLINE_RANKED: _ClassVar[ServingPath]
    SERVING_PATH_RECALL_ORDER: _ClassVar[ServingPath]
    SERVING_PATH_POPULAR: _ClassVar[ServingPath]

class DegradationReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DEGRADATION_REASON_UNSPECIFIED: _ClassVar[DegradationReason]
    DEGRADATION_REASON_RANKING_UNAVAILABLE: _ClassVar[DegradationReason]
    DEGRADATION_REASON_RANKING_DEADLINE_EXCEEDED: _ClassVar[DegradationReason]
    DEGRADATION_REASON_NO_RECALL_SET: _ClassVar[DegradationReason]
    DEGRADATION_REASON_NO_OFFLINE_LIST: _ClassVar[DegradationReason]
    DEGRADATION_REASON_RECALL_UNAVAILABLE: _ClassVar[DegradationReason]
    DEGRADATION_REASON_RECALL_DEADLINE_EXCEEDED: _ClassVar[DegradationReason]
    DEGRADATION_REASON_NO_KNOWN_CANDIDATES: _ClassVar[DegradationReason]
    DEGRADATION_REASON_FILTERED_SHORT: _ClassVar[DegradationReason]
CANDIDATE_ORIGIN_UNSPECIFIED: CandidateOrigin
CANDIDATE_ORIGIN_ALS_CATEGORY: CandidateOrigin
CANDIDATE_ORIGIN_REALTIME_INTEREST: CandidateOrigin
CANDIDATE_ORIGIN_POPULAR: CandidateOrigin
CANDIDATE_ORIGIN_OFFLINE_LIST: CandidateOrigin
CAP_SCOPE_UNSPECIFIED: CapScope
CAP_SCOPE_AD: CapScope
CAP_SCOPE_CAMPAIGN: CapScope
CAP_SCOPE_CUSTOMER: CapScope
FILTER_REASON_UNSPECIFIED: FilterReason
FILTER_REASON_PAUSED: FilterReason
FILTER_REASON_CAPPED: FilterReason
FILTER_REASON_EXCLUDED: FilterReason
FILTER_REASON_DIVERSITY: FilterReason
FILTER_REASON_UNKNOWN_AD: FilterReason
RECOMMEND_MODE_UNSPECIFIED: RecommendMode
RECOMMEND_MODE_REALTIME: RecommendMode
RECOMMEND_MODE_OFFLINE: RecommendMode
SERVING_PATH_UNSPECIFIED: ServingPath
SERVING_PATH_REALTIME_RANKED: ServingPath
SERVING_PATH_OFFLINE_RANKED: ServingPath
SERVING_PATH_RECALL_ORDER: ServingPath
SERVING_PATH_POPULAR: ServingPath
DEGRADATION_REASON_UNSPECIFIED: DegradationReason
DEGRADATION_REASON_RANKING_UNAVAILABLE: DegradationReason
DEGRADATION_REASON_RANKING_DEADLINE_EXCEEDED: DegradationReason
DEGRADATION_REASON_NO_RECALL_SET: DegradationReason
DEGRADATION_REASON_NO_OFFLINE_LIST: DegradationReason
DEGRADATION_REASON_RECALL_UNAVAILABLE: DegradationReason
DEGRADATION_REASON_RECALL_DEADLINE_EXCEEDED: DegradationReason
DEGRADATION_REASON_NO_KNOWN_CANDIDATES: DegradationReason
DEGRADATION_REASON_FILTERED_SHORT: DegradationReason

class RecommendRequest(_message.Message):
    __slots__ = ("user_id", "pid", "count", "mode", "request_id", "exclude_ad_ids", "frequency_caps", "diversity", "rank_by", "debug")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_AD_IDS_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_CAPS_FIELD_NUMBER: _ClassVar[int]
    DIVERSITY_FIELD_NUMBER: _ClassVar[int]
    RANK_BY_FIELD_NUMBER: _ClassVar[int]
    DEBUG_FIELD_NUMBER: _ClassVar[int]
    user_id: int
    pid: str
    count: int
    mode: RecommendMode
    request_id: str
    exclude_ad_ids: _containers.RepeatedScalarFieldContainer[int]
    frequency_caps: _containers.RepeatedCompositeFieldContainer[FrequencyCap]
    diversity: DiversityLimits
    rank_by: _common_pb2.RankBy
    debug: bool
    def __init__(self, user_id: _Optional[int] = ..., pid: _Optional[str] = ..., count: _Optional[int] = ..., mode: _Optional[_Union[RecommendMode, str]] = ..., request_id: _Optional[str] = ..., exclude_ad_ids: _Optional[_Iterable[int]] = ..., frequency_caps: _Optional[_Iterable[_Union[FrequencyCap, _Mapping]]] = ..., diversity: _Optional[_Union[DiversityLimits, _Mapping]] = ..., rank_by: _Optional[_Union[_common_pb2.RankBy, str]] = ..., debug: _Optional[bool] = ...) -> None: ...

class AdDebug(_message.Message):
    __slots__ = ("ad_id", "serving_path", "origin", "recall_position", "als_category_rank", "pctr", "contributions")
    AD_ID_FIELD_NUMBER: _ClassVar[int]
    SERVING_PATH_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    RECALL_POSITION_FIELD_NUMBER: _ClassVar[int]
    ALS_CATEGORY_RANK_FIELD_NUMBER: _ClassVar[int]
    PCTR_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTIONS_FIELD_NUMBER: _ClassVar[int]
    ad_id: int
    serving_path: ServingPath
    origin: CandidateOrigin
    recall_position: int
    als_category_rank: int
    pctr: float
    contributions: _containers.RepeatedCompositeFieldContainer[_common_pb2.FeatureContribution]
    def __init__(self, ad_id: _Optional[int] = ..., serving_path: _Optional[_Union[ServingPath, str]] = ..., origin: _Optional[_Union[CandidateOrigin, str]] = ..., recall_position: _Optional[int] = ..., als_category_rank: _Optional[int] = ..., pctr: _Optional[float] = ..., contributions: _Optional[_Iterable[_Union[_common_pb2.FeatureContribution, _Mapping]]] = ...) -> None: ...

class FrequencyCap(_message.Message):
    __slots__ = ("scope", "max_impressions", "window_hours")
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    MAX_IMPRESSIONS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_HOURS_FIELD_NUMBER: _ClassVar[int]
    scope: CapScope
    max_impressions: int
    window_hours: int
    def __init__(self, scope: _Optional[_Union[CapScope, str]] = ..., max_impressions: _Optional[int] = ..., window_hours: _Optional[int] = ...) -> None: ...

class DiversityLimits(_message.Message):
    __slots__ = ("max_per_category", "max_per_brand", "max_per_customer")
    MAX_PER_CATEGORY_FIELD_NUMBER: _ClassVar[int]
    MAX_PER_BRAND_FIELD_NUMBER: _ClassVar[int]
    MAX_PER_CUSTOMER_FIELD_NUMBER: _ClassVar[int]
    max_per_category: int
    max_per_brand: int
    max_per_customer: int
    def __init__(self, max_per_category: _Optional[int] = ..., max_per_brand: _Optional[int] = ..., max_per_customer: _Optional[int] = ...) -> None: ...

class RecommendResponse(_message.Message):
    __slots__ = ("ads", "serving_path", "degradation_reasons", "candidate_source", "mode", "data_version", "model_version", "request_id", "filled_from", "filtered", "explanations", "rank_by")
    ADS_FIELD_NUMBER: _ClassVar[int]
    SERVING_PATH_FIELD_NUMBER: _ClassVar[int]
    DEGRADATION_REASONS_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_SOURCE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    DATA_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    FILLED_FROM_FIELD_NUMBER: _ClassVar[int]
    FILTERED_FIELD_NUMBER: _ClassVar[int]
    EXPLANATIONS_FIELD_NUMBER: _ClassVar[int]
    RANK_BY_FIELD_NUMBER: _ClassVar[int]
    ads: _containers.RepeatedCompositeFieldContainer[_common_pb2.ScoredAd]
    serving_path: ServingPath
    degradation_reasons: _containers.RepeatedScalarFieldContainer[DegradationReason]
    candidate_source: _common_pb2.CandidateSource
    mode: RecommendMode
    data_version: str
    model_version: str
    request_id: str
    filled_from: _containers.RepeatedCompositeFieldContainer[FillIn]
    filtered: _containers.RepeatedCompositeFieldContainer[FilteredCount]
    explanations: _containers.RepeatedCompositeFieldContainer[AdDebug]
    rank_by: _common_pb2.RankBy
    def __init__(self, ads: _Optional[_Iterable[_Union[_common_pb2.ScoredAd, _Mapping]]] = ..., serving_path: _Optional[_Union[ServingPath, str]] = ..., degradation_reasons: _Optional[_Iterable[_Union[DegradationReason, str]]] = ..., candidate_source: _Optional[_Union[_common_pb2.CandidateSource, str]] = ..., mode: _Optional[_Union[RecommendMode, str]] = ..., data_version: _Optional[str] = ..., model_version: _Optional[str] = ..., request_id: _Optional[str] = ..., filled_from: _Optional[_Iterable[_Union[FillIn, _Mapping]]] = ..., filtered: _Optional[_Iterable[_Union[FilteredCount, _Mapping]]] = ..., explanations: _Optional[_Iterable[_Union[AdDebug, _Mapping]]] = ..., rank_by: _Optional[_Union[_common_pb2.RankBy, str]] = ...) -> None: ...

class FillIn(_message.Message):
    __slots__ = ("serving_path", "ads")
    SERVING_PATH_FIELD_NUMBER: _ClassVar[int]
    ADS_FIELD_NUMBER: _ClassVar[int]
    serving_path: ServingPath
    ads: int
    def __init__(self, serving_path: _Optional[_Union[ServingPath, str]] = ..., ads: _Optional[int] = ...) -> None: ...

class FilteredCount(_message.Message):
    __slots__ = ("reason", "candidates")
    REASON_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    reason: FilterReason
    candidates: int
    def __init__(self, reason: _Optional[_Union[FilterReason, str]] = ..., candidates: _Optional[int] = ...) -> None: ...
