"""Redis in each mode adrec supports, for the tests that must hold in all of them.

A session-wide Redis Cluster (three primaries) and TLS redis-server (a CA and certificate
made for the session, a password given as REDIS_PASSWORD, never in the URL), beside the
plain `redis_server` of conftest. `redis_target` is parametrized over the three modes: a
test asking for it runs once against each, on emptied servers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
from collections.abc import Iterator
from typing import Any

import pytest

from adrec.core.redis_conn import RedisSettings, connect
from adrec.core.redis_server import (
    INSTALL_HINT,
    PrivateCluster,
    PrivateRedis,
    private_cluster,
    private_tls_redis,
)

REDIS_MODES = ("standalone", "cluster", "tls")
#: The TLS server's password: it must never appear in what the code prints.
TLS_PASSWORD = "tls-secret-7f3a"


@dataclasses.dataclass(frozen=True)
class RedisTarget:
    """One Redis to run a test against, and the settings that reach it as a service would."""

    mode: str
    settings: RedisSettings
    #: Every server process behind it (the cluster's nodes, or the one server).
    servers: tuple[PrivateRedis, ...]
    cluster: PrivateCluster | None = None

    def client(self) -> Any:
        """The synchronous client of the job and the CLI for these settings."""
        return connect(self.settings)

    def env(self) -> dict[str, str]:
        """The settings as the environment of an adrec process."""
        env = {"REDIS_URL": self.settings.url, "REDIS_CLUSTER": str(self.settings.cluster)}
        if self.settings.password:
            env["REDIS_PASSWORD"] = self.settings.password
        if self.settings.tls_ca_file:
            env["REDIS_TLS_CA_FILE"] = self.settings.tls_ca_file
        return env

    def flush(self) -> None:
        for server in self.servers:
            with contextlib.closing(server.client()) as client:
                client.flushall()


def _require_redis_server() -> None:
    if shutil.which("redis-server") is None:
        pytest.fail(INSTALL_HINT, pytrace=False)


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[PrivateCluster]:
    _require_redis_server()
    with private_cluster() as cluster:
        yield cluster


@pytest.fixture(scope="session")
def redis_tls() -> Iterator[PrivateRedis]:
    _require_redis_server()
    with private_tls_redis(TLS_PASSWORD) as server:
        yield server


def target_of(
    mode: str, server: PrivateRedis | None = None, cluster: PrivateCluster | None = None
) -> RedisTarget:
    """The target of a standalone or TLS `server`, or of `cluster`."""
    if mode == "cluster":
        assert cluster is not None
        settings = RedisSettings(url=cluster.url, cluster=True)
        return RedisTarget(mode, settings, tuple(cluster.nodes), cluster)
    assert server is not None
    settings = RedisSettings(
        url=server.url,
        password=server.password,
        tls_ca_file=str(server.tls.ca_cert) if server.tls else "",
    )
    return RedisTarget(mode, settings, (server,))


@pytest.fixture(params=REDIS_MODES)
def redis_target(request: pytest.FixtureRequest) -> RedisTarget:
    """Each Redis mode in turn, emptied before the test."""
    mode = request.param
    if mode == "cluster":
        target = target_of(mode, cluster=request.getfixturevalue("redis_cluster"))
    elif mode == "tls":
        target = target_of(mode, server=request.getfixturevalue("redis_tls"))
    else:
        target = target_of(mode, server=request.getfixturevalue("redis_server"))
    target.flush()
    return target


@pytest.fixture
def any_redis(redis_target: RedisTarget) -> Iterator[Any]:
    """A job-side client of each Redis mode in turn (see `redis_target`)."""
    client = redis_target.client()
    yield client
    client.close()


def stored_keys(client: Any, pattern: bytes) -> list[bytes]:
    """Every key matching `pattern`, sorted, from every node (`KEYS` asks one node only)."""
    return sorted(client.scan_iter(match=pattern, count=1000))
