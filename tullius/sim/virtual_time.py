"""Running unmodified user code under virtual time, one step at a time.

Two pieces live here:

* `VirtualTime`: while a simulation runs (one ``run_for``/``drain``, not one
  task), freezegun fakes ``time.time``, ``time.monotonic``,
  ``time.perf_counter``, ``datetime.now`` and friends, and ``time.sleep`` (also
  a ``from time import sleep`` in a task class's module) is replaced by
  `virtual_sleep`; between runs freezegun stays started on the real clock
  (`_HeldFreeze`), since starting it scans every loaded module.
* `Baton` threads (`BatonPool`): ``run_for`` hands the scheduler's loop to a
  pool thread and waits; exactly one thread runs at a time.  The loop's thread
  calls a job's ``run()``/``failed()`` itself; if it sleeps, that thread stays
  with the job, parked in the sleep, and the loop moves on to a free pool
  thread, which registers the wake-up time, lets every other simulated worker
  proceed and resumes the sleeper (strict hand-off: it waits until the
  sleeper finishes or sleeps again) when virtual time reaches it.  Determinism
  follows from the strict hand-off: no two threads ever run Python at once.

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

Nothing here knows about tasks or stores; the simulation passes callables.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as datetime_module
import functools
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from types import ModuleType
from typing import Any, Final

from tullius.errors import TulliusError

# Real functions, kept inside a tuple: freezegun replaces module attributes that
# *are* the real functions, and this module must keep the real ones.
_REAL: Final = (time.sleep, time.monotonic, time.process_time)


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
            "wall_limit= if the work is genuinely that slow"
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


_local = threading.local()


class _Exit(BaseException):
    """Ends a pool thread at `BatonPool.close` (unwinding any loop frames it was parked in)."""


class Baton:
    """One pool thread of a simulation: it runs the scheduler's loop, or one job's user code.

    Exactly one thread runs at a time: the caller of ``run_for`` hands the loop
    to a pool thread and waits for the run's end; that thread calls a job's
    ``run()``/``failed()`` itself (`run_inline`), so a run that returns without
    sleeping costs no switch of threads at all.  When user code sleeps, its
    thread stays with the job (parked in the sleep) and hands the loop to a
    free pool thread; later steps of that job are resumed from the loop
    (`resume`) with the strict hand-off.  When the job ends, its thread is free
    again and, asked to run the loop later, carries on from where it left it
    (the loop keeps its state in the simulation, never in a frame's locals, and
    starting user code is the last thing an event does).

    States of its user code: ``"idle"``, ``"running"``, ``"sleeping"`` (waiting
    for ``wake_us``), ``"done"`` (``result`` holds ``("returned", value)``,
    ``("raised", exc)`` or ``("stopped", reason)``).
    """

    def __init__(self, pool: BatonPool, name: str) -> None:
        self.pool = pool
        self._go = threading.Lock()  # released to give this thread an order or a resume
        self._go.acquire()
        self._back = threading.Lock()  # released by this thread when a resumed step ends
        self._back.acquire()
        self.order: tuple[str, Callable[[], None] | None] = ("schedule", None)
        self.state = "idle"
        self.kill: str | None = None
        self.sleep_us = 0
        self.result: tuple[str, Any] = ("returned", None)
        self.broken = False
        #: Whether the user code running here slept (the loop went on elsewhere).
        self.moved = False
        self._after_sleep: Callable[[], None] | None = None
        #: The CPU this thread is pinned to by `SharedCpu` (None: not pinned).
        self.cpu: int | None = None
        self.thread = threading.Thread(target=self._main, name=name, daemon=True)
        self.thread.start()

    def _main(self) -> None:
        _local.baton = self
        try:
            then = self._await_order()
            while True:
                if self.order[0] == "schedule":
                    self.pool.serve(then)
                then = self._park_free()
        except _Exit:
            return

    def _await_order(self) -> Callable[[], None] | None:
        """Wait for an order: ``"schedule"`` (return what to run before the loop),
        ``"park"`` (return None) or ``"exit"`` (raise `_Exit`)."""
        self._go.acquire()
        order, then = self.order
        if order == "exit":
            raise _Exit
        return then

    def _park_free(self) -> Callable[[], None] | None:
        """Wait among the free threads for an order (see `_await_order`)."""
        self.pool.free.append(self)
        return self._await_order()

    # --- user code ----------------------------------------------------------------

    def run_inline(self, fn: Callable[[], Any], what: str, after_sleep: Callable[[], None]) -> str:
        """Run ``fn`` (user code) here, on the thread running the loop.

        Returns ``"done"`` if it ended without sleeping (``result`` says how).
        If it slept, ``after_sleep`` was run by the thread the loop moved to,
        the later steps were resumed from there, and this returns ``"moved"``
        only once this thread, free again, is asked to carry on the loop.
        """
        pool = self.pool
        self.kill = None
        self.moved = False
        self.state = "running"
        self._after_sleep = after_sleep
        pool.inline = (what, _REAL[1](), self)
        try:
            self.result = ("returned", fn())
        except TaskStopped as stop:
            self.result = ("stopped", str(stop))
        except BaseException as error:  # user code: every outcome is data
            self.result = ("raised", error)
        pool.inline = None
        if self.broken:  # declared hung meanwhile: the simulation has given up on it
            raise _Exit
        self.state = "done"
        if not self.moved:
            return "done"
        pool.free.append(self)  # before the resumer runs on: it may need a free thread
        self._back.release()
        then = self._await_order()
        if then is not None:
            then()
        return "moved"

    def sleep(self, seconds: float) -> None:
        if self.kill is not None:
            raise TaskStopped(self.kill)
        self.sleep_us = max(0, round(seconds * 1_000_000))
        self.state = "sleeping"
        if self.moved:  # a resumed step: back to the loop that resumed it
            self._back.release()
        else:  # the first sleep: the loop goes on in another thread
            self.moved = True
            self.pool.inline = None
            self.pool.order_loop(self._after_sleep)
        self._go.acquire()
        if self.kill is not None:
            raise TaskStopped(self.kill)

    # --- the loop's side ----------------------------------------------------------

    def resume(self, what: str, kill: str | None = None) -> str:
        """Wake the sleeper (with `TaskStopped` if ``kill``); return its new state."""
        self.kill = kill
        self.state = "running"
        self._go.release()
        if not self._back.acquire(timeout=self.pool.wall_limit):
            self.broken = True
            _async_raise(self.thread, TaskStopped)
            raise UserCodeHang(what, self.pool.wall_limit)
        return self.state


def _async_raise(thread: threading.Thread, exc: type[BaseException]) -> None:
    """Best effort: raise ``exc`` in a runaway user thread at its next bytecode."""
    if thread.ident is not None:
        ctypes.pythonapi.PyThreadState_SetAsyncExc(
            ctypes.c_ulong(thread.ident), ctypes.py_object(exc)
        )


class BatonPool:
    """The pool threads of one simulation, and the hand-off between them and ``run_for``.

    ``loop`` is the scheduler's loop (the simulation's); ``run`` hands it to a
    free thread and waits, in the caller's thread, until the run ends, watching
    for user code that runs ``wall_limit`` real seconds without sleeping.
    """

    #: Real seconds between two looks of the waiting caller at the user code running.
    WATCH_EVERY: Final = 0.05

    def __init__(self, wall_limit: float, loop: Callable[[], None] | None = None) -> None:
        self.wall_limit = wall_limit
        self.loop = loop
        self.free: list[Baton] = []
        self._all: list[Baton] = []
        self.threads: set[threading.Thread] = set()
        self.cpu = SharedCpu(self)
        #: (what, real start, thread) of user code running on the loop's thread, if any.
        self.inline: tuple[str, float, Baton] | None = None
        self.error: BaseException | None = None
        self.hung: UserCodeHang | None = None
        self.interrupted = False
        self._run_over = threading.Lock()
        self._run_over.acquire()

    def _new(self) -> Baton:
        baton = Baton(self, f"tullius-sim-user-{len(self._all) + 1}")
        self._all.append(baton)
        self.threads.add(baton.thread)
        self.cpu.join(baton)
        return baton

    def spare(self) -> Baton:
        """A free thread, made if there is none (left free)."""
        if not self.free:
            baton = self._new()
            baton.order = ("park", None)
            baton._go.release()  # it parks among the free ones at once
            while baton not in self.free:
                _REAL[0](0.001)
        return self.free[-1]

    def batons(self) -> list[Baton]:
        return list(self._all)

    def order_loop(self, then: Callable[[], None] | None = None) -> None:
        """Have a free thread (a new one if none) run ``then``, then the loop."""
        baton = self.free.pop() if self.free else self._new()
        baton.order = ("schedule", then)
        baton._go.release()

    def serve(self, then: Callable[[], None] | None) -> None:
        """In a pool thread: ``then``, then the loop until the run ends; report to ``run``."""
        try:
            if then is not None:
                then()
            assert self.loop is not None
            self.loop()
        except _Exit:
            raise
        except BaseException as error:  # carried to the caller of run_for
            self.error = error
        self._run_over.release()

    def run(self) -> None:
        """Hand the loop to a pool thread and wait for the run's end; raise what it raised.

        Raises:
            UserCodeHang: user code ran ``wall_limit`` real seconds without sleeping.
        """
        if self.hung is not None:
            raise SimulationError(f"this simulation stopped at an earlier hang: {self.hung}")
        self.error = None
        self.order_loop()
        while True:
            try:
                if self._run_over.acquire(timeout=self.WATCH_EVERY):
                    break
            except KeyboardInterrupt:  # Ctrl-C: the loop stops at its next event
                self.interrupted = True
                continue
            inline = self.inline
            if inline is not None and _REAL[1]() - inline[1] >= self.wall_limit:
                what, _, baton = inline
                baton.broken = True
                _async_raise(baton.thread, TaskStopped)
                self.hung = UserCodeHang(what, self.wall_limit)
                raise self.hung
        error, self.error = self.error, None
        if isinstance(error, UserCodeHang):
            self.hung = error
        if error is not None:
            raise error

    def close(self) -> None:
        """Stop every thread: unwind sleepers (work of crashed or paused servers, or
        runs cut off by the end of a ``run_for``) with `TaskStopped`, then end them."""
        for baton in self._all:
            if baton.state == "sleeping" and not baton.broken:
                try:
                    baton.resume("a task left sleeping at close()", kill="simulation closed")
                except UserCodeHang:
                    continue
        ending = []
        while self.free:
            baton = self.free.pop()
            baton.order = ("exit", None)
            baton._go.release()
            ending.append(baton.thread)
        for thread in ending:  # so that no thread ends during a later run (leak checks)
            thread.join(timeout=self.wall_limit)


#: Set to False (or the environment variable ``TULLIUS_SIM_PIN_CPU=0``) to let the
#: kernel place and schedule the simulator's threads freely (see `SharedCpu`).
PIN_TO_ONE_CPU = os.environ.get("TULLIUS_SIM_PIN_CPU", "1") != "0"


class SharedCpu:
    """Keeps the simulator's threads on one CPU during a run.

    Why: exactly one of them runs at any moment (the strict hand-off), so they
    never need two CPUs, but the kernel spreads them over two, and then every
    hand-off wakes a sleeping CPU (tens of microseconds on a virtual machine)
    and moves the task's objects from one CPU's cache to the other's.  On the
    2-core reference machine that was over a third of a short task's cost.

    So during a run (`start` to `stop`) the thread of ``run_for``'s caller and
    the pool's threads (the loop's and the sleepers') are pinned to the CPU the
    kernel had the caller on; `stop` gives the caller's thread its own affinity
    back (pool threads only run during runs).  Pinned, they also run as
    ``SCHED_BATCH`` (ordinary threads only; restored by `stop`): a thread
    woken by a hand-off then waits for the waker to block instead of preempting
    it, since it couldn't run anyway before the waker lets go of the GIL; that
    halved the hand-off once more.
    Nothing about the simulation changes, only when and where the kernel runs
    it.  Linux only; not done when the process may use a single CPU.  If
    the process gets less than 3/4 of that CPU (another process is busy on it),
    `check` lifts the pin, since pinned threads can't move away from a busy CPU,
    and pins them again a while later to wherever the kernel has moved them.
    """

    #: Seconds of wall time between two `check`s of how much CPU the process got.
    CHECK_EVERY: Final = 0.05
    #: Seconds after lifting the pin (the CPU was busy) before pinning again.
    RETRY_AFTER: Final = 0.25

    def __init__(self, pool: BatonPool) -> None:
        self._pool = pool
        self.cpu: int | None = None
        self._saved: set[int] = set()
        self._since: tuple[float, float] = (0.0, 0.0)  # (wall, process CPU) at the last check
        self._lifted_at: float | None = None
        self._batch = False  # whether `start` made the caller's thread SCHED_BATCH
        self._caller = 0  # the native id of the thread that called `start`

    def start(self) -> None:
        self._lifted_at = None
        if not PIN_TO_ONE_CPU or not hasattr(os, "sched_setaffinity"):
            return
        try:
            allowed = os.sched_getaffinity(0)
            cpu = _current_cpu()
            if len(allowed) < 2 or cpu not in allowed:
                return
            os.sched_setaffinity(0, {cpu})  # 0: the calling thread only
        except OSError:
            return
        self.cpu, self._saved = cpu, allowed
        self._caller = threading.get_native_id()
        self._batch = _set_batch(self._caller, on=True)
        self._since = (_REAL[1](), _REAL[2]())
        for baton in self._pool.batons():
            self.join(baton)

    def join(self, baton: Baton) -> None:
        """Put a pool thread on the run's CPU (a thread started meanwhile inherits it)."""
        thread_id = baton.thread.native_id
        if baton.cpu == self.cpu or thread_id is None:
            return
        try:  # on Linux a thread id names that one thread
            os.sched_setaffinity(thread_id, self._saved if self.cpu is None else {self.cpu})
        except OSError:
            return
        baton.cpu = self.cpu
        _set_batch(thread_id, on=self.cpu is not None)

    def check(self) -> None:
        """Lift the pin if the process got less than 3/4 of the CPU since the last check;
        pin again (to wherever the kernel has moved the scheduler) a while after."""
        wall = _REAL[1]()
        if self.cpu is None:
            if self._lifted_at is not None and wall - self._lifted_at >= self.RETRY_AFTER:
                self.start()
            return
        if wall - self._since[0] < self.CHECK_EVERY:
            return
        used = _REAL[2]()
        starved = used - self._since[1] < 0.75 * (wall - self._since[0])
        self._since = (wall, used)
        if starved:
            self.stop(unpin_pool=True)
            self._lifted_at = wall

    def stop(self, *, unpin_pool: bool = False) -> None:
        self._lifted_at = None
        if self.cpu is None:
            return
        self.cpu = None
        with contextlib.suppress(OSError):
            os.sched_setaffinity(self._caller, self._saved)
        if self._batch:
            _set_batch(self._caller, on=False)
            self._batch = False
        if unpin_pool:
            for baton in self._pool.batons():
                self.join(baton)


