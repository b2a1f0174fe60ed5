"""The fault benchmark's classification of what each request got: answered, degraded (by
reason), errors (by code), lost and late, and which of them miss a case's targets."""

from __future__ import annotations

import importlib.util
import math
import sys
from collections import Counter
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_faults.py"


@pytest.fixture(scope="module")
def bench():
    # By path: the benchmarks are scripts, not a package.
    spec = importlib.util.spec_from_file_location("bench_faults", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_faults"] = module
    spec.loader.exec_module(module)
    return module


def ranked(bench, latency=0.004, **fields):
    return bench.Outcome("", "OK", latency, "REALTIME_RANKED", (), 10, "v1", **fields)


def test_each_request_is_counted_once_by_how_it_ended(bench):
    outcomes = [
        ranked(bench),
        ranked(bench, latency=0.499),
        bench.Outcome("", "OK", 0.01, "OFFLINE_RANKED", ("RANKING_UNAVAILABLE",), 10, "v1"),
        bench.Outcome(
            "", "OK", 0.02, "POPULAR", ("RECALL_UNAVAILABLE", "NO_OFFLINE_LIST"), 10, "v1"
        ),
        bench.Outcome("", "DEADLINE_EXCEEDED", 0.5),
        bench.Outcome("", "UNAVAILABLE", 0.001),
        bench.Outcome("", "UNAVAILABLE", 0.001),
        bench.Outcome("", "LOST", math.nan),
        # OK, but after the caller's deadline by the client's own clock.
        ranked(bench, latency=0.502),
    ]
    counts = bench.count(outcomes, deadline_s=0.5)
    assert (counts.sent, counts.answered, counts.lost, counts.late) == (9, 5, 1, 1)
    assert counts.degraded == 2
    assert counts.reasons == Counter(
        {"RANKING_UNAVAILABLE": 1, "RECALL_UNAVAILABLE": 1, "NO_OFFLINE_LIST": 1}
    )
    assert counts.errors == Counter({"UNAVAILABLE": 2, "DEADLINE_EXCEEDED": 1})
    assert counts.paths == Counter({"REALTIME_RANKED": 3, "OFFLINE_RANKED": 1, "POPULAR": 1})
    assert counts.percentile_ms(100) == pytest.approx(502)
    assert bench.by_name(counts.errors) == "unavailable 2, deadline_exceeded 1"


def test_an_answer_off_the_realtime_path_without_a_reason_is_degraded_all_the_same(bench):
    silent = bench.Outcome("", "OK", 0.01, "POPULAR", (), 0, "v1")
    counts = bench.count([silent], deadline_s=0.5)
    assert counts.degraded == 1 and counts.empty == 1
    assert counts.reasons == Counter({bench.NO_REASON_GIVEN: 1})
    assert bench.misses(counts, bench.Expectation()) == ["1 empty answers"]


def test_lost_and_late_requests_miss_every_target(bench):
    counts = bench.count(
        [bench.Outcome("", "LOST", math.nan), ranked(bench, latency=0.7)], deadline_s=0.5
    )
    for expected in (
        bench.Expectation(),
        bench.Expectation(allowed_errors=frozenset({"UNAVAILABLE"}), fallback=False),
    ):
        assert bench.misses(counts, expected) == ["1 lost", "1 answered after the deadline"]


def test_errors_miss_unless_the_case_expects_their_code(bench):
    counts = bench.count(
        [ranked(bench), bench.Outcome("", "RESOURCE_EXHAUSTED", 0.001)], deadline_s=0.5
    )
    assert bench.misses(counts, bench.Expectation()) == ["errors resource_exhausted 1"]
    shedding = bench.Expectation(allowed_errors=frozenset({"RESOURCE_EXHAUSTED"}))
    assert bench.misses(counts, shedding) == []


def test_bad_requests_must_all_get_the_one_code(bench):
    expected = bench.Expectation(only_code="INVALID_ARGUMENT")
    refused = [bench.Outcome("bad", "INVALID_ARGUMENT", 0.001)] * 3
    assert bench.misses(bench.count(refused, 0.5), expected) == []
    answered = [*refused, ranked(bench), bench.Outcome("bad", "RESOURCE_EXHAUSTED", 0.001)]
    assert bench.misses(bench.count(answered, 0.5), expected) == ["2 not INVALID_ARGUMENT"]


def test_users_a_fault_leaves_alone_must_stay_ranked_and_keep_their_recall_lists(bench):
    degraded = bench.Outcome("", "OK", 0.01, "OFFLINE_RANKED", ("RECALL_UNAVAILABLE",), 10)
    # A busy machine's own noise, which the baseline shows without any fault.
    late_ranking = bench.Outcome(
        "", "OK", 0.09, "OFFLINE_RANKED", ("RANKING_DEADLINE_EXCEEDED",), 10
    )
    lost_list = bench.Outcome("", "OK", 0.01, "POPULAR", ("NO_RECALL_SET",), 10)
    untouched = bench.Expectation(untouched=True)
    answers = bench.count([ranked(bench), degraded, late_ranking], 0.5)
    assert bench.misses(answers, bench.Expectation()) == []
    assert bench.misses(answers, untouched) == ["degraded (recall_unavailable 1)"]
    assert bench.misses(bench.count([ranked(bench), late_ranking], 0.5), untouched) == []
    assert bench.misses(bench.count([lost_list], 0.5), bench.Expectation()) == [
        "1 answers without the user's recall list"
    ]
    assert bench.misses(bench.count([lost_list], 0.5), bench.Expectation(recall_sets=False)) == []
