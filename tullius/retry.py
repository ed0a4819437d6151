"""An operator's second chance for an UNHANDLED task: ``failed()`` tried again, once fixed.

Why: a task whose ``failed()`` failed on every attempt is left UNHANDLED, its
failure recorded and never dropped.  Once the bug in ``failed()`` is fixed,
the operator needs that failure handled; queueing a copy of the task would
run its ``run()`` again (charge the card twice), which is not what was asked.

How: terminal statuses never change (every proof about late writers leans on
that), so the task itself stays UNHANDLED.  A ``retry`` record on it, inserted
once under a deterministic id, decides the retry; it carries a copy of the
task (origin ``retry``, a child of the task), born FAILED: its run and failed
outcome records are written first, copying the task's own failure, and then
the copy itself, due at once (`machine._retry_writes`).  The daemons then
run the copy's ``failed()`` with the usual attempts, backoff and leases, and
its ``self.failure`` is the task's.  ``tullius.chain()`` follows the task to
its copy.

A retry cut short (the store out of reach, the process killed) is completed
by asking again: the copy's writes are repeated, each harmless twice.  But
only within `WRITE_WINDOW` of the retry record: past it the copy may have
run, settled and been pruned, and writing it again would run its
``failed()`` a second time; then a missing copy is reported, not re-made.
And a prune keeps ``retry`` records (`Store.delete_tasks`): a retry asked for
while its task is being pruned then finds the first one, instead of deciding
a second whose copy, with its derived id, would be the pruned one again.

The copy takes ``failed_timeout`` and ``failed_attempts`` from the task's
class as the operator's process loads it (`current_limits`): the fix may be
to raise them.  Its ``self.task_id`` is its own; ``self.retried_from()``
names the task.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Final, TypeVar

from tullius.clock import window_seconds
from tullius.document import (
    Status,
    TaskDoc,
    TaskView,
    retried_as,
    retry_copy_id,
    retry_id,
    short_name,
    status_of,
)
from tullius.engine import Conversation, apply_step, drive
from tullius.errors import NotRetried, TaskNotFound, UnknownTaskClass
from tullius.events import Retried
from tullius.machine import settle, step
from tullius.policy import WRITE_WINDOW
from tullius.store import FindByStatus, FindTasks, Load, LoadMany, Store
from tullius.task import load_class

T = TypeVar("T")

#: How many UNHANDLED tasks `retry_all` reads at a time.
RETRY_BATCH: Final = 500

#: A class's ``failed_timeout`` and ``failed_attempts``, or None to keep the task's own.
Limits = Callable[[str], "tuple[timedelta, int] | None"]


def _class_limits(class_name: str) -> tuple[timedelta, int]:
    """``failed_timeout`` and ``failed_attempts`` of the stored class as this process
    loads it now.

    Raises:
        UnknownTaskClass: it can't be loaded here.
    """
    cls = load_class(class_name)
    return cls.failed_timeout, cls.failed_attempts


def current_limits(class_name: str) -> tuple[timedelta, int] | None:
    """`_class_limits`, or None if the class can't be loaded here (then the task's
    own stand)."""
    try:
        return _class_limits(class_name)
    except UnknownTaskClass:
        return None


def limits_once(unloadable: Callable[[UnknownTaskClass], None]) -> Limits:
    """`current_limits`, each class loaded (or found unloadable) once, and
    ``unloadable`` told why a class can't be loaded, once per class.

    Why once: loading a class that can't be loaded imports its module again
    each time, running whatever its import does, for every task of it.
    """
    known: dict[str, tuple[timedelta, int] | None] = {}

    def limits(class_name: str) -> tuple[timedelta, int] | None:
        if class_name not in known:
            try:
                known[class_name] = _class_limits(class_name)
            except UnknownTaskClass as error:
                known[class_name] = None
                unloadable(error)
        return known[class_name]

    return limits


@dataclass(frozen=True)
class Retry:
    """One retry of a task's ``failed()``.

    Attributes:
        task_id: the UNHANDLED task.
        copy_id: the copy whose ``failed()`` runs (``tullius.chain()`` shows it).
        at: when the retry was recorded.
        by: who recorded it (the ``server`` of the retry record).
        new: True if this call recorded it; False if it had been retried
            before, in which case this call made sure its copy is stored.
        copy_status: the copy's status hint as this call found it (FAILED for
            a new one); None when it is not stored.
        completed: the copy was missing (an earlier retry cut short) and this
            call wrote it.
        stored: False only for a retry made over a `WRITE_WINDOW` ago whose
            copy is gone: pruned once done with (the usual case), or never
            written (a retry cut short and not asked again within the
            window).  It is not written again: it may have run.
        dry_run: asked with ``dry_run``: nothing was written.
        unreadable: the copy is stored but can't be read: set aside as
            undecodable (by a daemon of a version older than retries, say);
            its ``failed()`` won't run until its document is fixed.
    """

    task_id: str
    copy_id: str
    at: datetime
    by: str
    new: bool
    copy_status: Status | None = Status.FAILED
    completed: bool = False
    stored: bool = True
    unreadable: bool = False
    dry_run: bool = False
    #: The copy is UNHANDLED too and was retried in turn: its own copy's id.
    copy_retried_as: str | None = None

    def describe(self) -> str:
        """One line for an operator."""
        if self.new:
            if self.dry_run:
                return f"{self.task_id}: would be retried as {self.copy_id}"
            return f"{self.task_id}: retried as {self.copy_id}; its failed() runs next"
        line = (
            f"{self.task_id}: already retried as {self.copy_id} at "
            f"{self.at.isoformat(timespec='seconds')} by {self.by}"
        )
        if self.unreadable:
            line += (
                f"; {self.copy_id} is stored but set aside as undecodable (see its "
                "decode_error; a daemon older than retries can't read it): its failed() "
                "won't run until its document is fixed"
            )
        elif self.dry_run and self.copy_status is None and self.stored:
            line += f"; {self.copy_id} is missing (that retry was cut short) and would be stored"
        elif self.completed:
            line += f"; {self.copy_id} was missing (that retry was cut short) and is stored now"
        elif not self.stored:
            line += (
                f"; {self.copy_id} is no longer stored (pruned once done with, or never "
                "written), and is not written again, as it may have run"
            )
        elif self.copy_retried_as is not None:
            line += f"; {retried_in_turn(self.copy_id, self.copy_retried_as)}"
        elif self.copy_status is not None:
            line += f"; {self.copy_id} is {self.copy_status.value}"
            if self.copy_status is Status.UNHANDLED:
                line += f" too: retry {self.copy_id} itself"
        return line


def retried_in_turn(copy_id: str, again: str) -> str:
    """How a retry's copy that failed again and was retried itself is told, by
    `Retry.describe` and ``--status``."""
    return f"{copy_id} is unhandled too, and retried as {again}"


def retry(
    task_id: str,
    *,
    now: datetime,
    token: str,
    server: str,
    limits: Limits | None = None,
    dry_run: bool = False,
    known: TaskView | None = None,
) -> Conversation[Retry]:
    """Retry the ``failed()`` of the UNHANDLED task ``task_id`` (see the module).

    ``limits``: the copy's ``failed_timeout`` and ``failed_attempts`` from the
    task's class name (`current_limits`); None, or None from it, keeps the
    task's own.  Asking again for a task already retried records nothing new:
    its copy is made sure of (written again if the first retry was cut short,
    within a `WRITE_WINDOW` of it; past that, a missing copy is reported with
    ``stored`` False, never written again), and the earlier retry is returned.
    With ``dry_run``, only reads: the `Retry` returned says what would be done.
    ``known``: the task as read a moment ago (`retry_all` reads a page of them
    at once), instead of reading it here; a stale one is safe, since the retry
    record's insert decides.

    Raises:
        TaskNotFound: no such task (never queued, or pruned).
        NotRetried: the task is not UNHANDLED.
    """
    view: TaskView | None = known if known is not None else (yield Load(task_id))
    if view is None:
        raise TaskNotFound(task_id)
    status = status_of(view)
    if status is not Status.UNHANDLED:
        raise NotRetried(
            task_id,
            f"its status is {status.value!r}; expected 'unhandled' "
            "(only a task whose every failed() attempt failed is retried)",
        )
    if retried_as(view) is None:
        if dry_run:
            copy_id = retry_copy_id(view.task)
            return Retry(task_id, copy_id, now, server, new=True, copy_status=None, dry_run=True)
        found = None if limits is None else limits(view.task.class_name)
        timeout, attempts = found or (None, None)
        decided = step(view, Retried(token, server, timeout, attempts), now=now)
        winner = yield from apply_step(view, decided, now=now)
        assert winner is not None
        if winner.token == token:
            return _retry(view.with_record(winner), new=True)
        view = view.with_record(winner)  # a rival's retry came first: make sure of it
    done = _retry(view, new=False)
    copies: list[TaskDoc] = yield FindTasks((done.copy_id,))
    if copies:
        again = None
        if copies[0].status is Status.UNHANDLED:  # retried in turn? (said, not advised)
            copy_view: TaskView | None = yield Load(done.copy_id)
            later = None if copy_view is None else retried_as(copy_view)
            again = None if later is None else later.task_id
        return dataclasses.replace(done, copy_status=copies[0].status, copy_retried_as=again)
    if now - done.at > WRITE_WINDOW:
        # It may have run and been pruned since: writing it again would run its
        # failed() a second time.
        return dataclasses.replace(done, copy_status=None, stored=False)
    if dry_run:
        return dataclasses.replace(done, copy_status=None, dry_run=True)
    # Not ``yield from``: the driver sends each write's result, which a tuple can't take.
    for effect in settle(view, now):  # noqa: UP028
        yield effect
    if not (yield FindTasks((done.copy_id,))):
        # Its insert found it there after all: stored, but set aside as undecodable
        # (an older daemon that can't read a copy's origin), so no read returns it.
        return dataclasses.replace(done, copy_status=None, unreadable=True)
    return dataclasses.replace(done, completed=True)


def within_window(store: Store) -> Callable[[Conversation[T]], T]:
    """A driver for ``store`` that makes no task write a `WRITE_WINDOW` after this
    call, as the daemon's writers (`tullius.prune` counts on it)."""
    write_by = window_seconds() + WRITE_WINDOW.total_seconds()

    def run(conversation: Conversation[T]) -> T:
        return drive(store, conversation, write_by=write_by, clock=window_seconds)

    return run


