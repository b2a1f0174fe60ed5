from adrec.api.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

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

class RecommendRequest(_message.Message):
    __slots__ = ("user_id", "pid", "count", "mode", "request_id")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: int
    pid: str
    count: int
    mode: RecommendMode
    request_id: str
    def __init__(self, user_id: _Optional[int] = ..., pid: _Optional[str] = ..., count: _Optional[int] = ..., mode: _Optional[_Union[RecommendMode, str]] = ..., request_id: _Optional[str] = ...) -> None: ...

class RecommendResponse(_message.Message):
    __slots__ = ("ads", "serving_path", "degradation_reasons", "candidate_source", "mode", "data_version", "model_version", "request_id")
    ADS_FIELD_NUMBER: _ClassVar[int]
    SERVING_PATH_FIELD_NUMBER: _ClassVar[int]
    DEGRADATION_REASONS_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_SOURCE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    DATA_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ads: _containers.RepeatedCompositeFieldContainer[_common_pb2.ScoredAd]
    serving_path: ServingPath
    degradation_reasons: _containers.RepeatedScalarFieldContainer[DegradationReason]
    candidate_source: _common_pb2.CandidateSource
    mode: RecommendMode
    data_version: str
    model_version: str
    request_id: str
    def __init__(self, ads: _Optional[_Iterable[_Union[_common_pb2.ScoredAd, _Mapping]]] = ..., serving_path: _Optional[_Union[ServingPath, str]] = ..., degradation_reasons: _Optional[_Iterable[_Union[DegradationReason, str]]] = ..., candidate_source: _Optional[_Union[_common_pb2.CandidateSource, str]] = ..., mode: _Optional[_Union[RecommendMode, str]] = ..., data_version: _Optional[str] = ..., model_version: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...
