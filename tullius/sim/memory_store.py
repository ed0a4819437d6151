"""MemoryStore: the `Store` contract held in dictionaries, for the simulator and tests.

A second implementation, not a mock: the behaviour suite in
``tests/store_contract.py`` runs against it and against `MongoStore`, and
documents are stored exactly as a BSON round trip through MongoDB would return
them (milliseconds, aware UTC, lists for tuples), so both stores hand back
identical values.  `stored_task` and `stored_record` produce those values
directly instead of building and parsing a BSON dictionary on every write: the
simulator writes a dozen times per task, and the round trip was its largest
single cost.  They must stay equal to ``as_stored(doc)`` and
``record_from_bson(record_to_bson(record))``.

Queries are answered from indexes kept up to date by the writes: task ids by
status hint, and for `find_due` one list per (status, priority) sorted by
``(due_at, task_id)``, so a claim reads only the due prefix of each priority
in its band instead of scanning and sorting the whole queue.

It can also misbehave the way FerretDB does: with ``racy_updates > 0`` a
conditional update sometimes checks its condition against the value *before*
the latest write, as if it had raced that write, so two racing writers can
both "win" (a stale hint can even overwrite a terminal one).  Each write opens
one such window; inserts stay atomic, as they are on every server.
"""

from __future__ import annotations

import dataclasses
import random
from bisect import bisect_left, bisect_right, insort
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from operator import itemgetter
from typing import Any, Final

from tullius.document import (
    PLAIN_DATETIME,
    TERMINAL,
    Failure,
    Origin,
    Record,
    RecordKind,
    Status,
    TaskDoc,
    TaskView,
    retry_id,
    stored_time,
    stored_value,
)
from tullius.store import ServerSeen

#: Field value types a BSON round trip returns unchanged (and that can't be mutated).
_PLAIN: Final = frozenset({str, int, float, bool, bytes, type(None)})
_MS: Final = timedelta(milliseconds=1)
_DUE_AT: Final = itemgetter(0)


def stored_task(doc: TaskDoc) -> TaskDoc:
    """``doc`` as the store keeps it; equal to ``as_stored(doc)``, without the BSON dict."""
    task_id = str(doc.task_id)
    return TaskDoc(
        task_id,
        doc.class_name,
        _stored_fields(doc.fields),
        doc.priority,
        _stored_duration(doc.timeout),
        _stored_duration(doc.handler_timeout),
        int(doc.handler_attempts),
        _stored_instant(doc.start_after),
        _stored_instant(doc.created_at),
        doc.origin if type(doc.origin) is Origin else Origin(doc.origin.value),
        doc.parent_id,
        doc.root_id or task_id,
        doc.status if type(doc.status) is Status else Status(doc.status.value),
        None if doc.due_at is None else _stored_instant(doc.due_at),
    )


def stored_record(record: Record) -> Record:
    """``record`` as the store keeps it; equal to ``record_from_bson(record_to_bson(record))``.

    A record that is already in stored form (the usual case: no spawned tasks to
    copy, exact types, whole-millisecond UTC instants) is kept as it is rather
    than rebuilt: records and failures are frozen, so sharing one is safe.
    """
    failure = record.failure
    if (
        not record.spawned
        and type(record) is Record
        and type(record.record_id) is str
        and type(record.kind) is RecordKind
        and type(record.attempt) is int
        and type(record.beat) is int
        and _is_stored_instant(record.at)
        and (record.retry_at is None or _is_stored_instant(record.retry_at))
        and (record.task_created_at is None or _is_stored_instant(record.task_created_at))
        and (failure is None or (type(failure) is Failure and _is_stored_instant(failure.at)))
    ):
        return record
    return Record(
        str(record.record_id),
        record.task_id,
        RecordKind(record.kind.value),
        record.token,
        _stored_instant(record.at),
        record.server,
        int(record.attempt),
        record.worker,
        int(record.beat),
        record.ok,
        None
        if failure is None
        else Failure(
            failure.kind,
            failure.message,
            _stored_instant(failure.at),
            failure.traceback,
            failure.server,
        ),
        tuple(map(stored_task, record.spawned)),
        None if record.retry_at is None else _stored_instant(record.retry_at),
        None if record.task_created_at is None else _stored_instant(record.task_created_at),
    )


