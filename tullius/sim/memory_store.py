"""MemoryStore: the `Store` contract held in dictionaries, for the simulator and tests.

A second implementation, not a mock: the behaviour suite in
``tests/unit/test_store_behaviour.py`` runs against it and against `MongoStore`,
and documents pass through the same BSON conversion as in MongoDB, so both
stores hand back identical values (milliseconds, aware UTC, lists for tuples).

It can also misbehave the way FerretDB does: with ``racy_updates > 0`` a
conditional update sometimes checks its condition against the value *before*
the latest write, as if it had raced that write, so two racing writers can
both "win" (a stale hint can even overwrite a terminal one).  Each write opens
one such window; inserts stay atomic, as they are on every server.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from datetime import datetime

from tullius.document import (
    TERMINAL,
    Record,
    Status,
    TaskDoc,
    TaskView,
    as_stored,
    record_from_bson,
    record_to_bson,
    replace_status,
)


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
        self._children: dict[str, list[str]] = {}
        #: How many times each task id was newly inserted (always 1; checked by invariants).
        self.insert_counts: dict[str, int] = {}

    # --- writes -----------------------------------------------------------------

    def insert_tasks(self, docs: Sequence[TaskDoc]) -> int:
        inserted = 0
        for doc in docs:
            if doc.task_id in self._tasks:
                continue
            stored = as_stored(doc)
            self._tasks[doc.task_id] = stored
            self._by_status[stored.status].add(doc.task_id)
            if stored.parent_id is not None:
                self._children.setdefault(stored.parent_id, []).append(doc.task_id)
            self.insert_counts[doc.task_id] = self.insert_counts.get(doc.task_id, 0) + 1
            inserted += 1
        return inserted

    def insert_record(self, record: Record) -> Record:
        existing = self._records.get(record.record_id)
        if existing is not None:
            return existing
        stored = record_from_bson(record_to_bson(record))
        self._records[record.record_id] = stored
        self._records_by_task.setdefault(record.task_id, {})[record.record_id] = stored
        return stored

    def set_status(self, task_id: str, status: Status, due_at: datetime | None) -> None:
        doc = self._tasks.get(task_id)
        if doc is None:
            return
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
            return
        self._previous_status[task_id] = doc.status
        self._by_status[doc.status].discard(task_id)
        self._tasks[task_id] = as_stored(replace_status(doc, status, due_at))
        self._by_status[status].add(task_id)

    def beat(self, record_id: str) -> int | None:
        record = self._records.get(record_id)
        if record is None:
            return None
        renewed = dataclasses.replace(record, beat=record.beat + 1)
        self._records[record_id] = renewed
        self._records_by_task[record.task_id][record_id] = renewed
        return renewed.beat

    # --- reads ------------------------------------------------------------------

    def load(self, task_id: str) -> TaskView | None:
        doc = self._tasks.get(task_id)
        if doc is None:
            return None
        return TaskView(doc, dict(self._records_by_task.get(task_id, {})))

    def find_due(
        self, status: Status, min_priority: float, max_priority: float, now: datetime, limit: int
    ) -> list[TaskDoc]:
        due = [
            doc
            for doc in map(self._tasks.__getitem__, self._by_status[status])
            if min_priority <= doc.priority <= max_priority
            and doc.due_at is not None
            and doc.due_at <= now
        ]
        due.sort(key=lambda doc: (doc.priority, doc.due_at, doc.task_id))
        return due[:limit]

    def find_by_status(self, statuses: Sequence[Status], limit: int) -> list[TaskDoc]:
        docs = [self._tasks[task_id] for status in statuses for task_id in self._by_status[status]]
        docs.sort(key=lambda doc: (doc.due_at is not None, doc.due_at, doc.task_id))
        return docs[:limit]

    def find_children(self, parent_id: str) -> list[TaskDoc]:
        return sorted(
            (self._tasks[task_id] for task_id in self._children.get(parent_id, ())),
            key=lambda doc: doc.task_id,
        )

    def count_by_status(self) -> dict[Status, int]:
        return {status: len(ids) for status, ids in self._by_status.items() if ids}

    # --- for invariants and tests (not part of the Store protocol) ----------------

    def all_tasks(self) -> list[TaskDoc]:
        return list(self._tasks.values())

    def all_views(self) -> list[TaskView]:
        return [
            TaskView(doc, dict(self._records_by_task.get(task_id, {})))
            for task_id, doc in self._tasks.items()
        ]
