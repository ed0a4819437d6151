"""The stored shape of tasks and of the records that decide their fate.

Two kinds of documents live in the store:

* a **task document** (`TaskDoc`): what to run, for which class, with which
  fields, and a ``status`` *hint* saying where it probably is;
* **records** (`Record`), each inserted once under a deterministic id derived
  from the task id.  Records, not hints, are the truth: whoever inserts a
  record id first decides that step of the task's life (who runs it, how the
  run ended, who handles the failure, what the handler returned).

A `TaskView` is one task document with its records, as read.  `status_of()`
derives the true status from the records alone; `machine.py` decides what may
happen next.  This module holds data and the pure conversions to and from BSON
dictionaries (the only place that knows field names in the database).  No I/O,
no clock, no randomness here.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
from base64 import b32encode
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final, TypeVar

_T = TypeVar("_T")
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MS: Final = timedelta(milliseconds=1)


class _Factory:
    def __repr__(self) -> str:
        return "<factory>"  # as in the signatures dataclasses write


#: Marks an argument left out, for fields with a default factory (`quick_init`).
_NO_VALUE: Final = _Factory()


def quick_init(cls: type[_T]) -> type[_T]:
    """Give a frozen dataclass an ``__init__`` that sets its ``__dict__`` in one go.

    Why: the ``__init__`` that ``dataclass(frozen=True)`` writes sets each field
    with a call of ``object.__setattr__`` (plain assignment is what freezing
    forbids), and documents, records and views are built many times in each
    task's life: the simulator spent more on those calls than on some store
    operations.  The replacement has the same signature (names, order,
    defaults, default factories) and stores the same values; everything else
    (equality, hashing, repr, ``replace``, ``fields``, freezing) is the
    dataclass's own.  Only for classes without ``__post_init__`` or slots.
    """
    assert dataclasses.is_dataclass(cls)
    assert not hasattr(cls, "__post_init__")
    assert not hasattr(cls, "__slots__")
    scope: dict[str, Any] = {"_set": object.__setattr__, "_NO_VALUE": _NO_VALUE}
    params, items = [], []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            scope[f"_default_{f.name}"] = f.default
            params.append(f"{f.name}=_default_{f.name}")
            items.append(f"{f.name!r}: {f.name}")
        elif f.default_factory is not dataclasses.MISSING:
            scope[f"_factory_{f.name}"] = f.default_factory
            params.append(f"{f.name}=_NO_VALUE")
            items.append(f"{f.name!r}: _factory_{f.name}() if {f.name} is _NO_VALUE else {f.name}")
        else:
            params.append(f.name)
            items.append(f"{f.name!r}: {f.name}")
    source = (
        f"def __init__(self, {', '.join(params)}):\n"
        f"    _set(self, '__dict__', {{{', '.join(items)}}})\n"
    )
    exec(source, scope)  # built from the dataclass's own field names
    init = scope["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    init.__annotations__ = {**cls.__init__.__annotations__}
    cls.__init__ = init  # type: ignore[method-assign]
    return cls


class Status(enum.StrEnum):
    """Where a task is in its life.  The value is what the store keeps."""

    #: Stored, waiting for a worker (possibly not before ``start_after``).
    QUEUED = "queued"
    #: A worker's claim record won; ``run()`` is running under a lease.
    RUNNING = "running"
    #: ``run()`` returned; its successors are (being) inserted.  Terminal.
    SUCCEEDED = "succeeded"
    #: The run failed (or a handler attempt did); ``failed()`` must run next.
    FAILED = "failed"
    #: A worker's handler claim won; ``failed()`` is running under a lease.
    HANDLING = "handling"
    #: ``failed()`` returned; its replacements are (being) inserted.  Terminal.
    HANDLED = "handled"
    #: ``failed()`` failed on every allowed attempt.  Terminal, for an operator
    #: to look at: the failure is recorded, never dropped.
    UNHANDLED = "unhandled"


TERMINAL: Final = frozenset({Status.SUCCEEDED, Status.HANDLED, Status.UNHANDLED})

# The statuses as module globals, for the functions that derive and read the
# status a dozen times in each task's life (`status_of` and its readers).  Why:
# ``Status.QUEUED`` is looked up through the enum's metaclass, whose
# ``__getattr__`` keeps every class attribute off CPython's fast path: about
# 75 ns on 3.11, against 10 ns for a global.
_QUEUED: Final = Status.QUEUED
_RUNNING: Final = Status.RUNNING
_SUCCEEDED: Final = Status.SUCCEEDED
_FAILED: Final = Status.FAILED
_HANDLING: Final = Status.HANDLING
_HANDLED: Final = Status.HANDLED
_UNHANDLED: Final = Status.UNHANDLED


class Origin(enum.StrEnum):
    """How a task came to be stored."""

    #: Queued by application code through ``tullius.queue()``.
    QUEUED = "queued"
    #: Returned by a successful ``run()``.
    SUCCESSOR = "successor"
    #: Returned by ``failed()`` after a failure.
    REPLACEMENT = "replacement"
    #: An operator's retry of an UNHANDLED task's ``failed()``: a copy of the
    #: task, born FAILED with its parent's failure, so ``run()`` never runs again.
    RETRY = "retry"


class RecordKind(enum.StrEnum):
    """What a record decides."""

    #: Ownership of the task's one run (a lease, renewed by ``beat``).
    RUN = "run"
    #: How the run ended: success with successors, or a failure.
    OUTCOME = "outcome"
    #: Ownership of one attempt at running ``failed()``.
    HANDLER = "handler"
    #: How that attempt ended: replacements, or a handler error.
    HANDLER_END = "handler_end"
    #: An operator's retry of an UNHANDLED task: the copy it spawned (one per task).
    RETRY = "retry"


class FailureKind:
    """The ``kind`` values Tullius itself writes into a `Failure`."""

    EXCEPTION: Final = "exception"  #: run() or failed() raised
    TIMEOUT: Final = "timeout"  #: stopped at its deadline
    CRASHED: Final = "crashed"  #: the worker process died under it
    LOST: Final = "lost"  #: its server stopped renewing the lease
    BAD_RETURN: Final = "bad_return"  #: returned something that is not a task
    UNLOADABLE: Final = "unloadable"  #: its class or fields could not be loaded
    SHUTDOWN: Final = "shutdown"  #: its daemon stopped before it finished


@quick_init
@dataclass(frozen=True)
class Failure:
    """What went wrong, as ``failed()`` sees it in ``self.failure``.

    Attributes:
        kind: one of `FailureKind` (or a kind of the user's own).
        message: one line for people.
        at: when it was recorded (aware UTC).
        traceback: the formatted traceback, for exceptions.
        server: the server that recorded it.
    """

    kind: str
    message: str
    at: datetime
    traceback: str | None = None
    server: str | None = None


@quick_init
@dataclass(frozen=True)
class TaskSpec:
    """A task as returned by user code, before it has an id.

    ``run()`` and ``failed()`` produce specs; the machine turns them into
    `TaskDoc`s with ids derived from the parent, so that inserting them again
    is harmless.
    """

    class_name: str
    fields: Mapping[str, Any]
    priority: float
    timeout: timedelta
    handler_timeout: timedelta
    handler_attempts: int
    delay: timedelta | None = None
    start_after: datetime | None = None


@quick_init
@dataclass(frozen=True)
class TaskDoc:
    """One stored task.  Only ``status`` and ``due_at`` ever change, and they are hints."""

    task_id: str
    class_name: str
    fields: Mapping[str, Any]
    priority: float
    timeout: timedelta
    handler_timeout: timedelta
    handler_attempts: int
    start_after: datetime
    created_at: datetime
    origin: Origin = Origin.QUEUED
    parent_id: str | None = None
    root_id: str = ""
    #: Hint: where the task probably is.  `status_of()` is the truth.
    status: Status = Status.QUEUED
    #: Hint: when the next piece of work on it may start (queued and failed tasks).
    due_at: datetime | None = None


@quick_init
@dataclass(frozen=True)
class Record:
    """A decision about one task, inserted once under ``record_id``.

    Attributes:
        record_id: deterministic, from `run_id()` and friends.
        token: unique to the writer's attempt, so a writer can tell its own
            record from a rival's after an ambiguous write error.
        beat: heartbeat counter of a RUN or HANDLER record; the only field
            ever updated, and only by the owner.
        ok: for OUTCOME and HANDLER_END: did it succeed.
        failure: the run's failure (OUTCOME) or the handler's error (HANDLER_END).
        spawned: successors (OUTCOME) or replacements (HANDLER_END), with ids.
        retry_at: for a failed HANDLER_END, when the next attempt may start.
        task_created_at: for RUN, the ``created_at`` of the task as claimed:
            which of two tasks stored under one id ran (a keyed task stored
            again after a prune, beside a finished copy the prune left when
            cut short; see ``MongoStore``).  None from versions before
            2026-12-06.
    """

    record_id: str
    task_id: str
    kind: RecordKind
    token: str
    at: datetime
    server: str
    attempt: int = 0
    worker: str | None = None
    beat: int = 0
    ok: bool | None = None
    failure: Failure | None = None
    spawned: tuple[TaskDoc, ...] = ()
    retry_at: datetime | None = None
    task_created_at: datetime | None = None


# --- record ids -------------------------------------------------------------


def run_id(task_id: str) -> str:
    """Id of the record that owns the task's run."""
    return f"{task_id}:run"


def outcome_id(task_id: str) -> str:
    """Id of the record of how the run ended."""
    return f"{task_id}:outcome"


def handler_id(task_id: str, attempt: int) -> str:
    """Id of the record that owns handler attempt ``attempt`` (1-based)."""
    return f"{task_id}:handler:{attempt}"


def describe_lease(record_id: str) -> str:
    """A lease record's id as an operator reads it: ``task 't1' run()`` or ``task 't1'
    failed() attempt 2`` (the task id is what ``tullius.chain()`` takes)."""
    task_id, _, rest = record_id.partition(":")
    if rest == "run":
        return f"task {task_id!r} run()"
    kind, _, attempt = rest.partition(":")
    if kind == "handler" and attempt.isdigit():
        return f"task {task_id!r} failed() attempt {attempt}"
    return f"record {record_id!r}"


def handler_end_id(task_id: str, attempt: int) -> str:
    """Id of the record of how handler attempt ``attempt`` ended."""
    return f"{task_id}:handler:{attempt}:end"


def retry_id(task_id: str) -> str:
    """Id of the record of an operator's retry of the task's ``failed()`` (one per task)."""
    return f"{task_id}:retry"


def retry_copy_id(task: TaskDoc) -> str:
    """Id of the copy an operator's retry of ``task`` spawns (see `retry_id`)."""
    return derive_task_id(task, Origin.RETRY, 0)


def retry_copy_ids(task: TaskDoc) -> tuple[str, str]:
    """The ids the copy of a retry of ``task`` may have: `retry_copy_id`, and the id
    versions before 2026-12-06 gave it (from the task's id alone).  For readers
    that look a copy up without its retry record (``tulliusd --status``)."""
    return retry_copy_id(task), _short_id(f"{task.task_id}/{Origin.RETRY.value}/0")


def derive_task_id(parent: TaskDoc, origin: Origin, index: int) -> str:
    """The id of the ``index``-th task spawned by ``parent``.

    Deterministic, so that every writer who decides the same step of the same
    task makes the same ids (the accepted record then carries them, and a
    second insert of them is a harmless no-op); hashed, so that ids stay
    short along chains of thousands of retries.

    From the parent's id *and its* ``created_at``: a keyed ``queue()`` call
    repeated after its task was pruned stores the task again under the same
    id, and what that new run spawns must not meet what the first one spawned.
    A prune does not wait for a task's children (a delayed successor, a chain
    that goes on for good), and keeps an operator's retry record for good (a
    tombstone); a child under an id still stored would be refused, or would
    inherit the old retry.  The task stored again has the repeated call's
    start as its ``created_at``, so its tree takes new ids from its first
    step down.  (Until 2026-12-06 the id came from the parent's id alone:
    tasks stored then keep their ids, which their records carry.)
    """
    return _short_id(f"{parent.task_id}@{_epoch_ms(parent.created_at)}/{origin.value}/{index}")


def _epoch_ms(when: datetime) -> int:
    """``when`` in whole milliseconds since 1970 UTC, as the store keeps it (a naive
    time as UTC, which is what a client without ``tz_aware`` gives back)."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return (when - _EPOCH) // _MS


def keyed_task_id(key: str, index: int) -> str:
    """The id of the ``index``-th task queued with ``key`` (`tullius.queue`'s ``key=``).

    Deterministic for the same reason as `derive_task_id`: a repeated call
    inserts the same ids, and the store keeps the first.  Hashed, so that any
    key (colons, a megabyte) makes an id of the usual shape; the prefix keeps
    it apart from every derived id.
    """
    return _short_id(f"key/{key}/{index}")


def _short_id(text: str) -> str:
    """A task id hashed from ``text``: 16 lowercase base-32 characters (80 bits)."""
    digest = hashlib.blake2b(text.encode(), digest_size=10)
    return b32encode(digest.digest()).decode().lower()


def queued_doc(
    spec: TaskSpec,
    *,
    task_id: str,
    now: datetime,
    origin: Origin = Origin.QUEUED,
    parent: TaskDoc | None = None,
) -> TaskDoc:
    """A new QUEUED task document for ``spec``, starting after its delay or ``start_after``."""
    # ``now`` itself when there is no delay: equal to ``now + timedelta(0)``, without the sum.
    start_after = spec.start_after or (now if not spec.delay else now + spec.delay)
    return TaskDoc(
        task_id=task_id,
        class_name=spec.class_name,
        fields=spec.fields,
        priority=spec.priority,
        timeout=spec.timeout,
        handler_timeout=spec.handler_timeout,
        handler_attempts=spec.handler_attempts,
        start_after=start_after,
        created_at=now,
        origin=origin,
        parent_id=None if parent is None else parent.task_id,
        root_id=task_id if parent is None else (parent.root_id or parent.task_id),
        status=Status.QUEUED,
        due_at=start_after,
    )


# --- views ------------------------------------------------------------------


@quick_init
@dataclass(frozen=True)
class TaskView:
    """A task document and its records, as read together.

    A view is a snapshot: ``records`` must not change once the view is built
    (`with_record` makes a new view).  That lets the values derived from the
    records (`status_of`, `handler_attempt`) be computed once per view and
    kept in its ``__dict__`` (not fields: equality and repr ignore them); the
    drivers ask for them many times per transition.
    """

    task: TaskDoc
    records: Mapping[str, Record] = field(default_factory=dict)

    @property
    def task_id(self) -> str:
        return self.task.task_id

    @property
    def run(self) -> Record | None:
        return self.records.get(run_id(self.task.task_id))

    @property
    def outcome(self) -> Record | None:
        return self.records.get(outcome_id(self.task.task_id))

    @property
    def handler_attempt(self) -> int:
        """The highest handler attempt claimed so far (0 if none)."""
        cached: int | None = self.__dict__.get("_handler_attempt")
        if cached is not None:
            return cached
        n = 0
        task_id, records = self.task.task_id, self.records
        while handler_id(task_id, n + 1) in records:
            n += 1
        self.__dict__["_handler_attempt"] = n
        return n

    def handler(self, attempt: int) -> Record | None:
        return self.records.get(handler_id(self.task.task_id, attempt))

    def handler_end(self, attempt: int) -> Record | None:
        return self.records.get(handler_end_id(self.task.task_id, attempt))

    def current_lease(self) -> Record | None:
        """The RUN or HANDLER record whose lease is live, if the task is running or handling."""
        status = status_of(self)
        if status is _RUNNING:
            return self.run
        if status is _HANDLING:
            return self.handler(self.handler_attempt)
        return None

    def with_record(self, record: Record) -> TaskView:
        return TaskView(self.task, {**self.records, record.record_id: record})


def status_of(view: TaskView) -> Status:
    """The true status of a task, derived from its records alone (never the hint)."""
    cached: Status | None = view.__dict__.get("_status")
    if cached is None:
        cached = view.__dict__["_status"] = _derive_status(view)
    return cached


def _derive_status(view: TaskView) -> Status:
    records, task_id = view.records, view.task.task_id
    if records.get(run_id(task_id)) is None:
        return _QUEUED
    outcome = records.get(outcome_id(task_id))
    if outcome is None:
        return _RUNNING
    if outcome.ok:
        return _SUCCEEDED
    attempt = view.handler_attempt
    if attempt == 0:
        return _FAILED
    end = records.get(handler_end_id(task_id, attempt))
    if end is None:
        return _HANDLING
    if end.ok:
        return _HANDLED
    if attempt >= view.task.handler_attempts:
        return _UNHANDLED
    return _FAILED


def spawned_of(view: TaskView) -> tuple[TaskDoc, ...]:
    """What the task's accepted records say must be inserted: successors or replacements."""
    status = status_of(view)
    if status is _SUCCEEDED:
        outcome = view.outcome
        return () if outcome is None else outcome.spawned
    if status is _HANDLED:
        end = view.handler_end(view.handler_attempt)
        return () if end is None else end.spawned
    return ()


def retried_as(view: TaskView) -> TaskDoc | None:
    """The copy an operator's retry of this UNHANDLED task spawned, if it was retried.

    Not among `spawned_of`: a terminal hint promises that the successors or
    replacements exist, and a retry comes after the hint turned terminal (see
    ``tullius.retry``).
    """
    record = view.records.get(retry_id(view.task.task_id))
    if record is None or not record.spawned:
        return None
    return record.spawned[0]


def due_at_of(view: TaskView) -> datetime | None:
    """When the next piece of work on the task may start, or None if none is pending."""
    status = status_of(view)
    if status is _QUEUED:
        return view.task.start_after
    if status is _FAILED:
        attempt = view.handler_attempt
        end = view.handler_end(attempt) if attempt else None
        if end is not None and end.retry_at is not None:
            return end.retry_at
        assert view.outcome is not None  # FAILED implies an outcome
        return view.outcome.at
    return None


# --- BSON conversion ----------------------------------------------------------


#: The real ``datetime`` class, in a tuple: freezegun replaces the module
#: attributes that are the class while a simulation runs, and a time user code
#: took from its frozen clock (a ``FakeDatetime``) is stored as the plain class.
PLAIN_DATETIME: Final = (datetime,)


def stored_time(when: datetime) -> datetime:
    """``when`` as the store keeps it: a plain aware UTC ``datetime`` (not a subclass),
    truncated to milliseconds (BSON's precision)."""
    if when.tzinfo is None:
        raise ValueError(f"naive datetime {when!r}; expected an aware datetime")
    when = when.astimezone(UTC)
    plain = PLAIN_DATETIME[0]
    if type(when) is not plain:  # a pendulum time, say: BSON gives back a datetime
        when = plain(*when.timetuple()[:6], when.microsecond, tzinfo=UTC)
    return when.replace(microsecond=when.microsecond // 1000 * 1000)


#: Value types a BSON round trip gives back as they are.
_AS_STORED: Final = frozenset({str, int, float, bool, bytes, type(None)})
#: A subclass of a builtin comes back as the builtin (a ``StrEnum`` member as its str).
_BUILTIN_OF: Final[tuple[tuple[type, Callable[[Any], Any]], ...]] = (
    (str, str.__str__),
    (int, int.__int__),
    (float, float.__float__),
    (bytes, bytes.__bytes__),
)


def stored_value(value: Any) -> Any:
    """A field value as it comes back from the store: tuples become lists, times
    lose µs, and subclasses of builtin types (a ``StrEnum`` member, a pendulum
    time) become the builtin type, in values and in keys."""
    if type(value) in _AS_STORED:
        return value
    if isinstance(value, datetime):
        return stored_time(value)
    if isinstance(value, list | tuple):
        return [stored_value(item) for item in value]
    if isinstance(value, dict):
        return {str.__str__(key): stored_value(item) for key, item in value.items()}
    for builtin, convert in _BUILTIN_OF:
        if isinstance(value, builtin):
            return convert(value)
    return value


def _ms(delta: timedelta) -> int:
    return delta // timedelta(milliseconds=1)


def task_to_bson(doc: TaskDoc) -> dict[str, Any]:
    """The dictionary stored for a task; ``_id`` is the task id."""
    return {
        "_id": doc.task_id,
        "cls": doc.class_name,
        "fields": stored_value(dict(doc.fields)),
        "priority": doc.priority,
        "timeout_ms": _ms(doc.timeout),
        "handler_timeout_ms": _ms(doc.handler_timeout),
        "handler_attempts": doc.handler_attempts,
        "start_after": stored_time(doc.start_after),
        "created_at": stored_time(doc.created_at),
        "origin": doc.origin.value,
        "parent_id": doc.parent_id,
        "root_id": doc.root_id,
        "status": doc.status.value,
        "due_at": None if doc.due_at is None else stored_time(doc.due_at),
    }


def task_from_bson(data: Mapping[str, Any]) -> TaskDoc:
    """Inverse of `task_to_bson`.  Raises KeyError/ValueError on a malformed document."""
    fields = dict(data["fields"])
    if data["created_at"].tzinfo is None:
        # Decoded by a client without tz_aware=True: so were the fields' times.  (Only
        # then: the walk costs as much as decoding a large field again.)
        fields = aware_values(fields)
    return TaskDoc(
        task_id=str(data["_id"]),
        class_name=data["cls"],
        fields=fields,
        priority=_priority(data["priority"]),
        timeout=timedelta(milliseconds=data["timeout_ms"]),
        handler_timeout=timedelta(milliseconds=data["handler_timeout_ms"]),
        handler_attempts=int(data["handler_attempts"]),
        start_after=aware_utc(data["start_after"]),
        created_at=aware_utc(data["created_at"]),
        origin=Origin(data.get("origin", Origin.QUEUED.value)),
        parent_id=data.get("parent_id"),
        root_id=data.get("root_id") or str(data["_id"]),
        status=Status(data.get("status", Status.QUEUED.value)),
        due_at=None if data.get("due_at") is None else aware_utc(data["due_at"]),
    )


def short_name(class_name: str) -> str:
    """A stored class name without its module, for messages: ``Report`` for
    ``billing.tasks:Report``."""
    return class_name.rpartition(":")[2]


def is_number(value: Any) -> bool:
    """A number as a priority or a band's end may be: an int or float, not a bool
    (an int to Python, not to BSON), not NaN (which no comparison matches)."""
    return not isinstance(value, bool) and isinstance(value, int | float) and value == value


def _priority(value: Any) -> float:
    # A priority a hand edit or another program made a string matches no band's
    # query (MongoDB compares numbers with numbers only), so it would wait unseen.
    if not is_number(value):
        raise ValueError(f"priority {value!r} is not a number")
    return value  # type: ignore[no-any-return]


def aware_values(value: Any) -> Any:
    """``value`` with every naive datetime in it made aware UTC, as BSON's are.

    Why: a pymongo client without ``tz_aware=True`` (the README's ``make_db()``
    does not ask for it) decodes a document's times naive, and a task's fields
    must come back as they went in whichever collection or client read them.
    """
    if isinstance(value, datetime):
        return aware_utc(value)
    if isinstance(value, dict):
        return {name: aware_values(item) for name, item in value.items()}
    if isinstance(value, list):
        return [aware_values(item) for item in value]
    return value


def aware_utc(value: datetime) -> datetime:
    # pymongo without tz_aware=True (or mongomock) hands back naive UTC datetimes.
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def failure_to_bson(failure: Failure) -> dict[str, Any]:
    return {
        "kind": failure.kind,
        "message": failure.message,
        "at": stored_time(failure.at),
        "traceback": failure.traceback,
        "server": failure.server,
    }


def failure_from_bson(data: Mapping[str, Any]) -> Failure:
    return Failure(
        kind=data["kind"],
        message=data["message"],
        at=aware_utc(data["at"]),
        traceback=data.get("traceback"),
        server=data.get("server"),
    )


def record_to_bson(record: Record) -> dict[str, Any]:
    """The dictionary stored for a record; ``_id`` is the record id."""
    data = {
        "_id": record.record_id,
        "task_id": record.task_id,
        "kind": record.kind.value,
        "token": record.token,
        "at": stored_time(record.at),
        "server": record.server,
        "attempt": record.attempt,
        "worker": record.worker,
        "beat": record.beat,
        "ok": record.ok,
        "failure": None if record.failure is None else failure_to_bson(record.failure),
        "spawned": [task_to_bson(doc) for doc in record.spawned],
        "retry_at": None if record.retry_at is None else stored_time(record.retry_at),
    }
    if record.task_created_at is not None:
        data["task_created_at"] = stored_time(record.task_created_at)
    return data


def record_from_bson(data: Mapping[str, Any]) -> Record:
    """Inverse of `record_to_bson`."""
    return Record(
        record_id=str(data["_id"]),
        task_id=data["task_id"],
        kind=RecordKind(data["kind"]),
        token=data["token"],
        at=aware_utc(data["at"]),
        server=data["server"],
        attempt=int(data.get("attempt", 0)),
        worker=data.get("worker"),
        beat=int(data.get("beat", 0)),
        ok=data.get("ok"),
        failure=None if data.get("failure") is None else failure_from_bson(data["failure"]),
        spawned=tuple(task_from_bson(item) for item in data.get("spawned") or ()),
        retry_at=None if data.get("retry_at") is None else aware_utc(data["retry_at"]),
        task_created_at=(
            None if data.get("task_created_at") is None else aware_utc(data["task_created_at"])
        ),
    )


def as_stored(doc: TaskDoc) -> TaskDoc:
    """``doc`` exactly as reading it back from any store would return it."""
    return task_from_bson(task_to_bson(doc))
