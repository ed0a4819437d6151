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
_STARTED = (time.clock_gettime(_BOOT_CLOCK), time.time())


def window_seconds() -> float:
    """Seconds since this process started, by whichever clock has gone further:
    the boot clock or the wall clock.  What write windows are judged by.

    Why both: ``monotonic()`` stops while the machine is suspended; the boot
    clock counts that, but a VM paused by its hypervisor (or restored from a
    snapshot) may see neither jump, only its wall clock once set right.  A
    write window (`tullius.policy.WRITE_WINDOW`) must count a day away as a
    day, however it was spent.  A wall clock set back counts nothing; one set
    a day forward closes the windows open then, which only turns results into
    ``lost`` failures.
    """
    return max(time.clock_gettime(_BOOT_CLOCK) - _STARTED[0], time.time() - _STARTED[1])
