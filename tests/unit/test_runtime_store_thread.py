"""The daemon's store thread and sweeper, without worker processes."""

from __future__ import annotations

import contextlib
import random
import select
import threading
import time
from concurrent.futures import Future
from datetime import UTC, datetime, timedelta
from typing import Any

from tests.store_contract import make_doc
from tullius.band import Band
from tullius.clock import SystemClock
from tullius.engine import SweepReport, claim, drive
from tullius.errors import StoreError, StoreUnavailable
from tullius.policy import LeaseTimings, LeaseWatch
from tullius.runtime.store_thread import StoreThread
from tullius.runtime.store_watch import WatchedStore
from tullius.runtime.sweeper import Sweeper
from tullius.sim.memory_store import MemoryStore


def wait_readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 30)[0])


def test_finished_work_wakes_the_loop_and_callbacks_run_in_its_thread() -> None:
    thread = StoreThread()
    seen: list[tuple[Any, str]] = []
    try:
        thread.submit(
            lambda: threading.current_thread().name,
            lambda f: seen.append((f.result(), threading.current_thread().name)),
        )
        assert wait_readable(thread.wake_fd)
        deadline = time.monotonic() + 30
        while not seen and time.monotonic() < deadline:
            thread.collect()
        thread.drain()
        ((worker_thread, callback_thread),) = seen
        assert worker_thread.startswith("tullius-store")
        assert callback_thread == threading.current_thread().name
        assert thread.idle
    finally:
        thread.close()


def test_work_submitted_from_a_callback_is_not_lost() -> None:
    thread = StoreThread()
    results: list[int] = []

    def first_done(future: Future[Any]) -> None:
        results.append(future.result())
        thread.submit(lambda: 2, lambda f: results.append(f.result()))

    try:
        thread.submit(lambda: 1, first_done)
        deadline = time.monotonic() + 30
        while results != [1, 2] and time.monotonic() < deadline:
            wait_readable(thread.wake_fd)
            thread.drain()
            thread.collect()
        assert results == [1, 2]
        assert thread.idle
    finally:
        thread.close()


def _store_with_a_lease_of_another_server() -> MemoryStore:
    store = MemoryStore()
    store.insert_tasks([make_doc("t1")])
    job = drive(
        store,
        claim(Band(1, 0, 10), server="other", worker=None, token="theirs", now=datetime.now(UTC)),
    )
    assert job is not None
    return store


def _sweep(sweeper: Sweeper) -> SweepReport:
    future: Future[Any] = Future()
    future.set_result(sweeper.work(frozenset())())
    outcome = sweeper.finished(future)
    assert isinstance(outcome, SweepReport)
    return outcome


def _sweep_until_expired(sweeper: Sweeper, *, limit: float = 30.0) -> list[str]:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        expired = _sweep(sweeper).expired
        if expired:
            return expired
        time.sleep(sweeper.every)
    return []


def test_a_silent_lease_is_expired_on_our_own_clock() -> None:
    store = _store_with_a_lease_of_another_server()
    timings = LeaseTimings(timedelta(seconds=1.2))
    sweeper = Sweeper(store, timings, server="me", clock=SystemClock(), rng=random.Random(1))
    assert _sweep(sweeper).expired == []
    assert _sweep_until_expired(sweeper) == ["t1:run"]
    assert sweeper.expired == ["t1:run"]


class Switchable:
    """A store that refuses every call while ``down``, or the next ``refuse`` calls."""

    def __init__(self, store: MemoryStore) -> None:
        self.store = store
        self.down = False
        self.refuse = 0

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.store, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            if self.down or self.refuse:
                self.refuse = max(0, self.refuse - 1)
                raise StoreUnavailable(name, "connection refused")
            return method(*args, **kwargs)

        return call


def _watched_sweeper() -> tuple[Switchable, Any, Sweeper]:
    """A sweeper watching another server's silent lease through a `WatchedStore`,
    as the daemon's does (lease 1.2 s: stale after 0.6 s of store time)."""
    inner = Switchable(_store_with_a_lease_of_another_server())
    timings = LeaseTimings(timedelta(seconds=1.2))
    watch = timings.watch()
    store = WatchedStore(inner, watch)
    sweeper = Sweeper(
        store,
        timings,
        server="me",
        clock=SystemClock(),
        rng=random.Random(1),
        watch=watch,
    )
    return inner, store, sweeper


