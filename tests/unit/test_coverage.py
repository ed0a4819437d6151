"""Work no running server takes is found, and only that work.

`check_coverage` is driven against a MemoryStore here; the store operations
it relies on are in the store contract, run against every store.
"""

from __future__ import annotations

import math
from concurrent.futures import Future
from datetime import datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.store_contract import T0, make_doc
from tullius.band import ALL, Band, format_priority
from tullius.clock import SystemClock
from tullius.coverage import (
    LIVE_CHECKS,
    SHOWN_PRIORITIES,
    Coverage,
    check_coverage,
    uncovered_ranges,
)
from tullius.document import Status, stored_time
from tullius.engine import drive
from tullius.runtime.coverage_check import REPEAT_AFTER, CoverageCheck
from tullius.sim.memory_store import MemoryStore
from tullius.store import ServerSeen

NOW = T0 + timedelta(hours=1)
EVERY = timedelta(seconds=30)
LIVE = LIVE_CHECKS * EVERY
BANDS = (Band(10, 0, 10), Band(5, 0, 0))


def check(
    store: MemoryStore, *, now: datetime = NOW, forget_after: timedelta = timedelta(days=1)
) -> Coverage:
    """Server "a", with `BANDS`, checks at ``now``."""
    me = ServerSeen("a", BANDS, now, every=EVERY, instance="i-a")
    return drive(store, check_coverage(me, forget_after=forget_after))


def counts(coverage: Coverage) -> dict[float, int]:
    return coverage.waiting


def peer(
    store: MemoryStore,
    name: str,
    band: Band,
    age: timedelta,
    *,
    stopped: bool = False,
    instance: str = "",
) -> None:
    store.announce_server(ServerSeen(name, (band,), NOW - age, stopped, EVERY, instance))


def test_the_gaps_between_bands_start_and_end_just_past_each_band() -> None:
    assert uncovered_ranges([Band(1, 20, 30), Band(1, 0, 10)]) == [
        (-math.inf, math.nextafter(0, -math.inf)),
        (math.nextafter(10, math.inf), math.nextafter(20, -math.inf)),
        (math.nextafter(30, math.inf), math.inf),
    ]


def test_overlapping_and_touching_bands_leave_no_gap_between_them() -> None:
    assert uncovered_ranges([Band(1, 0, 10), Band(1, 5, 7), Band(1, 10, 12)]) == [
        (-math.inf, math.nextafter(0, -math.inf)),
        (math.nextafter(12, math.inf), math.inf),
    ]


def test_no_bands_leave_every_priority_uncovered() -> None:
    assert uncovered_ranges([]) == [(-math.inf, math.inf)]


small = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False) | st.integers(-20, 20)
huge = st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False, allow_infinity=False)


def bands_of(values: st.SearchStrategy[float]) -> st.SearchStrategy[list[Band]]:
    pairs = st.tuples(values, values).map(lambda pair: Band(1, min(pair), max(pair)))
    return st.lists(pairs, max_size=5)


@given(bands=bands_of(small), priority=small)
def test_a_priority_is_in_a_gap_exactly_when_no_band_covers_it(
    bands: list[Band], priority: float
) -> None:
    in_gap = any(low <= priority <= high for low, high in uncovered_ranges(bands))
    assert in_gap == (not any(band.covers(priority) for band in bands))


@given(bands=bands_of(huge | small), priority=huge | small)
def test_no_priority_outside_every_band_is_missed_however_large(
    bands: list[Band], priority: float
) -> None:
    # Beyond 2**53 a float can't hold every int: a gap may then take in a band's
    # own end (the check filters those out), but must never leave a priority out.
    if not any(band.covers(priority) for band in bands):
        assert any(low <= priority <= high for low, high in uncovered_ranges(bands))


def test_the_default_band_of_every_priority_leaves_no_gap_even_past_64_bits() -> None:
    assert uncovered_ranges([Band(4, *ALL)]) == []
    assert str(Band(4, *ALL)) == "4:all"


