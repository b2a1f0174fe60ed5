"""The built-in event log, Redis Streams, as a Structured Streaming source.

Registered with pyspark's Python data source API as ``adrec_redis_stream``. An offset is
the id of the last stream entry a batch covers; a batch reads the entries after its start
up to its end, split into time slices read in parallel. Entry ids start with the append
time in milliseconds, so a batch is bounded in time (``max_batch_seconds`` of the log)
without counting entries first, and ``received`` is that append time.

The reader connects with the same Redis settings as every adrec process (``REDIS_URL``
and friends from the environment), so no password passes through Spark's options.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Iterator, Mapping
from typing import Any

import pyarrow as pa
from pyspark.sql.datasource import DataSource, DataSourceStreamReader, InputPartition
from pyspark.sql.types import StructType

from adrec.core import events, keys, settings
from adrec.core.redis_conn import RedisSettings, connect

log = logging.getLogger("adrec.stream")

RAW_SCHEMA = "position string, received timestamp, line string"
#: Entries per XRANGE round trip.
READ_CHUNK = 5000
_FIRST_ID = "0-0"
_LAST_SEQUENCE = 2**64 - 1


def _split(entry_id: str) -> tuple[int, int]:
    milliseconds, sequence = entry_id.split("-")
    return int(milliseconds), int(sequence)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


_ARROW_SCHEMA = pa.schema(
    [
        ("position", pa.string()),
        ("received", pa.timestamp("us", tz="UTC")),
        ("line", pa.string()),
    ]
)


def _arrow_batch(entries: list[tuple[Any, Mapping[bytes, bytes]]]) -> pa.RecordBatch:
    """Stream entries as a batch of :data:`RAW_SCHEMA`; an entry without the event field
    has an empty line, which parsing counts as not an event."""
    positions = [_text(entry_id) for entry_id, _ in entries]
    milliseconds = [int(position.split("-", 1)[0]) for position in positions]
    lines = [_text(fields.get(events.LOG_FIELD, b"")) for _, fields in entries]
    return pa.RecordBatch.from_arrays(
        [
            pa.array(positions, pa.string()),
            pa.array([ms * 1000 for ms in milliseconds], pa.timestamp("us", tz="UTC")),
            pa.array(lines, pa.string()),
        ],
        schema=_ARROW_SCHEMA,
    )


@dataclasses.dataclass(frozen=True)
class LogSlice(InputPartition):
    """Entries with ids after ``after`` up to ``through`` (inclusive)."""

    after: str
    through: str


class RedisStreamSource(DataSource):
    @classmethod
    def name(cls) -> str:
        return "adrec_redis_stream"

    def schema(self) -> str:
        return RAW_SCHEMA

    def streamReader(self, schema: StructType) -> DataSourceStreamReader:  # noqa: N802 - pyspark API
        return RedisStreamReader(self.options)


class RedisStreamReader(DataSourceStreamReader):
    def __init__(self, options: Mapping[str, str]):
        self.start_at = options.get("starting_position", "earliest")
        self.max_batch_ms = int(float(options.get("max_batch_seconds", "30")) * 1000)
        self.slices = max(1, int(options.get("slices", "2")))
        self.stream = keys.EVENT_LOG
        self._client: Any = None
        #: Set when the log was trimmed past the job's position: those events are lost.
        self.trimmed_past: str | None = None

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = connect(settings.load(RedisSettings))
        return self._client

    def _last_id(self) -> str | None:
        newest = self.client.xrevrange(self.stream, count=1)
        return _text(newest[0][0]) if newest else None

    def initialOffset(self) -> dict[str, str]:  # noqa: N802 - pyspark API
        if self.start_at == "latest":
            return {"id": self._last_id() or _FIRST_ID}
        return {"id": _FIRST_ID}

    def latestOffset(self, start: dict[str, str], limit: Any = None) -> dict[str, str]:  # noqa: N802
        last = self._last_id()
        if last is None or _split(last) <= _split(start["id"]):
            return start
        self._check_trimmed(start["id"])
        first = self.client.xrange(self.stream, count=1)
        base_ms = _split(start["id"])[0]
        if first:
            base_ms = max(base_ms, _split(_text(first[0][0]))[0])
        if _split(last)[0] - base_ms <= self.max_batch_ms:
            return {"id": last}
        return {"id": f"{base_ms + self.max_batch_ms}-{_LAST_SEQUENCE}"}

    def _check_trimmed(self, position: str) -> None:
        if position == _FIRST_ID:
            return
        info = self.client.xinfo_stream(self.stream)
        deleted = _text(info.get("max-deleted-entry-id", _FIRST_ID))
        if _split(deleted) > _split(position) and deleted != self.trimmed_past:
            self.trimmed_past = deleted
            log.error(
                "the event log was trimmed past the stream job's position %s (up to %s): "
                "events in between were never processed; raise ADREC_EVENTS_LOG_MAX_LENGTH "
                "or keep the stream job closer to the log",
                position,
                deleted,
            )

    def partitions(self, start: dict[str, str], end: dict[str, str]) -> list[InputPartition]:
        if start["id"] == end["id"]:
            return []
        lo_ms, hi_ms = _split(start["id"])[0], _split(end["id"])[0]
        bounds = [start["id"]]
        step = max(1, (hi_ms - lo_ms) // self.slices)
        for cut in range(1, self.slices):
            cut_ms = lo_ms + cut * step
            if cut_ms >= hi_ms:
                break
            bounds.append(f"{cut_ms}-{_LAST_SEQUENCE}")
        bounds.append(end["id"])
        return [LogSlice(a, b) for a, b in itertools.pairwise(bounds)]

    def read(self, partition: InputPartition) -> Iterator[pa.RecordBatch]:
        # Arrow batches, one per XRANGE chunk: handing rows over one tuple at a time costs
        # more than reading them from Redis.
        assert isinstance(partition, LogSlice)
        client: Any = connect(settings.load(RedisSettings))
        try:
            after = partition.after
            while True:
                entries = client.xrange(
                    keys.EVENT_LOG, min=f"({after}", max=partition.through, count=READ_CHUNK
                )
                if entries:
                    yield _arrow_batch(entries)
                if len(entries) < READ_CHUNK:
                    return
                after = _text(entries[-1][0])
        finally:
            client.close()

    def commit(self, end: dict[str, str]) -> None:
        # The log keeps entries until its length bound trims them; nothing to release.
        return None

    def stop(self) -> None:
        if self._client is not None:
            self._client.close()
