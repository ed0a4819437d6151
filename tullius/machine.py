"""The task state machine: every rule about what may happen to a task.

Theory of operation
-------------------

Rule 1: everything that affects transitions lives in this file.  Drivers (the
simulator in ``tullius/sim``, the daemon in ``tullius/runtime``) read a task's
documents, turn what they observed into an `Event`, call `step()`, and apply
the returned effects in order.  `step()` is a pure function of (view, event,
now, rng): no I/O, no clock, no global randomness.

Rule 2: records decide, hints follow.  A task's true status is derived from
its records (`document.status_of`); each transition inserts exactly one new
record under a deterministic id.  Inserting a document whose ``_id`` exists is
rejected atomically by MongoDB, by FerretDB and by `MemoryStore`, so the first
insert wins even where conditional updates race.  The effects after the
`InsertRecord` (inserting spawned tasks under derived ids, setting the status
hint) are idempotent, so a sweeper can repeat them after any crash, and a
driver whose insert lost simply stops: the winner's record is the outcome.

Rule 3: an illegal event raises `InvalidTransition` and changes nothing.  The
single error path is a missing entry in `TRANSITIONS`; guards (a lease owned by
someone else, a task not yet due) raise the same error with a reason.

The life of a task::

    QUEUED --Claimed--> RUNNING --Succeeded--> SUCCEEDED (successors inserted)
                           |
                           +--Failed / LeaseExpired--> FAILED --HandlerClaimed--> HANDLING
                                                         ^                          |
                                  HandlerFailed / LeaseExpired (attempts left) -----+
                                                                                    |
               HANDLED (replacements inserted) <--HandlerSucceeded------------------+
               UNHANDLED (visible to an operator) <--HandlerFailed / LeaseExpired (last attempt)
                   |
                   +--Retried (by an operator)--> UNHANDLED, and a copy of the task born
                                                  FAILED with its failure (``failed()`` again)

`Swept` is allowed everywhere: it re-issues the idempotent effects of the
current status (repairing hints, finishing interrupted inserts).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from tullius.document import (
    TERMINAL,
    Failure,
    FailureKind,
    Origin,
    Record,
    RecordKind,
    Status,
    TaskDoc,
    TaskSpec,
    TaskView,
    derive_task_id,
    due_at_of,
    handler_end_id,
    handler_id,
    outcome_id,
    queued_doc,
    quick_init,
    retried_as,
    retry_copy_id,
    retry_id,
    run_id,
    spawned_of,
    status_of,
)
from tullius.effects import Effect, InsertRecord, InsertTasks, SetStatus
from tullius.errors import InvalidTransition
from tullius.events import (
    Claimed,
    Event,
    Failed,
    HandlerClaimed,
    HandlerFailed,
    HandlerSucceeded,
    LeaseExpired,
    Retried,
    Succeeded,
    Swept,
)
from tullius.policy import handler_backoff

# Compared on every settle: a module global, not ``Status.UNHANDLED`` (the enum
# metaclass's ``__getattr__``, ~75 ns on 3.11).
_UNHANDLED: Final = Status.UNHANDLED

#: For each status, the events it accepts and the statuses each may lead to.
#: Where an event has two targets, the records decide which (`status_of`): a
#: failed handler attempt leads to UNHANDLED only when it was the last allowed.
TRANSITIONS: Final[Mapping[Status, Mapping[type[Event], tuple[Status, ...]]]] = {
    Status.QUEUED: {
        Claimed: (Status.RUNNING,),
        Swept: (Status.QUEUED,),
    },
    Status.RUNNING: {
        Succeeded: (Status.SUCCEEDED,),
        Failed: (Status.FAILED,),
        LeaseExpired: (Status.FAILED,),
        Swept: (Status.RUNNING,),
    },
    Status.SUCCEEDED: {
        Swept: (Status.SUCCEEDED,),
    },
    Status.FAILED: {
        HandlerClaimed: (Status.HANDLING,),
        Swept: (Status.FAILED,),
    },
    Status.HANDLING: {
        HandlerSucceeded: (Status.HANDLED,),
        HandlerFailed: (Status.FAILED, Status.UNHANDLED),
        LeaseExpired: (Status.FAILED, Status.UNHANDLED),
        Swept: (Status.HANDLING,),
    },
    Status.HANDLED: {
        Swept: (Status.HANDLED,),
    },
    Status.UNHANDLED: {
        Retried: (Status.UNHANDLED,),
        Swept: (Status.UNHANDLED,),
    },
}


@quick_init
@dataclass(frozen=True)
class Step:
    """The result of one transition.

    Attributes:
        view: the task as it will read once ``effects`` are applied.
        status: its new true status.
        effects: writes to make, in order; the first `InsertRecord` decides.
        record: the record this step inserts (None for `Swept`).
    """

    view: TaskView
    status: Status
    effects: tuple[Effect, ...]
    record: Record | None = None


def step(view: TaskView, event: Event, *, now: datetime, rng: random.Random | None = None) -> Step:
    """Decide what ``event`` does to the task in ``view``.

    Args:
        view: the task document and its records, as read.
        event: what happened or is wanted.
        now: the driver's wall-clock reading (aware UTC), written into records.
        rng: the driver's random source, for backoff jitter; None for none.

    Returns:
        The new view, status and the effects to apply.

    Raises:
        InvalidTransition: the event is not allowed now; nothing changed.
    """
    status = status_of(view)
    try:
        targets = TRANSITIONS[status][type(event)]
    except KeyError:
        raise InvalidTransition(view.task_id, status.value, event) from None
    record = _RECORDERS[type(event)](view, event, now, rng)
    if record is None:
        return Step(view, status, _settle(view, status, now, sweeping=True))
    new_view = view.with_record(record)
    new_status = status_of(new_view)
    # The table is the contract; a record that derives anything else is a bug here.
    assert new_status in targets, (status, event, new_status)
    effects: tuple[Effect, ...] = (InsertRecord(record), *_settle(new_view, new_status, now))
    return Step(new_view, new_status, effects, record)


def settle(view: TaskView, now: datetime) -> tuple[Effect, ...]:
    """The idempotent writes that make the store agree with the task's records."""
    return _settle(view, status_of(view), now)


