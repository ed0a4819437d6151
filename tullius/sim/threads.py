"""The simulator's pool threads, and the strict hand-off between them.

``run_for`` hands the scheduler's loop to a pool thread and waits; exactly one
thread runs at a time.  The loop's thread calls a job's ``run()``/``failed()``
itself; if it sleeps, that thread stays with the job, parked in the sleep, and
the loop moves on to a free pool thread, which registers the wake-up time,
lets every other simulated worker proceed and resumes the sleeper (waiting
until it finishes or sleeps again) when virtual time reaches it.  Determinism
follows from the strict hand-off: no two threads ever run Python at once.

Stopping a task (deadline, crashed worker, lost lease) resumes its sleep with
`TaskStopped`.  User code that neither sleeps nor returns for ``wall_limit``
real seconds raises `UserCodeHang` out of ``run_for`` (and the simulation
can't run again).  Nothing here knows about tasks or stores; the simulation
passes callables.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable
from typing import Any, Final

from tullius.sim.cpu_pin import SharedCpu
from tullius.sim.virtual_time import (
    REAL,
    SimulationError,
    TaskStopped,
    UserCodeHang,
    thread_role,
)


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
        thread_role.baton = self
        try:
            then = self._await_order()
            while True:
                if self.order[0] == "schedule":
                    self.pool.serve(self, then)  # ends with this thread among the free
                    then = self._await_order()
                else:
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
        pool.inline = (what, REAL[1](), self)
        try:
            self.result = ("returned", fn())
        except TaskStopped as stop:
            self.result = ("stopped", str(stop))
        except BaseException as error:  # user code: every outcome is data
            self.result = ("raised", error)
        with pool.watch:
            pool.inline = None
            broken = self.broken
        if broken:  # declared hung meanwhile: the simulation has given up on it
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
            with self.pool.watch:
                if self.broken:  # declared hung: no loop may go on
                    raise TaskStopped("the simulation gave up on this task")
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
        #: Set by `serve` when the run is over (one per run).
        self._over = threading.Event()
        #: Held while user code's state changes under the eyes of `_watch`.
        self.watch = threading.Lock()

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
                REAL[0](0.001)
        return self.free[-1]

    def batons(self) -> list[Baton]:
        return list(self._all)

    def order_loop(self, then: Callable[[], None] | None = None) -> None:
        """Have a free thread (a new one if none) run ``then``, then the loop."""
        baton = self.free.pop() if self.free else self._new()
        baton.order = ("schedule", then)
        baton._go.release()

    def serve(self, baton: Baton, then: Callable[[], None] | None) -> None:
        """In pool thread ``baton``: ``then``, then the loop until the run ends; then
        join the free threads and report to `run` (in that order: `close` right after
        the run must find this thread free)."""
        try:
            if then is not None:
                then()
            assert self.loop is not None
            self.loop()
        except _Exit:
            raise
        except BaseException as error:  # carried to the caller of run_for
            self.error = error
        self.free.append(baton)
        self._over.set()

    def run(self) -> None:
        """Hand the loop to a pool thread and wait for the run's end; raise what it raised.

        Raises:
            UserCodeHang: user code ran ``wall_limit`` real seconds without sleeping.
        """
        if self.hung is not None:
            raise SimulationError(f"this simulation stopped at an earlier hang: {self.hung}")
        self.error = None
        self.interrupted = interrupted = False
        over = self._over = threading.Event()
        self.order_loop()
        while True:
            try:
                if over.wait(self.WATCH_EVERY):
                    break
                self._watch()
            except KeyboardInterrupt:  # Ctrl-C: the loop stops at its next event
                self.interrupted = interrupted = True
        error, self.error = self.error, None
        if isinstance(error, UserCodeHang):
            self.hung = error
        if error is not None:
            raise error
        if interrupted:  # the run ended before the loop saw it
            raise KeyboardInterrupt

    def _watch(self) -> None:
        """Give up on user code that has run ``wall_limit`` real seconds without sleeping."""
        with self.watch:
            inline = self.inline
            if inline is None or REAL[1]() - inline[1] < self.wall_limit:
                return
            what, _, baton = inline
            baton.broken = True  # it can't hand the loop on any more (see `Baton.sleep`)
            self.hung = UserCodeHang(what, self.wall_limit)
        _async_raise(baton.thread, TaskStopped)
        raise self.hung

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


def current_baton() -> Baton | None:
    """The pool thread running this code, if it is one."""
    baton: Baton | None = getattr(thread_role, "baton", None)
    return baton
