"""Running unmodified user code under virtual time, one step at a time.

Two pieces live here (``asyncio`` loops: `tullius.sim.virtual_asyncio`):

* `VirtualTime`: while a simulation runs (one ``run_for``/``drain``, not one
  task), freezegun fakes ``time.time``, ``time.monotonic``,
  ``time.perf_counter``, ``datetime.now`` and friends, and ``time.sleep`` (also
  a ``from time import sleep`` in any loaded module) is replaced by
  `virtual_sleep`; between runs freezegun stays started on the real clock
  (`_HeldFreeze`), and the sleeps stay replaced (`_HeldSleeps`: outside the
  simulator's threads `virtual_sleep` is the real sleep), since both scan
  every loaded module.
* the errors of running user code (`TaskStopped`, `UserCodeHang`,
  `UserThreadLeak`), and `virtual_sleep`, the sleep of a pool thread
  (`tullius.sim.threads`, which runs user code one step at a time).

Stopping a task (deadline, crashed worker, lost lease) resumes its sleep with
`TaskStopped`, a ``BaseException`` so that ``except Exception`` can't swallow
it; a sleep called after that raises it again.  What this cannot stop, and the
answer to each (see the README, "User code under virtual time"):

* code that never sleeps nor returns (a busy loop, a deadlock on a lock held by
  another task): after ``wall_limit`` real seconds ``run_for`` raises
  `UserCodeHang`, naming the task, instead of hanging (and the simulation
  can't run again);
* threads started inside ``run()``: their sleeps are real sleeps, and a thread
  still alive when ``run()`` returns is refused with `UserThreadLeak`.

Nothing here knows about tasks or stores.
"""

from __future__ import annotations

import copyreg
import datetime as datetime_module
import functools
import operator
import sys
import threading
import time
from datetime import UTC, datetime
from types import ModuleType
from typing import Any, Final

from tullius.errors import TulliusError

#: The real ``time.sleep``, ``time.monotonic`` and ``time.process_time``, kept
#: inside a tuple: freezegun replaces module attributes that *are* the real
#: functions, and the simulator must keep the real ones.
REAL: Final = (time.sleep, time.monotonic, time.process_time)

#: Per thread: ``baton``, the pool thread (`tullius.sim.threads.Baton`) this
#: thread is, if it is one; its user code's sleeps are virtual.
thread_role = threading.local()


class SimulationError(TulliusError):
    """The simulation can't go on, or found a broken promise."""


class UserCodeHang(SimulationError):
    """User code ran for ``wall_limit`` real seconds without sleeping or returning.

    Attributes:
        what: the task and call (``"ExampleTask.run() of task 't0001'"``).
        wall_limit: the limit in seconds.
    """

    def __init__(self, what: str, wall_limit: float) -> None:
        self.what = what
        self.wall_limit = wall_limit
        super().__init__(
            f"{what} ran for {wall_limit:g} real seconds without calling time.sleep() or "
            "returning; under virtual time a loop that never sleeps never lets time pass "
            "(busy-wait on time.time(), or a lock held by another task); add a sleep, or raise "
            "wall_limit= if the work is genuinely that slow (an asyncio loop in a task also "
            "waits for real for the threads and child processes it started, until they end)"
        )


class UserThreadLeak(SimulationError):
    """``run()``/``failed()`` returned while threads it started were still running."""

    def __init__(self, what: str, names: list[str]) -> None:
        self.what = what
        self.names = names
        super().__init__(
            f"{what} returned while threads it started are still running: {names!r}; the "
            "simulator runs user code one step at a time under virtual time and can't schedule "
            "other threads: join them before returning"
        )


class TaskStopped(BaseException):  # a signal to unwind, not an error to report
    """Raised inside user code to stop it (deadline, crashed worker, lost lease).

    A ``BaseException``: ``except Exception`` in user code can't swallow it.
    """


#: Modules whose waits are for another process: `virtual_sleep` and the clocks
#: are real when they call them, so ``subprocess.run(..., timeout=5)`` waits for
#: its child for real (a virtual clock timed a 0.5 s child out after 5 virtual
#: seconds, or never timed a stuck one out), as asyncio's child processes do.
REAL_TIME_MODULES: Final = frozenset(
    {"subprocess", "multiprocessing", "concurrent.futures.process"}
)
#: Their submodules (``multiprocessing.connection``): a prefix with its dot, so that a
#: user's ``subprocess_jobs`` is not one of them.
_REAL_TIME_PACKAGES: Final = tuple(f"{name}." for name in REAL_TIME_MODULES)


