"""The store conversations every driver has: claim work, finish it, renew, sweep.

Each conversation is a generator that yields store operations (see
``store.py``) and receives their results; it calls `machine.step()` for every
decision.  The daemon runs them straight through with `drive()`; the simulator
interleaves the operations of many servers and injects faults between them.
One engine, two drivers: the rules can't drift apart.

Nothing here reads a clock or a random source of its own: ``now``, the
observer's monotonic reading and ``rng`` are arguments.  A store error raised
into a conversation ends it; every write it made is safe to repeat, so the
driver simply runs the conversation again later.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar

from tullius.band import Band
from tullius.document import (
    TERMINAL,
    Record,
    RecordKind,
    Status,
    TaskDoc,
    TaskView,
    quick_init,
)
from tullius.effects import InsertRecord, InsertTasks, SetStatus
from tullius.errors import InvalidTransition, StoreError, WriteWindowClosed
from tullius.events import (
    Claimed,
    Event,
    HandlerClaimed,
    LeaseExpired,
    Swept,
)
from tullius.machine import Step, settle, step
from tullius.policy import LeaseWatch
from tullius.store import Beat, FindByStatus, FindDue, Load, Operation, Store, perform

T = TypeVar("T")
Conversation = Generator[Operation, Any, T]

#: The hints of tasks with work to claim: a failure to handle, or a run.
WORK: tuple[Status, ...] = (Status.FAILED, Status.QUEUED)
#: How many candidates one claim looks at before giving up for this round.
CLAIM_BATCH = 8
#: How many candidates a driver's claim query reads (``batch`` of `claim_many`):
#: the query costs about the same for 8 or 16 on FerretDB, and the untried ones
#: serve the band's next claims (`Candidates`).
CLAIM_READ = 16
#: How long the candidates one claim read and left untried serve the band's next
#: claims (`Candidates.keep_for`): a claim query reads the whole live queue on
#: FerretDB, and a worker freed a moment later can use what it found.  A task
#: queued meanwhile, however urgent, waits at most this much longer.
REUSE_CANDIDATES_FOR = timedelta(seconds=0.25)
#: How many running or handling tasks a sweep reads at a time (it reads them all,
#: page by page: a dead lease past the first page must be noticed too).
SWEEP_BATCH = 1000
#: The operations that write a task's documents or records: what ``drive``'s
#: ``write_by`` holds back.
TASK_WRITES: frozenset[type] = frozenset({InsertRecord, InsertTasks, SetStatus})
_NO_TIME = timedelta(0)
# Read for every claim: module globals, not ``RecordKind.RUN`` (the enum
# metaclass's ``__getattr__``, ~75 ns on 3.11).
_RUN_RECORD, _HANDLER_RECORD = RecordKind.RUN, RecordKind.HANDLER


class JobKind(enum.StrEnum):
    RUN = "run"  #: call ``run()``
    HANDLE = "handle"  #: call ``failed()``


# Job and Verdict: one of each per claim and per finish, so `quick_init` (see there).
@quick_init
@dataclass(frozen=True)
class Job:
    """Work a worker owns: the task as read right after its lease record won."""

    kind: JobKind
    view: TaskView
    lease: Record

    @property
    def task_id(self) -> str:
        return self.view.task_id

    @property
    def token(self) -> str:
        return self.lease.token

    @property
    def role(self) -> str:
        """The user code the job calls, as messages name it: ``run()`` or ``failed()``."""
        return "run()" if self.kind is JobKind.RUN else "failed()"

    @property
    def time_limit(self) -> timedelta:
        """How long that call may take: the task's ``timeout`` or ``failed_timeout``."""
        task = self.view.task
        return task.timeout if self.kind is JobKind.RUN else task.handler_timeout


@quick_init
@dataclass(frozen=True)
class Verdict:
    """How a finish went: ``accepted`` if our record won, else the rival's ``record``."""

    accepted: bool
    record: Record
    view: TaskView


