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

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

from tullius.band import Band, format_priority
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
    #: Due tasks outside every live band, most urgent first (at most the check's limit).
    stranded: tuple[TaskDoc, ...]
    #: More were found than ``stranded`` holds.
    more: bool = False

    def describe(self) -> str:
        """One log line: the waiting tasks by priority, and what the running servers take."""
        by_priority: dict[float, list[TaskDoc]] = {}
        for doc in self.stranded:
            by_priority.setdefault(doc.priority, []).append(doc)
        waiting = "; ".join(
            f"priority {format_priority(priority)}: "
            + ", ".join(f"{doc.class_name.rpartition(':')[2]} {doc.task_id}" for doc in docs)
            for priority, docs in by_priority.items()
        )
        servers = (
            ", ".join(
                f"{seen.server} {' '.join(str(band) for band in seen.bands)}" for seen in self.live
            )
            or "none"
        )
        return (
            f"{len(self.stranded)}{'+' if self.more else ''} task(s) wait for a priority no "
            f"running tulliusd takes, and will wait until one does ({waiting}); running "
            f"servers and their bands (count:min-max): {servers}; expected every priority "
            "queued to lie in some server's task_processes"
        )


def uncovered_ranges(bands: Iterable[Band]) -> list[tuple[float, float]]:
    """The priorities outside every band, as inclusive ``(min, max)`` float ranges.

    Bands are inclusive at both ends, so a gap's ends are the floats just past
    its neighbours' (`math.nextafter`): with bands 0-10 and 20-30 the gaps are
    ``(-inf, -5e-324)``, ``(10.000000000000002, 19.999999999999996)`` and
    ``(30.000000000000004, inf)``.  No bands: everything is uncovered.  Past
    2**53, where floats are further apart than ints, a gap is widened to the
    float at or beyond the nearest int, never narrowed: a range may then take
    in a priority a band covers (callers filter with `Band.covers`), but
    misses none that no band covers.
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
    server: str,
    bands: Sequence[Band],
    *,
    now: datetime,
    live_within: timedelta,
    forget_after: timedelta = FORGET_AFTER,
    limit: int = EXAMPLES,
) -> Conversation[Coverage]:
    """Renew ``server``'s entry, then find due work outside every live server's bands.

    Ages are judged on the store's clock where it stamps entries itself
    (`MongoStore`: the database's): by our own entry's time as read back, so
    no server's clock is compared with another's.  Entries older than
    ``forget_after`` are deleted on the way.  ``server`` counts as live
    whatever the read says (it is running this).
    """
    me = ServerSeen(server, tuple(bands), now)
    yield AnnounceServer(me)
    seen: list[ServerSeen] = yield ReadServers()
    stamped = next((entry.seen_at for entry in seen if entry.server == server), now)
    for entry in seen:
        if entry.server != server and stamped - entry.seen_at > forget_after:
            yield ForgetServer(entry.server, entry.seen_at)
    seen = [entry for entry in seen if entry.server != server]
    seen.append(ServerSeen(server, tuple(bands), stamped))
    return (
        yield from find_stranded(seen, now=now, clock=stamped, live_within=live_within, limit=limit)
    )


def read_coverage(
    seen: Sequence[ServerSeen], *, now: datetime, live_within: timedelta, limit: int = EXAMPLES
) -> Conversation[Coverage]:
    """`check_coverage` for a reader that is not a server (``tulliusd --status``): no
    writes, and ages judged by the newest entry's time (the store's clock where it
    stamps entries; ours if that is later)."""
    clock = max([now, *(entry.seen_at for entry in seen)])
    return (
        yield from find_stranded(seen, now=now, clock=clock, live_within=live_within, limit=limit)
    )


def find_stranded(
    seen: Sequence[ServerSeen],
    *,
    now: datetime,
    clock: datetime,
    live_within: timedelta,
    limit: int,
) -> Conversation[Coverage]:
    """Work due by ``now`` outside the bands of the servers in ``seen`` renewed
    within ``live_within`` of ``clock`` (the time their entries are compared with)
    and not stopped."""
    live = sorted(
        (entry for entry in seen if not entry.stopped and clock - entry.seen_at <= live_within),
        key=lambda entry: entry.server,
    )
    bands = [band for entry in live for band in entry.bands]
    stranded: list[TaskDoc] = []
    for low, high in uncovered_ranges(bands):
        found: list[TaskDoc] = yield FindDue(WORK, low, high, now, limit + 1 - len(stranded))
        stranded += [doc for doc in found if not any(band.covers(doc.priority) for band in bands)]
        if len(stranded) > limit:
            break
    return Coverage(tuple(live), tuple(stranded[:limit]), more=len(stranded) > limit)
