"""What the engine needs from a database, and the operations it asks for.

`Store` is the protocol both `MemoryStore` (simulator, tests) and `MongoStore`
(daemon) implement; an agreement test runs one behaviour suite against both.
Each method's docstring says what is atomic and what a lost race returns.  The
protocol never needs a transaction, and never trusts a conditional update to
be atomic: FerretDB's are not.  The only atomic primitive relied on is that
inserting a document whose ``_id`` exists is rejected.

The engine (``engine.py``) talks to a store through *operations*: frozen
dataclasses yielded by its generators and carried out by `perform()`.  This is
what lets the simulator interleave the store traffic of many servers one
operation at a time and inject faults between any two of them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final, Protocol

from tullius.band import Band
from tullius.document import Record, Status, TaskDoc, TaskView, quick_init
from tullius.effects import InsertRecord, InsertTasks, SetStatus
from tullius.policy import DEFAULT_LEASE


@dataclass(frozen=True)
class ServerSeen:
    """A daemon's entry in the store: the bands it runs, and when it last said so."""

    server: str
    bands: tuple[Band, ...]
    seen_at: datetime
    #: It said it stopped (a clean stop), so it takes nothing however recent.
    stopped: bool = False
    #: How often it renews the entry (its lease): others judge its age by this.
    every: timedelta = DEFAULT_LEASE
    #: Which start of the server wrote it: two daemons given one name differ here.
    instance: str = ""


