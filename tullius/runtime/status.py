"""``tulliusd --status``: what an operator must look at, read from the database.

Why: the failures Tullius cannot settle on its own end in two places an
operator has to find without knowing where to look: tasks left
``unhandled`` (every try of ``failed()`` failed), and work no running daemon
takes (`tullius.coverage`).  The report lists both, with the daemons the
database has heard from, the tasks counted by status and the documents set
aside as undecodable.  An unhandled task an operator retried
(``tulliusd --retry-unhandled``, `tullius.retry`) stays unhandled; its
entry says so, and what became of the retry's copy.  Retried tasks are
listed after the others, so that a pile of them never hides a new failure.
It changes no task.  Each daemon's entry is judged by its own renewal
period, at the database's time (`read_status`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Final

from tullius.coverage import Coverage, ago, is_live, read_coverage
from tullius.document import Status, TaskDoc, retried_as, retry_id
from tullius.engine import drive
from tullius.errors import TulliusError
from tullius.inspection import ChainLink, link_of
from tullius.policy import WRITE_WINDOW
from tullius.store import ServerSeen, Store

#: How many unhandled tasks are listed.
UNHANDLED_SHOWN: Final = 20
#: How many unhandled tasks are read (each loaded, to tell the retried ones):
#: the report's reads stay bounded however many there are.
UNHANDLED_READ: Final = 200
#: Entries of stopped or vanished servers older than this are counted, not listed.
LIST_GONE_FOR: Final = timedelta(hours=1)


@dataclass(frozen=True)
class RetryShown:
    """An operator's retry of an unhandled task (`tullius.retry`), as the report shows it."""

    #: The copy whose ``failed()`` the daemons run.
    copy_id: str
    #: When the retry was recorded, and by whom.
    at: datetime
    by: str
    #: The copy's status hint as found; None when it is not stored: the retry
    #: was cut short (or the copy, done with, was pruned since).
    copy_status: Status | None

    @property
    def stored(self) -> bool:
        """Whether the copy is stored."""
        return self.copy_status is not None


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
    #: document when the story can't be read (the document is what an operator
    #: must see).  Those not retried first, then the retried; each oldest first.
    unhandled: tuple[ChainLink | TaskDoc, ...]
    #: The retries of those of them an operator retried, by task id.
    retries: dict[str, RetryShown] = field(default_factory=dict)
    #: How many unhandled tasks were read (at most `UNHANDLED_READ`), and how
    #: many of those were retried.
    unhandled_read: int = 0
    unhandled_retried: int = 0
    #: Whether more unhandled tasks may exist than were read.
    unhandled_capped: bool = False


def read_status(
    store: Store, *, now: datetime, read: int = UNHANDLED_READ, shown: int = UNHANDLED_SHOWN
) -> StatusReport:
    """Read the report.

    Entries are judged at the database's clock where the store can read it
    (`MongoStore.server_time`), as the daemons judge them, so a reader whose
    clock is off does not see every daemon as gone; else at the newest
    entry's time, or ``now`` if that is later.

    At most ``read`` unhandled tasks are read (as `Store.find_by_status` gives
    them: an unhandled task has no ``due_at``, so by id), each loaded to tell
    whether it was retried, and at most ``shown`` listed: those not retried
    first, so that tasks retried already (still unhandled, for good) never
    hide a new failure; each group oldest (``created_at``) first.
    """
    servers = tuple(store.read_servers())
    count_set_aside = getattr(store, "count_set_aside", None)
    server_time = getattr(store, "server_time", None)
    clock = (server_time() if server_time is not None else None) or max(
        [now, *(seen.seen_at for seen in servers)]
    )
    docs = store.find_by_status([Status.UNHANDLED], read)
    fresh: list[tuple[TaskDoc, ChainLink | TaskDoc]] = []
    retried: list[tuple[TaskDoc, ChainLink | TaskDoc]] = []
    retries: dict[str, RetryShown] = {}
    for doc in docs:
        link, retry = _story(store, doc)
        if retry is None:
            fresh.append((doc, link))
        else:
            retried.append((doc, link))
            retries[doc.task_id] = retry
    listed = [link for _, link in (*_oldest_first(fresh), *_oldest_first(retried))][:shown]
    return StatusReport(
        now=now,
        clock=clock,
        servers=servers,
        counts=store.count_by_status(),
        set_aside=count_set_aside() if count_set_aside is not None else 0,
        coverage=drive(store, read_coverage(servers, now=now, clock=clock)),
        unhandled=tuple(listed),
        retries={link.task_id: retries[link.task_id] for link in listed if link.task_id in retries},
        unhandled_read=len(docs),
        unhandled_retried=len(retried),
        unhandled_capped=len(docs) >= read,
    )


