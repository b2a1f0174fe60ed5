from adrec.api.gateway.v1 import gateway_service_pb2 as _gateway_service_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class BehaviorType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BEHAVIOR_TYPE_UNSPECIFIED: _ClassVar[BehaviorType]
    BEHAVIOR_TYPE_PAGE_VIEW: _ClassVar[BehaviorType]
    BEHAVIOR_TYPE_CART: _ClassVar[BehaviorType]
    BEHAVIOR_TYPE_FAVORITE: _ClassVar[BehaviorType]
    BEHAVIOR_TYPE_BUY: _ClassVar[BehaviorType]
BEHAVIOR_TYPE_UNSPECIFIED: BehaviorType
BEHAVIOR_TYPE_PAGE_VIEW: BehaviorType
BEHAVIOR_TYPE_CART: BehaviorType
BEHAVIOR_TYPE_FAVORITE: BehaviorType
BEHAVIOR_TYPE_BUY: BehaviorType

class ReportEventsRequest(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[Event]
    def __init__(self, events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ...) -> None: ...

class ReportEventsResponse(_message.Message):
    __slots__ = ("accepted", "log_position")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    LOG_POSITION_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    log_position: str
    def __init__(self, accepted: _Optional[int] = ..., log_position: _Optional[str] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("event_id", "user_id", "time", "impression", "click", "behavior")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    IMPRESSION_FIELD_NUMBER: _ClassVar[int]
    CLICK_FIELD_NUMBER: _ClassVar[int]
    BEHAVIOR_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    user_id: int
    time: int
    impression: Impression
    click: Click
    behavior: Behavior
    def __init__(self, event_id: _Optional[str] = ..., user_id: _Optional[int] = ..., time: _Optional[int] = ..., impression: _Optional[_Union[Impression, _Mapping]] = ..., click: _Optional[_Union[Click, _Mapping]] = ..., behavior: _Optional[_Union[Behavior, _Mapping]] = ...) -> None: ...

class Impression(_message.Message):
    __slots__ = ("ad_id", "pid", "request_id", "serving_path", "model_version")
    AD_ID_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SERVING_PATH_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ad_id: int
    pid: str
    request_id: str
    serving_path: _gateway_service_pb2.ServingPath
    model_version: str
    def __init__(self, ad_id: _Optional[int] = ..., pid: _Optional[str] = ..., request_id: _Optional[str] = ..., serving_path: _Optional[_Union[_gateway_service_pb2.ServingPath, str]] = ..., model_version: _Optional[str] = ...) -> None: ...

class Click(_message.Message):
    __slots__ = ("ad_id", "pid", "request_id", "serving_path", "model_version")
    AD_ID_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SERVING_PATH_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ad_id: int
    pid: str
    request_id: str
    serving_path: _gateway_service_pb2.ServingPath
    model_version: str
    def __init__(self, ad_id: _Optional[int] = ..., pid: _Optional[str] = ..., request_id: _Optional[str] = ..., serving_path: _Optional[_Union[_gateway_service_pb2.ServingPath, str]] = ..., model_version: _Optional[str] = ...) -> None: ...

class Behavior(_message.Message):
    __slots__ = ("type", "cate_id", "brand_id")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    CATE_ID_FIELD_NUMBER: _ClassVar[int]
    BRAND_ID_FIELD_NUMBER: _ClassVar[int]
    type: BehaviorType
    cate_id: int
    brand_id: int
    def __init__(self, type: _Optional[_Union[BehaviorType, str]] = ..., cate_id: _Optional[int] = ..., brand_id: _Optional[int] = ...) -> None: ...
