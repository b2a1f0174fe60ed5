"""Real-time state values: the update script on a real redis-server, idempotence, decay, pruning."""

from __future__ import annotations

import json

import numpy as np
import pytest

from adrec.core import events, keys, realtime
from adrec.core.codecs import CodecError
from adrec.core.events import Kind, Scope
from adrec.core.realtime import (
    InterestUpdate,
    StateSettings,
    StateUpdate,
    StateWriter,
    decode_state,
)

NOW = 1_494_000_000
HOUR = events.bucket_of(NOW)
HALF_LIFE = realtime.INTEREST_HALF_LIFE_SECONDS


@pytest.fixture
def writer(redis_client) -> StateWriter:
    return StateWriter(redis_client, StateSettings(half_life_seconds=HALF_LIFE))


def _state(redis_client, user: int):
    raw = redis_client.get(keys.REALTIME_USER.key(user))
    return decode_state(raw) if raw is not None else None


def _cart(cate: int, bucket: int = HOUR) -> str:
    return events.count_field(Kind.CART, Scope.CATEGORY, cate, bucket)


def test_counts_add_up_across_batches_and_a_replayed_batch_counts_once(writer, redis_client):
    key = keys.REALTIME_USER.key(7)
    first = StateUpdate(key, counts=[(_cart(11), 2)])
    assert writer.apply("run-a", 0, NOW, [first]) == 1
    assert writer.apply("run-a", 1, NOW, [StateUpdate(key, counts=[(_cart(11), 3)])]) == 1
    # A crash after batch 1 reached this key: the replay must not add it again.
    assert writer.apply("run-a", 1, NOW, [StateUpdate(key, counts=[(_cart(11), 3)])]) == 0
    assert writer.apply("run-a", 0, NOW, [first]) == 0
    state = _state(redis_client, 7)
    assert state.counts == {_cart(11): 5}
    assert (state.run, state.batch) == ("run-a", 1)


def test_the_parts_of_one_batch_each_apply_once_in_any_order(writer, redis_client):
    key = keys.REALTIME_USER.key(7)

    def part(index: int, amount: int) -> int:
        update = StateUpdate(key, counts=[(_cart(11), amount)])
        return writer.apply("run-a", 4, NOW, [update], part=index)

    assert part(2, 1) == 1
    assert part(0, 10) == 1
    # A replay of either part changes nothing; a part not yet applied still does.
    assert part(2, 1) == 0
    assert part(0, 10) == 0
    assert part(1, 100) == 1
    assert writer.apply("run-a", 3, NOW, [StateUpdate(key, counts=[(_cart(11), 1000)])]) == 0
    assert _state(redis_client, 7).counts == {_cart(11): 111}
    # The next batch starts its own parts.
    assert writer.apply("run-a", 5, NOW, [StateUpdate(key, counts=[(_cart(11), 1)])], part=2) == 1
    assert _state(redis_client, 7).counts == {_cart(11): 112}


def test_a_value_of_a_whole_batch_written_before_parts_is_not_applied_again(writer, redis_client):
    key = keys.REALTIME_USER.key(7)
    redis_client.set(key, b'{"run":"run-a","batch":4,"counts":{"%s":5}}' % _cart(11).encode())
    update = StateUpdate(key, counts=[(_cart(11), 1)])
    assert writer.apply("run-a", 4, NOW, [update], part=3) == 0
    assert writer.apply("run-a", 5, NOW, [update], part=3) == 1
    assert _state(redis_client, 7).counts == {_cart(11): 6}


def test_a_new_run_applies_from_batch_zero_again(writer, redis_client):
    key = keys.REALTIME_USER.key(7)
    writer.apply("run-a", 9, NOW, [StateUpdate(key, counts=[(_cart(11), 1)])])
    assert writer.apply("run-b", 0, NOW, [StateUpdate(key, counts=[(_cart(11), 1)])]) == 1
    assert _state(redis_client, 7).counts == {_cart(11): 2}