def _settle(
    view: TaskView, status: Status, now: datetime, *, sweeping: bool = False
) -> tuple[Effect, ...]:
    """The idempotent writes that make the store agree with ``status``.

    Spawned tasks are inserted before the hint turns terminal, so a terminal
    hint promises they exist; a sweep of a settled task writes nothing.  An
    operator's retry of an UNHANDLED task comes after its hint turned
    terminal: its copy is written here too (records first, see
    `_retry_writes`); a sweep repeats that only while the hint lags (a move
    cut short), since no sweep reads a task whose hint is terminal.  A
    terminal hint's due time is ``now``, when it was settled: the first
    writer's stays (a terminal hint is never overwritten), and pruning
    (`tullius.prune`) counts a task's age from it.
    """
    hint = view.task
    terminal = status in TERMINAL
    due_at = now if terminal else due_at_of(view)
    spawned = spawned_of(view)
    if sweeping and hint.status is status:  # the hint is right: at most its due time lags
        if terminal or hint.due_at == due_at:
            return ()
        return (SetStatus(hint.task_id, status, due_at),)
    # Tuples built outright, not a list turned into one: every step ends here.
    if spawned:
        return (InsertTasks(spawned), SetStatus(hint.task_id, status, due_at))
    if status is _UNHANDLED:
        retry = retried_as(view)
        if retry is not None:
            return (*_retry_writes(view, retry), SetStatus(hint.task_id, status, due_at))
    return (SetStatus(hint.task_id, status, due_at),)