@quick_init
@dataclass(frozen=True)
class UnsureClaim:
    """A claim whose lease insert met a store error: it may have been stored.

    Its token is kept, so that the band's next claim can find out
    (`claim_many`): if the lease stored is ours, the job is run by ``worker``
    after all, instead of being left for the sweeps to fail as ``lost``
    without ever having run.  ``at``: the ``now`` of the claim.
    """

    doc: TaskDoc
    worker: str | None
    token: str
    at: datetime


class TaskGone(Exception):
    """A claim's lease record won, but the task has no document any more.

    Only a prune deletes a task, and it deletes the documents before the
    records, so a lease insert can only win on a pruned task after its
    document is gone: a claim that read it just before (a copy lingering
    after its parent's repair inserted it again, say) must not run it.  The
    lease record stays behind, an orphan nothing reads.
    """


class ClaimInterrupted(StoreError):
    """A store error ended a claim after it had won ``jobs``: they are the
    claimer's to run all the same (each lease is stored and ours)."""

    def __init__(self, jobs: list[Job], cause: StoreError) -> None:
        self.jobs = jobs
        self.cause = cause
        super().__init__(f"a claim stopped after winning {len(jobs)} job(s): {cause}")


@dataclass
class Candidates:
    """Due work a claim read but did not try, kept for the band's next claim.

    On a server where each claim query reads the whole collection (FerretDB),
    reading once for several claims matters.  Candidates are tried for
    ``keep_for`` after the claim that read them (``read_at`` is its ``now``):
    a task queued meanwhile, however urgent, waits at most that long.  A
    stale candidate is harmless: its claim loses and the hint is repaired.

    ``unsure`` holds the claims store errors left undecided (see `UnsureClaim`),
    at most one per worker: they outlive `forget`, and their tokens are the
    driver's own until settled.  It is a tuple, only ever replaced whole: the
    daemon's main thread reads it while a claim on a store thread settles or
    adds one, and must see it before or after, never half-way (a single
    unsure claim, overwritten by the next one, left the first one's lease to
    be failed as lost unrun while its worker was not idle).
    """

    keep_for: timedelta
    docs: list[TaskDoc] = field(default_factory=list)
    read_at: datetime | None = None
    unsure: tuple[UnsureClaim, ...] = ()
    #: How long an unsure claim waits for its worker to be idle again (None: for
    #: ever).  Then it is given up, and its lease, if stored, is no longer the
    #: driver's own: the sweeps fail it as ``lost``, as a dead server's.  Why: a
    #: worker that can never be started again would keep it from being judged.
    unsure_for: timedelta | None = None

    def unsure_tokens(self, now: datetime) -> list[str]:
        """The tokens of the unsure claims not given up at ``now``: the driver's own."""
        return [u.token for u in self.unsure if not self.given_up(u, now)]

    def given_up(self, unsure: UnsureClaim, now: datetime) -> bool:
        """Whether ``unsure`` waited longer than ``unsure_for`` for its worker."""
        return self.unsure_for is not None and now - unsure.at > self.unsure_for

    def fresh(self, now: datetime) -> list[TaskDoc]:
        """The candidates still worth trying at ``now`` (none once ``keep_for`` has passed)."""
        if self.read_at is None or not _NO_TIME <= now - self.read_at <= self.keep_for:
            self.docs.clear()
        return self.docs

    def forget(self) -> None:
        """Keep nothing: for a driver whose claim failed midway (a store error).  The
        candidate it was trying had been taken off ``docs``, and it may be more urgent
        than all those left, which must not be claimed before it is read again."""
        self.docs = []
        self.read_at = None


@dataclass
class SweepReport:
    """What one sweep did, for logs and tests."""

    examined: int = 0
    expired: list[str] = field(default_factory=list)  #: lease record ids declared lost
    repaired: list[str] = field(default_factory=list)  #: task ids whose hints/inserts were fixed


