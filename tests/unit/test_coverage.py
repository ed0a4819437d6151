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
from tullius.band import ALL, Band, format_priority
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


def test_a_server_that_said_it_stopped_takes_nothing_however_recent() -> None:
    store = MemoryStore()
    store.insert_tasks([make_doc("high", priority=50)])
    now = T0 + timedelta(hours=1)
    store.announce_server(ServerSeen("b", (Band(1, 40, 60),), now, stopped=True))
    assert [doc.task_id for doc in check(store, now=now).stranded] == ["high"]


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


def test_exactly_the_examples_limit_is_not_called_more() -> None:
    store = MemoryStore()
    store.insert_tasks([make_doc(f"t{n:03}", priority=50) for n in range(EXAMPLES)])
    coverage = check(store)
    assert (len(coverage.stranded), coverage.more) == (EXAMPLES, False)
    assert coverage.describe().startswith(f"{EXAMPLES} task(s) wait")


def test_a_priority_past_a_float_ends_precision_is_still_found_and_a_covered_one_is_not() -> None:
    # Given a band ending at 2**60 (which a float holds) and tasks just past and at it
    store = MemoryStore()
    store.insert_tasks(
        [make_doc("at-end", priority=2**60), make_doc("past-end", priority=2**60 + 1)]
    )
    coverage = drive(
        store,
        check_coverage("a", (Band(1, 0, 2**60),), now=T0 + timedelta(hours=1), live_within=LIVE),
    )
    # Then only the one no band covers is reported
    assert [doc.task_id for doc in coverage.stranded] == ["past-end"]


def test_waiting_work_is_logged_once_two_checks_agree_again_every_ten_minutes_and_when_it_clears(
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
    check_at(30)  # it waits: not yet reported (a peer's entry may be missing at a start)
    check_at(60)  # a second check agrees: a warning
    check_at(90)  # the same task still waits: quiet
    check_at(60 + REPEAT_AFTER)  # ten minutes on: again
    store.insert_tasks([make_doc("low", priority=-1)])
    check_at(90 + REPEAT_AFTER)  # another one joins: seen once, quiet
    check_at(120 + REPEAT_AFTER)  # and twice: a warning
    store.set_status("high", Status.RUNNING, None)
    store.set_status("low", Status.RUNNING, None)
    check_at(150 + REPEAT_AFTER)  # nothing waits any more: one line saying so
    check_at(180 + REPEAT_AFTER)
    assert warnings == [0, 0, 1, 0, 1, 0, 1, 1, 0]
    assert watch.next_at == 180 + REPEAT_AFTER + 30