def _real_for(caller: int) -> bool:
    """Whether real time applies to a call from ``caller`` frames above this
    function's caller: on every thread but the simulated workers', and in the
    waits of `REAL_TIME_MODULES`."""
    if getattr(thread_role, "baton", None) is None:
        return True
    name: str = sys._getframe(caller + 1).f_globals.get("__name__", "")
    return name in REAL_TIME_MODULES or name.startswith(_REAL_TIME_PACKAGES)


#: The longest sleep ``time.sleep`` takes (its nanoseconds are a signed 64-bit int).
_LONGEST_SLEEP: Final = (2**63 - 1) // 10**9


def virtual_sleep(seconds: float) -> None:
    """``time.sleep`` while a simulation runs: a user thread's sleep advances virtual time.

    A thread that is not a simulated worker (a thread started inside ``run()``,
    or unrelated to the simulation) sleeps for real, and so does a wait of
    `REAL_TIME_MODULES`.  Refuses what ``time.sleep`` refuses, with its errors.
    """
    if not isinstance(seconds, float):
        if not isinstance(seconds, int):
            seconds = operator.index(seconds)  # TypeError, as time.sleep's, for the rest
    elif seconds != seconds:
        raise ValueError("Invalid value NaN (not a number)")
    if seconds < 0:
        raise ValueError("sleep length must be non-negative")
    if seconds > _LONGEST_SLEEP:
        raise OverflowError(
            "timestamp out of range for platform time_t"
            if isinstance(seconds, float)
            else "timestamp too large to convert to C _PyTime_t"
        )
    if _real_for(1):  # 1: the caller of the sleep
        REAL[0](seconds)
        return
    thread_role.baton.sleep(seconds)


def _real_time_here() -> bool:
    """freezegun's ``_should_use_real_time`` during a run: real time for every
    thread but the simulated workers' (threads user code starts sleep for real,
    and polling a frozen clock they waited for ever), and for the waits of
    `REAL_TIME_MODULES`; virtual time for user code itself.  (freezegun's own
    walks the caller's stack on every clock read; it is switched off for runs,
    see `_HeldFreeze.resume`.)"""
    return _real_for(2)  # 1: freezegun's fake clock function, 2: its caller


class VirtualTime:
    """freezegun plus the ``sleep`` patch, for the length of one run of the scheduler.

    Use as a context manager; `set_now()` moves the frozen wall clock (and with
    it freezegun's monotonic and perf_counter) before user code gets the baton.
    freezegun starts at the first `set_now()`, not on entry: a run in which no
    user code runs (an idle stretch, a state-machine step) doesn't pay for its
    scan of every loaded module.
    """

    def __init__(self, now: datetime) -> None:
        self._freezer: Any = None
        self._factory: Any = None
        self._now = now  # what the factory says (once started)
        self._exited = False

    def __enter__(self) -> VirtualTime:
        return self

    def _start(self, now: datetime) -> None:
        self._freezer, self._factory = _HELD.resume(now)
        _SLEEPS.cover()

    def patch_module(self, module: ModuleType) -> None:
        """Replace the real ``sleep`` in ``module``: a task class's, which may have been
        imported during this run, after `_start` covered every module then loaded
        (a module imported with it is covered at the next run's start)."""
        _SLEEPS.cover_module(module)

    def set_now(self, now: datetime) -> None:
        if self._exited:  # a loop still going after its run was given up (a hang)
            raise SimulationError("virtual time is over: the run this loop belonged to ended")
        if self._factory is None:
            self._start(now)
        elif now != self._now:  # many steps run at the same instant: no conversion then
            self._factory.time_to_freeze = _naive(now)
        self._now = now

    def __exit__(self, *exc: object) -> None:
        self._exited = True
        if self._freezer is not None:
            _HELD.suspend(self._freezer, self._factory)
            self._freezer = self._factory = None


