"""The daemon's sweeper: fail stale leases of other servers, repair hints, on a schedule.

`engine.sweep` does the deciding; this keeps the schedule and the one piece of
memory a sweeper has, its `LeaseWatch`.  That memory counts store time, not
time: the daemon's store reports every call that failed or worked to the
watch (`runtime.store_watch`), and the watch's clock stands still through an
outage, so an owner that could not renew during one is never declared lost
for it.  A sweep that came much later than scheduled (the daemon was paused)
forgets everything.  Those rules are the `LeaseWatch`'s, shared with the
simulator's sweepers; this only brackets each sweep for it.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from tullius.clock import Clock, window_seconds
from tullius.engine import SweepReport, drive, sweep
from tullius.policy import WRITE_WINDOW, LeaseTimings, LeaseWatch
from tullius.store import Store


class Sweeper:
    """Schedules sweeps; its `work()` runs on the store thread, `finished()` on the loop's."""

    def __init__(
        self,
        store: Store,
        timings: LeaseTimings,
        *,
        server: str,
        clock: Clock,
        rng: random.Random,
        write_clock: Callable[[], float] = window_seconds,
        watch: LeaseWatch | None = None,
    ) -> None:
        self.store = store
        self.write_clock = write_clock
        self.server = server
        self.clock = clock
        self.rng = rng
        self.every = timings.sweep.total_seconds()
        #: What the sweeps remember; the store the daemon sweeps with reports to it.
        self.watch = watch or timings.watch()
        #: When the next sweep is due (monotonic seconds).
        self.next_at = 0.0
        #: A sweep is on the store thread.
        self.running = False
        self.sweeps = 0
        #: Lease record ids this daemon declared lost.
        self.expired: list[str] = []

    def work(self, own_tokens: frozenset[str]) -> Callable[[], SweepReport]:
        """The sweep to run on the store thread, leaving our own leases alone."""
        self.running = True

        def run() -> SweepReport:
            self.watch.sweep_starting(time.monotonic())
            # A sweep paused for longer than the write window writes nothing more.
            write_by = self.write_clock() + WRITE_WINDOW.total_seconds()
            return drive(
                self.store,
                sweep(
                    self.watch,
                    observer=self.server,
                    now=self.clock.now(),
                    monotonic=time.monotonic,
                    own_tokens=own_tokens,
                    rng=self.rng,
                ),
                write_by=write_by,
                clock=self.write_clock,
            )

        return run

    def finished(self, future: Future[Any]) -> SweepReport | BaseException:
        """Account for a finished sweep; return its report, or the error that ended it."""
        self.running = False
        self.next_at = time.monotonic() + self.every
        # Failed or not, the sweep was watching: what it saw stays (an outage is
        # the watch's store time's to leave out).
        self.watch.sweep_ended(time.monotonic())
        error = future.exception()
        if error is not None:
            return error
        self.sweeps += 1
        report: SweepReport = future.result()
        self.expired.extend(report.expired)
        return report
