"""The daemon's store, reporting every call that failed or worked to its sweeper's `LeaseWatch`.

Why every call: the watch stops its store time from the last moment the store
was known up to the first call asked after a failure that works
(`policy.LeaseWatch`), so it needs both ends of an outage as closely as the
daemon sees them.  Claims poll every few milliseconds, so the ends are
usually that close; a sweep, a renewal or a ``queue()`` from a task counts
the same.

What is an outage: a `StoreUnavailable` (`MongoStore` raises it once a call
has failed to reach the database for its whole retry time, 5 s), and a write
the database refused (out of disk, a quota: owners can't renew then either).
A refused read is the database answering, which says it is up: counted as a
call that worked.  Else a claim query refused every second would stop store
time for good, and no lease would ever be declared lost; a refused write
stops it only until the next call that works (claims poll every 10 ms).
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from typing import Any

from tullius.errors import StoreError, StoreUnavailable
from tullius.policy import LeaseWatch
from tullius.store import Store

#: The calls reported: the `Store` protocol's operations.
STORE_METHODS: frozenset[str] = frozenset(
    name for name, value in vars(Store).items() if callable(value) and not name.startswith("_")
)
#: Those that write: refused, they are an outage (see the module).
WRITE_METHODS: frozenset[str] = frozenset(
    {
        "insert_record",
        "insert_tasks",
        "set_status",
        "beat",
        "announce_server",
        "mark_stopped",
        "forget_server",
        "delete_tasks",
    }
)


class WatchedStore:
    """``store``, with each public method call timed on ``monotonic`` and reported to ``watch``.

    The store threads call at once: reports are made one at a time, under a
    lock, and the watch replaces its outage state whole, so a sweep reading
    it on another thread never sees half of one.
    """

    def __init__(
        self,
        store: Store,
        watch: LeaseWatch,
        *,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.inner = store
        self.watch = watch
        self._monotonic = monotonic
        self._lock = threading.Lock()
        #: When the latest call that worked was asked (None: none yet).
        self._up_at: float | None = None

    def __getattr__(self, name: str) -> Any:
        found = getattr(self.inner, name)
        if name not in STORE_METHODS:  # (a pymongo collection is callable, and no call)
            return found
        return functools.partial(self._call, found, name in WRITE_METHODS)

    def __repr__(self) -> str:
        return f"WatchedStore({self.inner!r})"

    def _call(self, method: Callable[..., Any], writes: bool, /, *args: Any, **kwargs: Any) -> Any:
        asked = self._monotonic()
        try:
            result = method(*args, **kwargs)
        except StoreError as error:
            if writes or isinstance(error, StoreUnavailable):
                self._failed(asked)
            else:
                self._answered(asked)
            raise
        self._answered(asked)
        return result

    def _failed(self, asked: float) -> None:
        with self._lock:
            # The earlier of the two: a call asked before the latest one that
            # worked may have hung on a dead connection since it was asked.
            up_at = asked if self._up_at is None else min(asked, self._up_at)
            self.watch.store_failed(up_at, self._monotonic())

    def _answered(self, asked: float) -> None:
        with self._lock:
            if self._up_at is None or asked > self._up_at:
                self._up_at = asked
            if self.watch.down:
                self.watch.store_worked(asked, self._monotonic())
