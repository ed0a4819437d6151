"""``tulliusd --status``: what an operator must look at, read from the database.

Why: the failures Tullius cannot settle on its own end in two places an
operator has to find without knowing where to look: tasks left
``unhandled`` (every try of ``failed()`` failed), and work no running daemon
takes (`tullius.coverage`).  The report lists both, with the daemons the
database has heard from, the tasks counted by status and the documents set
aside as undecodable.  It changes no task, and judges the daemons' entries
by the newest one's time (the database's clock) unless ours is later.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from tullius.band import format_priority
from tullius.coverage import EXAMPLES, LIVE_CHECKS, Coverage, read_coverage
from tullius.document import Status, TaskDoc
from tullius.engine import drive
from tullius.errors import TulliusError
from tullius.inspection import ChainLink, read_chain
from tullius.policy import LeaseTimings
from tullius.store import ServerSeen, Store


@dataclass(frozen=True)
class StatusReport:
    """What `format_status` prints."""

    now: datetime
    #: Servers seen within this of the newest entry are counted as running.
    live_within: timedelta
    servers: tuple[ServerSeen, ...]
    counts: dict[Status, int]
    #: Documents set aside because they can't be decoded (`MongoStore` only).
    set_aside: int
    coverage: Coverage
    #: At most `EXAMPLES` unhandled tasks: their story, or their bare document
    #: when the story can't be read (the document is what an operator must see).
    unhandled: tuple[ChainLink | TaskDoc, ...]


def read_status(store: Store, *, now: datetime, lease: timedelta) -> StatusReport:
    """Read the report; ``lease``: the daemons' (it sets how often they renew their entries)."""
    live_within = LIVE_CHECKS * LeaseTimings(lease).coverage_check
    servers = tuple(store.read_servers())
    count_set_aside = getattr(store, "count_set_aside", None)
    return StatusReport(
        now=now,
        live_within=live_within,
        servers=servers,
        counts=store.count_by_status(),
        set_aside=count_set_aside() if count_set_aside is not None else 0,
        coverage=drive(store, read_coverage(servers, now=now, live_within=live_within)),
        unhandled=tuple(
            _story(store, doc) for doc in store.find_by_status([Status.UNHANDLED], EXAMPLES)
        ),
    )


def _story(store: Store, doc: TaskDoc) -> ChainLink | TaskDoc:
    try:
        return read_chain(store, doc.task_id)[0]
    except TulliusError:  # set aside as undecodable, or gone meanwhile
        return doc


def format_status(report: StatusReport) -> str:
    """The report as text: one section each, the problems spelt out."""
    clock = max([report.now, *(seen.seen_at for seen in report.servers)])
    lines = [f"servers (running: seen within {_ago(report.live_within)}):"]
    for seen in report.servers:
        age = clock - seen.seen_at
        state = (
            "stopped"
            if seen.stopped
            else "running"
            if age <= report.live_within
            else "not seen (crashed, or cut off)"
        )
        bands = " ".join(str(band) for band in seen.bands)
        lines.append(f"  {seen.server}  {state}, last seen {_ago(age)} ago, bands {bands}")
    if not report.servers:
        lines.append("  none has recorded itself")
    counted = ", ".join(
        f"{status.value} {report.counts[status]:,}" for status in Status if status in report.counts
    )
    lines.append(f"tasks by status: {counted or 'none'}")
    if report.set_aside:
        lines.append(
            f"set aside as undecodable (see decode_error in each document): {report.set_aside:,}"
        )
    stranded = report.coverage.stranded
    lines.append(
        "waiting for a priority no running server takes: "
        + (f"{len(stranded)}{'+' if report.coverage.more else ''}" if stranded else "none")
    )
    lines += [
        f"  priority {format_priority(doc.priority)}  {doc.class_name}  {doc.task_id}  due since "
        f"{doc.due_at.isoformat() if doc.due_at else '?'}"
        for doc in stranded
    ]
    total = report.counts.get(Status.UNHANDLED, 0)
    lines.append(f"unhandled (every try of failed() failed; for an operator): {total:,}")
    for link in report.unhandled:
        if isinstance(link, TaskDoc):
            lines.append(f"  {link.task_id}  {link.class_name}  (its records can't be read)")
            continue
        failure = link.failure
        error = link.handler_error
        lines.append(
            f"  {link.task_id}  {link.class_name}  "
            + (f"failed ({failure.kind}: {_line(failure.message)})" if failure else "failed")
            + (f"; failed() error ({error.kind}: {_line(error.message)})" if error else "")
        )
    if total > len(report.unhandled):
        lines.append(f"  ... and {total - len(report.unhandled):,} more")
    return "\n".join(lines)


def _ago(delta: timedelta) -> str:
    seconds = max(0, int(delta.total_seconds()))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    if seconds < 2 * 86400:
        return f"{seconds // 3600} h"
    return f"{seconds // 86400} days"


def _line(message: str, width: int = 120) -> str:
    """A message on one line, cut to ``width``."""
    flat = " ".join(message.split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."
