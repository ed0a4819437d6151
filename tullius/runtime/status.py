"""``tulliusd --status``: what an operator must look at, read from the database.

Why: the failures Tullius cannot settle on its own end in two places an
operator has to find without knowing where to look: tasks left
``unhandled`` (every try of ``failed()`` failed), and work no running daemon
takes (`tullius.coverage`).  The report lists both, with the daemons the
database has heard from, the tasks counted by status and the documents set
aside as undecodable.  An unhandled task an operator retried
(``tulliusd --retry-unhandled``, `tullius.retry`) stays unhandled; its
entry says so, and what became of the retry's copy.  Tasks whose retry's
copy is stored are listed after the others, and each group newest first, so
that neither a pile of them nor old failures ever hide a new failure.
It changes no task.  Each daemon's entry is judged by its own renewal
period, at the database's time (`read_status`).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Final

from tullius.coverage import Coverage, ago, is_live, read_coverage
from tullius.document import Status, TaskDoc, retried_as, retry_copy_ids, retry_id
from tullius.engine import drive
from tullius.errors import TulliusError
from tullius.inspection import ChainLink, children_of, link_of
from tullius.policy import WRITE_WINDOW
from tullius.retry import retried_in_turn
from tullius.store import ServerSeen, Store

#: How many unhandled tasks are listed.
UNHANDLED_SHOWN: Final = 20
#: How many unhandled tasks are read at most (each page's copies are looked up
#: at once; only those listed are loaded): past it, the count says it was capped.
UNHANDLED_READ: Final = 20_000
#: How many unhandled tasks are read at a time.
UNHANDLED_PAGE: Final = 500
#: How many retry copies one `Store.find_tasks` looks up at most: a page's, each
#: under both the ids it may have (`retry_copy_ids`).
_FIND_CHUNK: Final = 2 * UNHANDLED_PAGE
#: What decoding one bad document or record may raise.
_BAD_DOCUMENT: Final = (ValueError, KeyError, TypeError)
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
    #: must see).  Those whose retry's copy is not stored first (never retried,
    #: or the copy cut short or pruned), then those whose copy is; each newest
    #: first (see `read_status`).
    unhandled: tuple[ChainLink | TaskDoc, ...]
    #: The retries of those of them an operator retried, by task id.
    retries: dict[str, RetryShown] = field(default_factory=dict)
    #: How many unhandled tasks were read (all, up to `UNHANDLED_READ`), and
    #: how many of those have their retry's copy stored.
    unhandled_read: int = 0
    unhandled_retried: int = 0
    #: Whether more unhandled tasks exist than were read.
    unhandled_capped: bool = False


def read_status(
    store: Store,
    *,
    now: datetime,
    read: int = UNHANDLED_READ,
    shown: int = UNHANDLED_SHOWN,
    page: int = UNHANDLED_PAGE,
) -> StatusReport:
    """Read the report.

    Entries are judged at the database's clock where the store can read it
    (`MongoStore.server_time`), as the daemons judge them, so a reader whose
    clock is off does not see every daemon as gone; else at the newest
    entry's time, or ``now`` if that is later.

    Every unhandled task is read (at most ``read``), ``page`` at a time in id
    order, and at most ``shown`` listed: first those whose retry's copy is not
    stored (never retried, or the copy cut short or pruned), then those whose
    copy is, so that tasks retried already (unhandled for good) never hide a
    new failure; each group newest first, by the time the task was left
    unhandled (an unhandled task's ``due_at``; last when None, as written by
    versions before it was kept).  Whether a task's copy is stored is read with
    one `Store.find_tasks` per page, the copy's ids being derived from the
    task (both forms, `retry_copy_ids`); only the tasks listed are loaded.
    """
    servers = tuple(store.read_servers())
    count_set_aside = getattr(store, "count_set_aside", None)
    server_time = getattr(store, "server_time", None)
    clock = (server_time() if server_time is not None else None) or max(
        [now, *(seen.seen_at for seen in servers)]
    )
    found = _read_unhandled(store, read=read, shown=shown, page=page)
    listed: list[ChainLink | TaskDoc] = []
    retries: dict[str, RetryShown] = {}
    for doc in [*found.fresh, *found.retried][:shown]:
        link, retry = _story(store, doc)
        listed.append(link)
        if retry is not None:
            retries[doc.task_id] = retry
    return StatusReport(
        now=now,
        clock=clock,
        servers=servers,
        counts=store.count_by_status(),
        set_aside=count_set_aside() if count_set_aside is not None else 0,
        coverage=drive(store, read_coverage(servers, now=now, clock=clock)),
        unhandled=tuple(listed),
        retries=retries,
        unhandled_read=found.read,
        unhandled_retried=found.retried_count,
        unhandled_capped=found.capped,
    )


@dataclass
class _Unhandled:
    """What `_read_unhandled` keeps of the unhandled tasks: counts, and the few to list."""

    #: Newest first: at most ``shown`` of those whose retry's copy is not stored,
    #: and at most ``shown`` of those whose copy is.
    fresh: list[TaskDoc] = field(default_factory=list)
    retried: list[TaskDoc] = field(default_factory=list)
    read: int = 0
    retried_count: int = 0
    capped: bool = False


def _read_unhandled(store: Store, *, read: int, shown: int, page: int) -> _Unhandled:
    """Every unhandled task, up to ``read``, page by page in id order (see `read_status`).

    Only counts and each group's newest ``shown`` are kept, so the memory used
    stays that of a page however many tasks there are.
    """
    found = _Unhandled()
    after = ""
    while found.read < read:
        docs = store.find_by_status([Status.UNHANDLED], min(page, read - found.read), after=after)
        if not docs:
            return found
        after = docs[-1].task_id
        found.read += len(docs)
        stored = _copies_stored(store, docs)
        retried = [doc for doc in docs if doc.task_id in stored]
        found.retried_count += len(retried)
        fresh = [doc for doc in docs if doc.task_id not in stored]
        found.fresh = heapq.nsmallest(shown, [*found.fresh, *fresh], key=_newest_first)
        found.retried = heapq.nsmallest(shown, [*found.retried, *retried], key=_newest_first)
    # Read as many as allowed: say so if there are more.
    found.capped = bool(store.find_by_status([Status.UNHANDLED], 1, after=after))
    return found


def _copies_stored(store: Store, docs: list[TaskDoc]) -> set[str]:
    """Those of ``docs`` whose retry's copy is stored (one `Store.find_tasks` per chunk)."""
    # Both ids a copy may have: this version's, and that of retries made before it.
    copy_of = {copy: doc.task_id for doc in docs for copy in retry_copy_ids(doc)}
    copy_ids = list(copy_of)
    stored: set[str] = set()
    for start in range(0, len(copy_ids), _FIND_CHUNK):
        chunk = copy_ids[start : start + _FIND_CHUNK]
        try:
            copies = store.find_tasks(chunk)
        # A copy that can't be decoded: its task counted as not retried, listed
        # with the new failures, where it is seen (not lost among the retried).
        except _BAD_DOCUMENT:
            continue
        stored.update(copy_of[copy.task_id] for copy in copies if copy.task_id in copy_of)
    return stored


