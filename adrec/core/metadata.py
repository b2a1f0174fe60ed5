"""Version metadata: what a published data version is, typed once for writers and readers.

The job describes its version with a :class:`VersionContent`; the publication adds the
identity fields and writes a :class:`VersionMeta` last, just before the active pointer
moves. The services (data version gauges, the watcher's run id, the gateway's offline
placement), ``adrec publish list`` and the tests all read the same fields from here.

The stored form is one flat JSON object. Readers ignore fields they do not know, so a
newer job's metadata stays readable by an older service during a rolling upgrade; a field
of the wrong type is a :class:`~adrec.core.codecs.CodecError` naming it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping
from typing import Any

from adrec.core import codecs


@dataclasses.dataclass(frozen=True)
class VersionCounts:
    """Rows the version holds per family of per-user or per-ad data."""

    recall_lists: int = 0
    offline_lists: int = 0
    users: int = 0
    ads: int = 0


@dataclasses.dataclass(frozen=True)
class VersionContent:
    """What a run says about the version it publishes."""

    config_digest: str = ""
    feature_spec_id: str = ""
    counts: VersionCounts = VersionCounts()
    #: The served model's day-8 metrics (auc, logloss, observed_ctr, mean_predicted).
    model_metrics: Mapping[str, float | None] = dataclasses.field(default_factory=dict)
    stages: tuple[str, ...] = ()
    #: Placement the offline lists were scored at; None when the version has none.
    offline_pid: str | None = None
    #: Clean rows of each input table the version was built from (the next run's
    #: guard against a truncated file).
    input_rows: Mapping[str, int] = dataclasses.field(default_factory=dict)
    #: The run's whole quality report, for people and tools; no reader depends on its shape.
    report: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class VersionMeta:
    version: str
    #: Tells apart two versions of the same id (a Redis that lost its data reissues ids).
    run_id: str
    #: ISO 8601, UTC.
    created_at: str
    #: Growth of Redis' used_memory while the version was written.
    memory_bytes: int
    content: VersionContent
    #: Sentinel keys written with the version (``keys.sentinel_keys``); 0 for a version
    #: published before there were any, whose loss the services then cannot see.
    sentinels: int = 0

    @property
    def created_at_unix(self) -> float | None:
        """Creation time in Unix seconds; None when it does not parse."""
        try:
            moment = dt.datetime.fromisoformat(self.created_at)
        except ValueError:
            return None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=dt.UTC)
        return moment.timestamp()

    def to_json(self) -> bytes:
        content = self.content
        return codecs.encode_json(
            {
                "version": self.version,
                "run_id": self.run_id,
                "created_at": self.created_at,
                "memory_bytes": self.memory_bytes,
                "sentinels": self.sentinels,
                "config_digest": content.config_digest,
                "feature_spec_id": content.feature_spec_id,
                "counts": dataclasses.asdict(content.counts),
                "model_metrics": dict(content.model_metrics),
                "stages": list(content.stages),
                "offline_pid": content.offline_pid,
                "input_rows": dict(content.input_rows),
                "report": dict(content.report),
            }
        )

    @classmethod
    def from_json(cls, raw: bytes) -> VersionMeta:
        document = codecs.decode_json(raw)
        counts = _field(document, "counts", dict, {})
        return cls(
            version=_field(document, "version", str, ""),
            run_id=_field(document, "run_id", str, ""),
            created_at=_field(document, "created_at", str, ""),
            memory_bytes=_field(document, "memory_bytes", int, 0),
            content=VersionContent(
                config_digest=_field(document, "config_digest", str, ""),
                feature_spec_id=_field(document, "feature_spec_id", str, ""),
                counts=VersionCounts(
                    **{
                        name.name: _field(counts, name.name, int, 0, parent="counts")
                        for name in dataclasses.fields(VersionCounts)
                    }
                ),
                model_metrics=_metrics(_field(document, "model_metrics", dict, {})),
                stages=tuple(_strings(_field(document, "stages", list, []), "stages")),
                offline_pid=_field(document, "offline_pid", str, None)
                or _report_offline_pid(document),
                input_rows=_counts(_field(document, "input_rows", dict, {}), "input_rows"),
                report=_field(document, "report", dict, {}),
            ),
            sentinels=_field(document, "sentinels", int, 0),
        )


def _field(
    document: Mapping[str, Any], name: str, kind: type, default: Any, parent: str = ""
) -> Any:
    value = document.get(name)
    if value is None:
        return default
    # bool is an int to Python, never a count here.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        where = f"{parent}.{name}" if parent else name
        raise codecs.CodecError(
            f"version metadata field {where!r} must be {kind.__name__}, not {type(value).__name__}"
        )
    return value


def _report_offline_pid(document: Mapping[str, Any]) -> str | None:
    # Metadata written before offline_pid was a field of its own has it only in the report.
    report = document.get("report")
    offline = report.get("offline") if isinstance(report, dict) else None
    pid = offline.get("pid") if isinstance(offline, dict) else None
    return pid if isinstance(pid, str) else None


def _metrics(metrics: Mapping[str, Any]) -> dict[str, float | None]:
    for name, value in metrics.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise codecs.CodecError(
                f"version metadata field 'model_metrics.{name}' must be a "
                f"number, not {type(value).__name__}"
            )
    return {name: None if value is None else float(value) for name, value in metrics.items()}


def _counts(counts: Mapping[str, Any], name: str) -> dict[str, int]:
    return {
        key: _field(counts, key, int, 0, parent=name) for key in counts if counts[key] is not None
    }


def _strings(values: list[Any], name: str) -> list[str]:
    if not all(isinstance(value, str) for value in values):
        raise codecs.CodecError(f"version metadata field {name!r} must list strings")
    return values


def now_utc() -> str:
    """A creation time as VersionMeta stores it."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