class _HeldFreeze:
    """freezegun kept started between runs, reading the real clock, until `release`.

    Why: starting freezegun scans every loaded module for references to the
    real clock functions (and stopping it scans the modules loaded since):
    about 2 ms each time, paid by every ``run_for`` that runs user code.  A
    test that steps a simulation in small runs (a Hypothesis state machine, a
    benchmark's arrivals) paid it per step, often more than the step itself.

    So when a run ends with its freeze the only one active, the freeze stays
    on freezegun's stacks with a factory that answers the real time
    (`_RealClock`) and an ignore list that matches every module (so the
    patched functions read the real clocks, as they do for freezegun's own
    ignored modules); the next run swaps its frozen time back in.  freezegun's
    pickling hook for datetimes is taken off meanwhile.  If another freeze is
    active when a run starts, the run freezes on top of it as before.

    Held only where that is invisible: the local time zone is UTC (freezegun's
    ``datetime.now()``, ``date.today()`` and naive ``timestamp()`` read the
    factory as UTC whatever the zone), and freezegun inspects the call stack
    (``call_stack_inspection_limit``, else its clock functions would read the
    factory too).  Elsewhere each run stops freezegun, as before.
    `release` (``Simulation.close()``) stops the held freeze for good.  This
    uses freezegun's module-level stacks, checked before use (`_stacks_known`);
    without them every run starts and stops freezegun.
    """

    def __init__(self) -> None:
        self._held: tuple[Any, Any] | None = None
        self._pickling: dict[Any, Any] = {}  # freezegun's copyreg entries, while held
        #: Runs going on: more than one when a task runs a simulation of its own.
        self._depth = 0
        #: freezegun's own ``_should_use_real_time``, while runs replace it.
        self._check: Any = None

    @property
    def running(self) -> bool:
        return self._depth > 0

    def resume(self, now: datetime) -> tuple[Any, Any]:
        """A started freeze at ``now`` and its factory: the held one if it is intact."""
        import freezegun  # imported here: the pytest plugin must stay cheap to import
        import freezegun.api as api

        if self._held is not None and self._depth == 0 and _intact(api):
            freezer, factory = self._held
            factory.time_to_freeze = _naive(now)
            copyreg.dispatch_table.update(self._pickling)
        else:
            freezer = freezegun.freeze_time(_naive(now), tick=False)
            factory = freezer.start()
        # freezegun walks the caller's stack on every clock read, looking for
        # ignored modules such as ``threading``, which is always on a pool
        # thread's stack; user code there must see virtual time, so the check
        # is switched off for this freeze (module patching still honours it),
        # and replaced by the simulator's own, by thread (`_real_time_here`,
        # and `_ByThread` for the datetimes, which don't ask it).
        factories: list[Any] = api.freeze_factories  # it holds any callable
        factories[-1] = _ByThread(factory)
        api.ignore_lists[-1] = ()
        self._depth += 1
        if self._depth == 1 and callable(getattr(api, "_should_use_real_time", None)):
            self._check = api._should_use_real_time
            api._should_use_real_time = _real_time_here
        return freezer, factory

    def suspend(self, freezer: Any, factory: Any) -> None:
        """End a run: hold its freeze on the real clock if it is the only one active
        (else stop it, as before)."""
        import freezegun.api as api

        self._depth -= 1
        if self._depth == 0 and self._check is not None:
            api._should_use_real_time = self._check
            self._check = None
        top = api.freeze_factories[-1] if _stacks_known() and api.freeze_factories else None
        if (
            self._depth == 0
            and len(api.freeze_factories) == 1
            and isinstance(top, _ByThread)
            and top.factory is factory
            and (self._held is None or self._held[0] is freezer)
            and bool(getattr(api, "call_stack_inspection_limit", None))
            and time.timezone == 0
            and (not time.daylight or time.altzone == 0)
        ):
            factories: list[Any] = api.freeze_factories  # it holds any callable
            factories[0] = _REAL_CLOCK
            api.ignore_lists[0] = ("",)
            self._pickling = {
                kind: copyreg.dispatch_table.pop(kind)
                for kind in (api.real_datetime, api.real_date)
                if kind in copyreg.dispatch_table
            }
            self._held = (freezer, factory)
        else:
            freezer.stop()

    def release(self) -> None:
        """Stop the held freeze: the real clock functions are back everywhere.  Not
        during a run, nor while another freeze is active (the next close tries again)."""
        if self._held is None or self.running:
            return
        import freezegun.api as api

        if _intact(api):
            freezer, factory = self._held
            self._held = None
            api.freeze_factories[0] = factory
            api.ignore_lists[0] = ()
            copyreg.dispatch_table.update(self._pickling)
            freezer.stop()


class _ByThread:
    """A run's freezegun time factory: the frozen time on the simulated workers'
    threads, the real time on every other (`_REAL_CLOCK`).  Why: a thread user
    code starts sleeps for real, and polling ``datetime.now()`` on the frozen
    clock it waited for ever."""

    __slots__ = ("factory",)

    def __init__(self, factory: Any) -> None:
        self.factory = factory

    def __call__(self) -> datetime:
        if getattr(thread_role, "baton", None) is None:
            return _REAL_CLOCK()
        result: datetime = self.factory()
        return result


