"""Clocks: the only way drivers learn the time.

The machine never reads a clock; drivers pass ``now`` into it.  A clock gives
two readings: ``now()``, aware UTC wall time, written into records and compared
with ``start_after``; and ``monotonic()``, seconds that never jump, used to
judge lease staleness and timeouts locally.  The simulator's clock lives in
``tullius/sim/clock.py``.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime:
        """Aware UTC wall-clock time."""
        ...

    def monotonic(self) -> float:
        """Seconds from an arbitrary origin; never goes backwards."""
        ...


class SystemClock:
    """The real clock of this machine."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()


#: ``CLOCK_BOOTTIME`` where the system has it (Linux), else the monotonic clock.
_BOOT_CLOCK = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)


def boot_seconds() -> float:
    """Seconds from an arbitrary origin, counting time the machine was suspended.

    Why not ``monotonic()``: on Linux it stops while the machine (or its VM) is
    suspended, and a write window (`tullius.prune.WRITE_WINDOW`) must count a
    day spent suspended as a day.
    """
    return time.clock_gettime(_BOOT_CLOCK)
