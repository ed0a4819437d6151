"""Work no running server takes is found, and only that work.

`check_coverage` is driven against a MemoryStore here; the store operations
it relies on are in the store contract, run against every store.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.store_contract import make_doc
from tullius.band import Band
from tullius.coverage import EXAMPLES, Coverage, check_coverage, uncovered_ranges
from tullius.document import Status
from tullius.engine import drive
from tullius.sim.memory_store import MemoryStore
from tullius.store import ServerSeen

T0 = datetime(2026, 1, 1, 12, tzinfo=UTC)
LIVE = timedelta(minutes=2)
BANDS = (Band(10, 0, 10), Band(5, 0, 0))


def check(
    store: MemoryStore,
    *,
    now: datetime = T0 + timedelta(hours=1),
    forget_after: timedelta = timedelta(days=1),
) -> Coverage:
    """Server "a", with `BANDS`, checks at ``now``."""
    return drive(
        store, check_coverage("a", BANDS, now=now, live_within=LIVE, forget_after=forget_after)
    )


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


priorities = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False) | st.integers(-20, 20)


@given(
    bands=st.lists(
        st.tuples(priorities, priorities).map(lambda pair: Band(1, min(pair), max(pair))),
        max_size=5,
    ),
    priority=priorities,
)
def test_a_priority_is_in_a_gap_exactly_when_no_band_covers_it(
    bands: list[Band], priority: float
) -> None:
    in_gap = any(low <= priority <= high for low, high in uncovered_ranges(bands))
    assert in_gap == (not any(band.covers(priority) for band in bands))


def test_a_due_task_outside_every_band_is_reported_with_the_bands_that_miss_it() -> None:
    store = MemoryStore()
    store.insert_tasks([make_doc("high", priority=50), make_doc("fine", priority=3)])
    coverage = check(store)
    assert [doc.task_id for doc in coverage.stranded] == ["high"]
    message = coverage.describe()
    assert "priority 50: Nothing high" in message
    assert "a 10:0-10 5:0-0" in message


def test_a_failure_whose_failed_hook_no_band_takes_is_reported_too() -> None:
    store = MemoryStore()
    store.insert_tasks([make_doc("low", priority=-1)])
    store.set_status("low", Status.FAILED, T0)
    assert [doc.task_id for doc in check(store).stranded] == ["low"]


def test_a_task_another_running_server_takes_is_not_reported() -> None:
    store = MemoryStore()
    store.insert_tasks([make_doc("high", priority=50)])
    now = T0 + timedelta(hours=1)
    store.announce_server(ServerSeen("b", (Band(1, 40, 60),), now - LIVE))
    coverage = check(store, now=now)
    assert coverage.stranded == ()
    assert [seen.server for seen in coverage.live] == ["a", "b"]


def test_a_server_not_seen_for_longer_than_the_live_window_takes_nothing() -> None:
    store = MemoryStore()
    store.insert_tasks([make_doc("high", priority=50)])
    now = T0 + timedelta(hours=1)
    store.announce_server(ServerSeen("b", (Band(1, 40, 60),), now - LIVE - timedelta(seconds=1)))
    coverage = check(store, now=now)
    assert [doc.task_id for doc in coverage.stranded] == ["high"]
    assert [seen.server for seen in coverage.live] == ["a"]
    assert [seen.server for seen in store.read_servers()] == ["a", "b"]  # kept for a day


def test_a_server_not_seen_for_a_day_is_forgotten() -> None:
    store = MemoryStore()
    now = T0 + timedelta(days=2)
    store.announce_server(ServerSeen("gone", (Band(1, 0, 10),), T0))
    check(store, now=now, forget_after=timedelta(days=1))
    assert [seen.server for seen in store.read_servers()] == ["a"]


def test_a_task_not_due_yet_is_not_reported() -> None:
    store = MemoryStore()
    store.insert_tasks([make_doc("later", priority=50, start_after=T0 + timedelta(days=1))])
    assert check(store).stranded == ()


def test_the_checking_server_renews_its_own_entry() -> None:
    store = MemoryStore()
    now = T0 + timedelta(hours=1)
    check(store, now=now)
    assert store.read_servers() == [ServerSeen("a", BANDS, now)]


def test_a_long_wait_list_is_cut_at_the_examples_limit_and_says_so() -> None:
    store = MemoryStore()
    store.insert_tasks([make_doc(f"t{n:03}", priority=50 + n % 3) for n in range(EXAMPLES + 5)])
    store.insert_tasks([make_doc("neg", priority=-5)])
    coverage = check(store)
    assert len(coverage.stranded) == EXAMPLES
    assert coverage.stranded[0].task_id == "neg"  # most urgent first
    assert coverage.describe().startswith(f"{EXAMPLES}+ task(s) wait")


def test_the_daemon_warns_when_waiting_work_changes_every_ten_minutes_and_once_when_it_clears(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from concurrent.futures import Future

    from tullius.clock import SystemClock
    from tullius.runtime.coverage_check import REPEAT_AFTER, CoverageCheck

    store = MemoryStore()
    watch = CoverageCheck(
        store, server="a", bands=BANDS, every=timedelta(seconds=30), clock=SystemClock()
    )
    warnings: list[int] = []

    def check_at(now: float) -> None:
        future: Future[Coverage] = Future()
        future.set_result(watch.work()())
        with caplog.at_level("WARNING", logger="tullius.daemon"):
            caplog.clear()
            assert watch.finished(future, now) is None
        warnings.append(len(caplog.records))

    check_at(0)  # nothing waits: quiet
    store.insert_tasks([make_doc("high", priority=50)])
    check_at(30)  # it waits: a warning
    check_at(60)  # the same task still waits: quiet
    check_at(60 + REPEAT_AFTER)  # ten minutes on: again
    store.insert_tasks([make_doc("low", priority=-1)])
    check_at(90 + REPEAT_AFTER)  # another one joins: a warning
    store.set_status("high", Status.RUNNING, None)
    store.set_status("low", Status.RUNNING, None)
    check_at(120 + REPEAT_AFTER)  # nothing waits any more: one line saying so
    check_at(150 + REPEAT_AFTER)
    assert warnings == [0, 1, 0, 1, 1, 1, 0]
    assert watch.next_at == 150 + REPEAT_AFTER + 30