def _oldest_first(
    found: list[tuple[TaskDoc, ChainLink | TaskDoc]],
) -> list[tuple[TaskDoc, ChainLink | TaskDoc]]:
    return sorted(found, key=lambda pair: (pair[0].created_at, pair[0].task_id))


def _story(store: Store, doc: TaskDoc) -> tuple[ChainLink | TaskDoc, RetryShown | None]:
    """The task's link and its retry, if retried; its bare document if they can't be read.

    The task alone, not its chain: a retried task's chain goes on through its
    copy, which would make the report's reads grow with the history.
    """
    try:
        view = store.load(doc.task_id)
        if view is None:  # set aside as undecodable, or gone meanwhile
            return doc, None
        children = store.find_children(doc.task_id)
        link = link_of(view, children)
        copy = retried_as(view)
        if copy is None:
            return link, None
        record = view.records[retry_id(doc.task_id)]
    # The same, found by the store; or a document or record that can't be decoded:
    # one bad document must not take the whole report down.
    except (TulliusError, ValueError):
        return doc, None
    found = next((child.status for child in children if child.task_id == copy.task_id), None)
    return link, RetryShown(copy.task_id, record.at, record.server, found)


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
    count = f"{total:,}"
    if report.unhandled_retried:
        of = f"of the {report.unhandled_read:,} read" if report.unhandled_capped else "of them"
        count += f" ({report.unhandled_retried:,} {of} retried already, listed after the others)"
    elif report.unhandled_capped and total > report.unhandled_read:
        count += f" ({report.unhandled_read:,} read, none of them retried)"
    lines = [f"unhandled (every try of failed() failed; for an operator): {count}"]
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
        retry = report.retries.get(link.task_id)
        if retry is not None:
            lines.append(f"    {_retried(link.task_id, retry, report.now)}")
    if total > len(report.unhandled):
        lines.append(f"  ... and {total - len(report.unhandled):,} more")
    return lines


def _retried(task_id: str, retry: RetryShown, now: datetime) -> str:
    """What became of an operator's retry, and what to do if it was cut short."""
    line = f"retried as {retry.copy_id} at {retry.at.isoformat(timespec='seconds')} by {retry.by}"
    if retry.copy_status is not None:
        return f"{line}; {retry.copy_id} {_copy_phrase(retry.copy_id, retry.copy_status)}"
    if now - retry.at <= WRITE_WINDOW:
        return (
            f"{line}, but {retry.copy_id} is not stored (the retry was cut short): "
            f"run tulliusd --retry-unhandled {task_id} again"
        )
    return (
        f"{line}; {retry.copy_id} is not stored: pruned once done with, or never written "
        f"(a retry cut short is completed only within {ago(WRITE_WINDOW)})"
    )


def _copy_phrase(copy_id: str, status: Status) -> str:
    """Where the retry's copy is, as its hint says."""
    if status is Status.UNHANDLED:
        return f"is unhandled too: retry {copy_id} itself"
    if status is Status.FAILED:
        return "is failed: its failed() is pending"
    if status is Status.HANDLING:
        return "is handling: its failed() is running"
    return f"is {status.value}"


def _line(message: str, width: int = 120) -> str:
    """A message on one line, cut to ``width``."""
    flat = " ".join(message.split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."
