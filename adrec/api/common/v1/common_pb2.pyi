from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class RankBy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RANK_BY_UNSPECIFIED: _ClassVar[RankBy]
    RANK_BY_PCTR: _ClassVar[RankBy]
    RANK_BY_ECPM: _ClassVar[RankBy]

class CandidateSource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CANDIDATE_SOURCE_UNSPECIFIED: _ClassVar[CandidateSource]
    CANDIDATE_SOURCE_PERSONAL: _ClassVar[CandidateSource]
    CANDIDATE_SOURCE_POPULAR: _ClassVar[CandidateSource]
RANK_BY_UNSPECIFIED: RankBy
RANK_BY_PCTR: RankBy
RANK_BY_ECPM: RankBy
CANDIDATE_SOURCE_UNSPECIFIED: CandidateSource
CANDIDATE_SOURCE_PERSONAL: CandidateSource
CANDIDATE_SOURCE_POPULAR: CandidateSource

class ScoredAd(_message.Message):
    __slots__ = ("ad_id", "ctr", "pctr", "bid", "ecpm")
    AD_ID_FIELD_NUMBER: _ClassVar[int]
    CTR_FIELD_NUMBER: _ClassVar[int]
    PCTR_FIELD_NUMBER: _ClassVar[int]
    BID_FIELD_NUMBER: _ClassVar[int]
    ECPM_FIELD_NUMBER: _ClassVar[int]
    ad_id: int
    ctr: float
    pctr: float
    bid: float
    ecpm: float
    def __init__(self, ad_id: _Optional[int] = ..., ctr: _Optional[float] = ..., pctr: _Optional[float] = ..., bid: _Optional[float] = ..., ecpm: _Optional[float] = ...) -> None: ...

class FeatureContribution(_message.Message):
    __slots__ = ("feature", "column", "margin")
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    COLUMN_FIELD_NUMBER: _ClassVar[int]
    MARGIN_FIELD_NUMBER: _ClassVar[int]
    feature: str
    column: str
    margin: float
    def __init__(self, feature: _Optional[str] = ..., column: _Optional[str] = ..., margin: _Optional[float] = ...) -> None: ...
