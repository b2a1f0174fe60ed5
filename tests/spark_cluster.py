"""A Spark standalone cluster on loopback, started with pyspark's own `spark-class`.

One master and a few one-core workers, each a JVM in its own process group so that
stopping it also stops the executor JVMs it launched (the executors' pyspark daemons
take groups of their own and exit when their executor's pipe to them closes). Every
wait is bounded and every process is stopped on the way out, whatever happened inside.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pyspark

from adrec.core.redis_server import free_port

HOST = "127.0.0.1"
SPARK_CLASS = pathlib.Path(pyspark.__file__).parent / "bin" / "spark-class"
#: spark-submit as the venv installs it: the command docs/job.md documents.
SPARK_SUBMIT = pathlib.Path(sys.executable).parent / "spark-submit"
#: Spark's own default logging, except that the executors' task lines are pinned: the
#: test counts them to tell an executor that worked from one that only registered.
LOG4J2_PROPERTIES = """\
rootLogger.level = info
rootLogger.appenderRef.stderr.ref = console
appender.console.type = Console
appender.console.name = console
appender.console.target = SYSTEM_ERR
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = %d{yy/MM/dd HH:mm:ss} %p %c{1}: %m%n%ex
logger.executor.name = org.apache.spark.executor.Executor
logger.executor.level = info
"""
#: How long a JVM gets to exit on SIGTERM (the worker then stops its executors) before
#: its whole process group is killed.
STOP_SECONDS = 15


class ClusterError(RuntimeError):
    """The cluster did not come up, or a process of it died."""


@dataclasses.dataclass
class Daemon:
    name: str
    process: subprocess.Popen[bytes]
    log: pathlib.Path
    webui_port: int

    def state(self) -> dict[str, Any]:
        """The daemon's web UI JSON (`/json/`): workers and apps, or executors."""
        return fetch_json(f"http://{HOST}:{self.webui_port}/json/")

    def log_tail(self, chars: int = 3000) -> str:
        return tail(self.log, chars)


@dataclasses.dataclass
class Worker(Daemon):
    work_dir: pathlib.Path


@dataclasses.dataclass
class StandaloneCluster:
    master: Daemon
    master_port: int
    workers: list[Worker]
    #: The environment the daemons run in; spark-submit gets the same Spark variables.
    env: dict[str, str]

    @property
    def url(self) -> str:
        return f"spark://{HOST}:{self.master_port}"

    def diagnostics(self) -> str:
        """The daemons' log tails, for a failure message."""
        return "\n".join(
            f"--- {daemon.name} ({daemon.log}):\n{daemon.log_tail(1500)}"
            for daemon in (self.master, *self.workers)
        )


def fetch_json(url: str, timeout: float = 5) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        document: dict[str, Any] = json.load(response)
        return document


def tail(path: pathlib.Path, chars: int = 3000) -> str:
    if not path.exists():
        return "(no log)"
    return path.read_text(errors="replace")[-chars:]


def spark_env(base: pathlib.Path) -> dict[str, str]:
    """Spark's variables for every process of the cluster and for spark-submit.

    A private SPARK_CONF_DIR keeps a developer's own spark-defaults.conf or log4j2 setup
    out of the test; SPARK_LOCAL_IP keeps every listener, the driver's included, on
    loopback.
    """
    conf_dir = base / "conf"
    log_dir = base / "logs"
    conf_dir.mkdir(parents=True, exist_ok=True)
    (conf_dir / "log4j2.properties").write_text(LOG4J2_PROPERTIES)
    log_dir.mkdir(parents=True, exist_ok=True)
    return {
        **os.environ,
        "SPARK_LOCAL_IP": HOST,
        "SPARK_LOCAL_HOSTNAME": HOST,
        "SPARK_CONF_DIR": str(conf_dir),
        "SPARK_LOG_DIR": str(log_dir),
        "SPARK_WORKER_DIR": str(base / "work"),
        # The daemons only book-keep; the work runs in the executors.
        "SPARK_DAEMON_MEMORY": "512m",
        # The driver's interpreter, and the executors' unless spark-submit's own
        # environment names another: the one with pyspark, numpy and pandas.
        "PYSPARK_PYTHON": sys.executable,
        "PYSPARK_DRIVER_PYTHON": sys.executable,
    }


def bare_executor_python(base: pathlib.Path) -> pathlib.Path:
    """This interpreter and its site-packages, minus the `.pth` files, for the executors.

    The `.pth` files hold the editable install of adrec: without them an executor can
    import adrec and jobs only from the --py-files zip, as on a cluster whose executor
    image lacks adrec, and a module the zip misses fails the job instead of being found
    in the checkout.
    """
    site_packages = next(p for p in map(pathlib.Path, sys.path) if p.name == "site-packages")
    wrapper = base / "executor-python"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'PYTHONPATH="${{PYTHONPATH:+$PYTHONPATH:}}{site_packages}" exec {sys.executable} -S "$@"\n'
    )
    wrapper.chmod(0o755)
    return wrapper


