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
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Final

from tullius.document import TERMINAL, Status, TaskView, status_of
from tullius.engine import Conversation
from tullius.policy import WRITE_WINDOW
from tullius.store import DeleteTasks, FindByStatus, Load

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
    #: The records the deleted tasks had when read.
    records: int = 0

    def describe(self, older_than: timedelta) -> str:
        """One line for an operator."""
        total = sum(self.deleted.values())
        by_status = ", ".join(f"{status.value} {n}" for status, n in sorted(self.deleted.items()))
        line = f"deleted {total} finished task(s)" + (f" ({by_status})" if total else "")
        line += f" and {self.records} record(s) older than {_days(older_than)}"
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
) -> Conversation[PruneReport]:
    """Delete the finished tasks that may go (see the module), ``batch`` at a time."""
    check_age(older_than)
    statuses = (*SETTLED, Status.UNHANDLED) if unhandled else SETTLED
    report = PruneReport()
    after = ""  # pages in id order; only an empty one ends (a page may lose undecodable ones)
    while True:
        docs = yield FindByStatus(statuses, batch, after)
        if not docs:
            return report
        after = docs[-1].task_id
        doomed: list[TaskView] = []
        for doc in docs:
            view: TaskView | None = yield Load(doc.task_id)
            if view is None:
                continue
            if view.task.status not in statuses:  # a live copy whose move was cut short
                report.kept["not settled"] += 1
                continue
            reason = None if _may_go(view, older_than, now) else "too young"
            if reason is None and view.task.parent_id is not None:
                parent: TaskView | None = yield Load(view.task.parent_id)
                if parent is not None and not (
                    parent.task.status in TERMINAL and _may_go(parent, older_than, now)
                ):
                    reason = "parent too young"
            if reason is not None:
                report.kept[reason] += 1
                continue
            doomed.append(view)
        if doomed:
            yield DeleteTasks(tuple(view.task_id for view in doomed))
            report.deleted.update(view.task.status for view in doomed)
            report.records += sum(len(view.records) for view in doomed)


def _may_go(view: TaskView, older_than: timedelta, now: datetime) -> bool:
    """Whether no writer can reach ``view``'s task any more: its hint is terminal
    (the caller checks) and it settled more than ``older_than`` plus its longest
    time limit ago.  A terminal hint whose records say otherwise is an earlier
    prune's leftover (only a prune deletes records): it may go at once."""
    if status_of(view) not in TERMINAL:
        return True
    task = view.task
    # The hint's due time is when it settled; before that was written (older
    # versions), the last record's time, which is earlier.
    settled_at = task.due_at or max(record.at for record in view.records.values())
    return now - settled_at > older_than + max(task.timeout, task.handler_timeout)
