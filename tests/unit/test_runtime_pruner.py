"""The daemon's pruner (``--keep-finished``): when passes run, a page at a time, after errors.

Each page is run here as the supervisor runs it on a store thread, then
handed to `Pruner.finished`; the schedule's clock and the ages' clock are both
arguments.
"""

from __future__ import annotations

import random
from concurrent.futures import Future
from datetime import datetime, timedelta
from typing import Any

import pytest

from tests.unit.test_prune import NOW, left_unhandled, queued, run_to_the_end
from tullius.document import Status
from tullius.errors import StoreUnavailable
from tullius.prune import MIN_AGE, PruneReport
from tullius.runtime.pruner import FIRST_WITHIN, PRUNE_EVERY, RETRY_AFTER, Pruner
from tullius.sim.memory_store import MemoryStore

DAY = timedelta(days=1)


class Clocks:
    """A wall clock for ages and a monotonic one for the schedule, both set by hand."""

    def __init__(self) -> None:
        self.wall = NOW
        self.seconds = 1000.0

    def now(self) -> datetime:
        return self.wall

    def monotonic(self) -> float:
        return self.seconds


def old_tasks(store: MemoryStore, count: int, *, days_ago: float = 10) -> None:
    for n in range(count):
        queued(store, f"t{n}")
        run_to_the_end(store, f"t{n}", at=NOW - days_ago * DAY)


def pruner(store: MemoryStore, clocks: Clocks, **options: Any) -> Pruner:
    return Pruner(
        store,
        keep=options.pop("keep", MIN_AGE),
        unhandled=options.pop("unhandled", False),
        clock=clocks,
        rng=random.Random(7),
        monotonic=clocks.monotonic,
        **options,
    )


def page(pruner: Pruner) -> PruneReport | BaseException | None:
    """Run the pruner's next page as a store thread would, and hand it back."""
    future: Future[Any] = Future()
    work = pruner.work()
    assert pruner.running
    try:
        future.set_result(work())
    except Exception as error:
        future.set_exception(error)
    return pruner.finished(future)


def whole_pass(pruner: Pruner) -> PruneReport | BaseException:
    """Run pages until the pass reports, or a page fails."""
    while (result := page(pruner)) is None:
        pass
    return result


def test_the_first_pass_starts_within_a_minute_of_the_daemons_start() -> None:
    clocks = Clocks()
    starts = {pruner(MemoryStore(), clocks).next_at for _ in range(3)}
    assert all(clocks.seconds <= at <= clocks.seconds + FIRST_WITHIN for at in starts)


def test_a_pass_deletes_a_page_at_a_time_and_reports_once_at_its_end() -> None:
    # Given five tasks finished ten days ago and a pruner keeping three days, two a page
    store, clocks = MemoryStore(), Clocks()
    old_tasks(store, 5)
    keeper = pruner(store, clocks, batch=2)
    # When its pages run one after the other
    results = []
    while not results or results[-1] is None:
        results.append(page(keeper))
        assert keeper.next_at == clocks.seconds or results[-1] is not None  # pages take no time
    # Then three pages went by with nothing to say, and the last one reported the pass
    *quiet, report = results
    assert quiet == [None, None, None]
    assert isinstance(report, PruneReport)
    assert report.deleted == {Status.SUCCEEDED: 5}
    assert report.resume_after is None
    assert store.count_by_status() == {}
    # And the next pass is due about an hour later
    assert keeper.passes == 1
    assert 0.9 * PRUNE_EVERY <= keeper.next_at - clocks.seconds <= 1.1 * PRUNE_EVERY


class Slow(MemoryStore):
    """A store whose paged reads by status take two seconds of the pruner's clock."""

    def __init__(self, clocks: Clocks) -> None:
        super().__init__()
        self.clocks = clocks

    def find_by_status(self, statuses: Any, limit: int, after: str = "") -> Any:
        self.clocks.seconds += 2.0
        return super().find_by_status(statuses, limit, after)


