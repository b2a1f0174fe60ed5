"""The ad states, their change log and counter, and frequency-cap counting
(adrec/core/adstate.py), on real redis-servers of every mode."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from redis_fixtures import RedisTarget
from service_data import run

from adrec.core import adstate, events, keys, realtime
from adrec.core.adstate import (
    AdHierarchy,
    AdStates,
    AdStateStore,
    Cap,
    Level,
    ServedAds,
    Status,
    capped_members,
    parse_caps,
    tightest,
)
from adrec.core.codecs import CodecError
from adrec.core.events import Kind, Scope, count_field
from adrec.core.redis_conn import connect_async
from services.runtime.data import RedisOp, RedisReader, client_without_socket_timeouts
from services.runtime.metrics import Metrics

NOW = 1_717_171_717


def test_a_state_pauses_inside_its_window_or_outside_an_active_one():
    paused = adstate.AdState(Level.CAMPAIGN, 5, Status.PAUSED, "r", 0, 1, start=NOW, end=NOW + 60)
    assert [paused.paused_at(t) for t in (NOW - 1, NOW, NOW + 59, NOW + 60)] == [
        False,
        True,
        True,
        False,
    ]
    flight = adstate.AdState(Level.ADGROUP, 7, Status.ACTIVE, "r", 0, 2, start=NOW, end=NOW + 60)
    assert [flight.paused_at(t) for t in (NOW - 1, NOW, NOW + 60)] == [True, False, True]
    forever = adstate.AdState(Level.CUSTOMER, 9, Status.PAUSED, "r", 0, 3)
    assert forever.paused_at(0) and forever.paused_at(NOW * 2)


def test_states_round_trip_and_know_their_next_boundary():
    states = (
        AdStates.empty()
        .with_state(Level.CAMPAIGN, 5, Status.PAUSED, "budget", None, None, 1000)
        .with_state(Level.ADGROUP, 7, Status.PAUSED, "review", NOW + 10, NOW + 20, 2000)
        .with_state(Level.CAMPAIGN, 5, Status.ACTIVE, "topped up", None, None, 3000)
    )
    assert states.seq == 3
    assert states.last is not None and states.last.previous_status is Status.PAUSED
    decoded = AdStates.decode(states.encode())
    assert decoded.seq == 3 and decoded.states == states.states and decoded.last == states.last
    assert {level: ids.tolist() for level, ids in decoded.paused_ids(NOW).items()} == {
        Level.ADGROUP: [],
        Level.CAMPAIGN: [],
        Level.CUSTOMER: [],
    }
    assert decoded.paused_ids(NOW + 15)[Level.ADGROUP].tolist() == [7]
    assert decoded.next_boundary(NOW) == NOW + 10
    assert decoded.next_boundary(NOW + 10) == NOW + 20
    assert decoded.next_boundary(NOW + 20) is None
    with pytest.raises(CodecError):
        AdStates.decode(b'{"format": 2, "seq": 1, "states": []}')
    with pytest.raises(CodecError):
        AdStates.decode(b"not json")


def test_reasons_and_windows_are_checked():
    assert adstate.check_reason("budget spent") is None
    assert "required" in adstate.check_reason("  ")
    assert "at most 200" in adstate.check_reason("x" * 201)
    assert "control" in adstate.check_reason("a\nb")
    assert adstate.check_window(None, None, NOW) == []
    assert adstate.check_window(NOW + 5, NOW + 1, NOW) == [
        ("end_time", f"{NOW + 1} is not after start_time {NOW + 5}")
    ]
    assert [field for field, _ in adstate.check_window(None, NOW - 1, NOW)] == ["end_time"]
    assert [field for field, _ in adstate.check_window(-3, None, NOW)] == ["start_time"]


def test_the_hierarchy_knows_ids_and_parents():
    hierarchy = AdHierarchy.from_table(
        {
            "adgroup_id": np.array([30, 10, 20], np.int32),
            "campaign_id": np.array([2, 1, 1], np.int32),
            "customer_id": np.array([8, 9, 9], np.int32),
        }
    )
    assert hierarchy.knows(Level.ADGROUP, 20) and not hierarchy.knows(Level.ADGROUP, 21)
    assert hierarchy.knows(Level.CAMPAIGN, 2) and not hierarchy.knows(Level.CAMPAIGN, 3)
    assert hierarchy.knows(Level.CUSTOMER, 8) and not hierarchy.knows(Level.CUSTOMER, 10)
    assert hierarchy.parents(Level.ADGROUP, 30) == [(Level.CAMPAIGN, 2), (Level.CUSTOMER, 8)]
    assert hierarchy.parents(Level.CAMPAIGN, 1) == [(Level.CUSTOMER, 9)]
    assert hierarchy.parents(Level.ADGROUP, 31) == []
    with pytest.raises(CodecError, match="customer_id"):
        AdHierarchy.from_table({"adgroup_id": np.array([1]), "campaign_id": np.array([1])})


def test_caps_parse_and_tighten():
    caps = parse_caps("ad:3/24h, campaign:10/24h,customer:20/72h")
    assert caps == tuple(
        sorted(
            (
                Cap(Scope.AD, 24, 3),
                Cap(Scope.CAMPAIGN, 24, 10),
                Cap(Scope.CUSTOMER, 72, 20),
            )
        )
    )
    assert [str(cap) for cap in parse_caps("ad:3/24h")] == ["ad:3/24h"]
    assert parse_caps("") == ()
    for bad, problem in (
        ("ad:3", "not a cap"),
        ("brand:3/24h", "not a cap"),
        ("ad:0/24h", "at least 1"),
        ("ad:3/73h", "1..72"),
        ("ad:3/24h,ad:2/24h", "same scope and window"),
    ):
        with pytest.raises(ValueError, match=problem):
            parse_caps(bad)
    assert tightest([Cap(Scope.AD, 24, 3), Cap(Scope.AD, 24, 1), Cap(Scope.AD, 1, 5)]) == (
        Cap(Scope.AD, 1, 5),
        Cap(Scope.AD, 24, 1),
    )


def test_capped_members_count_impressions_in_the_window_plus_what_was_served():
    bucket = events.bucket_of(NOW)
    counts = {
        count_field(Kind.IMPRESSION, Scope.AD, 11, bucket): 2,
        count_field(Kind.IMPRESSION, Scope.AD, 12, bucket - 30): 5,
        count_field(Kind.IMPRESSION, Scope.CAMPAIGN, 4, bucket - 1): 3,
        count_field(Kind.CLICK, Scope.AD, 13, bucket): 9,
        count_field(Kind.IMPRESSION, Scope.CATEGORY, 6513, bucket): 9,
        count_field(Kind.IMPRESSION, Scope.AD, 14, bucket + 1): 9,
    }
    # The value as the stream job's script stores it.
    raw = json.dumps(
        {"run": "r", "batch": 3, "counts": counts, "interest": {"6513": [1.5, NOW]}},
        separators=(",", ":"),
    ).encode()
    assert realtime.decode_state(raw).counts == counts
    caps = (Cap(Scope.AD, 24, 2), Cap(Scope.CAMPAIGN, 24, 4), Cap(Scope.CUSTOMER, 1, 1))
    served = {Scope.CAMPAIGN: np.array([4]), Scope.CUSTOMER: np.array([8])}
    found = capped_members(caps, raw, served, NOW)
    # Ad 12's impressions are 30 hours old: outside the 24-hour window. Clicks, categories
    # and a bucket ahead of the clock don't count.
    assert {scope: ids.tolist() for scope, ids in found.items()} == {
        Scope.AD: [11],
        Scope.CAMPAIGN: [4],
        Scope.CUSTOMER: [8],
    }
    within_72h = capped_members((Cap(Scope.AD, 72, 5),), raw, {}, NOW)
    assert within_72h[Scope.AD].tolist() == [12]
    # The campaign's impressions are of the hour before: outside a 1-hour window.
    assert capped_members((Cap(Scope.CAMPAIGN, 1, 1),), raw, {}, NOW) == {}
    within_2h = capped_members((Cap(Scope.CAMPAIGN, 2, 3),), raw, {}, NOW)
    assert within_2h[Scope.CAMPAIGN].tolist() == [4]
    # Two windows of one scope: each counts its own hours, and either one caps.
    two = (Cap(Scope.AD, 1, 2), Cap(Scope.AD, 48, 7))
    assert capped_members(two, raw, {Scope.AD: np.array([12, 12])}, NOW)[Scope.AD].tolist() == [
        11,
        12,
    ]
    # One id in two scopes of one window is two members: ad 4's one impression does not
    # add to campaign 4's three.
    apart = (Cap(Scope.AD, 24, 1), Cap(Scope.CAMPAIGN, 24, 4))
    found = capped_members(apart, raw, {Scope.AD: np.array([4])}, NOW)
    assert {scope: ids.tolist() for scope, ids in found.items()} == {Scope.AD: [4, 11]}
    assert capped_members(caps, None, {}, NOW) == {}
    served_twice = {Scope.AD: np.array([5, 6, 5])}
    assert capped_members(caps, b"", served_twice, NOW)[Scope.AD].tolist() == [5]


def test_apply_records_every_change_in_order_and_raises_the_counter(redis_target: RedisTarget):
    async def scenario():
        client = connect_async(redis_target.settings)
        try:
            store = AdStateStore(client)
            assert (await store.read()).seq == 0 and await adstate.read_counter(client) == 0
            first = await store.apply(Level.CAMPAIGN, 5, Status.PAUSED, "budget spent")
            second = await store.apply(
                Level.ADGROUP, 7, Status.PAUSED, "review", NOW + 10, NOW + 20
            )
            third = await store.apply(Level.CAMPAIGN, 5, Status.ACTIVE, "topped up")
            assert [c.change_id for c in (first, second, third)] == [1, 2, 3]
            assert third.previous_status is Status.PAUSED and first.previous_status is None
            assert await adstate.read_counter(client) == 3
            states = await store.read()
            assert states.get(Level.CAMPAIGN, 5).status is Status.ACTIVE
            assert states.get(Level.ADGROUP, 7).start == NOW + 10
            history = await store.history(10)
            assert [c.change_id for c in history] == [3, 2, 1]
            assert history[2].state.reason == "budget spent"
            assert [c.change_id for c in await store.history(1)] == [3]
            of_campaign = await store.history(10, (Level.CAMPAIGN, 5))
            assert [c.change_id for c in of_campaign] == [3, 1]
            assert await store.history(10, (Level.CUSTOMER, 5)) == []
        finally:
            await client.aclose()

    run(scenario)


def test_concurrent_changes_all_land_once_each(redis_target: RedisTarget):
    async def scenario():
        client = connect_async(redis_target.settings)
        try:
            store = AdStateStore(client)
            # Connected first, as a service's client is by its first health check: a
            # cluster client's first commands must not race to learn the slots.
            assert (await store.read()).seq == 0
            changes = await asyncio.gather(
                *(store.apply(Level.ADGROUP, ad, Status.PAUSED, f"ad {ad}") for ad in range(1, 7))
            )
            assert sorted(c.change_id for c in changes) == list(range(1, 7))
            states = await store.read()
            assert states.seq == 6 and len(states.states) == 6
            assert [c.change_id for c in await store.history(10)] == [6, 5, 4, 3, 2, 1]
            assert await adstate.read_counter(client) == 6
        finally:
            await client.aclose()

    run(scenario)


def test_a_change_left_unlogged_is_completed_by_the_next(redis_target: RedisTarget):
    async def scenario():
        client = connect_async(redis_target.settings)
        try:
            store = AdStateStore(client)
            await store.apply(Level.CAMPAIGN, 5, Status.PAUSED, "first")
            # A change whose writer died after the state's compare-and-set: neither logged
            # nor counted.
            stranded = (await store.read()).with_state(
                Level.CUSTOMER, 9, Status.PAUSED, "stranded", None, None, 1
            )
            await client.set(keys.AD_STATE, stranded.encode())
            assert await adstate.read_counter(client) == 1
            await store.apply(Level.ADGROUP, 7, Status.PAUSED, "third")
            assert [c.state.reason for c in await store.history(10)] == [
                "third",
                "stranded",
                "first",
            ]
            assert await adstate.read_counter(client) == 3
        finally:
            await client.aclose()

    run(scenario)


def test_stores_taking_turns_each_build_on_the_others_changes(redis_target: RedisTarget):
    async def scenario():
        client = connect_async(redis_target.settings)
        try:
            first, second = AdStateStore(client), AdStateStore(client)
            await first.apply(Level.CAMPAIGN, 5, Status.PAUSED, "one")
            await first.apply(Level.CAMPAIGN, 6, Status.PAUSED, "two")
            await second.apply(Level.CAMPAIGN, 5, Status.ACTIVE, "three")
            # `first` holds the states it wrote last; Redis has moved on since.
            await first.apply(Level.CUSTOMER, 9, Status.PAUSED, "four")
            for store in (first, second, AdStateStore(client)):
                states = await store.read()
                assert states.seq == 4
                assert {key: state.reason for key, state in states.states.items()} == {
                    (Level.CAMPAIGN, 5): "three",
                    (Level.CAMPAIGN, 6): "two",
                    (Level.CUSTOMER, 9): "four",
                }
            assert [c.change_id for c in await second.history(10)] == [4, 3, 2, 1]
        finally:
            await client.aclose()

    run(scenario)


def test_served_ads_are_appended_per_slice_and_age_out_after_one_to_two_slices(
    redis_target: RedisTarget,
):
    async def scenario():
        client = connect_async(redis_target.settings)
        reader = RedisReader(
            client_without_socket_timeouts(redis_target.settings),
            Metrics().service("gateway"),
            5.0,
        )
        served = ServedAds(seconds=60)

        async def record(ad_ids: list[int], now: float) -> None:
            commands = served.record_commands(1001, served.slice_of(now), ad_ids)
            await reader.execute(commands, RedisOp.RECORD_SERVED, 5.0)

        async def read(now: float) -> list[int]:
            values = [await client.get(key) for key in served.read_keys(1001, now)]
            return sorted(served.decode(values).tolist())

        try:
            start = 60 * 1000
            await record([11, 12], start)
            await record([11, 70000], start + 30)
            # Each id little-endian in 4 bytes, one answer's after the other's.
            assert await client.get(keys.served_key(1001, 1000)) == (
                b"\x0b\x00\x00\x00\x0c\x00\x00\x00\x0b\x00\x00\x00\x70\x11\x01\x00"
            )
            assert await read(start + 30) == [11, 11, 12, 70000]
            assert await read(start + 119) == [11, 11, 12, 70000]
            assert await read(start + 120) == []
            ttl = await client.ttl(keys.served_key(1001, 1000))
            assert 60 < ttl <= 120
            await record([13], start + 70)
            assert await read(start + 130) == [13]
        finally:
            await reader.aclose()
            await reader.client.aclose()
            await client.aclose()

    run(scenario)


def test_a_damaged_served_value_is_a_codec_error():
    assert ServedAds.decode([None, b""]).tolist() == []
    with pytest.raises(CodecError, match="multiple of 4"):
        ServedAds.decode([b"\x01\x00\x00"])


def test_keys_stay_outside_every_version_and_hold_no_hash_tags():
    for key in (keys.AD_STATE, keys.AD_STATE_SEQ, keys.AD_STATE_HISTORY, keys.served_key(5, 9)):
        assert b"{" not in key and keys.key_slot(key) >= 0
        assert not key.startswith(b"adrec:v")
    with pytest.raises(ValueError):
        keys.served_key(0, 9)
    with pytest.raises(ValueError):
        keys.served_key(5, -1)
