from adrec.api.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FallbackReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FALLBACK_REASON_UNSPECIFIED: _ClassVar[FallbackReason]
    FALLBACK_REASON_NO_RECALL_SET: _ClassVar[FallbackReason]
FALLBACK_REASON_UNSPECIFIED: FallbackReason
FALLBACK_REASON_NO_RECALL_SET: FallbackReason

class GetCandidatesRequest(_message.Message):
    __slots__ = ("user_id", "pid", "limit", "request_id")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: int
    pid: str
    limit: int
    request_id: str
    def __init__(self, user_id: _Optional[int] = ..., pid: _Optional[str] = ..., limit: _Optional[int] = ..., request_id: _Optional[str] = ...) -> None: ...

class GetCandidatesResponse(_message.Message):
    __slots__ = ("ad_ids", "source", "fallback_reason", "data_version", "interest_count")
    AD_IDS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_REASON_FIELD_NUMBER: _ClassVar[int]
    DATA_VERSION_FIELD_NUMBER: _ClassVar[int]
    INTEREST_COUNT_FIELD_NUMBER: _ClassVar[int]
    ad_ids: _containers.RepeatedScalarFieldContainer[int]
    source: _common_pb2.CandidateSource
    fallback_reason: FallbackReason
    data_version: str
    interest_count: int
    def __init__(self, ad_ids: _Optional[_Iterable[int]] = ..., source: _Optional[_Union[_common_pb2.CandidateSource, str]] = ..., fallback_reason: _Optional[_Union[FallbackReason, str]] = ..., data_version: _Optional[str] = ..., interest_count: _Optional[int] = ...) -> None: ...
