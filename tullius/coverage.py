"""Noticing work that no running server will ever take.

Why: a worker only claims tasks whose priority lies in its band.  A task
queued with a priority outside every band of every running ``tulliusd``
(``priority=20`` when ``task_processes`` says 0-10, a ``failed()`` that raises
the priority of its replacement each time, or the one server that reserved
priority 0 crashed) is never claimed.  It has not failed, so no ``failed()``
runs: it waits, silently, for ever.  Celery has the same hole (a queue nobody
consumes); we close it by making the wait loud.

How: each daemon records its bands in the store with the time it last did so
(`ServerSeen`, stamped by the database's clock where the store has one).  Once
per lease it renews its own entry, reads every entry, takes the servers not
stopped and seen within `LIVE_CHECKS` periods of its own entry as running,
and looks for due work (``queued``, or ``failed`` with ``failed()`` to run)
whose priority lies outside the union of their bands.  The driver logs what
this finds.

This only reports: it never changes a task.  A task waiting for a band whose
servers are all down is not failed, since they may come back; an operator
decides.  Leases do not depend on any of this.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

from tullius.band import Band, format_priority
from tullius.document import Status, TaskDoc, short_name
from tullius.engine import WORK, Conversation
from tullius.errors import StoreError
from tullius.store import (
    AnnounceServer,
    CountDue,
    FindDue,
    ForgetServer,
    ReadServers,
    ServerSeen,
)

#: A server is taken for running while its entry is younger than this many of its
#: renewal periods (``tulliusd`` renews once per lease, `LeaseTimings.coverage_check`).
LIVE_CHECKS: Final = 4
#: Entries older than this are deleted (servers named after a pid leave one per start).
FORGET_AFTER: Final = timedelta(days=1)
#: How many of the waiting priorities are spelt out (the most urgent), and with
#: how many example tasks each.
SHOWN_PRIORITIES: Final = 10
EXAMPLES_PER_PRIORITY: Final = 3


@dataclass(frozen=True)
class Coverage:
    """What one check found: the servers taken for running, and work none of them takes."""

    live: tuple[ServerSeen, ...]
    #: How many due tasks wait at each priority no live band covers, most urgent first.
    waiting: dict[float, int]
    #: A few of them for each of the first `SHOWN_PRIORITIES` priorities.
    examples: tuple[TaskDoc, ...] = ()
    #: The earliest due time at each of those priorities.
    oldest: dict[float, datetime] = dataclasses.field(default_factory=dict)
    #: The checking server's own entry as read before it renewed it (see
    #: `CoverageCheck`: another daemon using its name shows here).
    previous: ServerSeen | None = None

    @property
    def total(self) -> int:
        return sum(self.waiting.values())

    def by_priority(self, now: datetime) -> list[str]:
        """One phrase per waiting priority shown: how many, since when, examples."""
        phrases = []
        for priority in list(self.waiting)[:SHOWN_PRIORITIES]:
            docs = [doc for doc in self.examples if doc.priority == priority]
            names = ", ".join(f"{short_name(doc.class_name)} {doc.task_id}" for doc in docs)
            oldest = self.oldest.get(priority)
            phrases.append(
                f"priority {format_priority(priority)}: {self.waiting[priority]}"
                + (f", oldest due {ago(now - oldest)} ago" if oldest is not None else "")
                + (f" (e.g. {names})" if names else "")
            )
        hidden = list(self.waiting)[SHOWN_PRIORITIES:]
        if hidden:
            count = sum(self.waiting[priority] for priority in hidden)
            phrases.append(f"and {count} more at {len(hidden)} other priorities")
        return phrases

    def describe(self, now: datetime) -> str:
        """One log line: the waiting tasks by priority, and what the running servers take."""
        servers = (
            ", ".join(
                f"{seen.server} {' '.join(str(band) for band in seen.bands)}" for seen in self.live
            )
            or "none"
        )
        return (
            f"{self.total} task(s) wait for a priority no running tulliusd takes, and will "
            f"wait until one does: {'; '.join(self.by_priority(now))}; running servers and "
            f"their bands (count:min-max): {servers}; expected every priority queued to lie "
            "in some server's task_processes"
        )


def ago(delta: timedelta) -> str:
    """``delta`` rounded for a person: ``40 s``, ``3 min``, ``5 h``, ``2 days``."""
    seconds = max(0, int(delta.total_seconds()))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    if seconds < 2 * 86400:
        return f"{seconds // 3600} h"
    return f"{seconds // 86400} days"


def uncovered_ranges(bands: Iterable[Band]) -> list[tuple[float, float]]:
    """The priorities outside every band, as inclusive ``(min, max)`` float ranges.

    Bands are inclusive at both ends, so a gap's ends are the floats just past
    its neighbours' (`math.nextafter`): with bands 0-10 and 20-30 the gaps are
    ``(-inf, -5e-324)``, ``(10.000000000000002, 19.999999999999996)`` and
    ``(30.000000000000004, inf)``.  No bands: everything is uncovered.  Past
    2**53, where floats are further apart than ints, a gap's end is moved
    towards the band, to the float at or past the nearest int, never away: a
    range may then take in a priority a band covers (callers filter with
    `Band.covers`), but misses none that no band covers.
    """
    gaps: list[tuple[float, float]] = []
    low = -math.inf  # the lowest priority not yet known to be covered
    for band in sorted(bands, key=lambda band: band.min_priority):
        if band.min_priority > low:
            gaps.append((low, _just_below(band.min_priority)))
        low = max(low, _just_above(band.max_priority))
    if low < math.inf:
        gaps.append((low, math.inf))
    return gaps


def _just_above(end: float) -> float:
    """The highest float bound that leaves out no priority above ``end``.

    Priorities are floats or 64-bit ints, so the nearest above ``end`` is the
    next float or the next int, whichever is lower (past 2**53 floats are
    further apart than ints); the bound is the float at or just below it.
    """
    if end == math.inf:
        return math.inf
    rounded = float(end)
    next_float = rounded if rounded > end else math.nextafter(rounded, math.inf)
    nearest = min(next_float, math.floor(end) + 1)
    bound = float(nearest)
    return math.nextafter(bound, -math.inf) if bound > nearest else bound


def _just_below(end: float) -> float:
    """The lowest float bound that leaves out no priority below ``end`` (see `_just_above`)."""
    if end == -math.inf:
        return -math.inf
    rounded = float(end)
    next_float = rounded if rounded < end else math.nextafter(rounded, -math.inf)
    nearest = max(next_float, math.ceil(end) - 1)
    bound = float(nearest)
    return math.nextafter(bound, math.inf) if bound < nearest else bound


def check_coverage(
    me: ServerSeen, *, forget_after: timedelta = FORGET_AFTER
) -> Conversation[Coverage]:
    """Renew the entry ``me`` of the checking server, then find due work outside
    every live server's bands (by ``me.seen_at``, its ``now``).

    Ages are judged on the store's clock where it stamps entries itself
    (`MongoStore`: the database's): by our own entry's time as read back, so
    no server's clock is compared with another's.  Entries older than
    ``forget_after`` are deleted on the way.  The checking server counts as
    live whatever the read says (it is running this).
    """
    now = me.seen_at
    before: list[ServerSeen] = yield ReadServers()
    previous = next((entry for entry in before if entry.server == me.server), None)
    yield AnnounceServer(me)
    seen: list[ServerSeen] = yield ReadServers()
    stamped = next((entry.seen_at for entry in seen if entry.server == me.server), now)
    others = [entry for entry in seen if entry.server != me.server]
    coverage = yield from find_stranded(
        [*others, dataclasses.replace(me, seen_at=stamped)], now=now, clock=stamped
    )
    # Last, and on its own: a store that refuses deletes still gets the check done.
    for entry in others:
        if stamped - entry.seen_at > forget_after:
            try:
                yield ForgetServer(entry.server, entry.seen_at)
            except StoreError:
                break
    return dataclasses.replace(coverage, previous=previous)


def read_coverage(
    seen: Sequence[ServerSeen], *, now: datetime, clock: datetime
) -> Conversation[Coverage]:
    """`check_coverage` for a reader that is not a server (``tulliusd --status``): no
    writes; ``clock`` is the store's time, which entries are judged by."""
    return (yield from find_stranded(seen, now=now, clock=clock))


def is_live(entry: ServerSeen, clock: datetime) -> bool:
    """Whether ``entry``'s server is taken for running at ``clock`` (the store's time)."""
    return not entry.stopped and clock - entry.seen_at <= LIVE_CHECKS * entry.every


def find_stranded(
    seen: Sequence[ServerSeen], *, now: datetime, clock: datetime
) -> Conversation[Coverage]:
    """Work due by ``now`` outside the bands of the servers in ``seen`` that are
    live at ``clock`` (`is_live`), counted per priority, with a few examples."""
    live = sorted((entry for entry in seen if is_live(entry, clock)), key=lambda e: e.server)
    bands = [band for entry in live for band in entry.bands]
    waiting: dict[float, int] = {}
    for low, high in uncovered_ranges(bands):
        counts: dict[float, int] = yield CountDue(WORK, low, high, now)
        waiting.update(
            (priority, count)
            for priority, count in counts.items()
            if not any(band.covers(priority) for band in bands)
        )
    examples: list[TaskDoc] = []
    oldest: dict[float, datetime] = {}
    for priority in sorted(waiting)[:SHOWN_PRIORITIES]:
        shown: list[TaskDoc] = yield FindDue(WORK, priority, priority, now, EXAMPLES_PER_PRIORITY)
        examples += shown
        # find_due puts failures before queued work, each by due time: the first
        # example of a status is its earliest, and queued work can be missing from
        # the examples only when they are all failures, and as many as were asked.
        failed = [doc for doc in shown if doc.status is Status.FAILED]
        queued = [doc for doc in shown if doc.status is not Status.FAILED]
        if not queued and len(shown) == EXAMPLES_PER_PRIORITY:
            queued = yield FindDue((Status.QUEUED,), priority, priority, now, 1)
        due = [docs[0].due_at for docs in (failed, queued) if docs and docs[0].due_at]
        if due:
            oldest[priority] = min(due)
    ordered = {priority: waiting[priority] for priority in sorted(waiting)}
    return Coverage(tuple(live), ordered, tuple(examples), oldest)
