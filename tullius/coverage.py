"""Noticing work that no running server will ever take.

Why: a worker only claims tasks whose priority lies in its band.  A task
queued with a priority outside every band of every running ``tulliusd``
(``priority=20`` when ``task_processes`` says 0-10, a ``failed()`` that raises
the priority of its replacement each time, or the one server that reserved
priority 0 crashed) is never claimed.  It has not failed, so no ``failed()``
runs: it waits, silently, for ever.  Celery has the same hole (a queue nobody
consumes); we close it by making the wait loud.

How: each daemon records its bands in the store with the time it last did so
(`ServerSeen`).  Once per lease it renews its own entry, reads every entry,
takes the servers seen within `LIVE_CHECKS` periods as running, and looks for
due work (``queued``, or ``failed`` with ``failed()`` to run) whose priority
lies outside the union of their bands.  The driver logs what this finds.

This only reports: it never changes a task.  A task waiting for a band whose
servers are all down is not failed, since they may come back; an operator
decides.  Entries are compared with the reader's wall clock, so servers whose
clocks differ by more than a few leases may be taken for stopped (a warning
too many) or for running (a warning late); leases do not depend on any of this.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

from tullius.band import Band
from tullius.document import TaskDoc
from tullius.engine import WORK, Conversation
from tullius.store import AnnounceServer, FindDue, ForgetServer, ReadServers, ServerSeen

#: A server is taken for running while its entry is younger than this many check
#: periods (``tulliusd`` checks once per lease, `LeaseTimings.coverage_check`).
LIVE_CHECKS: Final = 4
#: Entries older than this are deleted (servers named after a pid leave one per start).
FORGET_AFTER: Final = timedelta(days=1)
#: How many waiting tasks a check reports by name at most.
EXAMPLES: Final = 20


@dataclass(frozen=True)
class Coverage:
    """What one check found: the servers taken for running, and work none of them takes."""

    live: tuple[ServerSeen, ...]
    #: Due tasks outside every live band, most urgent first (at most `EXAMPLES`).
    stranded: tuple[TaskDoc, ...]

    def describe(self) -> str:
        """One log line: the waiting tasks by priority, and what the running servers take."""
        by_priority: dict[float, list[TaskDoc]] = {}
        for doc in self.stranded:
            by_priority.setdefault(doc.priority, []).append(doc)
        waiting = "; ".join(
            f"priority {priority:g}: "
            + ", ".join(f"{doc.class_name.rpartition(':')[2]} {doc.task_id}" for doc in docs)
            for priority, docs in by_priority.items()
        )
        more = "+" if len(self.stranded) >= EXAMPLES else ""
        servers = (
            ", ".join(
                f"{seen.server} {' '.join(str(band) for band in seen.bands)}" for seen in self.live
            )
            or "none"
        )
        return (
            f"{len(self.stranded)}{more} task(s) wait for a priority no running tulliusd "
            f"takes, and will wait until one does ({waiting}); running servers and their "
            f"bands (count:min-max): {servers}; expected every priority queued to lie in "
            "some server's task_processes"
        )


def uncovered_ranges(bands: Iterable[Band]) -> list[tuple[float, float]]:
    """The priorities outside every band, as inclusive ``(min, max)`` ranges.

    Bands are inclusive at both ends, so a gap's ends are the floats just past
    its neighbours' (`math.nextafter`): with bands 0-10 and 20-30 the gaps are
    ``(-inf, -5e-324)``, ``(10.000000000000002, 19.999999999999996)`` and
    ``(30.000000000000004, inf)``.  No bands: everything is uncovered.
    """
    gaps: list[tuple[float, float]] = []
    low = -math.inf  # the lowest priority not yet known to be covered
    for band in sorted(bands, key=lambda band: band.min_priority):
        if band.min_priority > low:
            gaps.append((low, math.nextafter(band.min_priority, -math.inf)))
        low = max(low, math.nextafter(band.max_priority, math.inf))
    if low < math.inf:
        gaps.append((low, math.inf))
    return gaps


def check_coverage(
    server: str,
    bands: Sequence[Band],
    *,
    now: datetime,
    live_within: timedelta,
    forget_after: timedelta = FORGET_AFTER,
    limit: int = EXAMPLES,
) -> Conversation[Coverage]:
    """Renew ``server``'s entry, then find due work outside every live server's bands.

    Entries older than ``forget_after`` are deleted on the way.  ``server``
    counts as live whatever its stored entry says (it is running this).
    """
    me = ServerSeen(server, tuple(bands), now)
    yield AnnounceServer(me)
    seen: list[ServerSeen] = yield ReadServers()
    for entry in seen:
        if entry.server != server and now - entry.seen_at > forget_after:
            yield ForgetServer(entry.server, entry.seen_at)
    # Our own entry as we wrote it, whether or not the read saw the write.
    seen = [entry for entry in seen if entry.server != server] + [me]
    return (yield from find_stranded(seen, now=now, live_within=live_within, limit=limit))


def read_coverage(
    *, now: datetime, live_within: timedelta, limit: int = EXAMPLES
) -> Conversation[Coverage]:
    """`check_coverage` for a reader that is not a server (``tulliusd --status``): no writes."""
    seen: list[ServerSeen] = yield ReadServers()
    return (yield from find_stranded(seen, now=now, live_within=live_within, limit=limit))


def find_stranded(
    seen: Sequence[ServerSeen], *, now: datetime, live_within: timedelta, limit: int
) -> Conversation[Coverage]:
    """Due work outside the bands of the servers in ``seen`` renewed within ``live_within``."""
    live = sorted(
        (entry for entry in seen if now - entry.seen_at <= live_within),
        key=lambda entry: entry.server,
    )
    stranded: list[TaskDoc] = []
    for low, high in uncovered_ranges(band for entry in live for band in entry.bands):
        stranded += yield FindDue(WORK, low, high, now, limit - len(stranded))
        if len(stranded) >= limit:
            break
    return Coverage(tuple(live), tuple(stranded))
