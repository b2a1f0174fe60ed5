"""The whole batch job on a data folder: wall time, peak memory of all its processes, Redis.

Run: ``.venv/bin/python bench/bench_job.py --data DIR [--redis URL] [-- JOB FLAGS...]``

``adrec job run`` runs as a child process with default settings (plus any flags after
``--``); every second the resident memory of the whole process tree is summed (the Python
driver, the JVM and every Python worker), so the peak is what the machine had to hold at
once, not the largest single process. Without ``--redis`` a private redis-server is started
and stopped afterwards. Printed: wall time, peak summed RSS, each stage's seconds and rows
(from the job's report) and Redis ``used_memory`` of the published version.

Targets at the ``full`` preset (1,141,729 users, 100M behaviour rows) on 2 cores and
24 GiB: at most 20 minutes, at most 16 GB peak RSS, at most 3 GB ``used_memory``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from adrec.core import store  # noqa: E402
from adrec.core.redis_conn import RedisSettings, connect, redacted  # noqa: E402
from adrec.core.redis_server import private_redis  # noqa: E402

ADREC = (sys.executable, "-c", "import sys; from adrec.cli import main; sys.exit(main())")
TARGET_SECONDS = 20 * 60
TARGET_RSS_BYTES = 16 * 10**9
TARGET_REDIS_BYTES = 3 * 10**9


def tree_rss_bytes(root: int) -> int:
    """Summed VmRSS of ``root`` and all its descendants."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        pid = int(entry.name)
        children.setdefault(int(fields.get("PPid", "0").strip()), []).append(pid)
        rss[pid] = int(fields.get("VmRSS", "0 kB").split()[0]) * 1024
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack.extend(children.get(pid, []))
    return total


class PeakSampler(threading.Thread):
    def __init__(self, pid: int, interval: float = 1.0):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak = 0
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            self.peak = max(self.peak, tree_rss_bytes(self.pid))


def run_job(data: str, redis_url: str, extra: list[str], report: Path) -> tuple[float, int, int]:
    command = [*ADREC, "job", "run", "--data", data, "--redis-url", redis_url]
    command += ["--report-json", str(report), *extra]
    started = time.monotonic()
    child = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL)
    sampler = PeakSampler(child.pid)
    sampler.start()
    code = child.wait()
    sampler.stopped.set()
    sampler.join()
    return time.monotonic() - started, sampler.peak, code


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="folder holding the four files")
    parser.add_argument("--redis", help="Redis URL (default: a private redis-server)")
    parser.add_argument("job_flags", nargs="*", help="flags passed on to adrec job run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="adrec-bench-job-") as tmp:
        report_path = Path(tmp) / "report.json"
        if args.redis:
            outcome = _measure(args.data, args.redis, args.job_flags, report_path)
        else:
            with private_redis() as server:
                outcome = _measure(args.data, server.url, args.job_flags, report_path)
    return outcome


def _measure(data: str, redis_url: str, flags: list[str], report_path: Path) -> int:
    print(f"adrec job run --data {data} --redis-url {redacted(redis_url)} {' '.join(flags)}")
    print(f"machine: {os.cpu_count()} cores, {_machine_gib():.0f} GiB")
    seconds, peak, code = run_job(data, redis_url, flags, report_path)
    print(f"exit code {code}, wall time {seconds:.0f} s ({seconds / 60:.1f} min)")
    print(f"peak RSS of all job processes together: {peak / 1e9:.2f} GB")
    if code != 0 or not report_path.exists():
        return 1
    report = json.loads(report_path.read_text())
    print("stage        seconds          rows")
    for stage in report["stages"]:
        rows = "-" if stage["rows"] is None else f"{stage['rows']:,}"
        print(f"  {stage['name']:<10} {stage['seconds']:>7.1f} {rows:>15}")
    client = connect(RedisSettings(url=redis_url))
    used = int(client.info("memory")["used_memory"])
    meta = store.read_meta(client, report["version"])
    kept = len(store.list_versions(client))
    client.close()
    # The growth of used_memory while the version was written: its own size, whatever
    # older versions the Redis keeps for rollback.
    version_bytes = meta.memory_bytes if meta else used
    print(
        f"Redis: version {report['version']} took {version_bytes / 1e9:.2f} GB of used_memory; "
        f"used_memory {used / 1e9:.2f} GB with {kept} version(s) kept"
    )
    ctr = report.get("ctr", {})
    for name in ("course", "full"):
        if name in ctr:
            print(f"CTR {name}: AUC {ctr[name]['auc']}, train rows {ctr[name]['train_rows']:,}")
    if ctr.get("oracle"):
        print(f"CTR oracle: AUC {ctr['oracle']['auc']}")
    checks = {
        f"wall time <= {TARGET_SECONDS // 60} min": seconds <= TARGET_SECONDS,
        f"peak RSS <= {TARGET_RSS_BYTES / 1e9:.0f} GB": peak <= TARGET_RSS_BYTES,
        f"version's used_memory <= {TARGET_REDIS_BYTES / 1e9:.0f} GB": version_bytes
        <= TARGET_REDIS_BYTES,
    }
    print("targets of the full preset (2 cores, 24 GiB):")
    for name, ok in checks.items():
        print(f"  {'PASS' if ok else 'FAIL'} {name}")
    return 0


def _machine_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


if __name__ == "__main__":
    sys.exit(main())