def _set_batch(thread_id: int, *, on: bool) -> bool:
    """Switch an ordinary thread to ``SCHED_BATCH`` (or back); True if it was switched.

    Threads under any other policy (real-time, idle) are left alone.
    """
    try:
        policy = os.sched_getscheduler(thread_id)
        if policy != (os.SCHED_OTHER if on else os.SCHED_BATCH):
            return False
        os.sched_setscheduler(
            thread_id, os.SCHED_BATCH if on else os.SCHED_OTHER, os.sched_param(0)
        )
    except (OSError, AttributeError):  # not permitted, or not Linux
        return False
    return True


def _current_cpu() -> int | None:
    """The CPU the calling thread last ran on (field 39 of its ``stat``), or None."""
    try:
        with open("/proc/thread-self/stat", "rb") as stat:
            return int(stat.read().rpartition(b")")[2].split()[36])
    except (OSError, ValueError, IndexError):
        return None


def virtual_sleep(seconds: float) -> None:
    """``time.sleep`` while a simulation runs: a user thread's sleep advances virtual time.

    A thread that is not a simulated worker (a thread started inside ``run()``,
    or unrelated to the simulation) sleeps for real.
    """
    if seconds < 0:
        raise ValueError("sleep length must be non-negative")
    baton: Baton | None = getattr(_local, "baton", None)
    if baton is None:
        _REAL[0](seconds)
        return
    baton.sleep(seconds)


