"""The daemon's store thread and sweeper, without worker processes."""

from __future__ import annotations

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
from tullius.policy import LeaseTimings
from tullius.runtime.store_thread import StoreThread
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


def test_while_the_store_keeps_failing_no_lease_is_declared_lost() -> None:
    store = _store_with_a_lease_of_another_server()
    timings = LeaseTimings(timedelta(seconds=1.2))
    sweeper = Sweeper(store, timings, server="me", clock=SystemClock(), rng=random.Random(1))
    # Given store errors reported before every sweep, for several stale periods
    outage_until = time.monotonic() + 3 * timings.stale_after.total_seconds()
    while time.monotonic() < outage_until:
        sweeper.outage()
        # Then no sweep declares the silent lease lost: the owner couldn't renew either
        assert _sweep(sweeper).expired == []
        time.sleep(sweeper.every)
    # And once the store is healthy again, the lease is judged afresh and expires
    assert _sweep_until_expired(sweeper) == ["t1:run"]
