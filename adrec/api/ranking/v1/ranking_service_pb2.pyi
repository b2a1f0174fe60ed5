from adrec.api.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RankCandidatesRequest(_message.Message):
    __slots__ = ("user_id", "pid", "ad_ids", "top_k", "request_id", "rank_by", "explain")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    AD_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_BY_FIELD_NUMBER: _ClassVar[int]
    EXPLAIN_FIELD_NUMBER: _ClassVar[int]
    user_id: int
    pid: str
    ad_ids: _containers.RepeatedScalarFieldContainer[int]
    top_k: int
    request_id: str
    rank_by: _common_pb2.RankBy
    explain: bool
    def __init__(self, user_id: _Optional[int] = ..., pid: _Optional[str] = ..., ad_ids: _Optional[_Iterable[int]] = ..., top_k: _Optional[int] = ..., request_id: _Optional[str] = ..., rank_by: _Optional[_Union[_common_pb2.RankBy, str]] = ..., explain: _Optional[bool] = ...) -> None: ...

class AdExplanation(_message.Message):
    __slots__ = ("ad_id", "contributions")
    AD_ID_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTIONS_FIELD_NUMBER: _ClassVar[int]
    ad_id: int
    contributions: _containers.RepeatedCompositeFieldContainer[_common_pb2.FeatureContribution]
    def __init__(self, ad_id: _Optional[int] = ..., contributions: _Optional[_Iterable[_Union[_common_pb2.FeatureContribution, _Mapping]]] = ...) -> None: ...

class RankCandidatesResponse(_message.Message):
    __slots__ = ("ads", "model_version", "data_version", "unknown_ads_skipped", "user_profile_found", "behaviour_counts_found", "explanations")
    ADS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    DATA_VERSION_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_ADS_SKIPPED_FIELD_NUMBER: _ClassVar[int]
    USER_PROFILE_FOUND_FIELD_NUMBER: _ClassVar[int]
    BEHAVIOUR_COUNTS_FOUND_FIELD_NUMBER: _ClassVar[int]
    EXPLANATIONS_FIELD_NUMBER: _ClassVar[int]
    ads: _containers.RepeatedCompositeFieldContainer[_common_pb2.ScoredAd]
    model_version: str
    data_version: str
    unknown_ads_skipped: int
    user_profile_found: bool
    behaviour_counts_found: bool
    explanations: _containers.RepeatedCompositeFieldContainer[AdExplanation]
    def __init__(self, ads: _Optional[_Iterable[_Union[_common_pb2.ScoredAd, _Mapping]]] = ..., model_version: _Optional[str] = ..., data_version: _Optional[str] = ..., unknown_ads_skipped: _Optional[int] = ..., user_profile_found: _Optional[bool] = ..., behaviour_counts_found: _Optional[bool] = ..., explanations: _Optional[_Iterable[_Union[AdExplanation, _Mapping]]] = ...) -> None: ...
