from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AdLevel(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AD_LEVEL_UNSPECIFIED: _ClassVar[AdLevel]
    AD_LEVEL_ADGROUP: _ClassVar[AdLevel]
    AD_LEVEL_CAMPAIGN: _ClassVar[AdLevel]
    AD_LEVEL_CUSTOMER: _ClassVar[AdLevel]

class AdStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AD_STATUS_UNSPECIFIED: _ClassVar[AdStatus]
    AD_STATUS_ACTIVE: _ClassVar[AdStatus]
    AD_STATUS_PAUSED: _ClassVar[AdStatus]
AD_LEVEL_UNSPECIFIED: AdLevel
AD_LEVEL_ADGROUP: AdLevel
AD_LEVEL_CAMPAIGN: AdLevel
AD_LEVEL_CUSTOMER: AdLevel
AD_STATUS_UNSPECIFIED: AdStatus
AD_STATUS_ACTIVE: AdStatus
AD_STATUS_PAUSED: AdStatus

class AdRef(_message.Message):
    __slots__ = ("level", "id")
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    level: AdLevel
    id: int
    def __init__(self, level: _Optional[_Union[AdLevel, str]] = ..., id: _Optional[int] = ...) -> None: ...

class AdState(_message.Message):
    __slots__ = ("target", "status", "start_time", "end_time", "reason", "changed_at_ms", "change_id", "paused_now")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CHANGED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    CHANGE_ID_FIELD_NUMBER: _ClassVar[int]
    PAUSED_NOW_FIELD_NUMBER: _ClassVar[int]
    target: AdRef
    status: AdStatus
    start_time: int
    end_time: int
    reason: str
    changed_at_ms: int
    change_id: int
    paused_now: bool
    def __init__(self, target: _Optional[_Union[AdRef, _Mapping]] = ..., status: _Optional[_Union[AdStatus, str]] = ..., start_time: _Optional[int] = ..., end_time: _Optional[int] = ..., reason: _Optional[str] = ..., changed_at_ms: _Optional[int] = ..., change_id: _Optional[int] = ..., paused_now: _Optional[bool] = ...) -> None: ...

class AdStateChange(_message.Message):
    __slots__ = ("change_id", "state", "previous_status")
    CHANGE_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_STATUS_FIELD_NUMBER: _ClassVar[int]
    change_id: int
    state: AdState
    previous_status: AdStatus
    def __init__(self, change_id: _Optional[int] = ..., state: _Optional[_Union[AdState, _Mapping]] = ..., previous_status: _Optional[_Union[AdStatus, str]] = ...) -> None: ...

class SetAdStateRequest(_message.Message):
    __slots__ = ("target", "status", "reason", "start_time", "end_time")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    target: AdRef
    status: AdStatus
    reason: str
    start_time: int
    end_time: int
    def __init__(self, target: _Optional[_Union[AdRef, _Mapping]] = ..., status: _Optional[_Union[AdStatus, str]] = ..., reason: _Optional[str] = ..., start_time: _Optional[int] = ..., end_time: _Optional[int] = ...) -> None: ...

class SetAdStateResponse(_message.Message):
    __slots__ = ("change",)
    CHANGE_FIELD_NUMBER: _ClassVar[int]
    change: AdStateChange
    def __init__(self, change: _Optional[_Union[AdStateChange, _Mapping]] = ...) -> None: ...

class GetAdStateRequest(_message.Message):
    __slots__ = ("target",)
    TARGET_FIELD_NUMBER: _ClassVar[int]
    target: AdRef
    def __init__(self, target: _Optional[_Union[AdRef, _Mapping]] = ...) -> None: ...

class GetAdStateResponse(_message.Message):
    __slots__ = ("states", "paused", "campaign_id", "customer_id")
    STATES_FIELD_NUMBER: _ClassVar[int]
    PAUSED_FIELD_NUMBER: _ClassVar[int]
    CAMPAIGN_ID_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    states: _containers.RepeatedCompositeFieldContainer[AdState]
    paused: bool
    campaign_id: int
    customer_id: int
    def __init__(self, states: _Optional[_Iterable[_Union[AdState, _Mapping]]] = ..., paused: _Optional[bool] = ..., campaign_id: _Optional[int] = ..., customer_id: _Optional[int] = ...) -> None: ...

class ListAdStatesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListAdStatesResponse(_message.Message):
    __slots__ = ("states", "last_change_id")
    STATES_FIELD_NUMBER: _ClassVar[int]
    LAST_CHANGE_ID_FIELD_NUMBER: _ClassVar[int]
    states: _containers.RepeatedCompositeFieldContainer[AdState]
    last_change_id: int
    def __init__(self, states: _Optional[_Iterable[_Union[AdState, _Mapping]]] = ..., last_change_id: _Optional[int] = ...) -> None: ...

class ListAdStateChangesRequest(_message.Message):
    __slots__ = ("target", "limit")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    target: AdRef
    limit: int
    def __init__(self, target: _Optional[_Union[AdRef, _Mapping]] = ..., limit: _Optional[int] = ...) -> None: ...

class ListAdStateChangesResponse(_message.Message):
    __slots__ = ("changes",)
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    changes: _containers.RepeatedCompositeFieldContainer[AdStateChange]
    def __init__(self, changes: _Optional[_Iterable[_Union[AdStateChange, _Mapping]]] = ...) -> None: ...
