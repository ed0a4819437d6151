"""``tulliusd --status``: what an operator must look at, read from the database.

Why: the failures Tullius cannot settle on its own end in two places an
operator has to find without knowing where to look: tasks left
``unhandled`` (every try of ``failed()`` failed), and work no running daemon
takes (`tullius.coverage`).  The report lists both, with the daemons the
database has heard from, the tasks counted by status and the documents set
aside as undecodable.  It changes no task.  Each daemon's entry is judged by
its own renewal period, at the database's time (`read_status`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

from tullius.coverage import Coverage, ago, is_live, read_coverage
from tullius.document import Status, TaskDoc
from tullius.engine import drive
from tullius.errors import TulliusError
from tullius.inspection import ChainLink, read_chain
from tullius.store import ServerSeen, Store

#: How many unhandled tasks are listed.
UNHANDLED_SHOWN: Final = 20
#: Entries of stopped or vanished servers older than this are counted, not listed.
LIST_GONE_FOR: Final = timedelta(hours=1)


@dataclass(frozen=True)
class StatusReport:
    """What `format_status` prints."""

    now: datetime
    #: The time entries are judged at: the database's clock (see `read_status`).
    clock: datetime
    servers: tuple[ServerSeen, ...]
    counts: dict[Status, int]
    #: Documents set aside because they can't be decoded (`MongoStore` only).
    set_aside: int
    coverage: Coverage
    #: At most `UNHANDLED_SHOWN` unhandled tasks: their story, or their bare
    #: document when the story can't be read (the document is what an operator must see).
    unhandled: tuple[ChainLink | TaskDoc, ...]


def read_status(store: Store, *, now: datetime) -> StatusReport:
    """Read the report.

    Entries are judged at the database's clock where the store can read it
    (`MongoStore.server_time`), as the daemons judge them, so a reader whose
    clock is off does not see every daemon as gone; else at the newest
    entry's time, or ``now`` if that is later.
    """
    servers = tuple(store.read_servers())
    count_set_aside = getattr(store, "count_set_aside", None)
    server_time = getattr(store, "server_time", None)
    clock = (server_time() if server_time is not None else None) or max(
        [now, *(seen.seen_at for seen in servers)]
    )
    return StatusReport(
        now=now,
        clock=clock,
        servers=servers,
        counts=store.count_by_status(),
        set_aside=count_set_aside() if count_set_aside is not None else 0,
        coverage=drive(store, read_coverage(servers, now=now, clock=clock)),
        unhandled=tuple(
            _story(store, doc) for doc in store.find_by_status([Status.UNHANDLED], UNHANDLED_SHOWN)
        ),
    )


def _story(store: Store, doc: TaskDoc) -> ChainLink | TaskDoc:
    try:
        return read_chain(store, doc.task_id)[0]
    except TulliusError:  # set aside as undecodable, or gone meanwhile
        return doc


def format_status(report: StatusReport) -> str:
    """The report as text: one section each, the problems spelt out."""
    return "\n".join(
        [
            *_servers(report),
            *_counts(report),
            *_waiting(report),
            *_unhandled(report),
        ]
    )


def _servers(report: StatusReport) -> list[str]:
    clock = report.clock
    lines = ["servers:"]
    gone_long = 0
    for seen in report.servers:
        age = clock - seen.seen_at
        if is_live(seen, clock):
            state = "running"
        elif age > LIST_GONE_FOR:
            gone_long += 1
            continue
        else:
            state = "stopped" if seen.stopped else "not seen (crashed, or cut off)"
        bands = " ".join(str(band) for band in seen.bands)
        lines.append(f"  {seen.server}  {state}, last seen {ago(age)} ago, bands {bands}")
    if gone_long:
        lines.append(f"  and {gone_long} stopped or not seen for over {ago(LIST_GONE_FOR)}")
    if not report.servers:
        lines.append("  none has recorded itself")
    return lines


def _counts(report: StatusReport) -> list[str]:
    counted = ", ".join(
        f"{status.value} {report.counts[status]:,}" for status in Status if status in report.counts
    )
    lines = [f"tasks by status: {counted or 'none'}"]
    if report.set_aside:
        lines.append(
            f"set aside as undecodable (see decode_error in each document): {report.set_aside:,}"
        )
    return lines


def _waiting(report: StatusReport) -> list[str]:
    coverage = report.coverage
    if not coverage.waiting:
        return ["waiting for a priority no running server takes: none"]
    return [
        f"waiting for a priority no running server takes: {coverage.total:,} task(s)",
        *(f"  {phrase}" for phrase in coverage.by_priority(report.now)),
    ]


def _unhandled(report: StatusReport) -> list[str]:
    total = report.counts.get(Status.UNHANDLED, 0)
    lines = [f"unhandled (every try of failed() failed; for an operator): {total:,}"]
    for link in report.unhandled:
        if isinstance(link, TaskDoc):
            lines.append(f"  {link.task_id}  {link.class_name}  (its records can't be read)")
            continue
        failure, error = link.failure, link.handler_error
        lines.append(
            f"  {link.task_id}  {link.class_name}  "
            + (f"failed ({failure.kind}: {_line(failure.message)})" if failure else "failed")
            + (f"; failed() error ({error.kind}: {_line(error.message)})" if error else "")
        )
    if total > len(report.unhandled):
        lines.append(f"  ... and {total - len(report.unhandled):,} more")
    return lines


def _line(message: str, width: int = 120) -> str:
    """A message on one line, cut to ``width``."""
    flat = " ".join(message.split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."
