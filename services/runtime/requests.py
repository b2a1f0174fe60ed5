"""Request checks shared by the services, and the mapping of their failures to gRPC codes.

A handler checks every field of a request with one :class:`FieldChecks`, which raises
:class:`InvalidArgumentError` naming each bad field at once; :func:`grpc_errors` turns it
into INVALID_ARGUMENT, with a `google.rpc.BadRequest` listing the fields in the status
details (and :class:`UnavailableError` into UNAVAILABLE), before anything is read or
written, so a bad request costs nothing and changes nothing, and its caller can fix every
field in one round.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeAlias, TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from adrec.core.dataset import PIDS
from adrec.core.events import MAX_ID

#: Characters of a bad value an error message repeats.
ECHO_LIMIT = 40

_Servicer = TypeVar("_Servicer")
_Request = TypeVar("_Request")
_Response = TypeVar("_Response")
#: A servicer's unary method: ``async (self, request, context) -> response``.
Handler: TypeAlias = Callable[
    [_Servicer, _Request, grpc.aio.ServicerContext[_Request, _Response]], Awaitable[_Response]
]


@dataclasses.dataclass(frozen=True)
class FieldViolation:
    #: The field's name in the request (the proto's), or the flag's on the command line.
    field: str
    description: str


class InvalidArgumentError(ValueError):
    """Every bad field of one request; the message names each, one after the other."""

    def __init__(self, violations: Sequence[FieldViolation]):
        self.violations = tuple(violations)
        super().__init__("; ".join(f"{v.field}: {v.description}" for v in self.violations))

    def status(self) -> grpc.Status:
        """INVALID_ARGUMENT with this message, and the violations as a BadRequest detail."""
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=violation.field, description=violation.description
                )
                for violation in self.violations
            ]
        )
        detail = any_pb2.Any()
        detail.Pack(bad_request)
        status: grpc.Status = rpc_status.to_status(
            status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=str(self), details=[detail])
        )
        return status


class UnavailableError(RuntimeError):
    """The service cannot answer now (no data loaded, Redis unreachable); retry elsewhere."""


class FieldChecks:
    """The checks of one request's fields: each bad one is noted, and :meth:`raise_if_any`
    raises them all together.

    Each check returns the value it was given, so a handler reads its fields through them;
    the values are used only once :meth:`raise_if_any` has passed.
    """

    def __init__(self) -> None:
        self.violations: list[FieldViolation] = []

    def add(self, field: str, problem: str) -> None:
        self.violations.append(FieldViolation(field, problem))

    def raise_if_any(self) -> None:
        if self.violations:
            raise InvalidArgumentError(self.violations)

    def positive_id(self, field: str, value: int) -> int:
        if not 0 < value <= MAX_ID:
            self.add(field, f"must be a positive id up to {MAX_ID}, got {value}")
        return value

    def in_range(self, field: str, value: int, low: int, high: int) -> int:
        if not low <= value <= high:
            self.add(field, f"must be between {low} and {high}, got {value}")
        return value

    def known_pid(self, field: str, pid: str, *, required: bool) -> str:
        if (pid or required) and pid not in PIDS:
            shown = _excerpt(pid) if pid else "empty"
            self.add(field, f"{shown} is not a known placement; known: {', '.join(PIDS)}")
        return pid

    def bounded_text(self, field: str, value: str, limit: int) -> str:
        """A free-text field (a caller's request id) that is echoed, forwarded and logged."""
        if len(value) > limit:
            self.add(field, f"holds {len(value)} characters; at most {limit} ({_excerpt(value)})")
        return value


def _excerpt(text: str) -> str:
    # An error must fit in a status message however large the value it names.
    return repr(text) if len(text) <= ECHO_LIMIT else f"{text[:ECHO_LIMIT]!r}..."


def redis_unavailable(what: str, error: RedisError) -> UnavailableError:
    """A read of `what` that Redis failed, said in the caller's terms.

    Names only the error class: a Redis error's text may carry the server's address, which
    is none of the caller's business.
    """
    if isinstance(error, RedisTimeoutError):
        problem = "Redis did not answer in time"
    elif isinstance(error, RedisConnectionError):
        problem = "Redis is unreachable"
    else:
        problem = "Redis failed"
    return UnavailableError(f"cannot read {what}: {problem} ({type(error).__name__})")


def no_version_loaded(last_failure: str | None, otherwise: str) -> UnavailableError:
    """Nothing to answer from yet: because Redis failed the version watcher's last poll
    (`last_failure`, the error class), or for the reason `otherwise` gives."""
    if last_failure is not None:
        return UnavailableError(f"no data version loaded: Redis is unreachable ({last_failure})")
    return UnavailableError(otherwise)


def grpc_errors(
    method: Handler[_Servicer, _Request, _Response],
) -> Handler[_Servicer, _Request, _Response]:
    """Abort with INVALID_ARGUMENT / UNAVAILABLE when the handler raises those errors."""

    @functools.wraps(method)
    async def handle(
        self: _Servicer, request: _Request, context: grpc.aio.ServicerContext[_Request, _Response]
    ) -> _Response:
        try:
            return await method(self, request, context)
        except InvalidArgumentError as error:
            status = error.status()
            await context.abort(status.code, status.details, status.trailing_metadata)
        except UnavailableError as error:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(error))

    return handle
