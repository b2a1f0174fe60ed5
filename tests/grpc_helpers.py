"""Helpers for tests that talk to real gRPC servers over loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parents[1]
BUF = REPO_ROOT / "node_modules" / ".bin" / "buf"


def buf_executable() -> str:
    """Path of the pinned `buf`; fails the test (never skips) when the npm tooling is missing."""
    if not BUF.is_file():
        pytest.fail(
            "buf is not installed: run `npm ci` in the repository root "
            "(package.json pins @bufbuild/buf)",
            pytrace=False,
        )
    return str(BUF)


async def run_buf(*args: str, timeout: float = 60) -> tuple[int, str, str]:
    """Run `buf` without blocking the event loop (a server under test may share it)."""
    process = await asyncio.create_subprocess_exec(
        buf_executable(),
        *args,
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout)
    return process.returncode, stdout.decode(), stderr.decode()


@asynccontextmanager
async def loopback_channel(port: int, **options: object) -> AsyncIterator[grpc.aio.Channel]:
    """An insecure channel to 127.0.0.1:`port`; `options` become gRPC channel arguments."""
    async with grpc.aio.insecure_channel(
        f"127.0.0.1:{port}", options=list(options.items())
    ) as channel:
        yield channel


async def health_status(
    channel: grpc.aio.Channel, service: str = ""
) -> health_pb2.HealthCheckResponse.ServingStatus:
    response = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=5
    )
    return response.status