@pytest.mark.parametrize(
    ("priority", "shown"),
    [
        (10, "10"),
        (10.0, "10"),
        (0.5, "0.5"),
        (10.0000001, "10.0000001"),
        (1234567, "1234567"),
        (2**60 + 1, "1152921504606846977"),
        (-3, "-3"),
    ],
)
def test_a_priority_is_shown_exactly_as_it_is(priority: float, shown: str) -> None:
    assert format_priority(priority) == shown


def test_a_due_task_outside_every_band_is_reported_with_the_bands_that_miss_it() -> None:
    store = MemoryStore()
    store.insert_tasks([make_doc("high", priority=50), make_doc("fine", priority=3)])
    coverage = check(store)
    assert counts(coverage) == {50: 1}
    assert [doc.task_id for doc in coverage.examples] == ["high"]
    message = coverage.describe(NOW)
    assert "1 task(s) wait for a priority no running tulliusd takes" in message
    assert "priority 50: 1, oldest due 60 min ago (e.g. Nothing high)" in message
    assert "a 10:0-10 5:0-0" in message


def test_a_failure_whose_failed_hook_no_band_takes_is_reported_too() -> None:
    store = MemoryStore()
    store.insert_tasks([make_doc("low", priority=-1)])
    store.set_status("low", Status.FAILED, T0)
    assert counts(check(store)) == {-1: 1}


def test_a_task_another_running_server_takes_is_not_reported() -> None:
    store = MemoryStore()
    store.insert_tasks([make_doc("high", priority=50)])
    peer(store, "b", Band(1, 40, 60), LIVE)
    coverage = check(store)
    assert counts(coverage) == {}
    assert [seen.server for seen in coverage.live] == ["a", "b"]


def test_a_server_not_seen_for_longer_than_its_live_window_takes_nothing() -> None:
    store = MemoryStore()
    store.insert_tasks([make_doc("high", priority=50)])
    peer(store, "b", Band(1, 40, 60), LIVE + timedelta(seconds=1))
    coverage = check(store)
    assert counts(coverage) == {50: 1}
    assert [seen.server for seen in coverage.live] == ["a"]
    assert [seen.server for seen in store.read_servers()] == ["a", "b"]  # kept for a day


def test_each_server_is_judged_by_its_own_renewal_period() -> None:
    # Given a peer with a ten-minute lease, last seen 30 minutes ago (three of its periods)
    store = MemoryStore()
    store.insert_tasks([make_doc("high", priority=50)])
    store.announce_server(
        ServerSeen(
            "slow", (Band(1, 40, 60),), NOW - timedelta(minutes=30), every=timedelta(minutes=10)
        )
    )
    # Then it still counts as running
    assert counts(check(store)) == {}


def test_a_server_that_said_it_stopped_takes_nothing_however_recent() -> None:
    store = MemoryStore()
    store.insert_tasks([make_doc("high", priority=50)])
    peer(store, "b", Band(1, 40, 60), timedelta(0), stopped=True)
    assert counts(check(store)) == {50: 1}


def test_a_server_not_seen_for_a_day_is_forgotten() -> None:
    store = MemoryStore()
    store.announce_server(ServerSeen("gone", (Band(1, 0, 10),), T0))
    check(store, now=T0 + timedelta(days=2), forget_after=timedelta(days=1))
    assert [seen.server for seen in store.read_servers()] == ["a"]


def test_a_task_not_due_yet_is_not_reported() -> None:
    store = MemoryStore()
    store.insert_tasks([make_doc("later", priority=50, start_after=T0 + timedelta(days=1))])
    assert counts(check(store)) == {}


