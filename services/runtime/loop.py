"""The event loop adrec's servers and clients run on."""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, TypeVar

import uvloop

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` to completion on uvloop.

    grpc.aio hands every call's completion to the event loop as callbacks; uvloop runs
    them with less interpreter work than asyncio's default loop (what that saves per
    request is in docs/performance.md).
    """
    return uvloop.run(main)
