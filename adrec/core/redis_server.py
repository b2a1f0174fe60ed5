"""Start and stop private ``redis-server`` processes on free loopback ports.

Used by the test suite, the demo and the benchmarks so none of them ever touches a shared
instance. Three shapes:

- :func:`private_redis`: one plain server;
- :func:`private_tls_redis`: one server that speaks only TLS and wants a password, with a
  CA and a server certificate made for it by ``openssl``;
- :func:`private_cluster`: a Redis Cluster of primaries without replicas, its slots split
  evenly, ready once every node reports ``cluster_state:ok``.

Every server runs without persistence, so :meth:`PrivateRedis.restart` brings it back
empty, as a server without persistence comes back after a crash; a cluster node keeps its
identity and slots across a restart (its ``nodes.conf`` stays in its folder).
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import redis

INSTALL_HINT = (
    "redis-server was not found on PATH. Install it "
    "(Debian/Ubuntu: `apt-get install redis-server`, macOS: `brew install redis`) "
    "or point REDIS_URL at a running Redis."
)
#: Slots of a Redis Cluster, numbered 0..16383.
CLUSTER_SLOTS = 16384


class RedisServerError(RuntimeError):
    """A private redis-server could not be started."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True)
class TlsFiles:
    """A private CA and the server certificate it signed, valid for 127.0.0.1 and localhost."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


@dataclass
class PrivateRedis:
    port: int
    process: subprocess.Popen[bytes]
    workdir: Path
    extra_args: tuple[str, ...] = ()
    #: Set for a server that listens with TLS only (its port is then the TLS port).
    tls: TlsFiles | None = None
    #: The server's ``requirepass``; kept out of :attr:`url`, as a Secret keeps it out of
    #: REDIS_URL.
    password: str = ""

    @property
    def url(self) -> str:
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        """A synchronous client of this one server (for a cluster node: of it alone)."""
        options: dict[str, object] = {"password": self.password or None}
        if self.tls:
            options["ssl_ca_certs"] = str(self.tls.ca_cert)
        return redis.Redis.from_url(self.url, **options)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def restart(self, timeout: float = 10.0) -> None:
        """Start the server again on the same port and folder, without its data."""
        self.stop()
        self.process = _spawn(self.port, self.workdir, self.extra_args, self.tls)
        _wait_ready(self.port, self.process, timeout, self.tls)


def _spawn(
    port: int, workdir: Path, extra_args: tuple[str, ...] = (), tls: TlsFiles | None = None
) -> subprocess.Popen[bytes]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RedisServerError(INSTALL_HINT)
    if tls is None:
        listen = ["--port", str(port)]
    else:
        listen = [
            "--port",
            "0",
            "--tls-port",
            str(port),
            "--tls-cert-file",
            str(tls.server_cert),
            "--tls-key-file",
            str(tls.server_key),
            "--tls-ca-cert-file",
            str(tls.ca_cert),
            # The clients verify the server; the server asks no certificate of them.
            "--tls-auth-clients",
            "no",
        ]
    args = [
        binary,
        *listen,
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


def _answers_ping(port: int, tls: TlsFiles | None) -> bool:
    with contextlib.ExitStack() as stack:
        try:
            sock = stack.enter_context(socket.create_connection(("127.0.0.1", port), 0.2))
            if tls is not None:
                context = ssl.create_default_context(cafile=str(tls.ca_cert))
                sock = stack.enter_context(context.wrap_socket(sock, server_hostname="127.0.0.1"))
            sock.sendall(b"PING\r\n")
            # NOAUTH is an answer too: the server is up, it just wants a password.
            return sock.recv(16).startswith((b"+PONG", b"-NOAUTH"))
        except (OSError, ssl.SSLError):
            return False


def _wait_ready(
    port: int, process: subprocess.Popen[bytes], timeout: float, tls: TlsFiles | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            err = process.stderr.read().decode(errors="replace") if process.stderr else ""
            raise RedisServerError(f"redis-server exited with code {process.returncode}: {err}")
        if _answers_ping(port, tls):
            return
        time.sleep(0.05)
    process.kill()
    raise RedisServerError(f"redis-server on port {port} did not answer PING within {timeout}s")


@contextlib.contextmanager
def _started(
    workdir: Path,
    timeout: float,
    extra_args: tuple[str, ...] = (),
    tls: TlsFiles | None = None,
    password: str = "",
) -> Iterator[PrivateRedis]:
    port = free_port()
    if password:
        extra_args = (*extra_args, "--requirepass", password)
    server = PrivateRedis(
        port=port,
        process=_spawn(port, workdir, extra_args, tls),
        workdir=workdir,
        extra_args=extra_args,
        tls=tls,
        password=password,
    )
    try:
        _wait_ready(port, server.process, timeout, tls)
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def private_redis(
    timeout: float = 10.0, extra_args: tuple[str, ...] = ()
) -> Iterator[PrivateRedis]:
    """Run a throwaway redis-server for the duration of the block."""
    with (
        tempfile.TemporaryDirectory(prefix="adrec-redis-") as tmp,
        _started(Path(tmp), timeout, extra_args) as server,
    ):
        yield server


def make_tls_files(directory: Path) -> TlsFiles:
    """A new CA and a server certificate it signs for 127.0.0.1, written with ``openssl``."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise RedisServerError("openssl was not found on PATH (apt-get install openssl)")
    files = TlsFiles(directory / "ca.crt", directory / "server.crt", directory / "server.key")
    ca_key, request = directory / "ca.key", directory / "server.csr"
    extensions = directory / "server.ext"
    extensions.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    ec_key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    ca = ("req", "-x509", *ec_key, "-keyout", ca_key, "-out", files.ca_cert, "-days", "2")
    signed = ("x509", "-req", "-in", request, "-CA", files.ca_cert, "-CAkey", ca_key, "-days", "2")
    for command in (
        (*ca, "-subj", "/CN=adrec private test CA"),
        ("req", *ec_key, "-keyout", files.server_key, "-out", request, "-subj", "/CN=127.0.0.1"),
        (*signed, "-CAcreateserial", "-out", files.server_cert, "-extfile", extensions),
    ):
        result = subprocess.run(
            [openssl, *map(str, command)], capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise RedisServerError(f"openssl {command[0]} failed: {result.stderr.strip()}")
    return files


@contextlib.contextmanager
def private_tls_redis(
    password: str, timeout: float = 10.0, extra_args: tuple[str, ...] = ()
) -> Iterator[PrivateRedis]:
    """Run a throwaway redis-server that accepts only TLS connections and `password`.

    Its :attr:`~PrivateRedis.url` is ``rediss://`` without the password; a client needs the
    password and ``tls.ca_cert`` (REDIS_PASSWORD and REDIS_TLS_CA_FILE) to use it.
    """
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="adrec-redis-tls-")))
        tls = make_tls_files(workdir)
        yield stack.enter_context(_started(workdir, timeout, extra_args, tls, password))


