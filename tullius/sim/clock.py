"""SimClock: virtual time for the simulator; nothing here ever really sleeps.

Time is kept as an integer count of microseconds since the simulation's start,
so that sums of sleeps and deadlines are exact (a 5-second timeout fires at
5.000000, never at 4.999999).  ``now()`` is the wall-clock reading (aware UTC)
and ``monotonic()`` the seconds since start.  `ServerClock` is one simulated
server's view: the same monotonic reading, but a wall clock that may be skewed
(the fault "wall-clock skew on one server").

Autojump (as in ``trio.testing.MockClock``): the simulation's scheduler jumps
the clock straight to the next pending event whenever everything is waiting,
so an idle hour costs a handful of events, not an hour.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Final

#: Where every simulation's clock starts unless told otherwise.
DEFAULT_START: Final = datetime(2030, 1, 1, tzinfo=UTC)
#: The simulated clock stays before this: the dates a run adds to the time
#: (a time limit, a write window, a delay, a skew) must exist, and Python's
#: end at the year 9999.
LATEST: Final = datetime(9000, 1, 1, tzinfo=UTC)
#: The earliest start: a clock skewed back a decade from it must still exist.
EARLIEST: Final = datetime(1000, 1, 1, tzinfo=UTC)

US: Final = 1_000_000


def to_us(delta: timedelta) -> int:
    """``delta`` in whole microseconds (timedelta's own resolution, so exact)."""
    return (delta.days * 86_400 + delta.seconds) * US + delta.microseconds


class SimClock:
    """The simulation's clock; advanced only by the scheduler (or by `advance`).

    Args:
        start: the wall-clock reading at virtual time zero (aware).
    """

    def __init__(self, start: datetime = DEFAULT_START) -> None:
        if start.tzinfo is None:
            raise ValueError(f"start={start!r} must be an aware datetime")
        self.start = start.astimezone(UTC)
        self.us = 0
        self._now = (0, self.start)  # (us, now()): read several times per event

    def now(self) -> datetime:
        """Aware UTC wall time."""
        us, now = self._now
        if us != self.us:  # ``us`` is set directly by the scheduler: compare, don't reset
            now = self.start + timedelta(microseconds=self.us)
            self._now = (self.us, now)
        return now

    def monotonic(self) -> float:
        """Seconds since the simulation started."""
        return self.us / US

    @property
    def elapsed(self) -> timedelta:
        return timedelta(microseconds=self.us)

    def advance(self, delta: timedelta) -> None:
        """Move time forward by ``delta`` (>= 0); events due meanwhile are the caller's business."""
        step = to_us(delta)
        if step < 0:
            raise ValueError(f"delta={delta!r} must be >= 0: virtual time never goes back")
        self.us += step

    def jump_to(self, us: int) -> None:
        """Autojump: set the clock to ``us`` microseconds after start (never backwards)."""
        if us > self.us:
            self.us = us


class ServerClock:
    """One server's clock: shared monotonic time, wall time shifted by ``skew``."""

    def __init__(self, clock: SimClock, skew: timedelta = timedelta(0)) -> None:
        self._clock = clock
        self.skew = skew

    def now(self) -> datetime:
        # The same instant without a skew (no new datetime: most servers have none).
        return self._clock.now() + self.skew if self.skew else self._clock.now()

    def monotonic(self) -> float:
        return self._clock.monotonic()