def test_buckets_older_than_the_longest_window_are_pruned(writer, redis_client):
    key = keys.REALTIME_USER.key(3)
    stale = _cart(11, HOUR - events.KEPT_BUCKETS)
    oldest_kept = _cart(11, HOUR - events.KEPT_BUCKETS + 1)
    writer.apply("r", 0, NOW, [StateUpdate(key, counts=[(stale, 4), (oldest_kept, 1)])])
    assert _state(redis_client, 3).counts == {oldest_kept: 1}


def test_counts_match_a_prune_of_every_field_at_every_write_whatever_the_clock(
    writer, redis_client
):
    """A write within the hour of the last prune checks only its new fields' hours; the
    result must be what pruning every field at every write gives, also when a batch's
    clock runs behind an earlier one's and when a value predates the watermark."""
    rng = np.random.default_rng(5)
    key = keys.REALTIME_USER.key(12)
    # A value written before the watermark existed, with a stale field to drop.
    redis_client.set(key, json.dumps({"run": "r", "batch": 0, "counts": {_cart(1, 0): 3}}))
    expected: dict[str, int] = {_cart(1, 0): 3}
    for batch in range(1, 120):
        now = NOW + int(rng.integers(-3, 8)) * 3600 + batch * 600
        hour = events.bucket_of(now)
        oldest = hour - events.KEPT_BUCKETS + 1
        counts = [
            (
                _cart(
                    int(rng.integers(0, 4)), hour - int(rng.integers(-1, events.KEPT_BUCKETS + 3))
                ),
                1,
            )
            for _ in range(int(rng.integers(0, 4)))
        ]
        writer.apply("r", batch, now, [StateUpdate(key, counts=counts)])
        for field, increment in counts:
            expected[field] = expected.get(field, 0) + increment
        expected = {f: v for f, v in expected.items() if int(f.rsplit(":", 1)[1]) >= oldest}
        state = _state(redis_client, 12)
        assert dict(state.counts if state else {}) == expected, f"batch {batch}"


def test_window_counts_follow_the_clock_hour_definition(writer, redis_client):
    key = keys.REALTIME_USER.key(3)
    counts = [(_cart(11, HOUR), 1), (_cart(11, HOUR - 1), 2), (_cart(11, HOUR - 30), 4)]
    writer.apply("r", 0, NOW, [StateUpdate(key, counts=counts)])
    windows = _state(redis_client, 3).window_counts(NOW)
    assert [window.name for window in events.WINDOWS] == ["1h", "1d", "3d"]
    assert windows[(Kind.CART, Scope.CATEGORY, 11)] == (1, 3, 7)
    # An hour later the current bucket has moved on.
    assert _state(redis_client, 3).window_counts(NOW + 3600)[(Kind.CART, Scope.CATEGORY, 11)] == (
        0,
        3,
        7,
    )


def test_window_counts_skip_names_that_are_not_count_fields_and_keep_the_wanted_pairs():
    brand_pv = events.count_field(Kind.PAGE_VIEW, Scope.BRAND, 4, HOUR)
    fields = [
        (_cart(11), 2),
        (brand_pv, 3),
        (f"pv:c12:{HOUR + 1}", 5),  # a bucket after now
        ("pv:c12", 1),
        ("nope:c12:1", 1),
        (f"pv:z12:{HOUR}", 1),
        (f"pv:c:{HOUR}", 1),
        (f"pv:cx:{HOUR}", 1),
        (f"pv:c12:{HOUR}:1", 1),
        ("interest", 1),
    ]
    assert events.window_counts(fields, NOW) == {
        (Kind.CART, Scope.CATEGORY, 11): (2, 2, 2),
        (Kind.PAGE_VIEW, Scope.BRAND, 4): (3, 3, 3),
    }
    wanted = ((Kind.PAGE_VIEW, Scope.BRAND),)
    assert events.window_counts(fields, NOW, wanted) == {
        (Kind.PAGE_VIEW, Scope.BRAND, 4): (3, 3, 3)
    }