def _retry_writes(view: TaskView, copy: TaskDoc) -> tuple[Effect, ...]:
    """The writes that make a retry's copy exist: its run and failed outcome, then itself.

    The records come first, so that no reader ever meets the copy without
    them: a copy without records would read as QUEUED and its ``run()`` would
    run.  They are derived from the retry record alone (token, time, server)
    and the task's own failure, so every writer repeating them writes the
    same records, and the copy's ``failed()`` sees exactly what the task's saw.
    """
    retry = view.records[retry_id(view.task_id)]
    outcome = view.outcome
    assert outcome is not None  # UNHANDLED implies a failed outcome
    assert outcome.failure is not None
    run = Record(
        record_id=run_id(copy.task_id),
        task_id=copy.task_id,
        kind=RecordKind.RUN,
        token=retry.token,
        at=retry.at,
        server=retry.server,
        task_created_at=copy.created_at,
    )
    failed = Record(
        record_id=outcome_id(copy.task_id),
        task_id=copy.task_id,
        kind=RecordKind.OUTCOME,
        token=retry.token,
        at=retry.at,
        server=retry.server,
        ok=False,
        failure=outcome.failure,
    )
    return (InsertRecord(run), InsertRecord(failed), InsertTasks((copy,)))


# --- one recorder per event type: the record the event inserts -------------------

Recorder = Callable[[TaskView, Event, datetime, "random.Random | None"], Record | None]


def _record_claimed(view: TaskView, event: Event, now: datetime, rng: object) -> Record:
    assert isinstance(event, Claimed)
    _require_due(view, event, now)
    return Record(
        record_id=run_id(view.task_id),
        task_id=view.task_id,
        kind=RecordKind.RUN,
        token=event.token,
        at=now,
        server=event.server,
        worker=event.worker,
        task_created_at=view.task.created_at,
    )


def _record_succeeded(view: TaskView, event: Event, now: datetime, rng: object) -> Record:
    assert isinstance(event, Succeeded)
    run = _require_owner(view, view.run, event.token, event)
    return Record(
        record_id=outcome_id(view.task_id),
        task_id=view.task_id,
        kind=RecordKind.OUTCOME,
        token=event.token,
        at=now,
        server=run.server,
        worker=run.worker,
        ok=True,
        spawned=spawn(view.task, event.successors, Origin.SUCCESSOR, now),
    )


def _record_failed(view: TaskView, event: Event, now: datetime, rng: object) -> Record:
    assert isinstance(event, Failed)
    run = _require_owner(view, view.run, event.token, event)
    return Record(
        record_id=outcome_id(view.task_id),
        task_id=view.task_id,
        kind=RecordKind.OUTCOME,
        token=event.token,
        at=now,
        server=run.server,
        worker=run.worker,
        ok=False,
        failure=event.failure,
    )


def _record_lease_expired(
    view: TaskView, event: Event, now: datetime, rng: random.Random | None
) -> Record:
    assert isinstance(event, LeaseExpired)
    lease = view.current_lease()
    if lease is None or lease.record_id != event.record_id:
        raise InvalidTransition(
            view.task_id,
            status_of(view).value,
            event,
            f"lease {event.record_id!r} is not the live lease",
        )
    what = "run" if lease.kind is RecordKind.RUN else f"failed() attempt {lease.attempt}"
    failure = Failure(
        kind=FailureKind.LOST,
        message=(
            f"server {lease.server!r} stopped renewing its lease on the {what}; "
            f"declared lost by {event.observer!r}"
        ),
        at=now,
        server=event.observer,
    )
    # The token names the observer and the lease: the same observer repeating
    # this insert after an ambiguous error recognises its own record.
    token = f"lost/{event.observer}/{event.record_id}"
    if lease.kind is RecordKind.RUN:
        return Record(
            record_id=outcome_id(view.task_id),
            task_id=view.task_id,
            kind=RecordKind.OUTCOME,
            token=token,
            at=now,
            server=lease.server,
            worker=lease.worker,
            ok=False,
            failure=failure,
        )
    return _handler_error(view, lease, token, failure, now, rng)


def _record_handler_claimed(view: TaskView, event: Event, now: datetime, rng: object) -> Record:
    assert isinstance(event, HandlerClaimed)
    _require_due(view, event, now)
    attempt = view.handler_attempt + 1
    return Record(
        record_id=handler_id(view.task_id, attempt),
        task_id=view.task_id,
        kind=RecordKind.HANDLER,
        token=event.token,
        at=now,
        server=event.server,
        worker=event.worker,
        attempt=attempt,
    )


