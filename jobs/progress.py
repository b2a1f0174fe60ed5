"""Stage progress lines while the job runs, and the timings that go into the report.

Long stages (ingest at full size parses gigabytes) also print a heartbeat every
``interval`` seconds: the time so far, and the Spark tasks done of the total for the Spark
stages running then, with an estimate of what is left of them. A terminal is never
silent for more than ``interval``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TextIO

from pyspark import SparkContext

HEARTBEAT_SECONDS = 30.0
_POLL_SECONDS = 2.0
_STAGES_SHOWN = 2


@dataclasses.dataclass
class StageRecord:
    name: str
    seconds: float = 0.0
    rows: int | None = None
    notes: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class SparkWork:
    """One running Spark stage: its id, and its tasks done of the total."""

    stage_id: int
    done: int
    total: int


def spark_work(context: SparkContext) -> Callable[[], list[SparkWork]]:
    """The running Spark stages of ``context``, read from its status tracker."""
    tracker = context.statusTracker()

    def running() -> list[SparkWork]:
        work = []
        for stage_id in tracker.getActiveStageIds():
            info = tracker.getStageInfo(stage_id)
            if info is not None:
                work.append(SparkWork(stage_id, info.numCompletedTasks, info.numTasks))
        return work

    return running


def duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class Progress:
    """Prints ``[3/9] als ...`` as each stage starts and ends; keeps the timings."""

    def __init__(
        self,
        stages: tuple[str, ...],
        stream: TextIO | None = None,
        *,
        work: Callable[[], list[SparkWork]] | None = None,
        interval: float = HEARTBEAT_SECONDS,
    ):
        self.stages = stages
        self.stream = stream if stream is not None else sys.stderr
        self.records: list[StageRecord] = []
        self._work = work
        self._interval = interval
        self._started = time.monotonic()
        # When each Spark stage was first seen running: its rate so far gives the estimate.
        self._first_seen: dict[int, float] = {}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[StageRecord]:
        position = f"[{self.stages.index(name) + 1}/{len(self.stages)}]"
        self._print(f"{position} {name} ...")
        record = StageRecord(name)
        start = time.monotonic()
        stop = threading.Event()
        beat = threading.Thread(
            target=self._heartbeat, args=(name, start, stop), name="adrec-progress", daemon=True
        )
        beat.start()
        try:
            yield record
        except BaseException:
            self._print(f"{position} {name} failed after {time.monotonic() - start:.1f}s")
            raise
        finally:
            stop.set()
            beat.join()
        record.seconds = time.monotonic() - start
        self.records.append(record)
        rows = f", {record.rows:,} rows" if record.rows is not None else ""
        self._print(
            f"{position} {name} done in {record.seconds:.1f}s{rows} (elapsed {self.elapsed:.0f}s)"
        )

    def note(self, message: str) -> None:
        self._print(f"      {message}")

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self._started

    def as_report(self) -> list[dict[str, Any]]:
        return [dataclasses.asdict(r) for r in self.records]

    def heartbeat_line(self, name: str, start: float) -> str:
        """What the heartbeat prints now for stage ``name`` started at ``start``."""
        now = time.monotonic()
        line = f"      {name}: {duration(now - start)} so far"
        work = self._running(now)
        if not work:
            return f"{line}; no Spark tasks running (driver-side work)"
        parts = []
        # The busiest stages first; a join schedules several at once, most of them waiting.
        shown = sorted(work, key=lambda w: (-w.done, -w.total, w.stage_id))[:_STAGES_SHOWN]
        for running in sorted(shown, key=lambda w: w.stage_id):
            first = self._first_seen[running.stage_id]
            part = f"Spark stage {running.stage_id}: {running.done:,}/{running.total:,} tasks"
            if running.done and now > first:
                left = (running.total - running.done) * (now - first) / running.done
                part += f", about {duration(left)} left"
            parts.append(part)
        if len(work) > len(shown):
            parts.append(f"{len(work) - len(shown)} more Spark stages waiting")
        return f"{line}; " + "; ".join(parts)

    def _running(self, now: float) -> list[SparkWork]:
        work = self._work() if self._work is not None else []
        for running in work:
            self._first_seen.setdefault(running.stage_id, now)
        return work

    def _heartbeat(self, name: str, start: float, stop: threading.Event) -> None:
        # Polled more often than printed, so a Spark stage's start is seen within a poll
        # and its rate (the estimate) is not inflated by tasks done before it was seen.
        poll = min(_POLL_SECONDS, self._interval)
        printed = start
        while not stop.wait(poll):
            now = time.monotonic()
            try:
                if now - printed < self._interval:
                    self._running(now)
                    continue
                line = self.heartbeat_line(name, start)
            except Exception as exc:  # a status read must never stop the job
                line = f"      {name}: {duration(now - start)} so far ({exc})"
            printed = now
            self._print(line)

    def _print(self, line: str) -> None:
        with self._lock:
            print(line, file=self.stream, flush=True)