class _RealClock:
    """A freezegun time factory that answers the real time (naive UTC, as theirs do)."""

    def __call__(self) -> datetime:
        import freezegun.api as api

        real: type[datetime] = api.real_datetime
        return real.now(UTC).replace(tzinfo=None)


_REAL_CLOCK: Final = _RealClock()


def _intact(api: Any) -> bool:
    """Whether freezegun is as a held freeze left it: patched, only that freeze active."""
    return (
        _stacks_known()
        and len(api.freeze_factories) == 1
        and api.freeze_factories[0] is _REAL_CLOCK
        and time.time is api.fake_time
        and datetime_module.datetime is api.FakeDatetime
    )


@functools.cache
def _stacks_known() -> bool:
    """Whether freezegun keeps its freezes in the module-level stacks `_HeldFreeze` uses."""
    try:
        import freezegun.api as api
    except ImportError:
        return False
    return all(
        isinstance(getattr(api, name, None), list)
        for name in ("freeze_factories", "tz_offsets", "ignore_lists", "tick_flags")
    ) and all(hasattr(api, name) for name in ("fake_time", "FakeDatetime", "real_datetime"))


_HELD = _HeldFreeze()


class _HeldSleeps:
    """`virtual_sleep` in place of the real ``time.sleep`` in every loaded module,
    from a simulation's first run until `release` (``Simulation.close()``).

    Why every module: a helper module's own ``from time import sleep``, called
    from a task, slept for real and took no virtual time, so a task that
    ``tulliusd`` would time out succeeded in a test.  Why held between runs:
    scanning every loaded module costs about as much as freezegun's start
    (`_HeldFreeze`), and the replacement is invisible outside the simulator's
    threads, where `virtual_sleep` is the real sleep.  Each run scans only the
    modules loaded since the last scan, and a module's names holding the real
    sleep are remembered for the next simulation's (one bound later under a new
    name is missed).  References that are not module attributes (a class
    attribute, a ``functools.partial``) keep the real sleep.
    """

    def __init__(self) -> None:
        #: Per module ever scanned (by id, the module kept so that the id is not
        #: reused): the names that held the real sleep.
        self._names: dict[int, tuple[ModuleType, tuple[str, ...]]] = {}
        #: Modules covered since the last `release` (by id).
        self._covered: set[int] = set()
        #: Attributes replaced: (module, name).
        self._patched: list[tuple[ModuleType, str]] = []

    def cover(self) -> None:
        """Replace the real sleep in every module loaded since the last call."""
        covered = self._covered
        for module in list(sys.modules.values()):
            if id(module) not in covered:
                self.cover_module(module)

    def cover_module(self, module: ModuleType | None) -> None:
        if module is None or id(module) in self._covered:
            return
        self._covered.add(id(module))
        known = self._names.get(id(module))
        if known is None or known[0] is not module:
            try:
                found = tuple(name for name, value in vars(module).items() if value is REAL[0])
            except TypeError:  # not a module with a __dict__ (a stand-in in sys.modules)
                found = ()
            known = self._names[id(module)] = (module, found)
        for name in known[1]:
            if getattr(module, name, None) is not REAL[0]:
                continue
            try:
                setattr(module, name, virtual_sleep)
            except (AttributeError, TypeError):  # a read-only module: left as it is
                continue
            self._patched.append((module, name))

    def release(self) -> None:
        """Put the real sleep back wherever it was replaced (and is still replaced)."""
        for module, name in self._patched:
            if getattr(module, name, None) is virtual_sleep:
                setattr(module, name, REAL[0])
        self._patched.clear()
        self._covered.clear()


_SLEEPS = _HeldSleeps()


def release_frozen_clock() -> None:
    """Stop the freezegun patches and the sleeps held between runs (`_HeldFreeze`,
    `_HeldSleeps`); not during a run."""
    if not _HELD.running:
        _SLEEPS.release()
    _HELD.release()


def _naive(now: datetime) -> datetime:
    return now.astimezone(UTC).replace(tzinfo=None)


def module_of(obj: object) -> ModuleType | None:
    return sys.modules.get(getattr(obj, "__module__", ""), None)


def real_monotonic() -> float:
    return REAL[1]()
