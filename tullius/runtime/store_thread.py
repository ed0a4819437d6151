"""The daemon's store threads: every store conversation runs here, off the main thread.

The supervisor's main thread must never wait on the database (a kill at a
deadline can't be late because MongoDB is), so it hands each piece of store
work to this thread with a callback.  Finished work wakes the main loop
through a pipe, and the loop runs the callbacks itself, so all of the
supervisor's state is only ever touched by its main thread.

With a `MongoStore` several conversations run at once (pymongo is
thread-safe, and every conversation is correct against concurrent rivals:
that is the protocol), so one slow query does not hold up every finish.  An
in-process `MemoryStore` gets one thread, so it needs no lock.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

Done = Callable[[Future[Any]], None]


class StoreThread:
    """An executor whose completions wake a ``select``-style loop.

    Args:
        threads: how many conversations may run at once (1 for a `MemoryStore`).
    """

    def __init__(self, threads: int = 1) -> None:
        if threads < 1:
            raise ValueError(f"threads={threads!r} must be >= 1")
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="tullius-store")
        self._inflight: list[tuple[Future[Any], Done]] = []
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)

    @property
    def wake_fd(self) -> int:
        """Readable when work finished or `wake()` was called; wait on it."""
        return self._wake_r

    def wake(self) -> None:
        """Wake the loop (safe from any thread and from signal handlers)."""
        with contextlib.suppress(BlockingIOError, OSError):  # full pipe: already awake
            os.write(self._wake_w, b"x")

    def submit(self, work: Callable[[], Any], done: Done) -> None:
        """Run ``work`` on the store thread; `collect()` will call ``done`` with its future."""
        future = self._executor.submit(work)
        future.add_done_callback(lambda _: self.wake())
        self._inflight.append((future, done))

    def collect(self) -> None:
        """Call the ``done`` callback of every finished piece of work (in the caller's thread)."""
        current, self._inflight = self._inflight, []
        pending: list[tuple[Future[Any], Done]] = []
        for future, done in current:
            if future.done():
                done(future)  # may submit more work: that lands in the fresh list
            else:
                pending.append((future, done))
        self._inflight = pending + self._inflight

    def drain(self) -> None:
        """Consume wake-ups, after the loop woke."""
        with contextlib.suppress(BlockingIOError, OSError):
            while os.read(self._wake_r, 512):
                pass

    @property
    def idle(self) -> bool:
        """True when no submitted work is unfinished or uncollected."""
        return not self._inflight

    def close(self) -> None:
        """Wait for the work in progress, drop the rest, release the pipe."""
        self._executor.shutdown(wait=True, cancel_futures=True)
        os.close(self._wake_r)
        os.close(self._wake_w)