def drive(
    store: Store,
    conversation: Conversation[T],
    *,
    write_by: float | None = None,
    clock: Callable[[], float] | None = None,
) -> T:
    """Run a conversation against ``store`` to the end, one operation at a time.

    A `StoreError` is thrown into the conversation at the operation that failed,
    as the simulator throws it, so that both drivers give a conversation the
    same chance to react (a claim keeps what it won, see `claim_many`); unless
    the conversation handles it, it comes back out of here.

    ``write_by``: no task write (`TASK_WRITES`) is made once ``clock()`` has
    passed it; the conversation is closed and `WriteWindowClosed` raised
    instead (see `tullius.prune`, which counts on it).
    """
    send = conversation.send  # bound once: a conversation sends a few results
    try:
        op = next(conversation)
        while True:
            if write_by is not None and type(op) in TASK_WRITES:
                assert clock is not None, "write_by needs its clock"
                late_by = clock() - write_by
                if late_by > 0:
                    conversation.close()
                    raise WriteWindowClosed(type(op).__name__, late_by)
            try:
                result = perform(store, op)
            except StoreError as error:
                op = conversation.throw(error)
                continue
            op = send(result)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]


def apply_step(view: TaskView, decided: Step, *, now: datetime) -> Conversation[Record | None]:
    """Apply a `machine.Step`; return the record that decided it (None for a sweep).

    The step took effect if the returned record carries the step's token; any
    other token means a rival decided first.  The idempotent effects after the
    insert are recomputed from the record the store returned, so a writer
    repeating its own insert after an ambiguous error completes exactly what
    its first attempt stored.

    Raises:
        TaskGone: our lease record won, but the task has no document to set
            running or handling any more (see there).
    """
    record = decided.record
    if record is None:
        for effect in decided.effects:
            yield effect
        return None
    winner: Record = yield InsertRecord(record)
    if winner is record:  # stored as decided (an in-process store hands it back)
        effects = decided.effects[1:]
    elif winner.token == record.token:
        effects = settle(view.with_record(winner), now)
    else:
        return winner
    leasing = record.kind is _RUN_RECORD or record.kind is _HANDLER_RECORD
    for effect in effects:
        found = yield effect
        if found is False and leasing:  # (only `set_status` answers a bool)
            raise TaskGone(view.task_id)
    return winner


def repair(view: TaskView, *, now: datetime) -> Conversation[bool]:
    """Re-issue the idempotent effects of the task's true status; True if anything was written."""
    decided = step(view, Swept(), now=now)
    if not decided.effects:
        return False
    yield from apply_step(view, decided, now=now)
    return True


def claim(
    band: Band,
    *,
    server: str,
    worker: str | None,
    token: str,
    now: datetime,
    rng: random.Random | None = None,
    batch: int = CLAIM_BATCH,
) -> Conversation[Job | None]:
    """Take the most urgent due work in ``band`` for one worker, or None (see `claim_many`)."""
    jobs = yield from claim_many(
        band, server=server, workers=[(worker, token)], now=now, rng=rng, batch=batch
    )
    return jobs[0] if jobs else None


