"""Redis connections from a URL, standalone or cluster, sync (job, CLI) or asyncio (services)."""

from __future__ import annotations

import dataclasses
from typing import Any
from urllib.parse import urlsplit

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff

from adrec.core.settings import parse_bool, parse_float, setting

SUPPORTED_SCHEMES = ("redis", "rediss", "unix")


def validate_url(url: str) -> str | None:
    """Why ``url`` is not a usable Redis URL, or None when it is."""
    try:
        parts = urlsplit(url)
    except ValueError as error:
        return f"is not a URL ({error})"
    if parts.scheme not in SUPPORTED_SCHEMES:
        return f"scheme must be one of {', '.join(s + '://' for s in SUPPORTED_SCHEMES)}"
    if parts.scheme != "unix" and not parts.hostname:
        return "has no host"
    try:
        parts.port  # noqa: B018 - urlsplit validates the port lazily
    except ValueError:
        return "has an invalid port"
    if parts.scheme == "unix":
        # unix:///run/redis.sock?db=1: the path is the socket, the database a query field.
        if not parts.path:
            return "has no socket path"
        db = dict(part.partition("=")[::2] for part in parts.query.split("&") if part).get("db", "")
    else:
        db = parts.path.strip("/")
    if db and not db.isdigit():
        return f"database {db!r} is not a number"
    return None


def redacted(url: str) -> str:
    """The URL with any password replaced, for logs and error messages."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        # Too malformed to tell where a password would be: show none of it.
        return "***"
    if password is None:
        return url
    netloc = parts.netloc.replace(f":{password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


@dataclasses.dataclass(frozen=True)
class RedisSettings:
    url: str = setting(
        "REDIS_URL",
        "redis://127.0.0.1:6379/0",
        "Redis URL: redis://[:password@]host:port/db, rediss:// for TLS, unix:///path.sock",
        check=validate_url,
        show=redacted,
        aliases=("--redis",),
    )
    password: str = setting(
        "REDIS_PASSWORD", "", "Password when not in the URL (e.g. from a Secret)", secret=True
    )
    cluster: bool = setting(
        "REDIS_CLUSTER", False, "Connect in Redis Cluster mode", parse=parse_bool
    )
    tls_ca_file: str = setting(
        "REDIS_TLS_CA_FILE", "", "CA bundle used to verify the server with rediss://"
    )
    socket_timeout_s: float = setting(
        "REDIS_TIMEOUT_SECONDS",
        1.0,
        "Socket connect and read timeout",
        parse=parse_float,
        check=lambda v: None if v > 0 else "must be positive",
    )

    def validate(self) -> list[str]:
        if self.cluster and urlsplit(self.url).scheme == "unix":
            return ["REDIS_CLUSTER=true cannot be used with a unix:// REDIS_URL"]
        if self.cluster and urlsplit(self.url).path.strip("/") not in ("", "0"):
            return ["REDIS_URL selects a database other than 0, which Redis Cluster does not have"]
        return []


def _options(settings: RedisSettings, socket_timeouts: bool = True) -> dict[str, Any]:
    timeout = settings.socket_timeout_s if socket_timeouts else None
    options: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
    if settings.password:
        options["password"] = settings.password
    if settings.tls_ca_file:
        options["ssl_ca_certs"] = settings.tls_ca_file
    return options


def connect(settings: RedisSettings) -> redis.Redis | redis.cluster.RedisCluster:
    """A synchronous client (the batch job and the CLI)."""
    if settings.cluster:
        return redis.cluster.RedisCluster.from_url(settings.url, **_options(settings))
    return redis.Redis.from_url(settings.url, **_options(settings))


def connect_async(
    settings: RedisSettings, *, socket_timeouts: bool = True
) -> redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster:
    """An asyncio client (the gRPC services); without socket timeouts when the caller
    bounds every command itself.

    A cluster client tries each command once: a service has a fallback for every read and
    a deadline to keep, and redis-py's retries (with backoff and a topology refresh between
    them) made a read of a key on a dead node take most of a second to fail. It also keeps
    the slots it knows when some are not served, so a node down leaves the others usable.
    """
    options = _options(settings, socket_timeouts)
    if settings.cluster:
        return redis.asyncio.cluster.RedisCluster.from_url(
            settings.url,
            retry=AsyncRetry(NoBackoff(), 0),
            require_full_coverage=False,
            **options,
        )
    return redis.asyncio.Redis.from_url(settings.url, **options)


#: Characters of a Redis error an error line repeats: a server's reply can be of any size.
_DETAIL_LIMIT = 200


def redis_problem(error: redis.RedisError, settings: RedisSettings) -> str:
    """One line saying why the Redis at the settings' URL could not be used, for a command's
    error output: the URL redacted, and no password even where the error repeats it."""
    where = redacted(settings.url)
    detail = str(error) or type(error).__name__
    for secret in (_url_password(settings.url), settings.password):
        if secret:
            detail = detail.replace(secret, "***")
    if len(detail) > _DETAIL_LIMIT:
        detail = detail[:_DETAIL_LIMIT] + "..."
    # Subclasses before their bases: an AuthenticationError is a ConnectionError.
    if isinstance(error, redis.AuthenticationError):
        return f"Redis at {where} refused the credentials: {detail}"
    if isinstance(error, redis.TimeoutError):
        return (
            f"Redis at {where} did not answer within {settings.socket_timeout_s:g} s "
            f"(REDIS_TIMEOUT_SECONDS): {detail}"
        )
    if isinstance(error, redis.ConnectionError):
        return f"cannot reach Redis at {where}: {detail}"
    if isinstance(error, redis.exceptions.InvalidResponse):
        return f"{where} does not answer as a Redis server (is it the right port?): {detail}"
    if isinstance(error, redis.ResponseError):
        return f"Redis at {where} refused a command: {detail}"
    return f"Redis at {where} failed: {detail}"


def _url_password(url: str) -> str | None:
    try:
        return urlsplit(url).password
    except ValueError:
        return None