def _stored_instant(when: datetime) -> datetime:
    # Already aware UTC with whole milliseconds (the usual case): storing changes nothing.
    if _is_stored_instant(when):
        return when
    return stored_time(when)


def _is_stored_instant(when: datetime) -> bool:
    return type(when) is PLAIN_DATETIME[0] and when.tzinfo is UTC and not when.microsecond % 1000


def _stored_duration(delta: timedelta) -> timedelta:
    # Stored as whole milliseconds (``task_to_bson``); most durations already are.
    if type(delta) is timedelta and not delta.microseconds % 1000:
        return delta
    return timedelta(milliseconds=delta // _MS)


def _stored_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """A fresh copy of ``fields`` as stored; lists and dicts are copied deeply, as
    a round trip would, so that no caller shares a mutable value with the store."""
    copy = dict(fields)
    for value in copy.values():
        if type(value) not in _PLAIN:
            return stored_value(copy)  # type: ignore[no-any-return]
    return copy


class MemoryStore:
    """Task documents and records in memory; see `tullius.store.Store` for the contract.

    Args:
        rng: random source for racy conditional updates (required when racy).
        racy_updates: probability that a conditional update checks a stale value.
    """

    def __init__(self, *, rng: random.Random | None = None, racy_updates: float = 0.0) -> None:
        if not 0.0 <= racy_updates <= 1.0:
            raise ValueError(f"racy_updates={racy_updates!r} must be between 0 and 1")
        if racy_updates and rng is None:
            raise ValueError("racy_updates needs rng= so that races are reproducible")
        self._rng = rng
        self._racy = racy_updates
        self._tasks: dict[str, TaskDoc] = {}
        self._previous_status: dict[str, Status] = {}
        self._records: dict[str, Record] = {}
        self._records_by_task: dict[str, dict[str, Record]] = {}
        self._by_status: dict[Status, set[str]] = {status: set() for status in Status}
        # find_due's index: status -> priority -> [(due_at, task_id)] sorted, for
        # every task whose hint has a due_at; and each status's priorities, sorted.
        self._due: dict[Status, dict[float, list[tuple[datetime, str]]]] = {
            status: {} for status in Status
        }
        self._priorities: dict[Status, list[float]] = {status: [] for status in Status}
        self._children: dict[str, list[str]] = {}
        self._ordered: dict[tuple[Status, ...], tuple[Status, ...]] = {}
        #: How many times each task id was newly inserted (always 1; checked by invariants).
        self.insert_counts: dict[str, int] = {}
        self._servers: dict[str, ServerSeen] = {}

    # --- writes -----------------------------------------------------------------

    def insert_tasks(self, docs: Sequence[TaskDoc]) -> int:
        inserted = 0
        for doc in docs:
            if doc.task_id in self._tasks:
                continue
            stored = stored_task(doc)
            self._tasks[doc.task_id] = stored
            self._index(stored)
            if stored.parent_id is not None:
                self._children.setdefault(stored.parent_id, []).append(doc.task_id)
            self.insert_counts[doc.task_id] = self.insert_counts.get(doc.task_id, 0) + 1
            inserted += 1
        return inserted

    def insert_record(self, record: Record) -> Record:
        existing = self._records.get(record.record_id)
        if existing is not None:
            return existing
        stored = stored_record(record)
        self._records[record.record_id] = stored
        # Not ``setdefault(task_id, {})``, which builds a dict on every call: a task
        # holds two to four records.
        by_task = self._records_by_task.get(record.task_id)
        if by_task is None:
            by_task = self._records_by_task[record.task_id] = {}
        by_task[record.record_id] = stored
        return stored

    def set_status(self, task_id: str, status: Status, due_at: datetime | None) -> bool:
        doc = self._tasks.get(task_id)
        if doc is None:
            return False
        checked = doc.status
        if (
            self._racy
            and self._rng is not None
            and task_id in self._previous_status
            and self._rng.random() < self._racy
        ):
            # As on FerretDB: the condition is evaluated against what a client
            # racing the latest write read before that write landed.  The race
            # window closes once used: a later writer reads the current value.
            checked = self._previous_status.pop(task_id)
        if checked in TERMINAL:
            return True
        if self._racy:  # only racy updates read it
            self._previous_status[task_id] = doc.status
        self._unindex(doc)
        # ``doc`` is stored already: only the new hints need converting, and its
        # fields copying (this is what ``as_stored(dataclasses.replace(doc,
        # status=status, due_at=due_at))`` returns).  Built from a copy of its
        # ``__dict__`` rather than by ``TaskDoc()`` with all fourteen fields, which
        # took twice as long, and every step of every task ends here.  Sound because
        # a stored doc is a plain `quick_init` TaskDoc (made by `stored_task` or
        # here) whose ``__dict__`` holds its fields and nothing else.
        values = doc.__dict__.copy()
        values["fields"] = _stored_fields(doc.fields)
        values["status"] = status if type(status) is Status else Status(status.value)
        values["due_at"] = None if due_at is None else _stored_instant(due_at)
        stored = object.__new__(TaskDoc)
        object.__setattr__(stored, "__dict__", values)
        self._tasks[task_id] = stored
        self._index(stored)
        return True

    def beat(self, record_id: str) -> int | None:
        record = self._records.get(record_id)
        if record is None:
            return None
        renewed = dataclasses.replace(record, beat=record.beat + 1)
        self._records[record_id] = renewed
        self._records_by_task[record.task_id][record_id] = renewed
        return renewed.beat

    # --- indexes ------------------------------------------------------------------

    def _index(self, doc: TaskDoc) -> None:
        self._by_status[doc.status].add(doc.task_id)
        if doc.due_at is None or doc.status in TERMINAL:  # (a terminal one: when it settled)
            return
        buckets = self._due[doc.status]
        bucket = buckets.get(doc.priority)
        if bucket is None:
            bucket = buckets[doc.priority] = []
            insort(self._priorities[doc.status], doc.priority)
        key = (doc.due_at, doc.task_id)
        # Most tasks come due after every other in their bucket (queued now, or failed
        # now): one comparison instead of a binary search over (due_at, id) pairs.
        if not bucket or bucket[-1] < key:
            bucket.append(key)
        else:
            insort(bucket, key)

    def _unindex(self, doc: TaskDoc) -> None:
        self._by_status[doc.status].discard(doc.task_id)
        if doc.due_at is None or doc.status in TERMINAL:
            return
        buckets = self._due[doc.status]
        bucket = buckets[doc.priority]
        key = (doc.due_at, doc.task_id)
        # A claimed task is usually the most urgent of its bucket (claims take the
        # due prefix in order): one comparison instead of a binary search.
        del bucket[0 if bucket[0] == key else bisect_left(bucket, key)]
        if not bucket:
            del buckets[doc.priority]
            priorities = self._priorities[doc.status]
            del priorities[bisect_left(priorities, doc.priority)]

    # --- reads ------------------------------------------------------------------

    def load(self, task_id: str) -> TaskView | None:
        doc = self._tasks.get(task_id)
        if doc is None:
            return None
        return TaskView(doc, dict(self._records_by_task.get(task_id, {})))

    def load_many(self, task_ids: Sequence[str]) -> list[TaskView]:
        views = (self.load(task_id) for task_id in dict.fromkeys(task_ids))
        return [view for view in views if view is not None]

    def find_due(
        self,
        statuses: Sequence[Status],
        min_priority: float,
        max_priority: float,
        now: datetime,
        limit: int,
    ) -> list[TaskDoc]:
        # Ordered by (priority, status value, due_at, task_id): priorities in
        # ascending order, and within one priority and status the due entries are
        # a prefix of its bucket.
        if limit < 0:  # a slice's meaning, as ``sorted(all_due)[:limit]`` would give
            every = self.find_due(statuses, min_priority, max_priority, now, len(self._tasks))
            return every[:limit]
        ordered = self._ordered.get(statuses) if type(statuses) is tuple else None
        if ordered is None:  # each claim asks for the same statuses: sorted once
            ordered = tuple(sorted(set(statuses), key=lambda status: status.value))
            if type(statuses) is tuple:
                self._ordered[statuses] = ordered
        priorities = sorted(
            {
                priority
                for status in ordered
                for priority in self._priorities[status][
                    bisect_left(self._priorities[status], min_priority) :
                ]
                if priority <= max_priority
            }
        )
        due: list[TaskDoc] = []
        tasks = self._tasks
        for priority in priorities:
            for status in ordered:
                bucket = self._due[status].get(priority)
                if not bucket:
                    continue
                end = min(bisect_right(bucket, now, key=_DUE_AT), limit - len(due))
                due += [tasks[task_id] for _, task_id in bucket[:end]]
                if len(due) >= limit:
                    return due
        return due

    def count_due(
        self, statuses: Sequence[Status], min_priority: float, max_priority: float, now: datetime
    ) -> dict[float, int]:
        counts: dict[float, int] = {}
        for status in set(statuses):
            held = self._priorities[status]
            for priority in held[
                bisect_left(held, min_priority) : bisect_right(held, max_priority)
            ]:
                due = bisect_right(self._due[status].get(priority, []), now, key=_DUE_AT)
                if due:
                    counts[priority] = counts.get(priority, 0) + due
        return counts

    def find_by_status(
        self, statuses: Sequence[Status], limit: int, after: str | None = None
    ) -> list[TaskDoc]:
        docs = [
            self._tasks[task_id]
            for status in statuses
            for task_id in self._by_status[status]
            if after is None or task_id > after
        ]
        if after is None:
            docs.sort(key=lambda doc: (doc.due_at is not None, doc.due_at, doc.task_id))
        else:
            docs.sort(key=lambda doc: doc.task_id)
        return docs[:limit]

    def find_children(self, parent_id: str) -> list[TaskDoc]:
        return sorted(
            (self._tasks[task_id] for task_id in self._children.get(parent_id, ())),
            key=lambda doc: doc.task_id,
        )

    def find_tasks(self, task_ids: Sequence[str]) -> list[TaskDoc]:
        tasks = self._tasks
        return [tasks[task_id] for task_id in dict.fromkeys(task_ids) if task_id in tasks]

    def stored_ids(self, task_ids: Sequence[str]) -> set[str]:
        tasks, records = self._tasks, self._records
        return {t for t in task_ids if t in tasks or retry_id(t) in records}

    def count_by_status(self) -> dict[Status, int]:
        return {status: len(ids) for status, ids in self._by_status.items() if ids}

    # --- the servers' entries -----------------------------------------------------

    def announce_server(self, seen: ServerSeen) -> None:
        self._servers[seen.server] = dataclasses.replace(
            seen, bands=tuple(seen.bands), seen_at=stored_time(seen.seen_at)
        )

    def read_servers(self) -> list[ServerSeen]:
        return [self._servers[name] for name in sorted(self._servers)]

    def mark_stopped(self, server: str, instance: str) -> None:
        stored = self._servers.get(server)
        if stored is not None and stored.instance == instance:
            self._servers[server] = dataclasses.replace(stored, stopped=True)

    def forget_server(self, server: str, seen_at: datetime) -> None:
        stored = self._servers.get(server)
        if stored is not None and stored.seen_at == stored_time(seen_at):
            del self._servers[server]

    def delete_tasks(self, docs: Sequence[TaskDoc]) -> int:
        # One copy per task here, deleted after its records, as the protocol orders;
        # all but the retry records, which stay as tombstones (`tullius.retry`).  A
        # task stored again under the id since it was read (another ``created_at``)
        # is not the one read: it stays, with its records.
        doomed = [
            doc.task_id
            for doc in docs
            if (stored := self._tasks.get(doc.task_id)) is not None
            and stored.created_at == stored_time(doc.created_at)
        ]
        for task_id in doomed:
            records = self._records_by_task.pop(task_id, {})
            for record_id, record in records.items():
                if record.kind is RecordKind.RETRY:
                    self._records_by_task.setdefault(task_id, {})[record_id] = record
                else:
                    del self._records[record_id]
        for task_id in doomed:
            doc = self._tasks.pop(task_id)
            self._unindex(doc)
            self._previous_status.pop(task_id, None)
            if doc.parent_id is not None:
                self._children[doc.parent_id].remove(task_id)
        return len(doomed)

    # --- for invariants and tests (not part of the Store protocol) ----------------

    def lowest_due_priority(self, status: Status) -> float | None:
        """The most urgent priority among tasks with this hint and a due time, or None.

        `find_due` orders by priority first, so a check that looks for tasks more
        urgent than some priority can skip its query when this is not below it.
        """
        held = self._priorities[status]
        return held[0] if held else None

    def all_tasks(self) -> list[TaskDoc]:
        return list(self._tasks.values())

    def all_views(self) -> list[TaskView]:
        return [
            TaskView(doc, dict(self._records_by_task.get(task_id, {})))
            for task_id, doc in self._tasks.items()
        ]