def claim_many(
    band: Band,
    *,
    server: str,
    workers: Sequence[tuple[str | None, str]],
    now: datetime,
    rng: random.Random | None = None,
    batch: int = CLAIM_BATCH,
    candidates: Candidates | None = None,
) -> Conversation[list[Job]]:
    """Take the most urgent due work in ``band`` for several idle workers at once.

    ``workers`` lists ``(worker name, token)`` pairs; the jobs returned go to
    them in that order (fewer jobs than workers when work runs out).  One
    read of candidates serves every worker, which matters on servers where
    each query scans the collection.  With ``candidates``, the ones an
    earlier claim left are tried before reading again, and the ones this
    claim leaves untried are kept there.

    1. One read of due work (`Store.find_due`): most urgent first, by priority;
       within a priority, failed tasks (their ``failed()`` is overdue work)
       before queued ones; then earliest due.
    2. A queued candidate is claimed optimistically by inserting its RUN
       record: if the task had been claimed, the insert loses and nothing else
       was written.  A failed candidate is loaded first, for its attempt count.
    3. A candidate whose hint was stale is repaired and skipped.

    A store error ends the claim: as `ClaimInterrupted`, carrying the jobs
    already won, if any.  If it hit a lease insert, that claim is kept as
    ``candidates.unsure`` (the insert may have been stored), and the next
    claim for its worker first loads the task: a stored lease with our token
    is a job like any other.
    """
    jobs: list[Job] = []
    waiting = list(workers)
    if not waiting:
        return jobs
    left = candidates if candidates is not None else Candidates(keep_for=timedelta(0))
    try:
        if left.unsure:
            yield from _settle_unsure(left, waiting, jobs, now=now)
        if waiting and left.fresh(now):
            yield from _try_candidates(left, waiting, jobs, server=server, now=now, rng=rng)
        if waiting:
            limit = max(batch, 2 * len(waiting))
            left.docs = list(
                (yield FindDue(WORK, band.min_priority, band.max_priority, now, limit))
            )
            left.read_at = now
            yield from _try_candidates(left, waiting, jobs, server=server, now=now, rng=rng)
    except StoreError as error:
        if jobs:
            raise ClaimInterrupted(jobs, error) from error
        raise
    return jobs


def _settle_unsure(
    left: Candidates, waiting: list[tuple[str | None, str]], jobs: list[Job], *, now: datetime
) -> Conversation[None]:
    """Find out whether each of ``left.unsure``'s leases was stored, once its worker
    waits again: if the task's live lease is that very record, it is its worker's
    job (its hint repaired first: the error may have come before it was written)."""
    for unsure in left.unsure:
        index = next((i for i, (worker, _) in enumerate(waiting) if worker == unsure.worker), None)
        if index is None:  # its worker is not idle now: later, unless it waited too long
            if not left.given_up(unsure, now):
                continue
        else:
            view: TaskView | None = yield Load(unsure.doc.task_id)
            lease = None if view is None else view.current_lease()
            # (A terminal hint over a live lease: a prune's leftover, whose document
            # was gone when our lease won; see `TaskGone`.)
            if (
                view is not None
                and lease is not None
                and lease.token == unsure.token
                and view.task.status not in TERMINAL
            ):
                yield from repair(view, now=now)  # (a store error here: still unsure, retried)
                kind = JobKind.RUN if lease.kind is RecordKind.RUN else JobKind.HANDLE
                jobs.append(Job(kind, view, lease))
                waiting.pop(index)
            # else not stored, or over (a sweep declared it lost): nothing of ours
        left.unsure = tuple(other for other in left.unsure if other is not unsure)


def _try_candidates(
    left: Candidates,
    waiting: list[tuple[str | None, str]],
    jobs: list[Job],
    *,
    server: str,
    now: datetime,
    rng: random.Random | None,
) -> Conversation[None]:
    """Claim ``left.docs`` in order for ``waiting`` workers, popping both as they are
    used; a store error while a lease is written leaves the claim as ``left.unsure``."""
    docs = left.docs
    while docs and waiting:
        doc = docs.pop(0)
        worker, token = waiting[0]
        handling = doc.status is Status.FAILED
        event: Event = (
            HandlerClaimed(token=token, server=server, worker=worker)
            if handling
            else Claimed(token=token, server=server, worker=worker)
        )
        view: TaskView | None = TaskView(doc)
        if handling:
            view = yield Load(doc.task_id)
        if view is None:
            continue
        try:
            decided = step(view, event, now=now, rng=rng)
        except InvalidTransition:
            yield from repair(view, now=now)
            continue
        try:
            winner = yield from apply_step(view, decided, now=now)
        except StoreError:
            left.unsure = (*left.unsure, UnsureClaim(doc, worker, token, now))
            raise
        except TaskGone:
            continue
        assert winner is not None
        assert decided.record is not None
        if winner.token == decided.record.token:
            kind = JobKind.HANDLE if handling else JobKind.RUN
            jobs.append(Job(kind, _view_after(view, decided, winner), winner))
            waiting.pop(0)
            continue
        fresh = yield Load(doc.task_id)
        if fresh is not None:
            yield from repair(fresh, now=now)