def test_the_checking_server_renews_its_own_entry_and_sees_what_was_there_before() -> None:
    store = MemoryStore()
    peer(store, "a", Band(1, 0, 0), timedelta(minutes=1), instance="someone else")
    coverage = check(store)
    assert coverage.previous is not None
    assert coverage.previous.instance == "someone else"
    stored = ServerSeen("a", BANDS, stored_time(NOW), every=EVERY, instance="i-a")
    assert store.read_servers() == [stored]


def test_the_oldest_due_time_is_the_earliest_of_any_status_not_of_the_examples() -> None:
    # Given three failures due an hour ago, and a queued task due a week ago, at 50
    store = MemoryStore()
    store.insert_tasks([make_doc(f"f{n}", priority=50) for n in range(3)])
    for n in range(3):
        store.set_status(f"f{n}", Status.FAILED, NOW - timedelta(hours=1))
    store.insert_tasks([make_doc("q", priority=50, start_after=NOW - timedelta(days=7))])
    # Then the examples are the failures (the most urgent), and the oldest is the week
    coverage = check(store)
    assert [doc.task_id for doc in coverage.examples] == ["f0", "f1", "f2"]
    assert coverage.by_priority(NOW)[0].startswith("priority 50: 4, oldest due 7 days ago")


def test_every_waiting_priority_is_counted_and_the_most_urgent_are_spelt_out() -> None:
    # Given 30 tasks at 70, 14 at 80, and one at each of twelve more priorities
    store = MemoryStore()
    store.insert_tasks([make_doc(f"s{n:02}", priority=70) for n in range(30)])
    store.insert_tasks([make_doc(f"e{n:02}", priority=80) for n in range(14)])
    store.insert_tasks([make_doc(f"x{n:02}", priority=100 + n) for n in range(12)])
    coverage = check(store)
    # Then all are counted, by priority, and the first priorities have three examples each
    assert coverage.total == 56
    assert list(coverage.waiting)[:3] == [70, 80, 100]
    assert [doc.task_id for doc in coverage.examples[:4]] == ["s00", "s01", "s02", "e00"]
    phrases = coverage.by_priority(NOW)
    assert (
        phrases[0]
        == "priority 70: 30, oldest due 60 min ago (e.g. Nothing s00, Nothing s01, Nothing s02)"
    )
    assert phrases[1].startswith("priority 80: 14, ")
    assert len(phrases) == SHOWN_PRIORITIES + 1
    assert phrases[-1] == "and 4 more at 4 other priorities"


def test_a_priority_past_a_float_ends_precision_is_still_found_and_a_covered_one_is_not() -> None:
    # Given a band ending at 2**60 (which a float holds) and tasks just past and at it
    store = MemoryStore()
    store.insert_tasks(
        [make_doc("at-end", priority=2**60), make_doc("past-end", priority=2**60 + 1)]
    )
    me = ServerSeen("a", (Band(1, 0, 2**60),), NOW)
    # Then only the one no band covers is reported
    assert counts(drive(store, check_coverage(me))) == {2**60 + 1: 1}


class Watch:
    """A daemon's `CoverageCheck` on a MemoryStore, checked at chosen loop times."""

    def __init__(self, store: MemoryStore, caplog: pytest.LogCaptureFixture) -> None:
        self.check = CoverageCheck(store, server="a", bands=BANDS, every=EVERY, clock=SystemClock())
        self.caplog = caplog

    def at(self, now: float) -> list[str]:
        """Run one check at loop time ``now``; return the warnings it logged."""
        future: Future[Coverage] = Future()
        future.set_result(self.check.work()())
        with self.caplog.at_level("WARNING", logger="tullius.daemon"):
            self.caplog.clear()
            assert self.check.finished(future, now) is None
        return [record.getMessage() for record in self.caplog.records]


