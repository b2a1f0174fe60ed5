"""Redis connections from URLs against real private redis-servers."""

import re

import pytest
import redis

from adrec.core.redis_conn import (
    RedisSettings,
    connect,
    connect_async,
    redacted,
    redis_problem,
    validate_url,
)
from adrec.core.redis_server import private_redis
from adrec.core.settings import SettingsError, describe, load


def test_connects_with_db_from_url(redis_server):
    url = f"redis://127.0.0.1:{redis_server.port}/3"
    client = connect(load(RedisSettings, env={"REDIS_URL": url}))
    client.set(b"probe", b"1")
    assert redis.Redis(port=redis_server.port, db=3).get(b"probe") == b"1"
    assert redis.Redis(port=redis_server.port, db=0).get(b"probe") is None
    client.delete(b"probe")


def test_password_from_url_or_separate_setting():
    with private_redis(extra_args=("--requirepass", "s3cret")) as server:
        in_url = f"redis://:s3cret@127.0.0.1:{server.port}/0"
        assert connect(load(RedisSettings, env={"REDIS_URL": in_url})).ping()
        separate = load(RedisSettings, env={"REDIS_URL": server.url, "REDIS_PASSWORD": "s3cret"})
        assert connect(separate).ping()
        with pytest.raises(redis.AuthenticationError):
            connect(load(RedisSettings, env={"REDIS_URL": server.url})).ping()


async def _async_ping(settings):
    client = connect_async(settings)
    try:
        return await client.ping()
    finally:
        await client.aclose()


def test_async_client(redis_server):
    import asyncio

    settings = load(RedisSettings, env={"REDIS_URL": redis_server.url})
    assert asyncio.run(_async_ping(settings)) is True


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://x:6379", "scheme"),
        ("redis://", "no host"),
        ("redis://h:port/0", "invalid port"),
        ("redis://h:6379/zero", "not a number"),
        ("unix://", "no socket path"),
        ("unix:///run/redis.sock?db=zero", "not a number"),
    ],
)
def test_bad_urls_are_explained(url, why):
    assert why in validate_url(url)
    with pytest.raises(SettingsError, match=re.escape(f"REDIS_URL='{url}'")):
        load(RedisSettings, env={"REDIS_URL": url})


def test_a_unix_socket_url_connects(tmp_path):
    import subprocess
    import time

    socket_path = tmp_path / "redis.sock"
    server = subprocess.Popen(
        ["redis-server", "--port", "0", "--unixsocket", str(socket_path), "--save", ""],
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not socket_path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        url = f"unix://{socket_path}?db=2"
        assert validate_url(url) is None
        client = connect(load(RedisSettings, env={"REDIS_URL": url}))
        client.set(b"k", b"v")
        assert client.get(b"k") == b"v"
        assert client.connection_pool.connection_kwargs["db"] == 2
        client.close()
    finally:
        server.terminate()
        server.wait(10)


def test_rediss_and_cluster_validation():
    assert validate_url("rediss://:pw@cache.example:6380/0") is None
    with pytest.raises(SettingsError, match="database other than 0"):
        load(RedisSettings, env={"REDIS_URL": "redis://h:6379/2", "REDIS_CLUSTER": "true"})


def test_redacted_hides_passwords():
    assert redacted("rediss://:pw@h:6380/0") == "rediss://:***@h:6380/0"
    assert redacted("redis://h:6379/0") == "redis://h:6379/0"


def test_a_redis_problem_is_one_bounded_line_without_any_password():
    settings = RedisSettings(url="redis://:in-url@h:6379/0", password="from-secret")
    reply = redis.ResponseError("ERR in-url from-secret " + "x" * 1000)
    problem = redis_problem(reply, settings)
    assert problem.startswith("Redis at redis://:***@h:6379/0 refused a command: ERR *** *** x")
    assert "in-url" not in problem and "from-secret" not in problem
    assert len(problem) < 300 and "\n" not in problem
    assert redis_problem(redis.TimeoutError("Timeout reading from socket"), settings) == (
        "Redis at redis://:***@h:6379/0 did not answer within 1 s (REDIS_TIMEOUT_SECONDS): "
        "Timeout reading from socket"
    )
    assert redis_problem(redis.AuthenticationError("invalid password"), settings).startswith(
        "Redis at redis://:***@h:6379/0 refused the credentials"
    )


@pytest.mark.parametrize(
    "url",
    [
        "redis://:s3cret-pw@127.0.0.1:notaport/0",
        "rediss://admin:s3cret-pw@cache.example:6380/x",
        "redis://:s3cret-pw@[::1/0",
        "ftp://:s3cret-pw@h/0",
    ],
)
def test_a_bad_url_is_named_without_its_password(url):
    with pytest.raises(SettingsError) as error:
        load(RedisSettings, env={"REDIS_URL": url})
    assert "REDIS_URL=" in str(error.value) and "s3cret-pw" not in str(error.value)


def test_the_cli_never_prints_the_password_of_a_bad_url(capsys):
    from adrec.cli import main

    for argv in (["publish", "list"], ["job", "run", "--data", "nowhere"]):
        code = main([*argv, "--redis-url", "redis://:s3cret-pw@127.0.0.1:nope/0"])
        printed = capsys.readouterr()
        assert code == 2 and "REDIS_URL" in printed.err
        assert "s3cret-pw" not in printed.err + printed.out


def test_settings_logged_show_the_url_without_its_password():
    settings = load(RedisSettings, env={"REDIS_URL": "redis://:s3cret-pw@h:6379/0"})
    assert describe(settings)["REDIS_URL"] == "redis://:***@h:6379/0"
    assert settings.url == "redis://:s3cret-pw@h:6379/0"
