"""Stage progress lines while the job runs, and the timings that go into the report."""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from collections.abc import Iterator
from typing import Any, TextIO


@dataclasses.dataclass
class StageRecord:
    name: str
    seconds: float = 0.0
    rows: int | None = None
    notes: dict[str, Any] = dataclasses.field(default_factory=dict)


class Progress:
    """Prints ``[3/9] als ...`` as each stage starts and ends; keeps the timings."""

    def __init__(self, stages: tuple[str, ...], stream: TextIO | None = None):
        self.stages = stages
        self.stream = stream if stream is not None else sys.stderr
        self.records: list[StageRecord] = []
        self._started = time.monotonic()

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[StageRecord]:
        position = f"[{self.stages.index(name) + 1}/{len(self.stages)}]"
        self._print(f"{position} {name} ...")
        record = StageRecord(name)
        start = time.monotonic()
        try:
            yield record
        except BaseException:
            self._print(f"{position} {name} failed after {time.monotonic() - start:.1f}s")
            raise
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

    def _print(self, line: str) -> None:
        print(line, file=self.stream, flush=True)