def _spawn(
    args: Sequence[str], env: Mapping[str, str], log: pathlib.Path
) -> subprocess.Popen[bytes]:
    with log.open("wb") as output:
        # A session of its own: the group holds the JVM and everything it forks.
        return subprocess.Popen(
            [str(SPARK_CLASS), *args],
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop_group(process: subprocess.Popen[bytes], grace: float = STOP_SECONDS) -> None:
    """SIGTERM the process group, then SIGKILL it; returns once the leader is reaped."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=grace)
    # Children can outlive a leader that exited on SIGTERM: a stuck executor JVM, say.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=grace)


def _wait_for_workers(
    master: Daemon, daemons: Sequence[Daemon], count: int, timeout: float
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    state: dict[str, Any] = {}
    while time.monotonic() < deadline:
        for daemon in daemons:
            if daemon.process.poll() is not None:
                raise ClusterError(
                    f"{daemon.name} exited with {daemon.process.returncode}:\n{daemon.log_tail()}"
                )
        with contextlib.suppress(OSError, ValueError):
            state = master.state()
            alive = [w for w in state.get("workers", []) if w.get("state") == "ALIVE"]
            if len(alive) >= count:
                return state
        time.sleep(0.5)
    raise ClusterError(
        f"the master did not report {count} ALIVE workers within {timeout:.0f}s; "
        f"last state: {json.dumps(state)[:1000]}"
    )


@contextlib.contextmanager
def standalone_cluster(
    base: pathlib.Path,
    workers: int = 2,
    worker_memory: str = "1g",
    timeout: float = 90,
) -> Iterator[StandaloneCluster]:
    """A master and `workers` one-core workers on loopback; all stopped on exit."""
    env = spark_env(base)
    log_dir = pathlib.Path(env["SPARK_LOG_DIR"])
    master_port, master_ui = free_port(), free_port()
    daemons: list[Daemon] = []
    try:
        master = Daemon(
            "master",
            _spawn(
                [
                    "org.apache.spark.deploy.master.Master",
                    "--host",
                    HOST,
                    "--port",
                    str(master_port),
                    "--webui-port",
                    str(master_ui),
                ],
                env,
                log_dir / "master.log",
            ),
            log_dir / "master.log",
            master_ui,
        )
        daemons.append(master)
        pool: list[Worker] = []
        for index in range(workers):
            name = f"worker-{index + 1}"
            work_dir = base / "work" / name
            work_dir.mkdir(parents=True, exist_ok=True)
            webui = free_port()
            log = log_dir / f"{name}.log"
            process = _spawn(
                [
                    "org.apache.spark.deploy.worker.Worker",
                    f"spark://{HOST}:{master_port}",
                    "--host",
                    HOST,
                    "--cores",
                    "1",
                    "--memory",
                    worker_memory,
                    "--webui-port",
                    str(webui),
                    "--work-dir",
                    str(work_dir),
                ],
                {**env, "SPARK_WORKER_DIR": str(work_dir)},
                log,
            )
            worker = Worker(name, process, log, webui, work_dir)
            daemons.append(worker)
            pool.append(worker)
        _wait_for_workers(master, daemons, workers, timeout)
        yield StandaloneCluster(master, master_port, pool, env)
    finally:
        # Workers first: a worker whose master is gone keeps retrying to reconnect.
        for daemon in reversed(daemons):
            stop_group(daemon.process)


@dataclasses.dataclass
class Submitted:
    returncode: int
    stdout: str
    stderr: str
    seconds: float


def run_bounded(
    command: Sequence[str],
    env: Mapping[str, str],
    cwd: pathlib.Path,
    timeout: float,
    log_prefix: pathlib.Path,
) -> Submitted:
    """Run `command` in its own process group; on timeout the whole group is killed.

    spark-submit execs a JVM that forks the Python driver: killing only the JVM would
    leave the driver running.
    """
    out_path = log_prefix.with_suffix(".stdout")
    err_path = log_prefix.with_suffix(".stderr")
    started = time.monotonic()
    with out_path.open("wb") as out, err_path.open("wb") as err:
        process = subprocess.Popen(
            list(command),
            env=dict(env),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,
        )
        try:
            returncode = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise ClusterError(
                f"{command[0]} did not finish within {timeout:.0f}s:\n{tail(err_path)}"
            ) from None
        finally:
            # Also after a clean exit: nothing the run started may outlive it.
            stop_group(process, grace=5)
    return Submitted(
        returncode,
        out_path.read_text(errors="replace"),
        err_path.read_text(errors="replace"),
        time.monotonic() - started,
    )


def executor_logs(worker: Worker, app_id: str) -> list[pathlib.Path]:
    """The stderr files of the app's executors on `worker` (one folder per executor)."""
    return sorted((worker.work_dir / app_id).glob("*/stderr"))