def current_baton() -> Baton | None:
    return getattr(_local, "baton", None)


class VirtualTime:
    """freezegun plus the ``sleep`` patch, for the length of one run of the scheduler.

    Use as a context manager; `set_now()` moves the frozen wall clock (and with
    it freezegun's monotonic and perf_counter) before user code gets the baton.
    freezegun starts at the first `set_now()`, not on entry: a run in which no
    user code runs (an idle stretch, a state-machine step) doesn't pay for its
    scan of every loaded module.
    """

    def __init__(self, now: datetime, modules: Iterable[ModuleType] = ()) -> None:
        self._start_at = now
        self._modules = list(modules)
        self._patched: list[ModuleType] = []
        self._freezer: Any = None
        self._factory: Any = None

    def __enter__(self) -> VirtualTime:
        return self

    def _start(self, now: datetime) -> None:
        self._freezer, self._factory = _HELD.resume(now)
        time.sleep = virtual_sleep  # type: ignore[assignment]  # same behaviour for floats
        for module in self._modules:
            self.patch_module(module)

    def patch_module(self, module: ModuleType) -> None:
        """Replace a ``from time import sleep`` in ``module`` while virtual time is on."""
        if getattr(module, "sleep", None) is _REAL[0] and module not in self._patched:
            module.sleep = virtual_sleep  # type: ignore[attr-defined]
            self._patched.append(module)

    def set_now(self, now: datetime) -> None:
        if self._factory is None:
            self._start(now)
        else:
            self._factory.time_to_freeze = _naive(now)

    def __exit__(self, *exc: object) -> None:
        time.sleep = _REAL[0]
        for module in self._patched:
            module.sleep = _REAL[0]  # type: ignore[attr-defined]
        self._patched.clear()
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
    ignored modules); the next run swaps its frozen time back in.  If another
    freeze is active when a run starts, the run freezes on top of it as before.
    `release` (``Simulation.close()``) stops the held freeze for good.  This
    uses freezegun's module-level stacks, checked before use (`_stacks_known`);
    without them every run starts and stops freezegun.
    """

    def __init__(self) -> None:
        self._held: tuple[Any, Any] | None = None
        self.running = False

    def resume(self, now: datetime) -> tuple[Any, Any]:
        """A started freeze at ``now`` and its factory: the held one if it is intact."""
        import freezegun  # imported here: the pytest plugin must stay cheap to import
        import freezegun.api as api

        self.running = True
        if self._held is not None and _intact(api):
            freezer, factory = self._held
            factory.time_to_freeze = _naive(now)
            api.freeze_factories[-1] = factory
            api.ignore_lists[-1] = ()
            return freezer, factory
        freezer = freezegun.freeze_time(_naive(now), tick=False)
        factory = freezer.start()
        # freezegun walks the caller's stack on every clock read, looking for
        # ignored modules such as ``threading``, which is always on a pool
        # thread's stack; user code there must see virtual time, so the check
        # is switched off for this freeze (module patching still honours it).
        api.ignore_lists[-1] = ()
        return freezer, factory

    def suspend(self, freezer: Any, factory: Any) -> None:
        """End a run: hold its freeze on the real clock if it is the only one active
        (else stop it, as before)."""
        import freezegun.api as api

        self.running = False
        if (
            _stacks_known()
            and len(api.freeze_factories) == 1
            and api.freeze_factories[0] is factory
            and (self._held is None or self._held[0] is freezer)
        ):
            factories: list[Any] = api.freeze_factories  # it holds any callable
            factories[0] = _REAL_CLOCK
            api.ignore_lists[0] = ("",)
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
            freezer.stop()


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


def release_frozen_clock() -> None:
    """Stop the freezegun patches held between runs (`_HeldFreeze`); not during a run."""
    _HELD.release()


def _naive(now: datetime) -> datetime:
    return now.astimezone(UTC).replace(tzinfo=None)


def module_of(obj: object) -> ModuleType | None:
    return sys.modules.get(getattr(obj, "__module__", ""), None)


def real_monotonic() -> float:
    return _REAL[1]()