_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


def _newest_first(doc: TaskDoc) -> tuple[bool, timedelta, str]:
    """Sort key: latest left unhandled (``due_at``) first, those without one last; then by id."""
    settled = doc.due_at
    if not isinstance(settled, datetime):
        return True, timedelta(0), doc.task_id
    if settled.tzinfo is None:  # a naive time written by hand: UTC, as stored ones
        settled = settled.replace(tzinfo=UTC)
    return False, _EPOCH - settled, doc.task_id


def _story(store: Store, doc: TaskDoc) -> tuple[ChainLink | TaskDoc, RetryShown | None]:
    """The task's link and its retry, if retried; its bare document if they can't be read.

    The task alone, not its chain: a retried task's chain goes on through its
    copy, which would make the report's reads grow with the history.
    """
    try:
        view = store.load(doc.task_id)
        if view is None:  # set aside as undecodable, or gone meanwhile
            return doc, None
        try:
            children = children_of(store, view)
        except _BAD_DOCUMENT:  # one can't be decoded: the query by parent passes such by
            children = store.find_children(doc.task_id)
        link = link_of(view, children)
        copy = retried_as(view)
        if copy is None:
            return link, None
        record = view.records[retry_id(doc.task_id)]
    # The same, found by the store; or a document or record that can't be decoded:
    # one bad document must not take the whole report down.
    except (TulliusError, *_BAD_DOCUMENT):
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
            lines.append(f"    {_retried(link.task_id, retry, report)}")
    if total > len(report.unhandled):
        lines.append(f"  ... and {total - len(report.unhandled):,} more")
    return lines


def _retried(task_id: str, retry: RetryShown, report: StatusReport) -> str:
    """What became of an operator's retry, and what to do if it was cut short."""
    line = f"retried as {retry.copy_id} at {retry.at.isoformat(timespec='seconds')} by {retry.by}"
    if retry.copy_status is Status.UNHANDLED:
        # Unhandled too: retried in turn (listed, as it is unhandled), or to retry.
        again = report.retries.get(retry.copy_id)
        if again is not None:
            return f"{line}; {retried_in_turn(retry.copy_id, again.copy_id)}"
    if retry.copy_status is not None:
        return f"{line}; {retry.copy_id} {_copy_phrase(retry.copy_id, retry.copy_status)}"
    if report.now - retry.at <= WRITE_WINDOW:
        return (
            f"{line}, but {retry.copy_id} can't be read: the retry was cut short, or the "
            f"copy was set aside as undecodable; run tulliusd --retry-unhandled {task_id} "
            "again, which completes the one and names the other"
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
