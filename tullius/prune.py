"""Deleting finished tasks long after they finished, without letting a late writer redo them.

Why: nothing else ever deletes a task or a record, so the database grows with
every task run.  Celery keeps results a day by default and RQ minutes; a
Tullius user needs a way to keep months, not for ever.

Why not just delete old documents: a record's existence is what makes a late
writer lose.  A server cut off from the database (or paused) while it held a
task could, once its records are gone, win the insert of its verdict and redo
what the task's end did: queue its successors a second time.  So pruning
rests on a promise of the daemon's (`WRITE_WINDOW`: it writes nothing for a
job later than a day after the job's claim and time limit, nor for any other
conversation later than a day after it started), and takes a task only when
that window has closed for every writer who could reach it:

* its hint is terminal and one of those asked for (``unhandled`` only when
  asked: it is the evidence of a failure nobody handled);
* it settled more than ``older_than`` plus its longest time limit
  (``timeout`` or ``failed_timeout``) ago, and ``older_than`` is at least
  `MIN_AGE`.  When it settled is its terminal hint's due time, written by the
  writer that settled it (`machine`): a writer that read it unsettled, or
  held its lease, writes at most a window after that, plus its time limit;
* its parent is gone, or has a terminal hint and passes the same age rule
  with its own time limits: the parent's writers (its verdict, a repair of a
  move cut short) insert its children again, which would bring the task back
  with no records, to run again.

The store deletes each batch's live copies first, then all their records,
then the finished copies (`Store.delete_tasks`), so a prune cut short is
completed by the next one (a terminal hint whose records say otherwise is
its leftover) and never leaves a live task without its records.

The delete names each task as read (`Store.delete_tasks` takes the documents):
once a prune deleted a task, a keyed ``queue()`` repeated late stores it
again under the same id, as new (another ``created_at``), and a second prune
that read the old task before that (two pruning daemons, or a prune repeated
after an error) must not delete the new one.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Final

from tullius.document import TERMINAL, Status, TaskDoc, TaskView, status_of
from tullius.engine import Conversation
from tullius.policy import WRITE_WINDOW
from tullius.store import DeleteTasks, FindByStatus, FindTasks, Load

#: The least ``older_than`` a prune accepts: two write windows (a task settles at
#: most one after the settling writer started; a writer that read it before
#: that writes at most one after), and a day more for clocks.
MIN_AGE: Final = 3 * WRITE_WINDOW
#: How many finished tasks one prune reads (and deletes) at a time.
PRUNE_BATCH: Final = 500
#: The statuses pruned unless ``unhandled`` is asked for too.
SETTLED: Final = (Status.SUCCEEDED, Status.HANDLED)


@dataclass
class PruneReport:
    """What one prune did: tasks deleted per status, and why others were kept."""

    deleted: Counter[Status] = field(default_factory=Counter)
    #: Tasks kept, by reason: "too young", "parent too young", "not settled".
    kept: Counter[str] = field(default_factory=Counter)
    #: Where to go on from, when ``pages`` ran out before the last page (None:
    #: every page was read).
    resume_after: str | None = None

    def add(self, other: PruneReport) -> None:
        """Count ``other``'s deletions and kept tasks in too (a pass made of several calls)."""
        self.deleted.update(other.deleted)
        self.kept.update(other.kept)

    def describe(self, older_than: timedelta) -> str:
        """One line for an operator."""
        total = sum(self.deleted.values())
        by_status = ", ".join(f"{status.value} {n}" for status, n in sorted(self.deleted.items()))
        line = f"deleted {total} task(s) finished over {_days(older_than)} ago, with their records"
        if total:
            line += f" ({by_status})"
        if self.kept:
            kept = ", ".join(f"{n} {reason}" for reason, n in sorted(self.kept.items()))
            line += f"; kept {kept}"
        return line


def _days(age: timedelta) -> str:
    days = age / timedelta(days=1)
    return f"{days:g} day(s)"


def check_age(older_than: timedelta) -> None:
    """Refuse an ``older_than`` under `MIN_AGE`, naming the value.

    Raises:
        ValueError: naming the value and the least accepted.
    """
    if older_than < MIN_AGE:
        raise ValueError(
            f"older_than={_days(older_than)} is too young to prune: expected at least "
            f"{_days(MIN_AGE)}, as a daemon cut off from the database may still write a "
            f"task's verdict up to {_days(WRITE_WINDOW)} after its time limit"
        )


