"""Keeping the simulator's threads on one CPU while a simulation runs (Linux).

See `SharedCpu`.  Nothing about the simulation's results depends on it.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import TYPE_CHECKING, Final

from tullius.sim.virtual_time import REAL

if TYPE_CHECKING:
    from tullius.sim.threads import Baton, BatonPool


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
        self._since = (REAL[1](), REAL[2]())
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
        wall = REAL[1]()
        if self.cpu is None:
            if self._lifted_at is not None and wall - self._lifted_at >= self.RETRY_AFTER:
                self.start()
            return
        if wall - self._since[0] < self.CHECK_EVERY:
            return
        used = REAL[2]()
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