def retry_now(
    store: Store, task_id: str, *, server: str, token: str, dry_run: bool = False
) -> Retry:
    """Drive `retry` on ``store`` now, `within_window`, with the class's `current_limits`."""
    run = within_window(store)
    now = datetime.now(UTC)
    return run(
        retry(task_id, now=now, token=token, server=server, limits=current_limits, dry_run=dry_run)
    )


def _retry(view: TaskView, *, new: bool) -> Retry:
    record = view.records[retry_id(view.task_id)]
    copy = retried_as(view)
    assert copy is not None
    return Retry(view.task_id, copy.task_id, record.at, record.server, new)


def is_of_class(stored: str, asked: str) -> bool:
    """Whether a task stored as class ``stored`` (``module:Class``) is of the class
    an operator named: the same ``module:Class``, or just ``Class``."""
    return asked in (stored, short_name(stored))


@dataclass
class RetryReport:
    """What `retry_all` did."""

    retried: list[Retry] = field(default_factory=list)
    #: Tasks retried before (copies made sure of, or no longer stored).
    earlier: list[Retry] = field(default_factory=list)
    #: Tasks not retried, with the reason.
    refused: list[NotRetried] = field(default_factory=list)
    #: Every UNHANDLED task seen, by class, whether asked for or not: what a
    #: class name that matched nothing may have meant.
    classes: Counter[str] = field(default_factory=Counter)

    def describe(self) -> str:
        """One line for an operator (`Retry.describe` gives one per task)."""
        dry = any(done.dry_run for done in (*self.retried, *self.earlier))
        verb = "would retry" if dry else "retried"
        line = f"{verb} {len(self.retried)} unhandled task(s)"
        if self.earlier:
            line += f"; {len(self.earlier)} retried before"
            gone = sum(not done.stored for done in self.earlier)
            if gone:
                line += f" ({gone} of their copies no longer stored)"
        if self.refused:
            line += f"; {len(self.refused)} refused"
        return line

    def add(self, done: Retry | NotRetried) -> None:
        """Count one task's result: retried now, retried before, or refused."""
        if isinstance(done, NotRetried):
            self.refused.append(done)
        else:
            (self.retried if done.new else self.earlier).append(done)

    def matched(self) -> int:
        """How many tasks were asked for (retried, retried before or refused)."""
        return len(self.retried) + len(self.earlier) + len(self.refused)


