"""MongoStore: the `Store` contract on MongoDB (or FerretDB) through pymongo.

The only module that imports pymongo.  Two collections: ``tasks`` (one
document per task, ``_id`` = task id) and ``records`` (``_id`` = deterministic
record id, see ``document.py``).  Correctness rests on one primitive that
MongoDB and FerretDB both make atomic: an insert whose ``_id`` exists fails
with a duplicate-key error.  Conditional updates are used only for hints.

Transient errors (network, elections, write-concern timeouts, server
selection) are retried with capped exponential backoff for up to ``retry_for``,
then surface as `StoreUnavailable`.  Every method is safe to repeat after an
ambiguous failure, so retrying a write that was applied but whose
acknowledgement was lost is harmless: an insert of our own record returns our
record, a duplicate task insert is skipped, a hint is set again.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, TypeVar

from pymongo import ASCENDING, ReturnDocument
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import (
    BulkWriteError,
    ConnectionFailure,
    DuplicateKeyError,
    OperationFailure,
    PyMongoError,
    WriteConcernError,
)

from tullius.document import (
    TERMINAL,
    Record,
    Status,
    TaskDoc,
    TaskView,
    record_from_bson,
    record_to_bson,
    stored_time,
    task_from_bson,
    task_to_bson,
)
from tullius.errors import StoreError, StoreUnavailable

T = TypeVar("T")

#: Server error codes that mean "try again" (elections, shutdowns, stepdowns).
RETRYABLE_CODES = frozenset(
    {6, 7, 89, 91, 189, 262, 9001, 10107, 11600, 11602, 13435, 13436, 64, 50}
)
#: Status given to a task document that can't be decoded (not a `Status`: no
#: query for work or sweep ever selects it).
UNDECODABLE = "undecodable"
_log = logging.getLogger("tullius.store")
_CREDENTIALS = re.compile(r"(mongodb(?:\+srv)?://)[^@/\s]*@")


def redact(text: str) -> str:
    """``text`` with any ``user:password@`` of a MongoDB URI removed."""
    return _CREDENTIALS.sub(r"\1***@", text)


def is_transient(error: BaseException) -> bool:
    """True for errors after which the same operation may well succeed."""
    if isinstance(error, ConnectionFailure | WriteConcernError):
        return True  # includes AutoReconnect, NotPrimaryError, ServerSelectionTimeoutError
    if isinstance(error, OperationFailure):
        if error.has_error_label("RetryableWriteError"):
            return True
        return error.code in RETRYABLE_CODES
    return False


class MongoStore:
    """See `tullius.store.Store` for the contract of each method.

    Args:
        db: a pymongo ``Database`` (``make_db()`` of ``tullius_deps``).
        retry_for: how long to keep retrying transient errors before giving up.
        sleep: how to wait between retries (an argument, for tests).
        monotonic: the clock that bounds retrying.
    """

    def __init__(
        self,
        db: Database[Any],
        *,
        retry_for: timedelta = timedelta(seconds=30),
        sleep: Callable[[float], None] = time.sleep,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.db = db
        self.tasks: Collection[Any] = db["tasks"]
        self.records: Collection[Any] = db["records"]
        self.retry_for = retry_for.total_seconds()
        self._sleep = sleep
        self._monotonic = monotonic
        self._indexed = False

    def ensure_indexes(self) -> None:
        """Create the indexes the queries need; idempotent, safe from many servers at once."""
        self._retrying(
            "create indexes",
            lambda: (
                # find_due: one index range per priority, already in sort order.
                self.tasks.create_index(
                    [
                        ("priority", ASCENDING),
                        ("status", ASCENDING),
                        ("due_at", ASCENDING),
                        ("_id", ASCENDING),
                    ],
                    name="work",
                ),
                # find_by_status (sweeps).
                self.tasks.create_index(
                    [("status", ASCENDING), ("due_at", ASCENDING), ("_id", ASCENDING)],
                    name="status",
                ),
                self.tasks.create_index([("parent_id", ASCENDING)], name="parent"),
                self.records.create_index([("task_id", ASCENDING)], name="task"),
            ),
        )
        self._indexed = True

    # --- writes -----------------------------------------------------------------

    def insert_tasks(self, docs: Sequence[TaskDoc]) -> int:
        if not docs:
            return 0
        payload = [task_to_bson(doc) for doc in docs]

        def attempt() -> int:
            try:
                return len(self.tasks.insert_many(payload, ordered=False).inserted_ids)
            except BulkWriteError as error:
                details = error.details
                others = [e for e in details.get("writeErrors", []) if e.get("code") != 11000]
                if others or details.get("writeConcernErrors"):
                    raise
                return int(details.get("nInserted", 0))

        return self._retrying("insert tasks", attempt)

    def insert_record(self, record: Record) -> Record:
        payload = record_to_bson(record)

        def attempt() -> Record:
            try:
                self.records.insert_one(payload)
                return record_from_bson(payload)
            except DuplicateKeyError:
                stored = self.records.find_one({"_id": record.record_id})
                if stored is None:  # can't happen: records are never deleted
                    raise
                return record_from_bson(stored)

        return self._retrying("insert record", attempt)

    def set_status(self, task_id: str, status: Status, due_at: datetime | None) -> None:
        update = {
            "$set": {
                "status": status.value,
                "due_at": None if due_at is None else stored_time(due_at),
            }
        }
        terminal = [s.value for s in TERMINAL]
        self._retrying(
            "set status",
            lambda: self.tasks.update_one({"_id": task_id, "status": {"$nin": terminal}}, update),
        )

    def beat(self, record_id: str) -> int | None:
        def attempt() -> int | None:
            doc = self.records.find_one_and_update(
                {"_id": record_id},
                {"$inc": {"beat": 1}},
                # No projection: FerretDB 1.24 does not implement it in findAndModify.
                return_document=ReturnDocument.AFTER,
            )
            return None if doc is None else int(doc["beat"])

        return self._retrying("renew lease", attempt)

    # --- reads ------------------------------------------------------------------

    def load(self, task_id: str) -> TaskView | None:
        def attempt() -> TaskView | None:
            doc = self.tasks.find_one({"_id": task_id})
            if doc is None:
                return None
            records = {
                r["_id"]: record_from_bson(r) for r in self.records.find({"task_id": task_id})
            }
            return TaskView(task_from_bson(doc), records)

        return self._retrying("load task", attempt)

    def find_due(
        self,
        statuses: Sequence[Status],
        min_priority: float,
        max_priority: float,
        now: datetime,
        limit: int,
    ) -> list[TaskDoc]:
        query = {
            "status": {"$in": [status.value for status in statuses]},
            "priority": {"$gte": min_priority, "$lte": max_priority},
            "due_at": {"$lte": stored_time(now)},
        }
        sort = [
            ("priority", ASCENDING),
            ("status", ASCENDING),
            ("due_at", ASCENDING),
            ("_id", ASCENDING),
        ]
        return self._retrying(
            "find due tasks",
            lambda: self._decoded(self.tasks.find(query).sort(sort).limit(limit)),
        )

    def find_by_status(self, statuses: Sequence[Status], limit: int) -> list[TaskDoc]:
        query = {"status": {"$in": [s.value for s in statuses]}}
        sort = [("due_at", ASCENDING), ("_id", ASCENDING)]
        return self._retrying(
            "find tasks by status",
            lambda: self._decoded(self.tasks.find(query).sort(sort).limit(limit)),
        )

    def find_children(self, parent_id: str) -> list[TaskDoc]:
        return self._retrying(
            "find children",
            lambda: [
                task_from_bson(d)
                for d in self.tasks.find({"parent_id": parent_id}).sort([("_id", ASCENDING)])
            ],
        )

    def count_by_status(self) -> dict[Status, int]:
        def attempt() -> dict[Status, int]:
            counts: dict[Status, int] = {}
            for status in Status:
                n = self.tasks.count_documents({"status": status.value})
                if n:
                    counts[status] = n
            return counts

        return self._retrying("count tasks", attempt)

    # --- undecodable documents ----------------------------------------------------

    def _decoded(self, raw_docs: Iterable[Mapping[str, Any]]) -> list[TaskDoc]:
        """Decode task documents, setting aside any that can't be decoded.

        One malformed document (written by hand, or by an incompatible
        version) must not stop a whole band from claiming work: it is moved
        out of every queue by setting its ``status`` to `UNDECODABLE`, with
        the reason in ``decode_error``, and logged.  An operator can fix the
        document and set its status back to ``queued``.
        """
        docs = []
        for raw in raw_docs:
            try:
                docs.append(task_from_bson(raw))
            except (KeyError, ValueError, TypeError, AttributeError) as error:
                task_id = raw.get("_id")
                reason = redact(f"{type(error).__name__}: {error}")[:500]
                _log.warning(
                    "task document %r can't be decoded (%s); set aside with status %r",
                    task_id,
                    reason,
                    UNDECODABLE,
                )
                self.tasks.update_one(
                    {"_id": task_id},
                    {"$set": {"status": UNDECODABLE, "decode_error": reason}},
                )
        return docs

    # --- retrying ---------------------------------------------------------------

    def _retrying(self, operation: str, attempt: Callable[[], T]) -> T:
        """Run ``attempt``, retrying transient errors with backoff for up to ``retry_for``.

        Raises:
            StoreUnavailable: still failing when time ran out.
            StoreError: a non-transient driver error.  Messages are redacted of
                credentials.
        """
        deadline = self._monotonic() + self.retry_for
        delay = 0.05
        while True:
            try:
                return attempt()
            except PyMongoError as error:
                if not is_transient(error):
                    raise StoreError(
                        f"{operation} failed: {redact(f'{type(error).__name__}: {error}')}"
                    ) from None
                if self._monotonic() + delay > deadline:
                    raise StoreUnavailable(
                        operation, redact(f"{type(error).__name__}: {error}")
                    ) from None
                self._sleep(delay)
                delay = min(delay * 2, 2.0)