class Store(Protocol):
    """Durable storage of task documents and their records.

    Every method may raise `StoreError`; after one, the write may or may not
    have been applied, and repeating it is always safe.
    """

    def insert_tasks(self, docs: Sequence[TaskDoc]) -> int:
        """Insert each task whose id is not stored yet; return how many were new.

        Atomic per document.  A stored id is left untouched, so a repeat is a
        no-op.  Not atomic across documents: after an error, some may be in.
        """
        ...

    def insert_record(self, record: Record) -> Record:
        """Insert ``record`` unless its id is stored; return the stored record.

        Atomic: of racing inserts of one id exactly one wins, everywhere.  The
        caller compares the returned record's ``token`` with its own: equal
        means it won (also when repeating its own insert after an ambiguous
        error), different means a rival's record decided this step.
        """
        ...

    def set_status(self, task_id: str, status: Status, due_at: datetime | None) -> bool:
        """Set the status and due-time hints unless the stored hint is terminal.

        A conditional update: NOT atomic on every server (two racing writers
        may both apply).  Hints are therefore only hints; sweeps repair them.
        Returns whether the task had a document to update (`MongoStore`: a
        live one), whatever its hint: False only for a task not stored, or
        already moved (see `engine.TaskGone`).
        """
        ...

    def beat(self, record_id: str) -> int | None:
        """Increment the heartbeat counter of a lease record; return it, or None if missing.

        A store may also answer None once the record's task has finished: its
        leases are over either way.

        Only the lease's owner calls this, so racing is not a concern.
        """
        ...

    def load(self, task_id: str) -> TaskView | None:
        """The task and all of its records, or None if no such task.

        Not a snapshot: a record inserted during the read may be missing, which
        only makes the view stale, never inconsistent (records never change
        except ``beat``).  Records form a chain (``run``, ``outcome``,
        ``handler:1``, ``handler:1:end``, ...; each is inserted only after the
        one before it), and a store may read them in that order up to the
        first missing one.
        """
        ...

    def load_many(self, task_ids: Sequence[str]) -> list[TaskView]:
        """`load` of each of ``task_ids`` that is stored, in the order asked (once each).

        For reading a page of tasks with their records (`tullius.retry`):
        `MongoStore` reads the records of all of them in one query, where a
        `load` each would read each one's records ``_id`` by ``_id``, and on
        FerretDB every one of those reads scans all of ``records`` (see
        design.md, "Store operations").  Each view is as `load` gives it.
        """
        ...

    def find_due(
        self,
        statuses: Sequence[Status],
        min_priority: float,
        max_priority: float,
        now: datetime,
        limit: int,
    ) -> list[TaskDoc]:
        """Tasks whose hint is one of ``statuses``, priority in the band, ``due_at <= now``.

        Most urgent first: by priority, then status value (so ``failed``, whose
        ``failed()`` is overdue, comes before ``queued``), then ``due_at``, then
        id.  One query for every kind of work: on servers that scan a
        collection for each query, a claim costs one scan.  Hints may be
        stale; the caller must check the records before acting.
        """
        ...

    def count_due(
        self, statuses: Sequence[Status], min_priority: float, max_priority: float, now: datetime
    ) -> dict[float, int]:
        """How many tasks `find_due` would find without a limit, per priority (only
        priorities with some).  An infinite bound is no bound.  (A count, not the
        earliest due time too: FerretDB's ``$group`` has no ``$min``.)"""
        ...

    def find_by_status(
        self, statuses: Sequence[Status], limit: int, after: str | None = None
    ) -> list[TaskDoc]:
        """Tasks whose hint is one of ``statuses``, oldest ``due_at`` first, then by id.

        ``after``: only tasks whose id sorts after it, in id order, for reading
        page by page (a page goes on from the last id of the one before; ``""``
        for the first page in id order).
        """
        ...

    def find_children(self, parent_id: str) -> list[TaskDoc]:
        """Tasks spawned by ``parent_id`` (successors and replacements), by id."""
        ...

    def find_tasks(self, task_ids: Sequence[str]) -> list[TaskDoc]:
        """The documents of those of ``task_ids`` that are stored, without their records.

        A task with a live copy is given as that copy (`MongoStore`: as `load`
        prefers it), so its hint is the one a repair would see.  For reading
        many tasks' hints at once (`tullius.prune`), where `load` would read
        each one's records too.
        """
        ...

    def stored_ids(self, task_ids: Sequence[str]) -> set[str]:
        """Those of ``task_ids`` stored, live or finished, or whose operator's retry
        record outlived the task's prune (a tombstone, which a task stored again
        under the id would inherit); for a keyed ``queue()`` call.

        Cheaper than `find_tasks` where reading finished tasks by id is not:
        `MongoStore` reads the live queue, then the run and retry records of the
        rest (a task leaves the live queue only once it ran), so on FerretDB it
        scans one task's shard of ``records``, not all of ``finished``.  Read in
        that order, a task moving meanwhile is seen by one read or the other.
        """
        ...

    def count_by_status(self) -> dict[Status, int]:
        """How many task documents carry each status hint."""
        ...

    def announce_server(self, seen: ServerSeen) -> None:
        """Store ``seen`` as its server's entry, replacing the one before.

        A store with a clock of its own stamps the entry with it instead of
        ``seen.seen_at`` (`MongoStore`: the database's), so that entries are
        compared on one clock.  Two daemons given one name race here (the
        last write wins); each notices the other's ``instance``.
        """
        ...

    def mark_stopped(self, server: str, instance: str) -> None:
        """Mark ``server``'s entry stopped if ``instance`` wrote it last.

        The condition keeps a newer start under the same name (a deployment
        that starts the new daemon before the old one has stopped) running.
        """
        ...

    def read_servers(self) -> list[ServerSeen]:
        """Every server's entry, by name."""
        ...

    def forget_server(self, server: str, seen_at: datetime) -> None:
        """Delete ``server``'s entry if it was last renewed at ``seen_at``.

        The condition keeps a server that restarted under the same name (and
        renewed its entry since it was read) listed.
        """
        ...

    def delete_tasks(self, docs: Sequence[TaskDoc]) -> int:
        """Delete the tasks ``docs`` were read from (every copy) and their records;
        return how many tasks were deleted.

        For pruning finished tasks (`tullius.prune`), which alone decides what
        may go.  An operator's ``retry`` record stays, a tombstone: a retry asked
        for during the prune must find it, not decide another (`tullius.retry`).
        In this order: the tasks' live copies, then their records,
        then their other copies (`MongoStore`: in ``finished``).  So an error
        part-way leaves at most a finished copy with some or none of its
        records, which nothing claims and a repeat deletes; never a live copy
        without its records, which a claim would run again.

        Only the task as read goes: a copy whose ``created_at`` is another is a
        task stored again under the id since (a keyed ``queue()`` repeated
        after an earlier prune deleted the one read), which this prune never
        judged, and which keeps its copies and records (all of the id's then:
        the old ones were deleted before the id could be stored again).  With
        two prunes racing, the later one's delete would otherwise take it.
        """
        ...


