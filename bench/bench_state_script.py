"""What one real-time state write costs Redis, by the size of the state it rewrites.

Run: ``.venv/bin/python bench/bench_state_script.py`` (seconds; figures in
docs/performance.md, "The state script's cost by state size").

The stream job applies each user's part of a batch with one call of the state script
(``adrec.core.realtime``), which decodes the user's whole value, adds the batch's counts and
interest and writes the value back; Redis runs nothing else meanwhile, so the call's time
is how long every other client waits behind it. On a private redis-server, for states of
several sizes (count fields spread over the last 60 hour buckets): the microseconds per
call Redis itself reports (``INFO commandstats``), for writes within the hour of the
state's last write and for writes an hour later, when the window has moved and every
field's hour is checked again.
"""

from __future__ import annotations

import sys
import time

import redis

from adrec.core import events, keys
from adrec.core.events import Kind, Scope
from adrec.core.realtime import StateSettings, StateUpdate, StateWriter
from adrec.core.redis_server import private_redis

FIELD_COUNTS = (50, 300, 1500, 5000)
CALLS = 300


def microseconds_per_call(client: redis.Redis) -> float:
    return float(client.info("commandstats")["cmdstat_evalsha"]["usec_per_call"])


def main() -> int:
    now = int(time.time())
    hour = events.bucket_of(now)
    with private_redis() as server:
        client = redis.Redis.from_url(server.url)
        writer = StateWriter(client, StateSettings())
        print(f"{'fields':>7} {'bytes':>7} {'same hour us':>13} {'next hour us':>13}")
        for fields in FIELD_COUNTS:
            key = keys.REALTIME_USER.key(fields)
            held = [
                (events.count_field(Kind.PAGE_VIEW, Scope.CATEGORY, i, hour - i % 60), 1)
                for i in range(fields)
            ]
            new = [(events.count_field(Kind.PAGE_VIEW, Scope.CATEGORY, 1, hour), 1)]
            figures = []
            client.delete(key)
            writer.apply("bench", 0, now, [StateUpdate(key, counts=held)])
            written = client.get(key)
            assert written is not None
            for later in (0, events.BUCKET_SECONDS):
                client.config_resetstat()
                for batch in range(1, CALLS + 1):
                    # Each call on the same value, as written at `now`.
                    client.set(key, written)
                    writer.apply("bench", batch, now + later, [StateUpdate(key, counts=new)])
                figures.append(microseconds_per_call(client))
            size = len(written)
            print(f"{fields:>7} {size:>7} {figures[0]:>13.1f} {figures[1]:>13.1f}")
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