def test_waiting_work_is_logged_once_two_checks_agree_again_every_ten_minutes_and_when_it_clears(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = MemoryStore()
    watch = Watch(store, caplog)
    logged = [len(watch.at(0))]  # nothing waits: quiet
    store.insert_tasks([make_doc("high", priority=50)])
    logged.append(len(watch.at(30)))  # it waits: not yet (a peer's entry may be missing at a start)
    logged.append(len(watch.at(60)))  # a second check agrees: a warning
    store.insert_tasks([make_doc("high-2", priority=50)])
    logged.append(len(watch.at(90)))  # more at the same priority: quiet
    logged.append(len(watch.at(60 + REPEAT_AFTER)))  # ten minutes on: again
    store.insert_tasks([make_doc("low", priority=-1)])
    logged.append(len(watch.at(90 + REPEAT_AFTER)))  # a new priority, seen once: quiet
    logged.append(len(watch.at(120 + REPEAT_AFTER)))  # and twice: a warning
    store.set_status("low", Status.RUNNING, None)
    logged.append(len(watch.at(150 + REPEAT_AFTER)))  # fewer wait: quiet
    for task_id in ("high", "high-2"):
        store.set_status(task_id, Status.RUNNING, None)
    cleared = watch.at(180 + REPEAT_AFTER)  # nothing waits any more: one line saying so
    logged += [len(cleared), len(watch.at(210 + REPEAT_AFTER))]
    assert logged == [0, 0, 1, 0, 1, 0, 1, 0, 1, 0]
    assert cleared == ["no task waits for a priority no running tulliusd takes any more"]
    assert watch.check.next_at == 210 + REPEAT_AFTER + 30


def test_the_all_clear_comes_even_when_the_warned_priority_gave_way_to_an_unconfirmed_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = MemoryStore()
    watch = Watch(store, caplog)
    store.insert_tasks([make_doc("p50", priority=50)])
    assert watch.at(0) == []
    assert len(watch.at(30)) == 1  # 50 waits, twice: a warning
    store.set_status("p50", Status.RUNNING, None)
    store.insert_tasks([make_doc("p70", priority=70)])
    assert watch.at(60) == []  # 70 waits, once: quiet
    store.set_status("p70", Status.RUNNING, None)
    assert watch.at(90) == ["no task waits for a priority no running tulliusd takes any more"]


def test_another_daemon_renewing_our_entry_is_reported_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Given a daemon that has checked once, and a second one given the same name
    store = MemoryStore()
    watch = Watch(store, caplog)
    assert watch.at(0) == []
    clash = ServerSeen("a", (Band(1, 20, 30),), NOW, instance="the other one")
    # When the other one renews the entry between our checks, twice
    store.announce_server(clash)
    first = watch.at(30)
    store.announce_server(clash)
    second = watch.at(60)
    # Then we say so once, naming the name and the other's bands
    assert len(first) == 1
    assert "another tulliusd uses the server name 'a' (its bands: 1:20-30)" in first[0]
    assert second == []


def test_a_daemon_restarted_under_its_name_is_not_taken_for_a_clash(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = MemoryStore()
    store.announce_server(ServerSeen("a", BANDS, NOW, instance="before the restart"))
    watch = Watch(store, caplog)
    assert watch.at(0) == []
    assert watch.at(30) == []


def test_the_oldest_due_time_counts_queued_work_shown_among_the_examples() -> None:
    # Given one failure due an hour ago and queued work due two and seven days ago
    store = MemoryStore()
    store.insert_tasks(
        [
            make_doc("f", priority=50),
            make_doc("q2", priority=50, start_after=NOW - timedelta(days=2)),
            make_doc("q7", priority=50, start_after=NOW - timedelta(days=7)),
        ]
    )
    store.set_status("f", Status.FAILED, NOW - timedelta(hours=1))
    # Then the oldest is the week, read from the examples themselves
    coverage = check(store)
    assert [doc.task_id for doc in coverage.examples] == ["f", "q7", "q2"]
    assert coverage.by_priority(NOW)[0].startswith("priority 50: 3, oldest due 7 days ago")