def _record_handler_succeeded(view: TaskView, event: Event, now: datetime, rng: object) -> Record:
    assert isinstance(event, HandlerSucceeded)
    attempt = view.handler_attempt
    lease = _require_owner(view, view.handler(attempt), event.token, event)
    return Record(
        record_id=handler_end_id(view.task_id, attempt),
        task_id=view.task_id,
        kind=RecordKind.HANDLER_END,
        token=event.token,
        at=now,
        server=lease.server,
        worker=lease.worker,
        attempt=attempt,
        ok=True,
        spawned=spawn(view.task, event.replacements, Origin.REPLACEMENT, now),
    )


def _record_handler_failed(
    view: TaskView, event: Event, now: datetime, rng: random.Random | None
) -> Record:
    assert isinstance(event, HandlerFailed)
    lease = _require_owner(view, view.handler(view.handler_attempt), event.token, event)
    return _handler_error(view, lease, event.token, event.error, now, rng)


def _handler_error(
    view: TaskView,
    lease: Record,
    token: str,
    error: Failure,
    now: datetime,
    rng: random.Random | None,
) -> Record:
    attempt = lease.attempt
    last = attempt >= view.task.handler_attempts
    return Record(
        record_id=handler_end_id(view.task_id, attempt),
        task_id=view.task_id,
        kind=RecordKind.HANDLER_END,
        token=token,
        at=now,
        server=lease.server,
        worker=lease.worker,
        attempt=attempt,
        ok=False,
        failure=error,
        retry_at=None if last else now + handler_backoff(attempt, rng),
    )


def _record_retried(view: TaskView, event: Event, now: datetime, rng: object) -> Record:
    assert isinstance(event, Retried)
    earlier = retried_as(view)
    if earlier is not None:
        raise InvalidTransition(
            view.task_id,
            status_of(view).value,
            event,
            f"already retried as task {earlier.task_id!r}",
        )
    task = view.task
    copy_id = retry_copy_id(task)
    copy = TaskDoc(
        task_id=copy_id,
        class_name=task.class_name,
        fields=task.fields,
        priority=task.priority,
        timeout=task.timeout,
        handler_timeout=event.handler_timeout or task.handler_timeout,
        handler_attempts=event.handler_attempts or task.handler_attempts,
        start_after=now,
        created_at=now,
        origin=Origin.RETRY,
        parent_id=task.task_id,
        root_id=task.root_id or task.task_id,
        status=Status.FAILED,
        due_at=now,
    )
    return Record(
        record_id=retry_id(task.task_id),
        task_id=task.task_id,
        kind=RecordKind.RETRY,
        token=event.token,
        at=now,
        server=event.server,
        spawned=(copy,),
    )


def _record_swept(view: TaskView, event: Event, now: datetime, rng: object) -> None:
    return None


_RECORDERS: Final[Mapping[type[Event], Recorder]] = {
    Claimed: _record_claimed,
    Succeeded: _record_succeeded,
    Failed: _record_failed,
    LeaseExpired: _record_lease_expired,
    HandlerClaimed: _record_handler_claimed,
    HandlerSucceeded: _record_handler_succeeded,
    HandlerFailed: _record_handler_failed,
    Retried: _record_retried,
    Swept: _record_swept,
}


def _require_due(view: TaskView, event: Event, now: datetime) -> None:
    due_at = due_at_of(view)
    if due_at is not None and now < due_at:
        raise InvalidTransition(
            view.task_id, status_of(view).value, event, f"not due until {due_at.isoformat()}"
        )


def _require_owner(view: TaskView, lease: Record | None, token: str, event: Event) -> Record:
    if lease is None or lease.token != token:
        raise InvalidTransition(
            view.task_id, status_of(view).value, event, f"token {token!r} does not own the lease"
        )
    return lease


def spawn(
    parent: TaskDoc, specs: tuple[TaskSpec, ...], origin: Origin, now: datetime
) -> tuple[TaskDoc, ...]:
    """Task documents for what ``parent`` returned, with ids derived from it."""
    if not specs:  # most runs return nothing: no generator to build and exhaust
        return ()
    return tuple(
        queued_doc(
            spec,
            task_id=derive_task_id(parent, origin, index),
            now=now,
            origin=origin,
            parent=parent,
        )
        for index, spec in enumerate(specs)
    )