def retry_all(
    *,
    now: datetime,
    token: str,
    server: str,
    class_name: str | None = None,
    limits: Limits | None = None,
    batch: int = RETRY_BATCH,
    report: RetryReport | None = None,
    on_each: Callable[[Retry | NotRetried], None] | None = None,
    dry_run: bool = False,
) -> Conversation[RetryReport]:
    """Retry every UNHANDLED task (of ``class_name`` only, if given: the stored
    ``module:Class`` or just ``Class``), as `retry` with ``limits``.

    A copy this call made is not retried in turn, should it fail on every
    attempt while this runs.  ``report`` is filled as it goes (pass one to
    keep what was done if the store fails part-way), and ``on_each`` is
    called with each task's result as it comes.  With ``dry_run``, only reads.
    """
    report = RetryReport() if report is None else report
    made: set[str] = set()
    reached: set[str] = set()  # tasks retried out of id order (an earlier retry's copy)

    def one(task_id: str, known: TaskView | None = None) -> Conversation[Retry | NotRetried | None]:
        try:
            done = yield from retry(
                task_id,
                now=now,
                token=token,
                server=server,
                limits=limits,
                dry_run=dry_run,
                known=known,
            )
        except TaskNotFound:
            return None  # pruned meanwhile
        except NotRetried as refused:
            return refused
        if done.new or done.completed:
            made.add(done.copy_id)
        return done

    def tell(result: Retry | NotRetried) -> None:
        report.add(result)
        if on_each is not None:
            on_each(result)

    after = ""
    while True:
        page: list[TaskDoc] = yield FindByStatus((Status.UNHANDLED,), batch, after)
        if not page:
            return report
        after = page[-1].task_id
        # The page's tasks with their records in one read, not one each: on FerretDB
        # each read of a record scans all of them (see `Store.load_many`).
        asked = tuple(
            doc.task_id
            for doc in page
            if class_name is None or is_of_class(doc.class_name, class_name)
        )
        known = {view.task_id: view for view in (yield LoadMany(asked))} if asked else {}
        for doc in page:
            if doc.task_id in made or doc.task_id in reached:
                continue  # a copy this made, which failed again meanwhile, or done
            report.classes[doc.class_name] += 1
            if class_name is not None and not is_of_class(doc.class_name, class_name):
                continue
            result = yield from one(doc.task_id, known.get(doc.task_id))
            if result is None:
                continue
            if (
                isinstance(result, Retry)
                and result.copy_status is Status.UNHANDLED
                and result.copy_retried_as is None
                and result.copy_id > doc.task_id  # this pass reaches it only later
                and not dry_run
            ):
                # An earlier retry's copy, unhandled too: retried now, before this
                # task's line, so that the line says where it went instead of
                # advising a retry this pass makes a moment later.
                reached.add(result.copy_id)
                report.classes[doc.class_name] += 1
                again = yield from one(result.copy_id, known.get(result.copy_id))
                if again is not None:
                    tell(again)
                    if isinstance(again, Retry):
                        result = dataclasses.replace(result, copy_retried_as=again.copy_id)
            tell(result)
