"""The daemon's pruner: with ``--keep-finished``, delete old finished tasks now and then.

Why in the daemon: a ``tulliusd --prune-finished`` from cron is one more
thing an operator must remember, and a database left to grow slows FerretDB
down (design.md, "On FerretDB, history costs speed").

`tullius.prune.prune` decides what may go, as it does for
``--prune-finished``; this keeps the schedule.  A pass every `PRUNE_EVERY`
(give or take a tenth, so that daemons started together drift apart), the
first within `FIRST_WITHIN` of the start.  Every six hours, not every hour:
each pass on each daemon reads every finished task's document once (a page
too young to prune costs no other read), and kept for days, tasks gain
nothing from passes closer together.  A pass goes one page at a time,
each page one piece of store work, and waits as long as a page took before
the next, so that a large backlog never holds a store thread (an embedded
store has only one) while leases wait to be renewed, and takes at most half
of one store thread's time (on FerretDB a page of 500 took 2.4 s).

Several daemons pruning at once is safe: each deletion is of tasks no writer
can reach any more, and deleting what another prune deleted deletes
nothing.  A store error cuts a page short, never the pass: it goes on
from the same page `RETRY_AFTER` later, and twice as long after each error
in a row (up to `PRUNE_EVERY`: a refusal that never ends, say no right to
delete, is tried and logged four times a day).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from concurrent.futures import Future
from datetime import timedelta
from typing import Any, Final

from tullius.clock import Clock
from tullius.engine import drive
from tullius.prune import PRUNE_BATCH, PruneReport, check_age, prune
from tullius.store import Store

#: Seconds from the end of one pass to the start of the next (give or take a tenth).
PRUNE_EVERY: Final = 6 * 3600.0
#: The first pass starts at a random moment this many seconds after the daemon does.
FIRST_WITHIN: Final = 60.0
#: After a page cut short by an error, seconds before it is tried again (doubled
#: after each error in a row).
RETRY_AFTER: Final = 60.0


class Pruner:
    """Schedules prunes; `work()` runs on a store thread, `finished()` on the loop's.

    Args:
        store: where the tasks are.
        keep: how long finished tasks are kept (at least `tullius.prune.MIN_AGE`).
        unhandled: prune ``unhandled`` tasks too.
        clock: what ages are judged by (``now()``).
        rng: draws the moments passes start at.
        monotonic: what the schedule is kept by (the supervisor loop's clock).
    """

    def __init__(
        self,
        store: Store,
        *,
        keep: timedelta,
        unhandled: bool,
        clock: Clock,
        rng: random.Random,
        every: float = PRUNE_EVERY,
        first_within: float = FIRST_WITHIN,
        batch: int = PRUNE_BATCH,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        check_age(keep)
        self.monotonic = monotonic
        self.store = store
        self.keep = keep
        self.unhandled = unhandled
        self.clock = clock
        self.rng = rng
        self.every = every
        self.batch = batch
        #: When the next page is due (monotonic seconds).
        self.next_at = monotonic() + rng.uniform(0.0, first_within)
        #: A page is on a store thread.
        self.running = False
        #: Passes completed since the start.
        self.passes = 0
        #: The task id the pass goes on after; None between passes.
        self._after: str | None = None
        self._pass = PruneReport()
        self._page_started = 0.0
        #: Pages cut short by an error in a row.
        self.errors = 0

    def work(self) -> Callable[[], PruneReport]:
        """The next page of the pass (a new pass if none is under way), for a store thread."""
        self.running = True
        after = self._after or ""

        def run() -> PruneReport:
            self._page_started = self.monotonic()
            return drive(
                self.store,
                prune(
                    self.keep,
                    now=self.clock.now(),
                    unhandled=self.unhandled,
                    batch=self.batch,
                    after=after,
                    pages=1,
                ),
            )

        return run

    def finished(self, future: Future[Any]) -> PruneReport | BaseException | None:
        """Account for a page: the pass's report once the pass ended, the error
        that cut the page short, or None while the pass goes on."""
        self.running = False
        now = self.monotonic()
        error = future.exception()
        if error is not None:
            self.errors += 1
            self.next_at = now + min(RETRY_AFTER * 2 ** min(self.errors - 1, 30), self.every)
            return error
        self.errors = 0
        page: PruneReport = future.result()
        self._pass.add(page)
        if page.resume_after is not None:
            self._after = page.resume_after
            # The next page after as long again: other store work goes between.
            self.next_at = now + max(0.0, now - self._page_started)
            return None
        report, self._pass, self._after = self._pass, PruneReport(), None
        self.passes += 1
        self.next_at = now + self.every * self.rng.uniform(0.9, 1.1)
        return report
