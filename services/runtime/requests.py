"""Request checks shared by the services, and the mapping of their failures to gRPC codes.

A check raises :class:`InvalidArgumentError` naming the field; :func:`grpc_errors` turns it into
INVALID_ARGUMENT (and :class:`UnavailableError` into UNAVAILABLE) before anything is read or
written, so a bad request costs nothing and changes nothing.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import TypeAlias, TypeVar

import grpc

from adrec.core.dataset import PIDS

#: Characters of a bad value an error message repeats.
ECHO_LIMIT = 40
#: Longest request id a caller may send: enough for any UUID or trace id.
MAX_REQUEST_ID_LENGTH = 128

#: The largest id the data set's int32 columns and Redis keys hold.
MAX_ID = 2**31 - 1

_Servicer = TypeVar("_Servicer")
_Request = TypeVar("_Request")
_Response = TypeVar("_Response")
#: A servicer's unary method: ``async (self, request, context) -> response``.
Handler: TypeAlias = Callable[
    [_Servicer, _Request, grpc.aio.ServicerContext[_Request, _Response]], Awaitable[_Response]
]


class InvalidArgumentError(ValueError):
    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")


class UnavailableError(RuntimeError):
    """The service cannot answer now (no data loaded, Redis unreachable); retry elsewhere."""


def positive_id(field: str, value: int) -> int:
    if not 0 < value <= MAX_ID:
        raise InvalidArgumentError(field, f"must be a positive id up to {MAX_ID}, got {value}")
    return value


def in_range(field: str, value: int, low: int, high: int) -> int:
    if not low <= value <= high:
        raise InvalidArgumentError(field, f"must be between {low} and {high}, got {value}")
    return value


def known_pid(field: str, pid: str, *, required: bool) -> str:
    if not pid and not required:
        return pid
    if pid not in PIDS:
        shown = _excerpt(pid) if pid else "empty"
        raise InvalidArgumentError(
            field, f"{shown} is not a known placement; known: {', '.join(PIDS)}"
        )
    return pid


def bounded_text(field: str, value: str, limit: int) -> str:
    """A free-text field (a caller's request id) that is echoed, forwarded and logged."""
    if len(value) > limit:
        raise InvalidArgumentError(
            field, f"holds {len(value)} characters; at most {limit} ({_excerpt(value)})"
        )
    return value


def _excerpt(text: str) -> str:
    # An error must fit in a status message however large the value it names.
    return repr(text) if len(text) <= ECHO_LIMIT else f"{text[:ECHO_LIMIT]!r}..."


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
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        except UnavailableError as error:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(error))

    return handle
