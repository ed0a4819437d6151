"""Deleting finished tasks long after they finished, without letting a late writer redo them.

Why: nothing else ever deletes a task or a record, so the database grows with
every task run.  Celery keeps results a day by default and RQ minutes; a
Tullius user needs a way to keep months, not for ever.

Why not just delete old documents: a record's existence is what makes a late
writer lose.  A server cut off from the database (or paused) while it held a
task could, once its records are gone, win the insert of its verdict and redo
what the task's end did: queue its successors a second time.  So pruning
rests on a promise of the daemon's (`WRITE_WINDOW`: it writes nothing for a
job later than a day after the job's time limit, nor for any other
conversation later than a day after it started), and takes a task only when
that window has closed for every writer who could have held it:

* its true status (from its records) is terminal and one of those asked for
  (``unhandled`` only when asked: it is the evidence of a failure nobody
  handled), and its hint agrees (the move to ``finished`` was completed);
* the last of its records was written more than ``older_than`` plus its
  longest time limit (``timeout`` or ``failed_timeout``) ago, and
  ``older_than`` is at least `MIN_AGE`;
* its parent is gone or settled too (hint terminal): a parent whose move was
  cut short is repaired by repeating its inserts, which would bring the task
  back with no records, to run again.

The store deletes each batch's live copies first, then the records, then the
finished copies (`Store.delete_tasks`), so a prune cut short is completed by
the next one and never leaves a live task without its records.
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

#: The least ``older_than`` a prune accepts: the write window, and a day more for
#: clocks and the moments between a daemon's check of the window and its write.
MIN_AGE: Final = 2 * WRITE_WINDOW
#: How many finished tasks one prune reads (and deletes) at a time.
PRUNE_BATCH: Final = 500
#: The statuses pruned unless ``unhandled`` is asked for too.
SETTLED: Final = (Status.SUCCEEDED, Status.HANDLED)


@dataclass
class PruneReport:
    """What one prune did: tasks deleted per status, and why others were kept."""

    deleted: Counter[Status] = field(default_factory=Counter)
    #: Tasks kept, by reason: "too young", "parent not settled", "not settled".
    kept: Counter[str] = field(default_factory=Counter)
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
    after: str | None = None
    while True:
        docs = yield FindByStatus(statuses, batch, after)
        doomed: list[TaskView] = []
        for doc in docs:
            view: TaskView | None = yield Load(doc.task_id)
            if view is None:
                continue
            reason = _keep_because(view, statuses, older_than, now)
            if reason is None and view.task.parent_id is not None:
                parent: TaskView | None = yield Load(view.task.parent_id)
                if parent is not None and parent.task.status not in TERMINAL:
                    reason = "parent not settled"
            if reason is not None:
                report.kept[reason] += 1
                continue
            doomed.append(view)
        if doomed:
            record_ids = tuple(r for view in doomed for r in view.records)
            yield DeleteTasks(tuple(view.task_id for view in doomed), record_ids)
            report.deleted.update(view.task.status for view in doomed)
            report.records += len(record_ids)
        if len(docs) < batch:
            return report
        after = docs[-1].task_id


def _keep_because(
    view: TaskView, statuses: tuple[Status, ...], older_than: timedelta, now: datetime
) -> str | None:
    """Why ``view`` must stay, or None if it may go."""
    task = view.task
    if task.status in statuses and not view.records:
        return None  # an earlier prune's leftover: only a prune deletes the records of a task
    if task.status not in statuses or status_of(view) is not task.status:
        return "not settled"  # a move cut short, a hint a repair will fix
    finished_at = max(record.at for record in view.records.values())
    if now - finished_at <= older_than + max(task.timeout, task.handler_timeout):
        return "too young"
    return None