def prune(
    older_than: timedelta,
    *,
    now: datetime,
    unhandled: bool = False,
    batch: int = PRUNE_BATCH,
    after: str = "",
    pages: int | None = None,
) -> Conversation[PruneReport]:
    """Delete the finished tasks that may go (see the module), ``batch`` at a time.

    ``after`` and ``pages``: start after that task id, and stop after that
    many pages, saying where to go on from (`PruneReport.resume_after`).  Why:
    the daemon prunes a page at a time between its other store work, so that
    a large backlog never holds a store thread for long.

    Each page costs a read of the page, one read of the page's tasks old
    enough to go and their parents as they are now (`FindTasks`, live copies
    first; none when the whole page is too young) and one delete: no task's
    records are read, except those of a task settled before settling times
    were written (`_may_go`).
    """
    check_age(older_than)
    statuses = (*SETTLED, Status.UNHANDLED) if unhandled else SETTLED
    if pages is not None and pages < 1:
        raise ValueError(f"pages={pages!r} must be at least 1, or None for every page")
    report = PruneReport()
    read = 0
    # Pages in id order; only an empty one ends (a page may lose undecodable ones).
    while True:
        if pages is not None and read == pages:
            report.resume_after = after
            return report
        read += 1
        page = yield FindByStatus(statuses, batch, after)
        if not page:
            return report
        after = page[-1].task_id
        # Too young as listed is too young as it is now (a settling time only ever
        # moves up, `Store.set_status`): kept without reading it again, which
        # spares most pages of a history kept for weeks any other read.
        old = [doc for doc in page if not _young(doc, older_than, now)]
        if len(old) < len(page):
            report.kept["too young"] += len(page) - len(old)
        if not old:
            continue
        wanted = [doc.task_id for doc in old]
        wanted += [doc.parent_id for doc in old if doc.parent_id is not None]
        current: dict[str, TaskDoc] = {doc.task_id: doc for doc in (yield FindTasks(tuple(wanted)))}
        doomed: list[TaskDoc] = []
        for listed in old:
            doc = current.get(listed.task_id)
            if doc is None:
                continue  # deleted meanwhile
            if doc.status not in statuses:  # a live copy: a move cut short, or inserted again
                report.kept["not settled"] += 1
                continue
            if not (yield from _may_go(doc, older_than, now)):
                report.kept["too young"] += 1
                continue
            parent = None if doc.parent_id is None else current.get(doc.parent_id)
            if parent is not None and not (
                parent.status in TERMINAL and (yield from _may_go(parent, older_than, now))
            ):
                report.kept["parent too young"] += 1
                continue
            doomed.append(doc)
        if doomed:
            yield DeleteTasks(tuple(doomed))
            report.deleted.update(doc.status for doc in doomed)


def _young(doc: TaskDoc, older_than: timedelta, now: datetime) -> bool:
    """Whether ``doc`` settled too recently to go, by its settling time (False
    without one: `_may_go` then reads its records)."""
    settled = doc.due_at
    return settled is not None and not _aged(settled, doc, older_than, now)


def _aged(settled: datetime, doc: TaskDoc, older_than: timedelta, now: datetime) -> bool:
    return now - settled > older_than + max(doc.timeout, doc.handler_timeout)


def _may_go(doc: TaskDoc, older_than: timedelta, now: datetime) -> Conversation[bool]:
    """Whether no writer can reach the task any more, given that its hint is terminal:
    it settled more than ``older_than`` plus its longest time limit ago.

    When it settled is its hint's due time.  A task settled before that was
    written (older versions) has none: then its last record's time, which is
    earlier; and if it has no decided records, it is an earlier prune's
    leftover (only a prune deletes records), which may go at once.
    """
    settled = doc.due_at
    if settled is None:
        view: TaskView | None = yield Load(doc.task_id)
        if view is None:
            return False  # gone meanwhile, or set aside as undecodable: left alone
        if status_of(view) not in TERMINAL:
            return True
        settled = max(record.at for record in view.records.values())
    return _aged(settled, doc, older_than, now)
