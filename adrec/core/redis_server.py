"""Start and stop a private ``redis-server`` on a free loopback port.

Used by the test suite and the demo so neither ever touches a shared instance.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

INSTALL_HINT = (
    "redis-server was not found on PATH. Install it "
    "(Debian/Ubuntu: `apt-get install redis-server`, macOS: `brew install redis`) "
    "or point REDIS_URL at a running Redis."
)


class RedisServerError(RuntimeError):
    """The private redis-server could not be started."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class PrivateRedis:
    port: int
    process: subprocess.Popen[bytes]
    workdir: Path
    extra_args: tuple[str, ...] = ()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def restart(self, timeout: float = 10.0) -> None:
        """Start the server again on the same port (after ``stop``)."""
        self.stop()
        self.process = _spawn(self.port, self.workdir, self.extra_args)
        _wait_ready(self.port, self.process, timeout)


def _spawn(port: int, workdir: Path, extra_args: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RedisServerError(INSTALL_HINT)
    args = [
        binary,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(workdir),
        "--logfile",
        str(workdir / "redis.log"),
        *extra_args,
    ]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_ready(port: int, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            err = process.stderr.read().decode(errors="replace") if process.stderr else ""
            raise RedisServerError(f"redis-server exited with code {process.returncode}: {err}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2) as s:
            s.sendall(b"PING\r\n")
            # NOAUTH is an answer too: the server is up, it just wants a password.
            if s.recv(16).startswith((b"+PONG", b"-NOAUTH")):
                return
        time.sleep(0.05)
    process.kill()
    raise RedisServerError(f"redis-server on port {port} did not answer PING within {timeout}s")


@contextlib.contextmanager
def private_redis(
    timeout: float = 10.0, extra_args: tuple[str, ...] = ()
) -> Iterator[PrivateRedis]:
    """Run a throwaway redis-server for the duration of the block."""
    with tempfile.TemporaryDirectory(prefix="adrec-redis-") as tmp:
        port = free_port()
        workdir = Path(tmp)
        server = PrivateRedis(
            port=port,
            process=_spawn(port, workdir, extra_args),
            workdir=workdir,
            extra_args=extra_args,
        )
        try:
            _wait_ready(port, server.process, timeout)
            yield server
        finally:
            server.stop()
