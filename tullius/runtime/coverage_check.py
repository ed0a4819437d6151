"""The daemon's coverage check: once per lease, find work no running server takes.

`tullius.coverage.check_coverage` does the finding; this keeps the schedule
and decides what is worth a log line.  Waiting work is not reported at every
check: a warning when a priority starts to wait (once a second check in a
row finds it), again every `REPEAT_AFTER` while work waits, and one line when
nothing waits any more.  The check only reports, so its own errors never
stop the daemon: a store outage counts as one (like any store call's), any
other error is logged once.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from datetime import timedelta
from typing import Any, Final

from tullius.band import Band
from tullius.clock import Clock
from tullius.coverage import Coverage, check_coverage
from tullius.engine import drive
from tullius.runtime.mongo_store import short_error
from tullius.store import ServerSeen, Store

log = logging.getLogger("tullius.daemon")

#: While work waits and no new priority joins, how often the warning is repeated
#: (monotonic seconds).
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
        self.period = every
        self.clock = clock
        #: This start of the server: tells its entry from another daemon's of the same name.
        self.instance = uuid.uuid4().hex
        #: When the next check is due (monotonic seconds); the first one at start.
        self.next_at = 0.0
        #: A check is on a store thread.
        self.running = False
        #: Priorities reported as waiting, and when the last warning was logged.
        self._reported: frozenset[float] = frozenset()
        self._reported_at = 0.0
        #: A warning was logged since nothing last waited (an all-clear line is owed).
        self._warned = False
        #: The priorities the last check found waiting (reported once a second agrees).
        self._previous: frozenset[float] = frozenset()
        #: A check has renewed our entry: a stranger's entry under our name since is a clash.
        self._renewed = False
        self._clash_reported = False
        #: Errors already logged (see `first_report`).
        self._errors: set[str] = set()

    def entry(self) -> ServerSeen:
        """This server's entry as of now."""
        return ServerSeen(
            self.server, self.bands, self.clock.now(), False, self.period, self.instance
        )

    def work(self) -> Callable[[], Coverage]:
        """The check to run on a store thread."""
        self.running = True
        return lambda: drive(self.store, check_coverage(self.entry()))

    def finished(self, future: Future[Any], now: float) -> BaseException | None:
        """Log what the check found, if worth it; return the error that ended it, if any.

        A priority is reported once two checks in a row found work waiting at
        it (a daemon starting after all were down sees only itself at its first
        check, and its peers' entries by the next); again when a new priority
        joins, or every `REPEAT_AFTER`; never because fewer tasks wait.
        """
        self.running = False
        self.next_at = now + self.period.total_seconds()
        error = future.exception()
        if error is not None:
            return error
        coverage: Coverage = future.result()
        self._notice_clash(coverage.previous)
        waiting = frozenset(coverage.waiting)
        confirmed = waiting & self._previous
        self._previous = waiting
        if not waiting:
            if self._warned:
                log.warning("no task waits for a priority no running tulliusd takes any more")
            self._reported, self._warned = frozenset(), False
            return None
        self._reported &= waiting  # a priority that comes back is news again
        if confirmed - self._reported or (confirmed and now - self._reported_at >= REPEAT_AFTER):
            log.warning("%s", coverage.describe(self.clock.now()))
            self._reported |= confirmed
            self._reported_at, self._warned = now, True
        return None

    def _notice_clash(self, previous: ServerSeen | None) -> None:
        """Say once if another daemon renewed our entry since we did (one name, two daemons)."""
        if (
            self._renewed
            and previous is not None
            and previous.instance != self.instance
            and not self._clash_reported
        ):
            self._clash_reported = True
            log.warning(
                "another tulliusd uses the server name %r (its bands: %s): give each daemon "
                "its own --server-name; until then their entries overwrite each other, and "
                "the coverage check and tulliusd --status mix the two up",
                self.server,
                " ".join(str(band) for band in previous.bands) or "none",
            )
        self._renewed = True

    def first_report(self, error: BaseException) -> bool:
        """Whether ``error`` (not an outage) is new: each is logged once, not every lease.

        Told apart by `short_error`'s text: the full server reply pymongo appends
        carries cluster times and session ids that change with every call.
        """
        text = f"{type(error).__name__}: {short_error(error)}"
        if text in self._errors:
            return False
        self._errors.add(text)
        return True