# --- the other operations (the task writes are the machine's effects) ---------

# Built for every read of every conversation: `quick_init` spares the field-by-field
# ``__init__`` of a frozen dataclass.


@quick_init
@dataclass(frozen=True)
class Load:
    task_id: str


@dataclass(frozen=True)
class LoadMany:
    task_ids: tuple[str, ...]


@quick_init
@dataclass(frozen=True)
class FindDue:
    statuses: tuple[Status, ...]
    min_priority: float
    max_priority: float
    now: datetime
    limit: int


@dataclass(frozen=True)
class CountDue:
    statuses: tuple[Status, ...]
    min_priority: float
    max_priority: float
    now: datetime


@quick_init
@dataclass(frozen=True)
class FindByStatus:
    statuses: tuple[Status, ...]
    limit: int
    after: str | None = None


@quick_init
@dataclass(frozen=True)
class Beat:
    record_id: str


@dataclass(frozen=True)
class AnnounceServer:
    seen: ServerSeen


@dataclass(frozen=True)
class ReadServers:
    pass


@dataclass(frozen=True)
class ForgetServer:
    server: str
    seen_at: datetime


@dataclass(frozen=True)
class FindTasks:
    task_ids: tuple[str, ...]


@dataclass(frozen=True)
class DeleteTasks:
    docs: tuple[TaskDoc, ...]


@dataclass(frozen=True)
class StoredIds:
    task_ids: tuple[str, ...]


Operation = (
    InsertRecord
    | InsertTasks
    | SetStatus
    | Load
    | LoadMany
    | FindDue
    | FindByStatus
    | CountDue
    | Beat
    | AnnounceServer
    | ReadServers
    | ForgetServer
    | FindTasks
    | DeleteTasks
    | StoredIds
)


def perform(store: Store, op: Operation) -> Any:
    """Carry out one operation against ``store`` and return its result."""
    # A table by type rather than a ``match``, which tries the cases in turn:
    # every driver performs several operations per task.  The walk of the MRO
    # only runs for a subclass of an operation.
    do = PERFORMERS.get(type(op))
    if do is None:
        do = next((PERFORMERS[cls] for cls in type(op).__mro__ if cls in PERFORMERS), None)
        if do is None:
            raise TypeError(f"unknown store operation {op!r}")
    return do(store, op)


#: How `perform` carries out each kind of operation: ``PERFORMERS[type(op)](store, op)``.
#: The simulator binds these to its store in a table of its own.
PERFORMERS: Final[Mapping[type[Any], Callable[[Store, Any], Any]]] = {
    InsertRecord: lambda store, op: store.insert_record(op.record),
    InsertTasks: lambda store, op: store.insert_tasks(op.docs),
    SetStatus: lambda store, op: store.set_status(op.task_id, op.status, op.due_at),
    Load: lambda store, op: store.load(op.task_id),
    LoadMany: lambda store, op: store.load_many(op.task_ids),
    FindDue: lambda store, op: store.find_due(
        op.statuses, op.min_priority, op.max_priority, op.now, op.limit
    ),
    FindByStatus: lambda store, op: store.find_by_status(op.statuses, op.limit, op.after),
    CountDue: lambda store, op: store.count_due(
        op.statuses, op.min_priority, op.max_priority, op.now
    ),
    Beat: lambda store, op: store.beat(op.record_id),
    AnnounceServer: lambda store, op: store.announce_server(op.seen),
    ReadServers: lambda store, op: store.read_servers(),
    ForgetServer: lambda store, op: store.forget_server(op.server, op.seen_at),
    FindTasks: lambda store, op: store.find_tasks(op.task_ids),
    StoredIds: lambda store, op: store.stored_ids(op.task_ids),
    DeleteTasks: lambda store, op: store.delete_tasks(op.docs),
}


def operation_name(op: Operation) -> str:
    """A stable name for an operation kind, used to aim injected faults."""
    return type(op).__name__
