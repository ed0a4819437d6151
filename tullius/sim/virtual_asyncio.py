"""``asyncio`` event loops that user code makes, under virtual time.

A task's ``run()`` may call ``asyncio.run(main())``.  Under freezegun alone its
loop reads the frozen ``time.monotonic`` and waits for its next timer in its
selector, for real: ``await asyncio.sleep(5)`` waited five real seconds, found
the clock unmoved and waited again, until `UserCodeHang`.  So while a
simulation runs (`LOOPS`, held from a run until ``Simulation.close()``), every
selector event loop made on a simulated worker's thread is *virtualised*
(`_virtualise`):

* its clock (``loop.time()``) is the simulation's monotonic clock, exact to the
  microsecond and the same on every server (a skewed wall clock doesn't
  stretch its timers), with a resolution of a microsecond;
* its wait for the next timer (`_VirtualWait.select`) polls its file
  descriptors without waiting, and if nothing is ready sleeps in virtual time
  until the timer: the worker's sleep, as ``time.sleep`` (`Baton.sleep`), so
  the loop's task is stopped there at its deadline;
* but while the loop waits for real work it started itself (jobs of
  ``run_in_executor``, ``asyncio.to_thread`` and host name lookups, child
  processes), it waits for real, virtual time standing still: that work
  takes no virtual time, as pure CPU work, and its result comes before any
  later timer, whatever the machine's load.  A real wait that never ends is
  the simulation's hang (`UserCodeHang`).

Replies on sockets to servers outside the simulation are not work the loop
knows will come: a timer pending meanwhile fires in virtual time first.  Loops
made elsewhere (before the run, on other threads) are left as they are.
"""

from __future__ import annotations

import asyncio
import weakref
from asyncio import selector_events
from collections.abc import Callable
from typing import Any

from tullius.sim.virtual_time import thread_role


class _HeldLoops:
    """The patch of ``BaseSelectorEventLoop.__init__`` that virtualises loops made on a
    simulated worker's thread: `cover` at each run (with the running simulation's
    monotonic clock), `release` when the simulation closes."""

    def __init__(self) -> None:
        self._real_init: Callable[..., None] | None = None
        self.monotonic: Callable[[], float] | None = None

    def cover(self, monotonic: Callable[[], float]) -> None:
        self.monotonic = monotonic
        if self._real_init is not None:
            return
        cls = selector_events.BaseSelectorEventLoop
        real_init = self._real_init = cls.__init__
        held = self

        def __init__(loop: Any, selector: Any = None) -> None:
            real_init(loop, selector)
            clock = held.monotonic
            if clock is not None and getattr(thread_role, "baton", None) is not None:
                _virtualise(loop, clock)

        __init__._tullius_virtual = True  # type: ignore[attr-defined]
        cls.__init__ = __init__  # type: ignore[method-assign, assignment]

    def release(self) -> None:
        real_init, self._real_init = self._real_init, None
        self.monotonic = None
        cls = selector_events.BaseSelectorEventLoop
        if real_init is not None and getattr(cls.__init__, "_tullius_virtual", False):
            cls.__init__ = real_init  # type: ignore[method-assign]


LOOPS = _HeldLoops()


def _virtualise(loop: Any, monotonic: Callable[[], float]) -> None:
    """Give ``loop`` the virtual clock and wait (see the module's docstring); instance
    attributes, since asyncio calls them as ``self.time()``, ``self._selector`` and
    ``self.run_in_executor(...)``."""
    waits = _VirtualWait(loop._selector)
    loop._selector = waits
    loop.time = monotonic
    # The virtual clock's step: asyncio runs a timer once ``when < time() +
    # resolution``, so a timer due less than a microsecond from now is due.
    loop._clock_resolution = 1e-6
    run_in_executor = loop.run_in_executor

    def tracked_run_in_executor(executor: Any, func: Any, *args: Any) -> Any:
        future = run_in_executor(executor, func, *args)
        waits.jobs.add(future)
        future.add_done_callback(waits.jobs.discard)
        return future

    loop.run_in_executor = tracked_run_in_executor
    make_transport = getattr(loop, "_make_subprocess_transport", None)
    if make_transport is not None:

        async def tracked_subprocess(*args: Any, **kwargs: Any) -> Any:
            transport = await make_transport(*args, **kwargs)
            waits.processes.add(transport)
            return transport

        loop._make_subprocess_transport = tracked_subprocess


class _VirtualWait:
    """A loop's selector whose waits for timers take virtual time (see the module)."""

    def __init__(self, real: Any) -> None:
        self._real = real
        #: Executor jobs the loop awaits (`_virtualise`); child processes it started.
        self.jobs: set[asyncio.Future[Any]] = set()
        self.processes: weakref.WeakSet[Any] = weakref.WeakSet()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def _real_work(self) -> bool:
        return bool(self.jobs) or any(p.get_returncode() is None for p in self.processes)

    def select(self, timeout: float | None = None) -> Any:
        real = self._real
        baton = getattr(thread_role, "baton", None)
        if baton is None or (timeout is not None and timeout <= 0):
            return real.select(timeout)
        ready = real.select(0)
        if ready or timeout is None or self._real_work():
            # Ready; or no timer, so only real I/O can wake the loop; or real work
            # of its own under way: wait for it for real, virtual time standing still.
            return ready or real.select(timeout)
        microseconds = round(timeout * 1_000_000)
        if microseconds:  # (under a microsecond: due already, see `_virtualise`)
            baton.sleep(microseconds / 1_000_000)
        return real.select(0)
