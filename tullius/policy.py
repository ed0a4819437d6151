"""Arithmetic of time: leases, heartbeats, sweeps and handler backoff.

Pure functions and one small bookkeeping class.  Instants and randomness are
arguments: a driver passes its clock's reading and its own ``random.Random``.
Grow this module, not the transition table, when timing rules change.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import timedelta
from typing import Final

from tullius.errors import ConfigError

#: First wait before retrying a failed ``failed()``; doubled on each attempt.
HANDLER_BACKOFF_BASE = timedelta(seconds=1)
#: Longest wait between two attempts at ``failed()``.
HANDLER_BACKOFF_CAP = timedelta(minutes=5)


def handler_backoff(attempt: int, rng: random.Random | None = None) -> timedelta:
    """How long to wait after handler attempt ``attempt`` (1-based) failed.

    Exponential (1 s, 2 s, 4 s, ... up to 5 min).  With ``rng``, "equal jitter":
    a uniform draw from the upper half, so that many handlers failing together
    (say, during a database outage) do not retry together.
    """
    if attempt < 1:
        raise ValueError(f"attempt={attempt!r} must be >= 1")
    delay: timedelta = min(HANDLER_BACKOFF_BASE * 2 ** min(attempt - 1, 30), HANDLER_BACKOFF_CAP)
    if rng is None:
        return delay
    half: timedelta = delay / 2
    return half + half * rng.random()


#: The lease of ``tulliusd`` and of the simulator unless told otherwise.
DEFAULT_LEASE: Final = timedelta(seconds=30)
#: The shortest lease: a store round trip must fit in a sixth of it many times
#: over.  (A lease of a few microseconds gave heartbeats and sweeps 0 apart,
#: and the simulator then swept for ever without virtual time moving.)
MIN_LEASE: Final = timedelta(milliseconds=60)
#: The longest lease: orphaned work is noticed within a lease, and a week is
#: already far past any use.
MAX_LEASE: Final = timedelta(days=7)
#: How long after a job's time limit (or a claim's or sweep's start) ``tulliusd``
#: may still write for it: past that, it gives the write up (`engine.drive`'s
#: ``write_by``) and the task is failed as ``lost`` by the sweeps instead.  What
#: makes pruning finished tasks safe (`tullius.prune`).  Long, so that a database
#: out of reach for hours still ends with every verdict recorded.
WRITE_WINDOW: Final = timedelta(days=1)


#: How long ``tulliusd`` lets running jobs finish after a stop signal (SIGTERM or
#: SIGINT) before it stops them and fails them as ``shutdown``; ``--grace``, and
#: `tullius.sim.ServerStop`'s ``grace``.
DEFAULT_GRACE: Final = timedelta(seconds=30)
#: Between SIGTERM and SIGKILL for a job stopped at its deadline or by a shutdown.
KILL_GRACE: Final = timedelta(seconds=1)
#: After a shutdown's kills, how long a stopping ``tulliusd`` keeps trying to
#: record the verdicts of its last jobs before it exits without them (their
#: leases are then no longer renewed, and the sweeps fail them as ``lost``).
FINISH_GIVE_UP: Final = timedelta(seconds=30)


def verdict_window(time_limit: timedelta) -> timedelta:
    """How long after its claim a job's verdict may still be written: the job's
    ``time_limit`` (its run or its ``failed()`` may take that long) and a
    `WRITE_WINDOW`.  Both drivers give a verdict up past it."""
    return time_limit + WRITE_WINDOW


@dataclass(frozen=True)
class LeaseTimings:
    """Heartbeat, sweep and staleness periods derived from one promise: ``lease``.

    The promise: when a server dies, the tasks it owned are failed as ``lost``
    by another server within ``lease``.  An observer sees the dead owner's last
    beat at most ``sweep`` after it was written (so at most ``sweep`` after the
    death), calls it stale ``stale_after`` later, and acts at its next sweep:
    ``2 * sweep + stale_after`` = 5/6 of the lease, leaving a sixth for the
    store round trips.  A live owner beats every ``heartbeat`` and would have
    to miss three beats in a row to be declared lost, which absorbs ordinary
    database latency.
    """

    lease: timedelta = DEFAULT_LEASE

    def __post_init__(self) -> None:
        if not isinstance(self.lease, timedelta) or not MIN_LEASE <= self.lease <= MAX_LEASE:
            raise ConfigError(
                "lease",
                self.lease,
                f"must be a timedelta from {MIN_LEASE.total_seconds():g} seconds to "
                f"{MAX_LEASE.days} days (heartbeats and sweeps come a sixth of it apart)",
            )

    @property
    def heartbeat(self) -> timedelta:
        return self.lease / 6

    @property
    def sweep(self) -> timedelta:
        return self.lease / 6

    @property
    def stale_after(self) -> timedelta:
        return self.lease / 2

    @property
    def coverage_check(self) -> timedelta:
        """How often a server renews its entry and looks for work no server takes
        (`tullius.coverage`): slow work, so no more often than the lease."""
        return self.lease

    def watch(self) -> LeaseWatch:
        """A new memory for one server's sweeps, by these periods (every driver's)."""
        return LeaseWatch(self.stale_after, late_after=self.late_sweep)

    @property
    def late_sweep(self) -> timedelta:
        """A sweep starting this long after the last good one ended was not watching
        (its server was paused, or stuck): its observer starts every window afresh."""
        return LATE_SWEEPS * self.sweep


#: How many sweep periods without a good sweep make an observer's memory untrustworthy.
LATE_SWEEPS = 3


class LeaseWatch:
    """One observer's memory of the heartbeats it has seen.

    A lease is stale when its beat counter has not changed for ``stale_after``
    of *store time* on *this observer's* monotonic clock: its clock less the
    outages it saw.  No wall clock of any server is compared with another's,
    so skewed or jumping wall clocks can't expire a live lease.

    Outages: a driver reports each of its server's store calls that could not
    reach the store (`store_failed`; a refusal is an answer, not an outage)
    and, while an outage is open, each that worked (`store_worked`).  From
    the last moment the store was known up before a failure until a call
    asked after it works, store time stands still, since owners could not
    renew either.  Why not forget every observation after an outage instead,
    as Tullius did until 2026-12-05: a server that lost the store for a tenth
    of a second every 4 s forgot before every sweep, and never declared a
    dead server's lease lost; in the simulator a `lost` verdict due 20 s
    after a crash came 811 s after it, when the outages stopped.

    Pauses: with ``late_after``, a sweep that starts that long after the last
    one ended forgets everything (its server was paused or stuck, and was not
    watching).  `sweep_starting` and `sweep_ended` bracket each sweep, failed
    or not.

    The daemon's store threads report while a sweep reads: the outage state is
    one tuple, replaced whole, so a reader never sees half an update (the
    writers take turns, `runtime.store_watch`).
    """

    def __init__(self, stale_after: timedelta, *, late_after: timedelta | None = None) -> None:
        self.stale_after = stale_after.total_seconds()
        self.late_after = None if late_after is None else late_after.total_seconds()
        self._seen: dict[str, tuple[int, float]] = {}
        self._last_sweep: float | None = None
        #: (seconds of ended outages, when the open one began or None, when its
        #: last failure was seen)
        self._outages: tuple[float, float | None, float] = (0.0, None, 0.0)

    @property
    def down(self) -> bool:
        """An outage is open: the next call that works should be reported."""
        return self._outages[1] is not None

    def store_failed(self, up_at: float, now: float) -> None:
        """A store call of this observer's server failed at ``now``; the store was
        last known up at ``up_at`` (when the latest call that worked was asked)."""
        ended, began, _ = self._outages
        self._outages = (ended, min(up_at, now) if began is None else began, now)

    def store_worked(self, asked_at: float, now: float) -> None:
        """A store call asked at ``asked_at`` worked, at ``now``: asked after the
        last failure was seen, it ends the outage (at ``now``, to be safe)."""
        ended, began, failed_at = self._outages
        if began is not None and asked_at > failed_at:
            self._outages = (ended + max(0.0, now - began), None, failed_at)

    def store_time(self, at: float) -> float:
        """``at`` (this observer's monotonic clock) less every outage seen so far;
        an open outage stops this clock."""
        ended, began, _ = self._outages
        return at - ended - (max(0.0, at - began) if began is not None else 0.0)

    def sweep_starting(self, now: float) -> None:
        """Before a sweep, at ``now`` (monotonic): forget if it starts late."""
        last = self._last_sweep
        if self.late_after is not None and last is not None and now - last > self.late_after:
            self.reset()

    def sweep_ended(self, now: float) -> None:
        """After a sweep, at ``now`` (monotonic), whether it went well or not: a
        sweep cut short by a store error was still watching."""
        self._last_sweep = now

    def is_stale(self, record_id: str, beat: int, asked_at: float, answered_at: float) -> bool:
        """Record an observation; True if ``beat`` has not moved for ``stale_after``.

        ``asked_at`` and ``answered_at`` bracket the read that saw ``beat``: the
        read happened somewhere between them (a slow sweep, a retried read).  A
        new beat counts from ``answered_at`` and staleness is judged at
        ``asked_at``, so neither end can make a live lease look older than it is.
        """
        seen = self._seen.get(record_id)
        if seen is None or seen[0] != beat:
            self._seen[record_id] = (beat, self.store_time(answered_at))
            return False
        return self.store_time(asked_at) - seen[1] >= self.stale_after

    def forget_except(self, record_ids: set[str]) -> None:
        """Drop observations of leases that are no longer live."""
        for record_id in list(self._seen):
            if record_id not in record_ids:
                del self._seen[record_id]

    def reset(self) -> None:
        """Forget everything, e.g. after this observer lost the store for a while."""
        self._seen.clear()
