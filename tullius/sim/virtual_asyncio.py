"""``asyncio`` event loops that user code makes, under virtual time.

A task's ``run()`` may call ``asyncio.run(main())``.  Under freezegun alone its
loop reads the frozen ``time.monotonic`` and waits for its next timer in its
selector, for real: ``await asyncio.sleep(5)`` waited five real seconds, found
the clock unmoved and waited again, until `UserCodeHang`.  So while a
simulation runs (`LOOPS`, held from a run until ``Simulation.close()``), every
selector event loop made on a simulated worker's thread is *virtualised*
(`_virtualise`):

* its clock (``loop.time()``) is the simulation's monotonic clock from the
  POSIX time of its start (so it reads as ``time.monotonic()`` does in user
  code, as in CPython), exact to the microsecond and the same on every server
  (a skewed wall clock doesn't stretch its timers), with a resolution of a
  microsecond;
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

Replies on sockets are not work the loop knows will come: a timer pending
meanwhile fires in virtual time first.  Loops made elsewhere (before the run,
on other threads) are left as they are, and `LOOPS.release` gives the loops
it virtualised their own clock and waits back.
"""

from __future__ import annotations

import contextlib
import time
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
        self.clock: Callable[[], float] | None = None
        self.loops: weakref.WeakSet[Any] = weakref.WeakSet()

    def cover(self, monotonic: Callable[[], float], epoch: float) -> None:
        """``monotonic``: the running simulation's seconds since its start, at ``epoch``
        (its start as a POSIX timestamp): a loop's clock reads ``epoch +
        monotonic()``, as ``time.monotonic()`` in user code (freezegun's) reads the
        frozen wall clock, so that ``loop.call_at(time.monotonic() + 1)`` works."""
        self.clock = lambda: epoch + monotonic()
        if self._real_init is not None:
            return
        cls = selector_events.BaseSelectorEventLoop
        real_init = self._real_init = cls.__init__
        held = self

        def __init__(loop: Any, selector: Any = None) -> None:
            real_init(loop, selector)
            clock = held.clock
            if clock is not None and getattr(thread_role, "baton", None) is not None:
                _virtualise(loop, clock)
                held.loops.add(loop)

        __init__._tullius_virtual = True  # type: ignore[attr-defined]
        cls.__init__ = __init__  # type: ignore[method-assign, assignment]

    def release(self) -> None:
        """Stop virtualising new loops, and give the loops virtualised so far their own
        clock and waits back (one kept by user code would read a closed simulation's
        clock for ever)."""
        real_init, self._real_init = self._real_init, None
        self.clock = None
        cls = selector_events.BaseSelectorEventLoop
        if real_init is not None and getattr(cls.__init__, "_tullius_virtual", False):
            cls.__init__ = real_init  # type: ignore[method-assign]
        for loop in list(self.loops):
            _devirtualise(loop)
        self.loops.clear()


LOOPS = _HeldLoops()


#: The methods `_virtualise` replaces on a loop with instance attributes
#: (`_devirtualise` deletes them again).
_REPLACED = (
    "time",
    "run_in_executor",
    "shutdown_default_executor",
    "_make_subprocess_transport",
)


def _virtualise(loop: Any, clock: Callable[[], float]) -> None:
    """Give ``loop`` the virtual clock and wait (see the module's docstring); instance
    attributes, since asyncio calls them as ``self.time()``, ``self._selector`` and
    ``self.run_in_executor(...)``."""
    waits = _VirtualWait(loop._selector)
    loop._selector = waits
    loop.time = clock
    # The virtual clock's step: asyncio runs a timer once ``when < time() +
    # resolution``, so a timer due less than a microsecond from now is due.
    loop._clock_resolution = 1e-6
    run_in_executor = loop.run_in_executor
    shutdown_default_executor = loop.shutdown_default_executor

    def tracked_run_in_executor(executor: Any, func: Any, *args: Any) -> Any:
        """Real work until both the job has ended in its thread (a cancelled future is
        done at once, its job not) and its result has reached the loop: only then
        is the coroutine awaiting it ready to run before any timer."""
        both = [2]

        def one_done(*_: Any) -> None:
            both[0] -= 1
            if not both[0]:
                waits.running -= 1

        def job(*args: Any) -> Any:
            try:
                return func(*args)
            finally:
                with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                    loop.call_soon_threadsafe(one_done)

        waits.running += 1
        try:
            future = run_in_executor(executor, job, *args)
        except BaseException:
            waits.running -= 1
            raise
        future.add_done_callback(one_done)
        return future

    async def tracked_shutdown(*args: Any, **kwargs: Any) -> Any:
        """``asyncio.run`` waits here for its executor's threads, on a thread of its own."""
        waits.running += 1
        try:
            return await shutdown_default_executor(*args, **kwargs)
        finally:
            waits.running -= 1

    loop.run_in_executor = tracked_run_in_executor
    loop.shutdown_default_executor = tracked_shutdown
    make_transport = getattr(loop, "_make_subprocess_transport", None)
    if make_transport is not None:

        async def tracked_subprocess(*args: Any, **kwargs: Any) -> Any:
            transport = await make_transport(*args, **kwargs)
            waits.processes.add(transport)
            return transport

        loop._make_subprocess_transport = tracked_subprocess


def _devirtualise(loop: Any) -> None:
    for name in _REPLACED:
        with contextlib.suppress(AttributeError):
            delattr(loop, name)
    waits = getattr(loop, "_selector", None)
    if isinstance(waits, _VirtualWait):
        loop._selector = waits.real
    loop._clock_resolution = time.get_clock_info("monotonic").resolution  # as asyncio sets it


class _VirtualWait:
    """A loop's selector whose waits for timers take virtual time (see the module)."""

    def __init__(self, real: Any) -> None:
        self.real = real
        #: Executor jobs under way, and ``shutdown_default_executor`` waits
        #: (`_virtualise`); the child processes the loop started.
        self.running = 0
        self.processes: weakref.WeakSet[Any] = weakref.WeakSet()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def _real_work(self) -> bool:
        return self.running > 0 or any(p.get_returncode() is None for p in self.processes)

    def select(self, timeout: float | None = None) -> Any:
        real = self.real
        baton = getattr(thread_role, "baton", None)
        if baton is None or (timeout is not None and timeout <= 0):
            return real.select(timeout)
        ready = real.select(0)
        if ready:
            return ready
        if timeout is None or self._real_work():
            # No timer: only real I/O, or a thread, can wake the loop.  Or real work
            # of its own under way.  Either way wait for real, virtual time standing
            # still (a wait that never ends is the simulation's hang).
            return real.select(timeout)
        microseconds = round(timeout * 1_000_000)
        if microseconds:  # (under a microsecond: due already, see `_virtualise`)
            baton.sleep(microseconds / 1_000_000)
        return real.select(0)
