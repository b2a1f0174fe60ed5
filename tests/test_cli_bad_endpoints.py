"""The CLI pointed at a port that is not Redis (or not the gateway): one line naming the
URL, its password redacted, and a non-zero exit, never a traceback.

The ports are real: a TCP listener on 127.0.0.1 that answers like an HTTP server, one that
writes bytes no protocol expects and hangs up, one that never answers, and a closed port.
"""

from __future__ import annotations

import os
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from adrec.cli import main
from adrec.core.redis_server import free_port, private_redis

PASSWORD = "hunter2"
#: The Redis commands that open the given URL, each with the arguments it needs.
PUBLISH_COMMANDS = (
    ["publish", "list"],
    ["publish", "rollback", "v1"],
    ["publish", "update-user", "5", "--recall", "1,2"],
)


class _Reply(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        mode = self.server.mode  # type: ignore[attr-defined]
        if mode == "http":
            self.request.recv(4096)
            self.request.sendall(
                b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
        elif mode == "garbage":
            self.request.sendall(b"\x00\x01\xfe\xffnot a protocol\r\n")
        elif mode == "silent":
            # Holds the connection open, reading and answering nothing, until the client
            # gives up or the server closes.
            self.request.settimeout(0.1)
            while not self.server.closing.is_set():  # type: ignore[attr-defined]
                try:
                    if not self.request.recv(4096):
                        return
                except TimeoutError:
                    continue


class _Listener(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@pytest.fixture(params=["http", "garbage", "closed"])
def not_redis(request) -> Iterator[int]:
    """The port of a listener that is no Redis server, or a closed port."""
    if request.param == "closed":
        yield free_port()
        return
    yield from _listening(request.param)


def _listening(mode: str) -> Iterator[int]:
    server = _Listener(("127.0.0.1", 0), _Reply)
    server.mode = mode  # type: ignore[attr-defined]
    server.closing = threading.Event()  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.closing.set()  # type: ignore[attr-defined]
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def silent() -> Iterator[int]:
    yield from _listening("silent")


def url(port: int) -> str:
    return f"redis://:{PASSWORD}@127.0.0.1:{port}/0"


def assert_one_redacted_line(err: str, port: int) -> None:
    assert "Traceback" not in err
    assert PASSWORD not in err
    assert len(err.strip().splitlines()) == 1, err
    assert f"redis://:***@127.0.0.1:{port}/0" in err


@pytest.mark.parametrize("command", PUBLISH_COMMANDS, ids=lambda command: command[1])
def test_publish_names_the_redacted_url_of_a_port_that_is_not_redis(not_redis, command, capsys):
    assert main([*command, "--redis-url", url(not_redis)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("adrec publish: error: ")
    assert_one_redacted_line(captured.err, not_redis)


def test_publish_says_a_silent_port_did_not_answer_in_time(silent, capsys):
    started = time.monotonic()
    code = main(["publish", "list", "--redis-url", url(silent), "--redis-timeout-seconds", "0.2"])
    assert code == 1
    err = capsys.readouterr().err
    assert_one_redacted_line(err, silent)
    assert "did not answer within 0.2 s (REDIS_TIMEOUT_SECONDS)" in err
    # redis-py retries a timed-out command a few times, each bounded by the timeout.
    assert time.monotonic() - started < 10


def test_publish_says_redis_refused_the_password_without_printing_it(capsys, monkeypatch):
    with private_redis(extra_args=("--requirepass", "right-one")) as server:
        assert main(["publish", "list", "--redis-url", url(server.port)]) == 1
        err = capsys.readouterr().err
        assert_one_redacted_line(err, server.port)
        assert "refused the credentials" in err
        # A password from REDIS_PASSWORD (a Secret) is no more printed than one in the URL.
        monkeypatch.setenv("REDIS_PASSWORD", PASSWORD)
        plain = f"redis://127.0.0.1:{server.port}/0"
        assert main(["publish", "list", "--redis-url", plain]) == 1
        err = capsys.readouterr().err
        assert PASSWORD not in err and "Traceback" not in err
        assert f"Redis at {plain} refused the credentials" in err


def test_the_job_checks_redis_before_anything_else_and_names_the_redacted_url(not_redis, tmp_path):
    """A real `adrec job run` process: Redis is checked before the input is read or Spark
    starts (the tests run without a Java, so a Spark start would fail differently)."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "adrec",
            "job",
            "run",
            "--data",
            str(tmp_path),
            "--redis-url",
            url(not_redis),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        check=False,
    )
    assert result.returncode != 0
    assert result.stdout == ""
    assert result.stderr.startswith("adrec job: error: cannot reach Redis at ")
    assert_one_redacted_line(result.stderr, not_redis)


def test_recommend_names_the_gateway_address_that_does_not_speak_grpc(not_redis, capsys):
    gateway = f"127.0.0.1:{not_redis}"
    assert main(["recommend", "7", "--gateway", gateway, "--timeout", "5"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"adrec recommend: error: cannot reach the gateway at {gateway}: ")


def test_the_listeners_are_what_the_tests_say():
    """The http and garbage listeners answer, and a closed port refuses, so each test above
    sees the failure it is named after."""
    for mode, first in (("http", b"HTTP/1.1 400"), ("garbage", b"\x00\x01")):
        for port in _listening(mode):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(b"PING\r\n")
                assert sock.recv(64).startswith(first)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", free_port()), timeout=5).close()
