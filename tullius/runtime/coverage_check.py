"""The daemon's coverage check: once per lease, find work no running server takes.

`tullius.coverage.check_coverage` does the finding; this keeps the schedule
and decides what is worth a log line.  The same waiting tasks are not
reported at every check: a warning when what waits changes (counting a task
once a second check in a row finds it), again every `REPEAT_AFTER` while it
does not, and one line when nothing waits any more.  The check only reports,
so its own errors never stop the daemon: a store outage counts as one (like
any store call's), any other error is logged once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future
from datetime import timedelta
from typing import Any, Final

from tullius.band import Band
from tullius.clock import Clock
from tullius.coverage import LIVE_CHECKS, Coverage, check_coverage
from tullius.engine import drive
from tullius.store import Store

log = logging.getLogger("tullius.daemon")

#: While the same tasks wait, how often the warning is repeated (monotonic seconds).
REPEAT_AFTER: Final = 600.0


class CoverageCheck:
    """Schedules checks; `work()` runs on a store thread, `finished()` on the loop's."""

    def __init__(
        self,
        store: Store,
        *,
        server: str,
        bands: tuple[Band, ...],
        every: timedelta,
        clock: Clock,
    ) -> None:
        self.store = store
        self.server = server
        self.bands = bands
        self.every = every.total_seconds()
        self.live_within = LIVE_CHECKS * every
        self.clock = clock
        #: When the next check is due (monotonic seconds); the first one at start.
        self.next_at = 0.0
        #: A check is on a store thread.
        self.running = False
        #: The ids that waited at the last warning, and when it was logged.
        self._reported: tuple[str, ...] = ()
        self._reported_at = 0.0
        #: What the last check found waiting (reported once a second check agrees).
        self._previous: frozenset[str] = frozenset()
        #: Errors already logged (see `first_report`).
        self._errors: set[str] = set()

    def work(self) -> Callable[[], Coverage]:
        """The check to run on a store thread."""
        self.running = True
        return lambda: drive(
            self.store,
            check_coverage(
                self.server, self.bands, now=self.clock.now(), live_within=self.live_within
            ),
        )

    def finished(self, future: Future[Any], now: float) -> BaseException | None:
        """Log what the check found, if worth it; return the error that ended it, if any.

        A task is reported once two checks in a row found it waiting: a daemon
        starting after all were down sees only itself at its first check, and
        its peers' entries by the next.
        """
        self.running = False
        self.next_at = now + self.every
        error = future.exception()
        if error is not None:
            return error
        coverage: Coverage = future.result()
        waiting = tuple(doc.task_id for doc in coverage.stranded)
        confirmed = tuple(task_id for task_id in waiting if task_id in self._previous)
        self._previous = frozenset(waiting)
        if not waiting:
            if self._reported:
                log.warning("no task waits for a priority no running tulliusd takes any more")
            self._reported = ()
        elif confirmed and (confirmed != self._reported or now - self._reported_at >= REPEAT_AFTER):
            log.warning("%s", coverage.describe())
            self._reported, self._reported_at = confirmed, now
        return None

    def first_report(self, error: BaseException) -> bool:
        """Whether ``error`` (not an outage) is new: each is logged once, not every lease."""
        text = f"{type(error).__name__}: {error}"
        if text in self._errors:
            return False
        self._errors.add(text)
        return True