def test_interest_combines_decayed_scores_and_fades_out(writer, redis_client):
    key = keys.REALTIME_USER.key(5)
    writer.apply("r", 0, NOW, [StateUpdate(key, interest=[InterestUpdate(21, 1.0, NOW)])])
    later = NOW + int(HALF_LIFE)
    writer.apply("r", 1, later, [StateUpdate(key, interest=[InterestUpdate(21, 1.0, later)])])
    state = _state(redis_client, 5)
    score, since = state.interest[21]
    assert since == later
    assert score == pytest.approx(1.5)
    assert state.interest_ranking(later + int(HALF_LIFE), HALF_LIFE) == [(21, pytest.approx(0.75))]
    # Faded below the floor: no longer ranked, and dropped by the next update.
    far = later + int(10 * HALF_LIFE)
    assert state.interest_ranking(far, HALF_LIFE) == []
    writer.apply("r", 2, far, [StateUpdate(key, counts=[(_cart(1, events.bucket_of(far)), 1)])])
    assert _state(redis_client, 5).interest == {}


def test_interest_keeps_the_strongest_categories_only(redis_client):
    writer = StateWriter(
        redis_client, StateSettings(half_life_seconds=HALF_LIFE, max_interest_categories=2)
    )
    key = keys.REALTIME_USER.key(5)
    updates = [InterestUpdate(cate, float(cate), NOW) for cate in (1, 2, 3)]
    writer.apply("r", 0, NOW, [StateUpdate(key, interest=updates)])
    assert set(_state(redis_client, 5).interest) == {2, 3}


def test_state_expires_after_the_longest_window(writer, redis_client):
    key = keys.REALTIME_USER.key(8)
    writer.apply("r", 0, NOW, [StateUpdate(key, counts=[(_cart(1), 1)])])
    ttl = redis_client.ttl(key)
    assert (events.KEPT_BUCKETS) * 3600 < ttl <= (events.KEPT_BUCKETS + 1) * 3600


def test_many_updates_go_through_round_trips_of_the_set_size(redis_client):
    round_trips = []
    pipeline = redis_client.pipeline

    def counted_pipeline(**options):
        real = pipeline(**options)
        execute = real.execute

        def counted_execute():
            round_trips.append(len(real.command_stack))
            return execute()

        real.execute = counted_execute
        return real

    redis_client.pipeline = counted_pipeline
    writer = StateWriter(
        redis_client, StateSettings(half_life_seconds=HALF_LIFE), writes_per_round_trip=7
    )
    updates = [StateUpdate(keys.REALTIME_USER.key(u), counts=[(_cart(1), u)]) for u in range(1, 51)]
    assert writer.apply("r", 0, NOW, updates) == 50
    assert round_trips == [7] * 7 + [1]
    assert _state(redis_client, 50).counts == {_cart(1): 50}
    assert _state(redis_client, 1).counts == {_cart(1): 1}


def test_a_value_that_is_not_state_is_refused():
    with pytest.raises(CodecError, match="real-time state"):
        decode_state(b"not json")
    with pytest.raises(CodecError, match="real-time state"):
        decode_state(json.dumps({"counts": {}}).encode())
    for counts in ({"cart:c11:415000": "2"}, {"cart:c11:415000": 1.5}, ["cart:c11:415000"]):
        with pytest.raises(CodecError, match="counts must map fields to integers"):
            decode_state(json.dumps({"batch": 1, "counts": counts}).encode())


def test_value_bytes_are_pinned():
    raw = b'{"run":"r","batch":3,"counts":{"cart:c11:415000":2},"interest":{"21":[1.5,1494000000]}}'
    state = decode_state(raw)
    assert state.counts == {"cart:c11:415000": 2}
    assert state.interest == {21: (1.5, 1494000000)}
    assert (state.run, state.batch) == ("r", 3)
