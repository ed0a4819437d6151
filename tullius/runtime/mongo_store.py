"""MongoStore: the `Store` contract on MongoDB (or FerretDB) through pymongo.

The only module that imports pymongo.  Three collections:

* ``tasks``: the live queue, one document per task that is not finished
  (``_id`` = task id, ``status``/``due_at`` hints updated in place), kept
  small: what queries filter or sort on stays readable (``status``,
  ``priority``, ``due_at``, ``cls``, ``parent_id``), the rest of the task is
  packed as BSON in ``body`` (`pack_live`);
* ``finished``: the task documents once their hint turned terminal, unpacked
  and readable (moved there by `set_status`, insert-only);
* ``records``: the decisions (``_id`` = deterministic record id, see
  ``document.py``).

Why finished tasks move out: the claim query, the hint updates and the sweeps
then touch only live work, so their cost does not grow with history.  That
matters on MongoDB for cache locality and on FerretDB 1.24 decisively: its
SQLite backend pushes down only a plain ``_id`` equality for reads and nothing
for writes, so every update and every other query reads the whole collection
(measured: an ``update_one`` by ``_id`` takes 1.4 ms among 200 documents and
9 ms among 3,000).  Correctness rests on one primitive that MongoDB and
FerretDB both make atomic: an insert whose ``_id`` exists fails with a
duplicate-key error.  Conditional updates and the move are used only for hints.

Why live documents are packed: FerretDB reads every document of the
collection for each of those operations, and its cost per document grows with
the number of fields (measured over 1,000 documents: a claim query takes 90 ms
on full task documents, 41 ms on packed ones).

Transient errors (network, elections, write-concern timeouts, server
selection) are retried with capped exponential backoff for up to ``retry_for``,
then surface as `StoreUnavailable`.  Every method is safe to repeat after an
ambiguous failure, so retrying a write that was applied but whose
acknowledgement was lost is harmless: an insert of our own record returns our
record, a duplicate task insert is skipped, a hint is set again.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, TypeVar

import bson
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


#: Fields of a live task document kept outside ``body``: what queries use.
LIVE_FIELDS = ("_id", "status", "priority", "due_at", "cls", "parent_id")
_BODY_OPTIONS: bson.CodecOptions[dict[str, Any]] = bson.CodecOptions(tz_aware=True)


def pack_live(doc: TaskDoc) -> dict[str, Any]:
    """The live-collection form of a task: query fields plus the rest as BSON in ``body``."""
    full = task_to_bson(doc)
    rest = {key: value for key, value in full.items() if key not in LIVE_FIELDS}
    packed = {key: full[key] for key in LIVE_FIELDS}
    packed["body"] = bson.Binary(bson.encode(rest))
    return packed


def unpack(raw: Mapping[str, Any]) -> dict[str, Any]:
    """A stored task document in the form of `task_to_bson`, packed (live) or not."""
    if "body" not in raw:
        return dict(raw)
    return {
        **bson.decode(raw["body"], _BODY_OPTIONS),
        **{k: v for k, v in raw.items() if k != "body"},
    }


def decode_task(raw: Mapping[str, Any]) -> TaskDoc:
    """The `TaskDoc` of a stored document from either collection.

    Raises:
        KeyError, ValueError, TypeError: the document is malformed.
    """
    try:
        return task_from_bson(unpack(raw))
    except bson.errors.BSONError as error:
        raise ValueError(f"body is not valid BSON: {error}") from None


def _sortable(value: Any) -> tuple[int, Any]:
    """A sort key ordering None first, as MongoDB does."""
    return (0, 0) if value is None else (1, value)


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
        self.finished: Collection[Any] = db["finished"]
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
                self.finished.create_index(
                    [("status", ASCENDING), ("due_at", ASCENDING), ("_id", ASCENDING)],
                    name="status",
                ),
                self.finished.create_index([("parent_id", ASCENDING)], name="parent"),
                self.records.create_index([("task_id", ASCENDING)], name="task"),
            ),
        )
        self._indexed = True

    # --- writes -----------------------------------------------------------------

    def insert_tasks(self, docs: Sequence[TaskDoc]) -> int:
        if not docs:
            return 0
        # Only the live collection refuses a duplicate: repeating the insert of a
        # task that already finished re-creates a live copy with its old hint.
        # That costs a claim attempt, not a second run: the claim's record
        # insert loses to the stored one, and the repair moves the copy back.
        payload = [pack_live(doc) for doc in docs]

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
        """Update the hint of a live task; a terminal hint moves it to ``finished``.

        Every write filters on ``_id`` alone: on FerretDB an update with any
        other condition costs several times more (measured: 23 ms instead of
        5 ms under load).  The contract's "unless the hint is terminal" holds
        because only live tasks are updated and a finished task is no longer
        live: an update without upsert of a moved task matches nothing.  The
        move copies the task with its terminal hint into ``finished`` (a
        duplicate is ignored: it was moved before), then deletes the live
        copy.  A crash between the two leaves a live copy with its old hint,
        which the next sweep or claim repairs, repeating the move.
        """
        hint = {
            "status": status.value,
            "due_at": None if due_at is None else stored_time(due_at),
        }
        if status not in TERMINAL:
            self._retrying(
                "set status",
                lambda: self.tasks.update_one({"_id": task_id}, {"$set": hint}),
            )
            return

        def move() -> None:
            live = self.tasks.find_one({"_id": task_id})
            if live is None:
                return  # moved already, or no such task
            with contextlib.suppress(DuplicateKeyError):
                self.finished.insert_one({**unpack(live), **hint})
            self.tasks.delete_one({"_id": task_id})

        self._retrying("set status", move)

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
            # The live copy first: if a task is in both collections (mid-move,
            # or re-inserted after it finished) the live hint is the one a
            # repair must see and fix.
            doc = self.tasks.find_one({"_id": task_id}) or self.finished.find_one({"_id": task_id})
            if doc is None:
                return None
            records = {
                r["_id"]: record_from_bson(r) for r in self.records.find({"task_id": task_id})
            }
            return TaskView(decode_task(doc), records)

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
            lambda: self._decoded(
                self._find_in(statuses, query, sort, limit),
            ),
        )

    def find_by_status(self, statuses: Sequence[Status], limit: int) -> list[TaskDoc]:
        query = {"status": {"$in": [s.value for s in statuses]}}
        sort = [("due_at", ASCENDING), ("_id", ASCENDING)]
        return self._retrying(
            "find tasks by status",
            lambda: self._decoded(self._find_in(statuses, query, sort, limit)),
        )

    def find_children(self, parent_id: str) -> list[TaskDoc]:
        def attempt() -> list[TaskDoc]:
            found = {d["_id"]: d for d in self.finished.find({"parent_id": parent_id})}
            found.update((d["_id"], d) for d in self.tasks.find({"parent_id": parent_id}))
            return [decode_task(found[key]) for key in sorted(found)]

        return self._retrying("find children", attempt)

    def count_by_status(self) -> dict[Status, int]:
        """Hints counted per status: live ones from ``tasks``, terminal ones from ``finished``.

        A task caught mid-move (copied, not yet deleted) counts under both
        hints for that moment.
        """

        def attempt() -> dict[Status, int]:
            counts: dict[Status, int] = {}
            for status in Status:
                collection = self.finished if status in TERMINAL else self.tasks
                n = collection.count_documents({"status": status.value})
                if n:
                    counts[status] = n
            return counts

        return self._retrying("count tasks", attempt)

    def _find_in(
        self,
        statuses: Sequence[Status],
        query: Mapping[str, Any],
        sort: list[tuple[str, int]],
        limit: int,
    ) -> list[Mapping[str, Any]]:
        """Run ``query`` on the collections that hold ``statuses``, merged in ``sort`` order.

        Live statuses are in ``tasks`` only; terminal ones are read from both
        (a finished task's live copy lingers until its move completes).
        """
        live = list(self.tasks.find(query).sort(sort).limit(limit))
        if not any(status in TERMINAL for status in statuses):
            return live
        found = {d["_id"]: d for d in self.finished.find(query).sort(sort).limit(limit)}
        found.update((d["_id"], d) for d in live)

        def key(doc: Mapping[str, Any]) -> tuple[Any, ...]:
            return tuple(_sortable(doc.get(field)) for field, _ in sort)

        return sorted(found.values(), key=key)[:limit]

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
                docs.append(decode_task(raw))
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