@dataclass
class PrivateCluster:
    """A running Redis Cluster of primaries; ``nodes[i]`` serves ``slot_ranges[i]``."""

    nodes: list[PrivateRedis]
    slot_ranges: list[tuple[int, int]] = field(default_factory=list)

    @property
    def url(self) -> str:
        """A URL of one node, from which a cluster client discovers the others."""
        return self.nodes[0].url

    def node_of_slot(self, slot: int) -> PrivateRedis:
        for node, (first, last) in zip(self.nodes, self.slot_ranges, strict=True):
            if first <= slot <= last:
                return node
        raise ValueError(f"slot {slot} is outside 0..{CLUSTER_SLOTS - 1}")

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Wait until every node reports ``cluster_state:ok`` with every slot served.

        ``cluster_state`` alone does not do: without full coverage required, a node is ok
        before it has heard of the other nodes' slots.
        """
        deadline = time.monotonic() + timeout
        pending = list(self.nodes)
        while pending:
            with (
                contextlib.closing(pending[0].client()) as client,
                contextlib.suppress(redis.RedisError),
            ):
                info = client.cluster("info")
                if info["cluster_state"] == "ok" and int(info["cluster_slots_ok"]) == CLUSTER_SLOTS:
                    pending.pop(0)
                    continue
            if time.monotonic() > deadline:
                raise RedisServerError(
                    f"Redis Cluster node on port {pending[0].port} not ok within {timeout}s"
                )
            time.sleep(0.05)


@contextlib.contextmanager
def private_cluster(
    primaries: int = 3,
    timeout: float = 30.0,
    node_timeout_ms: int = 2000,
    extra_args: tuple[str, ...] = (),
) -> Iterator[PrivateCluster]:
    """Run a throwaway Redis Cluster of `primaries` nodes, no replicas, slots split evenly.

    The nodes keep serving their own slots while another is down
    (``cluster-require-full-coverage no``, as docs/operations.md recommends for adrec), and
    mark a silent node failed after `node_timeout_ms`.
    """
    args = (
        "--cluster-enabled",
        "yes",
        "--cluster-config-file",
        "nodes.conf",
        "--cluster-node-timeout",
        str(node_timeout_ms),
        "--cluster-require-full-coverage",
        "no",
        *extra_args,
    )
    with contextlib.ExitStack() as stack:
        cluster = PrivateCluster([])
        # The bus port defaults to the port + 10000, which may be taken or past 65535.
        first_bus_port = free_port()
        for index in range(primaries):
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="adrec-rc-")))
            bus = free_port() if index else first_bus_port
            node_args = (*args, "--cluster-port", str(bus))
            cluster.nodes.append(stack.enter_context(_started(workdir, timeout, node_args)))
        share = CLUSTER_SLOTS // primaries
        for index, node in enumerate(cluster.nodes):
            first = index * share
            last = CLUSTER_SLOTS - 1 if index == primaries - 1 else first + share - 1
            cluster.slot_ranges.append((first, last))
            with contextlib.closing(node.client()) as client:
                # redis-py leaves execute_command unannotated.
                client.execute_command("CLUSTER", "ADDSLOTSRANGE", first, last)  # type: ignore[no-untyped-call]
                if index:
                    client.execute_command(  # type: ignore[no-untyped-call]
                        "CLUSTER", "MEET", "127.0.0.1", cluster.nodes[0].port, first_bus_port
                    )
        cluster.wait_ok(timeout)
        yield cluster