def finish(
    job: Job, event: Event, *, now: datetime, rng: random.Random | None = None
) -> Conversation[Verdict]:
    """Record how ``job`` ended.  Safe to run again after a store error.

    The verdict carries the record that decided the task: a rival's (not
    accepted), or our own as first stored (accepted), even if a repeat of
    this call brought a different event.

    Raises:
        InvalidTransition: ``event`` does not fit the job (a driver bug).
    """
    decided = step(job.view, event, now=now, rng=rng)
    winner = yield from apply_step(job.view, decided, now=now)
    assert winner is not None
    return Verdict(winner.token == job.token, winner, _view_after(job.view, decided, winner))


def _view_after(view: TaskView, decided: Step, winner: Record) -> TaskView:
    """``view`` with the record that decided its step: ``view.with_record(winner)``.

    When the store kept our own record as it was (an in-process store hands it
    back), that is the step's view already, with its status derived: reusing it
    spares a copy of the records and a second derivation in the next step.
    """
    if winner is decided.record:
        return decided.view
    return view.with_record(winner)


def renew(job: Job) -> Conversation[bool]:
    """Renew the job's lease; False if the job is no longer ours (someone ended it)."""
    beat = yield Beat(job.lease.record_id)
    if beat is None:
        return False
    view: TaskView | None = yield Load(job.task_id)
    if view is None:
        return False
    lease = view.current_lease()
    return lease is not None and lease.token == job.token


def sweep(
    watch: LeaseWatch,
    *,
    observer: str,
    now: datetime,
    monotonic: Callable[[], float],
    own_tokens: frozenset[str] = frozenset(),
    rng: random.Random | None = None,
    limit: int = SWEEP_BATCH,
) -> Conversation[SweepReport]:
    """Fail stale leases as ``lost`` and repair hints of running and handling tasks.

    1. Read the tasks whose hint says RUNNING or HANDLING, ``limit`` at a time in
       id order until a page comes back short (these hints have no due time).
    2. For each, load its records.  A live lease that is not ours is observed by
       ``watch``, with ``monotonic()`` (this observer's clock) read before and
       after that load: one reading for the whole sweep would date a beat read
       late in a long sweep too early, and make a live lease look stale.  Once
       stale, `LeaseExpired` is stepped (first insert wins against the owner's
       late result and against other sweepers).
    3. A task whose hint disagrees with its records is repaired (`Swept`).
    """
    report = SweepReport()
    live: set[str] = set()
    after = ""  # id order from the first page (a hand-edited due time changes nothing)
    while True:
        docs = yield FindByStatus((Status.RUNNING, Status.HANDLING), limit, after)
        for doc in docs:
            asked_at = monotonic()
            view: TaskView | None = yield Load(doc.task_id)
            if view is None:
                continue
            report.examined += 1
            lease = view.current_lease()
            if lease is not None and lease.token not in own_tokens:
                live.add(lease.record_id)
                if watch.is_stale(lease.record_id, lease.beat, asked_at, monotonic()):
                    decided = step(view, LeaseExpired(lease.record_id, observer), now=now, rng=rng)
                    winner = yield from apply_step(view, decided, now=now)
                    if (
                        winner is not None
                        and decided.record is not None
                        and winner.token == decided.record.token
                    ):
                        report.expired.append(lease.record_id)
                    continue
            if (yield from repair(view, now=now)):
                report.repaired.append(view.task_id)
        if len(docs) < limit:
            break
        after = docs[-1].task_id
    watch.forget_except(live)
    return report