def test_between_pages_a_pass_waits_as_long_as_the_page_took() -> None:
    # Given five old tasks, two a page, on a store where a page takes 2 s
    clocks = Clocks()
    store = Slow(clocks)
    old_tasks(store, 5)
    keeper = pruner(store, clocks, batch=2)
    # When a page runs
    assert page(keeper) is None
    # Then the next is due 2 s after it ended: the pass takes at most half a store thread
    assert keeper.next_at == clocks.seconds + 2.0


def test_a_later_pass_takes_what_has_aged_since() -> None:
    # Given tasks finished two days ago, too young for a pass now
    store, clocks = MemoryStore(), Clocks()
    old_tasks(store, 3, days_ago=2)
    keeper = pruner(store, clocks)
    first = whole_pass(keeper)
    assert isinstance(first, PruneReport)
    assert first.deleted == {}
    assert first.kept == {"too young": 3}
    # When the next pass runs two days later
    clocks.wall += 2 * DAY
    clocks.seconds = keeper.next_at
    second = whole_pass(keeper)
    # Then they are gone
    assert isinstance(second, PruneReport)
    assert second.deleted == {Status.SUCCEEDED: 3}


class FailingOnce(MemoryStore):
    """A store whose second paged read by status fails; it notes where each read started."""

    def __init__(self) -> None:
        super().__init__()
        self.reads_after: list[str] = []

    def find_by_status(self, statuses: Any, limit: int, after: str = "") -> Any:
        self.reads_after.append(after)
        if len(self.reads_after) == 2:
            raise StoreUnavailable("find_by_status", "connection refused")
        return super().find_by_status(statuses, limit, after)


def test_a_page_cut_short_by_a_store_error_is_tried_again_a_minute_later() -> None:
    # Given five old tasks, two a page, in a store whose second read fails
    store, clocks = FailingOnce(), Clocks()
    old_tasks(store, 5)
    keeper = pruner(store, clocks, batch=2)
    assert page(keeper) is None
    # When the second page runs
    error = page(keeper)
    # Then the error comes back, and the page is due again a minute later
    assert isinstance(error, StoreUnavailable)
    assert not keeper.running
    assert keeper.next_at == clocks.seconds + RETRY_AFTER
    assert keeper.passes == 0
    # And the pass goes on from that page, not from the start, and counts every deletion
    report = whole_pass(keeper)
    assert store.reads_after[:3] == ["", "t1", "t1"]
    assert isinstance(report, PruneReport)
    assert report.deleted == {Status.SUCCEEDED: 5}


def test_errors_in_a_row_double_the_wait_up_to_the_time_between_passes() -> None:
    store, clocks = FailingOnce(), Clocks()
    keeper = pruner(store, clocks)
    waits = []
    for _ in range(12):
        store.reads_after[:] = [""]  # (its second read fails: each read here is one)
        assert isinstance(page(keeper), StoreUnavailable)
        waits.append(keeper.next_at - clocks.seconds)
    assert waits[:4] == [RETRY_AFTER, 2 * RETRY_AFTER, 4 * RETRY_AFTER, 8 * RETRY_AFTER]
    assert waits[-1] == PRUNE_EVERY
    # And a page that works starts the count again
    assert not isinstance(page(keeper), BaseException)
    assert keeper.errors == 0


def test_unhandled_tasks_are_pruned_only_when_asked() -> None:
    store, clocks = MemoryStore(), Clocks()
    left_unhandled(store, "nobody-handled", at=NOW - 10 * DAY)
    kept = whole_pass(pruner(store, clocks))
    assert isinstance(kept, PruneReport)
    assert kept.deleted == {}
    gone = whole_pass(pruner(store, clocks, unhandled=True))
    assert isinstance(gone, PruneReport)
    assert gone.deleted == {Status.UNHANDLED: 1}


def test_keeping_under_three_days_is_refused() -> None:
    with pytest.raises(ValueError, match=r"older_than=2 day\(s\) is too young"):
        pruner(MemoryStore(), Clocks(), keep=2 * DAY)