def _sweep_once(sweeper: Sweeper) -> SweepReport | BaseException:
    future: Future[Any] = Future()
    try:
        future.set_result(sweeper.work(frozenset())())
    except Exception as error:
        future.set_exception(error)
    return sweeper.finished(future)


def test_while_the_store_is_down_no_lease_is_declared_lost() -> None:
    inner, _, sweeper = _watched_sweeper()
    assert _sweep(sweeper).expired == []
    # Given a store that refuses every call for several stale periods
    inner.down = True
    outage_until = time.monotonic() + 3 * sweeper.watch.stale_after
    while time.monotonic() < outage_until:
        assert isinstance(_sweep_once(sweeper), StoreUnavailable)
        time.sleep(sweeper.every)
    # When it is back
    inner.down = False
    # Then the first sweep does not declare the silent lease lost: its owner could
    # not renew either; and later sweeps do, once it stays silent
    assert _sweep(sweeper).expired == []
    assert _sweep_until_expired(sweeper) == ["t1:run"]


def test_store_errors_now_and_then_do_not_keep_a_dead_lease_from_being_declared_lost() -> None:
    # Why: until 2026-12-05 any store error made the next sweep forget what it had
    # seen, so errors more frequent than sweeps kept dead leases alive for ever
    inner, store, sweeper = _watched_sweeper()
    assert _sweep(sweeper).expired == []
    deadline = time.monotonic() + 30
    expired: list[str] = []
    while not expired and time.monotonic() < deadline:
        # Given, before every sweep, one refused call between two that work (the
        # daemon's claims poll every 10 ms: its calls come that close together)
        store.count_by_status()
        inner.refuse = 1
        with contextlib.suppress(StoreUnavailable):
            store.count_by_status()
        store.count_by_status()
        outcome = _sweep_once(sweeper)
        assert isinstance(outcome, SweepReport)
        expired = outcome.expired
        time.sleep(sweeper.every)
    # Then the dead lease is declared lost all the same
    assert expired == ["t1:run"]


class Scripted:
    """A store whose ``load`` and ``beat`` do what the test says, on a clock the test moves."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.error: Exception | None = None
        self.takes = 0.0

    def load(self, task_id: str) -> None:
        self.seconds += self.takes
        if self.error is not None:
            raise self.error

    def beat(self, record_id: str) -> None:
        self.load(record_id)


def _watched_script() -> tuple[Scripted, LeaseWatch, Any]:
    inner = Scripted()
    watch = LeaseWatch(timedelta(seconds=15))
    return inner, watch, WatchedStore(inner, watch, monotonic=lambda: inner.seconds)  # type: ignore[arg-type]


def test_a_refused_read_is_an_answer_and_stops_no_store_time() -> None:
    inner, watch, store = _watched_script()
    for second in range(100):
        inner.seconds = float(second)
        inner.error = StoreError("load failed: OperationFailure: not authorized")
        with contextlib.suppress(StoreError):
            store.load("t1")
        assert not watch.down
    assert watch.store_time(100.0) == 100.0


def test_an_outage_starts_no_later_than_the_failed_call_was_asked() -> None:
    inner, watch, store = _watched_script()
    # Given a call asked at 100 s that hangs until 130 s and fails, while one asked
    # at 108 s worked
    inner.seconds = 108.0
    store.load("t1")
    inner.seconds, inner.takes = 100.0, 30.0
    inner.error = StoreUnavailable("load", "socket timeout")
    with contextlib.suppress(StoreUnavailable):
        store.load("t1")
    # When a call asked after it works at 131 s
    inner.seconds, inner.takes, inner.error = 131.0, 0.0, None
    store.load("t1")
    # Then store time stood still from 100 s, when the failed call was asked
    assert watch.store_time(131.0) == 100.0


def test_a_refused_write_stops_store_time_until_a_call_works() -> None:
    # Out of disk, say: owners can't renew either
    inner, watch, store = _watched_script()
    inner.seconds = 10.0
    store.load("t1")
    inner.seconds, inner.error = 12.0, StoreError("beat failed: OperationFailure: disk full")
    with contextlib.suppress(StoreError):
        store.beat("t1:run")
    assert watch.down
    inner.seconds, inner.error = 20.0, None
    store.load("t1")
    assert not watch.down
    assert watch.store_time(20.0) == 10.0
