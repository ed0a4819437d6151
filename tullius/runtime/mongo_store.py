"""MongoStore: the `Store` contract on MongoDB (or FerretDB) through pymongo.

The only module that imports pymongo.  Three kinds of collection:

* the live queue, ``tasks`` (and ``tasks_1`` ... ``tasks_<n-1>`` where it is
  sharded, see `live_collections`): one document per task that is not
  finished (``_id`` = task id, ``status``/``due_at`` hints updated in place),
  kept small: what queries filter or sort on stays readable (``status``,
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
on full task documents, 41 ms on packed ones).  Why the live queue is sharded
on FerretDB: a task's two hint writes (claimed, then moved) each read one
shard instead of the whole queue; a claim query reads every shard, but one
claim query serves several claims (`engine.Candidates`).

Transient errors (network, elections, write-concern timeouts, server
selection) are retried with capped exponential backoff for up to ``retry_for``,
then surface as `StoreUnavailable`.  Every method is safe to repeat after an
ambiguous failure, so retrying a write that was applied but whose
acknowledgement was lost is harmless: an insert of our own record returns our
record, a duplicate task insert is skipped, a hint is set again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import math
import re
import threading
import time
import zlib
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from functools import partial
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
from pymongo.read_concern import ReadConcern

from tullius.band import Band
from tullius.clock import window_seconds
from tullius.document import (
    TERMINAL,
    Record,
    RecordKind,
    Status,
    TaskDoc,
    TaskView,
    aware_utc,
    handler_end_id,
    handler_id,
    is_number,
    outcome_id,
    record_from_bson,
    record_to_bson,
    retry_id,
    run_id,
    status_of,
    stored_time,
    task_from_bson,
    task_to_bson,
)
from tullius.errors import ConfigError, StoreError, StoreUnavailable
from tullius.policy import DEFAULT_LEASE
from tullius.store import ServerSeen

T = TypeVar("T")

#: Server error codes that mean "try again" (elections, shutdowns, stepdowns).
RETRYABLE_CODES = frozenset(
    {6, 7, 89, 91, 189, 262, 9001, 10107, 11600, 11602, 13435, 13436, 64, 50}
)
#: Shards of the live queue a new database gets on FerretDB (see `live_collections`):
#: each update or delete there reads its whole collection, so smaller collections
#: make the two per task cheaper.  Measured with 500 queued no-op tasks through
#: one daemon (tasks/s, two runs each): 1 shard 81-95, 4: 105-111, 8: 113-124,
#: 16: 93-110, 32: 84 (claim queries, which read every shard, start to dominate).
FERRETDB_LIVE_SHARDS = 8
MAX_LIVE_SHARDS = 64
#: Shards of ``records`` a new database gets on FerretDB (see `record_collections`).
#: FerretDB 1.24 reads by ``_id`` with a scan of the table (its SQLite backend never
#: uses the ``_id`` index for a read), and ``records`` holds all history: a lease
#: renewal read two or three records, scanning it each time (1.1 s beside 100,000
#: records).  A task's records all go to one shard, chosen by a hash of its id, so
#: each read scans a 64th of history; the unique ``_id`` that decides each step
#: still holds, within that shard.
FERRETDB_RECORD_SHARDS = 64
MAX_RECORD_SHARDS = 256
#: What decoding a malformed stored document raises.
_DECODE_ERRORS = (KeyError, ValueError, TypeError, AttributeError)
#: How many times `MongoStore.find_by_status` reads a page that lost undecodable documents.
_REREADS = 3
#: How often a move to ``finished`` tries again when the copy there changed under it.
_MOVE_TRIES = 3
#: Status given to a task document that can't be decoded (not a `Status`: no
#: query for work or sweep ever selects it).
UNDECODABLE = "undecodable"
#: The kind of the records a prune keeps (`delete_tasks`).
_RETRY_KIND = RecordKind.RETRY.value
#: The kind of record a prune deletes last of a task's (`delete_tasks`).
_RUN_KIND = RecordKind.RUN.value
_log = logging.getLogger("tullius.store")
_CREDENTIALS = re.compile(r"(mongodb(?:\+srv)?://)[^@/\s]*@")


#: Fields of a live task document kept outside ``body``: what queries use
#: (``created_at``: a prune's delete, `MongoStore.delete_tasks`).
LIVE_FIELDS = ("_id", "status", "priority", "due_at", "cls", "parent_id", "created_at")
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


#: Hints a claim looks for: setting one announces work to idle claimers.
CLAIMABLE = frozenset({Status.QUEUED, Status.FAILED})
#: How long a claim query that found nothing is answered from memory while
#: no new work is announced: an idle daemon reads one small document per poll
#: instead of every shard of the queue.  Work that becomes due without being
#: announced (a delayed task, a handler's backoff, a document written by hand)
#: waits at most this long beyond its due time.
IDLE_RECHECK = timedelta(seconds=0.25)
#: Live documents remembered from queries, so that the move of a task this
#: server claimed needs no read (see `_RecentDocs`).
BODY_CACHE_SIZE = 4096


class _RecentDocs:
    """The most recently read live documents, by id; thread-safe.

    A live document's body never changes, and the move overwrites its hint,
    so any copy read earlier serves the move as well as a fresh read: it saves
    a round trip per task.  (Of the task stored under the id now: every writer
    that moves a task reads its current live copy first, which replaces any
    copy of an older task stored under the id before a prune.)  If the task
    was moved meanwhile, the copy's insert is a duplicate (ignored) and the
    delete matches nothing, as with a read.
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._docs: OrderedDict[str, Mapping[str, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, key: str, doc: Mapping[str, Any]) -> None:
        with self._lock:
            self._docs[key] = doc
            self._docs.move_to_end(key)
            while len(self._docs) > self._size:
                self._docs.popitem(last=False)

    def pop(self, key: str) -> Mapping[str, Any] | None:
        with self._lock:
            return self._docs.pop(key, None)


def _due_query(
    statuses: Sequence[Status], min_priority: float, max_priority: float, now: datetime
) -> dict[str, Any]:
    """The query of `MongoStore.find_due` and `MongoStore.count_due`.

    An infinite bound is left out rather than sent: not every server compares
    with an infinite double (the default band and the coverage check's gaps
    are open-ended).
    """
    priority: dict[str, float] = {}
    if min_priority > -math.inf:
        priority["$gte"] = min_priority
    if max_priority < math.inf:
        priority["$lte"] = max_priority
    query: dict[str, Any] = {
        "status": {"$in": [status.value for status in statuses]},
        "due_at": {"$lte": stored_time(now)},
    }
    if priority:
        query["priority"] = priority
    return query


def _encode_band(band: Band) -> dict[str, Any]:
    # Sub-documents, not [count, min, max]: FerretDB refuses nested arrays.  An
    # infinite end (the default band) is stored as null: not every server keeps
    # an infinite double.
    return {
        "count": band.count,
        "min": None if band.min_priority == -math.inf else band.min_priority,
        "max": None if band.max_priority == math.inf else band.max_priority,
    }


def _decode_server(raw: Mapping[str, Any]) -> ServerSeen:
    """A server's entry, checked: any field a hand edit may have broken raises."""
    seen_at = raw["seen_at"]
    if not isinstance(seen_at, datetime):
        raise TypeError(f"seen_at={seen_at!r} is not a date")
    bands = []
    for entry in raw["bands"]:
        low = -math.inf if entry["min"] is None else entry["min"]
        high = math.inf if entry["max"] is None else entry["max"]
        count = entry["count"]
        for value in (low, high):
            if not is_number(value):
                raise TypeError(f"band end {value!r} is not a number")
        if isinstance(count, bool) or not isinstance(count, int) or count < 1 or low > high:
            raise ValueError(f"band {dict(entry)!r} is not (count >= 1, min <= max)")
        bands.append(Band(count, low, high))
    # Entries from before these fields existed: not stopped, the default lease.
    stopped = raw.get("stopped", False)
    every_ms = raw.get("every_ms", DEFAULT_LEASE // timedelta(milliseconds=1))
    instance = raw.get("instance", "")
    if not isinstance(stopped, bool):
        raise TypeError(f"stopped={stopped!r} is not true or false")
    if isinstance(every_ms, bool) or not isinstance(every_ms, int) or every_ms <= 0:
        raise ValueError(f"every_ms={every_ms!r} is not a positive whole number")
    return ServerSeen(
        str(raw["_id"]),
        tuple(bands),
        stored_time(aware_utc(seen_at)),
        stopped,
        timedelta(milliseconds=every_ms),
        str(instance),
    )


def _chain_ids(task_id: str) -> Iterator[str]:
    """Record ids of a task in the order they can come to exist (endless)."""
    yield run_id(task_id)
    yield outcome_id(task_id)
    for attempt in itertools.count(1):
        yield handler_id(task_id, attempt)
        yield handler_end_id(task_id, attempt)


def _shard_of(shards: list[Collection[Any]], task_id: str) -> Collection[Any]:
    """The one of ``shards`` that holds ``task_id``: by a CRC-32 of the id, stable
    across processes and versions."""
    if len(shards) == 1:
        return shards[0]
    return shards[zlib.crc32(task_id.encode()) % len(shards)]


def _grouped(
    task_ids: Iterable[str], shard_of: Callable[[str], Collection[Any]]
) -> list[tuple[Collection[Any], list[str]]]:
    """``task_ids`` grouped by the shard ``shard_of`` gives each."""
    by_name: dict[str, tuple[Collection[Any], list[str]]] = {}
    for task_id in task_ids:
        shard = shard_of(task_id)
        by_name.setdefault(shard.name, (shard, []))[1].append(task_id)
    return list(by_name.values())


def _check_shards(name: str, count: int | None, most: int) -> None:
    """Refuse a shard count asked of `MongoStore` that is not None or 1 to ``most``."""
    if count is not None and not (
        isinstance(count, int) and not isinstance(count, bool) and 1 <= count <= most
    ):
        raise ConfigError(
            name,
            count,
            f"is not allowed; expected a whole number from 1 to {most}, "
            "or None to follow the database",
        )


def _majority_read(collection: Collection[Any]) -> Collection[Any]:
    """``collection`` read with read concern ``"majority"`` (see `MongoStore.records`)."""
    return collection.with_options(read_concern=ReadConcern("majority"))


def _older_twin(twin: Mapping[str, Any], created_at: Any, ran: Callable[[], Any]) -> bool:
    """Whether ``twin``, a task's finished copy, is an older task's than the one
    created at ``created_at`` that ran under its id: ``ran`` gives the
    ``created_at`` the `run` record names (`Record.task_created_at`), asked only
    when the copies' ``created_at`` differ (a copy inserted again by a repeated
    call has the call's).  False when unsure (a record of a version that did not
    say): the copy stays, as before."""
    if not isinstance(created_at, datetime):
        return False
    theirs = twin.get("created_at")
    if not isinstance(theirs, datetime) or aware_utc(theirs) == aware_utc(created_at):
        return False
    named = ran()
    return isinstance(named, datetime) and aware_utc(named) == aware_utc(created_at)


def _lease_task(record_id: str) -> str | None:
    """The task of a lease record (``<task>:run``, ``<task>:handler:<n>``), or None
    for an id of another shape."""
    if record_id.endswith(":run"):
        return record_id[: -len(":run")]
    parts = record_id.rsplit(":", 2)
    if len(parts) == 3 and parts[1] == "handler" and parts[2].isdigit():
        return parts[0]
    return None


def _by_ids(ids: list[str]) -> dict[str, Any]:
    """A filter on ``_id`` for ``ids``: an equality for one, which FerretDB pushes down
    to SQL (its ``$in`` it evaluates itself, decoding every document)."""
    return {"_id": ids[0]} if len(ids) == 1 else {"_id": {"$in": ids}}


def _decode_records(raws: Iterable[Mapping[str, Any]]) -> dict[str, Record]:
    """Records as read from ``records``, by id."""
    return {raw["_id"]: record_from_bson(raw) for raw in raws}


def _sortable(value: Any) -> tuple[int, Any]:
    """A sort key ordering None first, then numbers, then dates, then anything else,
    as MongoDB does; never comparing two types Python can't (a hand-edited field)."""
    if value is None:
        return (0, 0)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return (1, value)
    if isinstance(value, datetime):
        return (2, value)
    return (3, repr(value))


def redact(text: str) -> str:
    """``text`` with any ``user:password@`` of a MongoDB URI removed."""
    return _CREDENTIALS.sub(r"\1***@", text)


def short_error(error: BaseException) -> str:
    """One readable line, without credentials: pymongo appends its timeouts and a
    dump of the whole topology to its messages."""
    text = redact(str(error))
    for cut in (" (configured timeouts", ", Timeout:", ", full error:"):
        text = text.split(cut)[0]
    return text[:300]


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
        monotonic: the clock that bounds retrying: by default one that counts
            time suspended, so that a write whose acknowledgement was lost is
            not repeated days later (`tullius.prune` counts on it).
    """

    def __init__(
        self,
        db: Database[Any],
        *,
        retry_for: timedelta = timedelta(seconds=30),
        live_shards: int | None = None,
        record_shards: int | None = None,
        sleep: Callable[[float], None] = time.sleep,
        monotonic: Callable[[], float] = window_seconds,
    ) -> None:
        _check_shards("live_shards", live_shards, MAX_LIVE_SHARDS)
        _check_shards("record_shards", record_shards, MAX_RECORD_SHARDS)
        self.db = db
        #: The first shard of the live queue (the only one unless sharded).
        self.tasks: Collection[Any] = db["tasks"]
        self.finished: Collection[Any] = db["finished"]
        #: The first shard of ``records`` (the only one unless sharded).  Decisions
        #: are read as a majority of a replica set has them: a record only the
        #: primary has (its write still waiting for ``w="majority"``) could be
        #: rolled back by a failover, after a reader acted on it.
        self.records: Collection[Any] = _majority_read(db["records"])
        self.meta: Collection[Any] = db["tullius_meta"]
        #: One entry per daemon: its bands and when it last renewed them (`tullius.coverage`).
        self.servers: Collection[Any] = db["tullius_servers"]
        self.retry_for = retry_for.total_seconds()
        self._wanted_shards = live_shards
        self._wanted_record_shards = record_shards
        self._bodies = _RecentDocs(BODY_CACHE_SIZE)
        self._reader_pool: ThreadPoolExecutor | None = None
        self._readers_lock = threading.Lock()
        #: Per claim query: the queue version and ``now`` of its last empty answer.
        self._idle: dict[tuple[Any, ...], tuple[int, datetime]] = {}
        self._shards: list[Collection[Any]] | None = None
        self._record_shards: list[Collection[Any]] | None = None
        #: Unreadable server entries already warned about: (id, reason).
        self._bad_entries: set[tuple[str, str]] = set()
        self._sleep = sleep
        self._monotonic = monotonic

    # --- the live queue's shards ------------------------------------------------

    def live_collections(self) -> list[Collection[Any]]:
        """The collections of the live queue: ``tasks``, then ``tasks_1`` ... if sharded.

        How many is a property of the database, not of a client: the first
        store to use a database records it in ``tullius_meta`` (the number
        asked for, else 8 on FerretDB and 1 elsewhere, and 1 for a database
        that already has live tasks in an unrecorded layout), and every store
        follows what is recorded.

        Raises:
            ConfigError: ``live_shards`` was given and differs from the recorded number.
        """
        if self._shards is None:
            self._follow_layout()
            assert self._shards is not None
        return self._shards

    def record_collections(self) -> list[Collection[Any]]:
        """The collections of ``records``: ``records``, then ``records_1`` ... if sharded.

        Recorded with the live queue's layout (`live_collections`): 64 for a new
        database on FerretDB (`FERRETDB_RECORD_SHARDS`), else 1; a database set up
        before records were sharded keeps 1.
        """
        if self._record_shards is None:
            self._follow_layout()
            assert self._record_shards is not None
        return self._record_shards

    def records_for(self, task_id: str) -> Collection[Any]:
        """The ``records`` collection that holds every record of ``task_id``."""
        return _shard_of(self.record_collections(), task_id)

    def _by_record_shard(self, task_ids: Iterable[str]) -> list[tuple[Collection[Any], list[str]]]:
        """``task_ids`` grouped by the ``records`` collection of each (`records_for`)."""
        return _grouped(task_ids, self.records_for)

    def _follow_layout(self) -> None:
        live, records = self._retrying("read the store layout", self._layout)
        for name, wanted, count in (
            ("live_shards", self._wanted_shards, live),
            ("record_shards", self._wanted_record_shards, records),
        ):
            if wanted is not None and wanted != count:
                raise ConfigError(
                    name,
                    wanted,
                    f"does not match database {self.db.name!r}, which was set up with "
                    f"{count}; expected the same number for every store of one database "
                    f"(omit {name} to follow it)",
                )
        self._shards = [self.tasks] + [self.db[f"tasks_{i}"] for i in range(1, live)]
        self._record_shards = [self.records] + [
            _majority_read(self.db[f"records_{i}"]) for i in range(1, records)
        ]

    def _readers(self) -> ThreadPoolExecutor:
        """Threads that read the shards of the live queue in parallel (made on first use)."""
        with self._readers_lock:
            if self._reader_pool is None:
                self._reader_pool = ThreadPoolExecutor(
                    max_workers=len(self.live_collections()) + 1,
                    thread_name_prefix="tullius-store-read",
                )
            return self._reader_pool

    def _by_live_shard(self, task_ids: Iterable[str]) -> list[tuple[Collection[Any], list[str]]]:
        """``task_ids`` grouped by the live collection that holds each (`live_for`)."""
        return _grouped(task_ids, self.live_for)

    def live_for(self, task_id: str) -> Collection[Any]:
        """The live collection that holds ``task_id`` (by a hash stable across processes)."""
        return _shard_of(self.live_collections(), task_id)

    def _layout(self) -> tuple[int, int]:
        """The shards of the live queue and of ``records``, as recorded (recorded now
        if no store recorded them yet)."""
        stored = self.meta.find_one({"_id": "layout"})
        if stored is None:
            ferretdb = self._is_ferretdb()

            def count(wanted: int | None, first: Collection[Any], on_ferretdb: int) -> int:
                if wanted is not None:
                    return wanted
                if first.find_one({}, {"_id": 1}) is not None:
                    return 1  # documents from before layouts were recorded
                return on_ferretdb if ferretdb else 1

            live = count(self._wanted_shards, self.tasks, FERRETDB_LIVE_SHARDS)
            records = count(self._wanted_record_shards, self.records, FERRETDB_RECORD_SHARDS)
            # With sharded records, not as ``live_shards``: a version from before
            # them would read ``records`` alone, and stops at start-up instead.
            layout = (
                {"live_shards": live}
                if records == 1
                else {"shards": {"live": live, "records": records}}
            )
            with contextlib.suppress(DuplicateKeyError):  # another store decided first
                self.meta.insert_one({"_id": "layout", **layout})
            stored = self.meta.find_one({"_id": "layout"})
            if stored is None:  # can't happen: the document is never deleted
                raise StoreError("the store layout document vanished")
        if "shards" in stored:
            return int(stored["shards"]["live"]), int(stored["shards"]["records"])
        return int(stored["live_shards"]), 1

    def _is_ferretdb(self) -> bool:
        try:
            info = self.db.client.admin.command("buildInfo")
        except (PyMongoError, NotImplementedError):
            return False
        return "ferretdbVersion" in info

    def ensure_indexes(self) -> None:
        """Create the indexes the queries need; idempotent, safe from many servers at once."""

        def index_live(live: Collection[Any]) -> None:
            # find_due: one index range per priority, already in sort order.
            work = ["priority", "status", "due_at", "_id"]
            live.create_index([(key, ASCENDING) for key in work], name="work")
            # find_by_status (sweeps).
            live.create_index(
                [("status", ASCENDING), ("due_at", ASCENDING), ("_id", ASCENDING)],
                name="status",
            )
            live.create_index([("parent_id", ASCENDING)], name="parent")

        for live in self.live_collections():
            self._retrying("create indexes", partial(index_live, live))
        self._retrying(
            "create indexes",
            lambda: (
                self.finished.create_index(
                    [("status", ASCENDING), ("due_at", ASCENDING), ("_id", ASCENDING)],
                    name="status",
                ),
                # find_by_status(after=): the pages of a prune or --status, in id order.
                self.finished.create_index(
                    [("status", ASCENDING), ("_id", ASCENDING)], name="status_id"
                ),
                self.finished.create_index([("parent_id", ASCENDING)], name="parent"),
            ),
        )
        for records in self.record_collections():
            self._retrying(
                "create indexes",
                partial(records.create_index, [("task_id", ASCENDING)], name="task"),
            )

    # --- writes -----------------------------------------------------------------

    def insert_tasks(self, docs: Sequence[TaskDoc]) -> int:
        if not docs:
            return 0
        # Only the live collection refuses a duplicate: repeating the insert of a
        # task that already finished re-creates a live copy with its old hint.
        # That costs a claim attempt, not a second run: the claim's record
        # insert loses to the stored one, and the repair moves the copy back.
        by_shard: dict[str, tuple[Collection[Any], list[dict[str, Any]]]] = {}
        for doc in docs:
            live = self.live_for(doc.task_id)
            by_shard.setdefault(live.name, (live, []))[1].append(pack_live(doc))

        def attempt(live: Collection[Any], payload: list[dict[str, Any]]) -> int:
            try:
                return len(live.insert_many(payload, ordered=False).inserted_ids)
            except BulkWriteError as error:
                details = error.details
                others = [e for e in details.get("writeErrors", []) if e.get("code") != 11000]
                if others:
                    raise
                concern = details.get("writeConcernErrors")
                if concern:  # applied, not yet acknowledged by enough members: transient
                    raise WriteConcernError(
                        concern[0].get("errmsg", "write concern error"),
                        concern[0].get("code"),
                        details,
                    ) from None
                return int(details.get("nInserted", 0))

        inserted = 0
        for live, payload in by_shard.values():
            inserted += self._retrying("insert tasks", partial(attempt, live, payload))
        self._bump_queue_version()
        return inserted

    def insert_record(self, record: Record) -> Record:
        payload = record_to_bson(record)
        records = self.records_for(record.task_id)

        def attempt() -> Record:
            try:
                records.insert_one(payload)
                return record_from_bson(payload)
            except DuplicateKeyError:
                stored = records.find_one({"_id": record.record_id})
                if stored is None:
                    # Records are never deleted: this one (ours, its first ack lost,
                    # or a rival's) is not yet on a majority.  Acting on it could
                    # act on a write a failover rolls back, so wait and try again:
                    # it either commits or is rolled back and our insert wins.
                    raise WriteConcernError(
                        f"record {record.record_id!r} exists but is not yet majority-committed",
                        64,  # WriteConcernFailed: transient, retried
                    ) from None
                return record_from_bson(stored)

        return self._retrying("insert record", attempt)

    def set_status(self, task_id: str, status: Status, due_at: datetime | None) -> bool:
        """Update the hint of a live task; a terminal hint moves it to ``finished``.

        Every write filters on ``_id`` alone: on FerretDB an update with any
        other condition costs several times more (measured: 23 ms instead of
        5 ms under load).  The contract's "unless the hint is terminal" holds
        because only live tasks are updated and a finished task is no longer
        live: an update without upsert of a moved task matches nothing.  The
        move copies the task with its terminal hint into ``finished`` (a
        duplicate is ignored: it was moved before, unless it is an older
        task's, `_insert_finished`), then deletes the live copy.  A crash
        between the two leaves a live copy with its old hint, which the next
        sweep or claim repairs, repeating the move.
        """
        stored_due = None if due_at is None else stored_time(due_at)
        hint = {"status": status.value, "due_at": stored_due}
        shard = self.live_for(task_id)
        if status not in TERMINAL:
            updated = self._retrying(
                "set status",
                lambda: shard.update_one({"_id": task_id}, {"$set": hint}),
            )
            if status in CLAIMABLE:
                self._bump_queue_version()
            return bool(updated.matched_count)

        def move() -> bool:
            live = self._bodies.pop(task_id) or shard.find_one({"_id": task_id})
            if live is None:
                return False  # moved already, or no such task
            if self._insert_finished(task_id, {**unpack(live), **hint}, stored_due):
                shard.delete_one({"_id": task_id})
            return True

        return self._retrying("set status", move)

    def _insert_finished(self, task_id: str, doc: dict[str, Any], due: datetime | None) -> bool:
        """Insert ``doc``, a task with its terminal hint, into ``finished``, where a
        copy of ``task_id`` may be already; whether the task is there now, so
        that its live copy may go.

        That copy is this task, moved before (a live copy inserted again, read
        and perhaps acted on since it settled): it stays, and its settling time
        moves up to ``due``, so that pruning waits a whole window after its
        last reader.  Or it is an older task's, stored under the id before a
        prune deleted it, that the prune left when cut short (it deletes the
        records first), before a keyed call stored the task again: then it
        gives way (`_older_twin`), or the new task's end would be read with
        the old task's terminal hint, and a prune that read the old copy would
        delete the new one's history.  A prune that read the old copy may
        delete it meanwhile: then the insert is tried again.
        """
        for _ in range(_MOVE_TRIES):
            try:
                self.finished.insert_one(doc)
                return True
            except DuplicateKeyError:
                pass
            twin = self.finished.find_one({"_id": task_id}, {"created_at": 1})
            if twin is None:
                continue  # deleted since (by a prune): insert again
            if not _older_twin(twin, doc.get("created_at"), partial(self._ran, task_id)):
                self._move_settled_time_up(task_id, due)
                return True
            replaced = self.finished.replace_one(
                {"_id": task_id, "created_at": twin["created_at"]}, doc
            )
            if replaced.matched_count:
                return True
        # The copy in `finished` changed under every try: the live copy stays,
        # with its hint, and its repair repeats the move.
        return False

    def _ran(self, task_id: str) -> Any:
        """The ``created_at`` the `run` record of ``task_id`` names (None if none)."""
        run = self.records_for(task_id).find_one({"_id": run_id(task_id)}, {"task_created_at": 1})
        return None if run is None else run.get("task_created_at")

    def beat(self, record_id: str) -> int | None:
        """Count a heartbeat of a lease; None if the record is missing or its task finished.

        The counters live in the task's live document (``beats``, keyed by the
        record id after the task id), not in the record: on FerretDB an update
        reads its whole collection, and the live queue's shard is small while
        ``records`` holds all history.  A finished task's leases are over, so
        None is the right answer for it too (`engine.renew` then stops).
        """

        def attempt() -> int | None:
            record = self._find_record(record_id)
            if record is None:
                return None
            task_id = str(record["task_id"])
            key = record_id[len(task_id) + 1 :]  # "run", "handler:2"...
            doc = self.live_for(task_id).find_one_and_update(
                {"_id": task_id},
                {"$inc": {f"beats.{key}": 1}},
                # No projection: FerretDB 1.24 does not implement it in findAndModify.
                return_document=ReturnDocument.AFTER,
            )
            if doc is None:
                return None
            return int(doc["beats"][key])

        return self._retrying("renew lease", attempt)

    def _find_record(self, record_id: str) -> Mapping[str, Any] | None:
        """A record by id: in its task's shard, if the id names its task (a lease's
        does), else in each shard in turn."""
        task_id = _lease_task(record_id)
        shards = self.record_collections() if task_id is None else [self.records_for(task_id)]
        for records in shards:
            found: Mapping[str, Any] | None = records.find_one({"_id": record_id})
            if found is not None:
                return found
        return None

    # --- reads ------------------------------------------------------------------

    def load(self, task_id: str) -> TaskView | None:
        def attempt() -> TaskView | None:
            # The live copy first: if a task is in both collections (mid-move,
            # or re-inserted after it finished) the live hint is the one a
            # repair must see and fix.
            live = self.live_for(task_id)
            doc = live.find_one({"_id": task_id})
            collection = live
            if doc is None:
                doc, collection = self.finished.find_one({"_id": task_id}), self.finished
            if doc is None:
                return None
            return self._view_of(doc, collection, partial(self._records_of, task_id))

        return self._retrying("load task", attempt)

    def load_many(self, task_ids: Sequence[str]) -> list[TaskView]:
        """One ``find`` per collection holding the tasks, and one of ``records`` by
        ``task_id`` for them all; live copies win, as in `load`."""
        ids = list(dict.fromkeys(task_ids))
        if not ids:
            return []

        def attempt() -> list[TaskView]:
            found = self._documents_of(ids)
            raw_records: dict[Any, list[Mapping[str, Any]]] = {}
            for records, in_shard in self._by_record_shard(found):
                for raw in records.find({"task_id": {"$in": in_shard}}):
                    raw_records.setdefault(raw.get("task_id"), []).append(raw)
            views = []
            for task_id in ids:
                if task_id not in found:
                    continue
                doc, collection = found[task_id]
                read = partial(_decode_records, raw_records.get(task_id, ()))
                view = self._view_of(doc, collection, read)
                if view is not None:
                    views.append(view)
            return views

        return self._retrying("load tasks", attempt)

    def _view_of(
        self,
        doc: Mapping[str, Any],
        collection: Collection[Any],
        read_records: Callable[[], dict[str, Record]],
    ) -> TaskView | None:
        """The view of a task from its document as read from ``collection`` and its
        records (``read_records``), as `load` gives it: heartbeat counts from the
        live document; None for a document set aside, or one that can't be decoded
        (set aside now); a decided live copy already moved is dropped."""
        if doc.get("status") == UNDECODABLE:
            return None  # (set aside: see `_set_aside`)
        task_id = doc["_id"]
        try:
            task = decode_task(doc)
            records = read_records()
            for key, count in (doc.get("beats") or {}).items():
                record = records.get(f"{task_id}:{key}")
                if record is not None and int(count) > record.beat:
                    records[record.record_id] = dataclasses.replace(record, beat=int(count))
        except _DECODE_ERRORS as error:
            # Returning None makes claims and sweeps pass the task by, instead
            # of one bad document stopping them for every other task.
            self._set_aside(collection, task_id, error)
            return None
        view = TaskView(task, records)
        if collection is not self.finished and status_of(view) in TERMINAL:
            return self._drop_finished_twin(collection, view)
        return view

    def _drop_finished_twin(self, live: Collection[Any], view: TaskView) -> TaskView | None:
        """A decided task's live copy: if it was moved to ``finished`` before, delete it.

        Why: inserting a finished task again (a repeated ``queue()``, or a
        repair repeating its parent's inserts) re-creates a live copy with its
        first hint.  Repairing that copy would insert its own successors again,
        re-creating each finished descendant in turn, one per claim round.  A
        copy in ``finished`` proves the move was done, and the move comes after
        the successors' insert (`tullius.machine`), so the live copy can go
        without a repair; unless that copy is an older task's (`_older_twin`),
        which proves nothing about this one.  Otherwise (a crash between the
        record and the move) the live copy is returned and its repair repeats
        the move.  Only a decided live task costs the extra read, which a
        healthy move never leaves.
        """
        task_id = view.task.task_id
        moved = self.finished.find_one({"_id": task_id})
        run = view.run
        ran = None if run is None else run.task_created_at
        if moved is None or _older_twin(moved, view.task.created_at, lambda: ran):
            # (An older task's copy a cut-short prune left proves nothing: the
            # repair repeats the inserts, and the move replaces it.)
            return view
        # Whoever read the live copy before this may still act on it for a write
        # window: the settling time moves up to now, so pruning waits for them.
        self._move_settled_time_up(task_id, stored_time(datetime.now(UTC)))
        live.delete_one({"_id": task_id})
        self._bodies.pop(task_id)
        try:
            return TaskView(decode_task(moved), view.records)
        except _DECODE_ERRORS as error:  # as `_view_of` for any other document
            self._set_aside(self.finished, task_id, error)
            return None

    def _move_settled_time_up(self, task_id: str, to: datetime | None) -> None:
        """Make the finished copy's settling time (its ``due_at``) at least ``to``.

        Two updates: ``$max`` over a null (a copy an older version settled) is
        refused by some servers, so a null is set first.  The only update a
        ``finished`` document ever gets; its ``status`` never changes.
        """
        if to is None:
            return
        self.finished.update_one({"_id": task_id, "due_at": None}, {"$set": {"due_at": to}})
        self.finished.update_one({"_id": task_id}, {"$max": {"due_at": to}})

    def _records_of(self, task_id: str) -> dict[str, Record]:
        """The task's records.  In a sharded (FerretDB) layout, read one by one by ``_id``.

        Records form a chain (`run`, `outcome`, `handler:1`, `handler:1:end`,
        `handler:2` ... and last an operator's `retry`; each needs the one
        before), so reading in that order up to the first missing one finds
        them all, and what is found is a consistent prefix even while others
        insert.  Each read is an ``_id`` lookup in the task's shard of ``records``,
        which FerretDB pushes down but answers with a scan of that shard up to the
        match (see `FERRETDB_RECORD_SHARDS`), where a query by ``task_id`` would
        decode each of its documents.
        """
        records = self.records_for(task_id)
        if len(self.live_collections()) == 1:
            return _decode_records(records.find({"task_id": task_id}))
        found: dict[str, Record] = {}
        last: Record | None = None
        for record_id in _chain_ids(task_id):
            raw = records.find_one({"_id": record_id})
            if raw is None:
                break
            found[record_id] = last = record_from_bson(raw)
        # An operator's retry comes after the last attempt's failed end (only an
        # UNHANDLED task is retried): read it only where the chain ends so.
        if (
            last is not None
            and last.kind is RecordKind.HANDLER_END
            and not last.ok
            and last.retry_at is None  # (the last attempt's end has none)
        ):
            raw = records.find_one({"_id": retry_id(task_id)})
            if raw is not None:
                found[raw["_id"]] = record_from_bson(raw)
        return found

    def find_due(
        self,
        statuses: Sequence[Status],
        min_priority: float,
        max_priority: float,
        now: datetime,
        limit: int,
    ) -> list[TaskDoc]:
        query = _due_query(statuses, min_priority, max_priority, now)
        sort = [
            ("priority", ASCENDING),
            ("status", ASCENDING),
            ("due_at", ASCENDING),
            ("_id", ASCENDING),
        ]
        key = (tuple(statuses), min_priority, max_priority)

        def attempt() -> list[TaskDoc]:
            version = self._queue_version()
            idle = self._idle.get(key)
            if (
                idle is not None
                and idle[0] == version
                and timedelta(0) <= now - idle[1] < IDLE_RECHECK
            ):
                return []
            docs = self._decoded(self._find_in(statuses, query, sort, limit))
            if docs:
                self._idle.pop(key, None)
            else:
                self._idle[key] = (version, now)
            return docs

        return self._retrying("find due tasks", attempt)

    def count_due(
        self, statuses: Sequence[Status], min_priority: float, max_priority: float, now: datetime
    ) -> dict[float, int]:
        group = [
            {"$match": _due_query(statuses, min_priority, max_priority, now)},
            {"$group": {"_id": "$priority", "n": {"$sum": 1}}},
        ]

        def attempt() -> dict[float, int]:
            counts: Counter[float] = Counter()
            for live in self.live_collections():  # due work is never in ``finished``
                for row in live.aggregate(group):
                    priority = row["_id"]
                    if is_number(priority):
                        counts[priority] += int(row["n"])  # else no query for work matches it
            return dict(counts)

        return self._retrying("count due tasks", attempt)

    def _queue_version(self) -> int:
        doc = self.meta.find_one({"_id": "queue"})
        return 0 if doc is None else int(doc.get("version", 0))

    def _bump_queue_version(self) -> None:
        """Tell idle claimers that work may have appeared (see `find_due`)."""

        def bump() -> None:
            try:
                self.meta.update_one({"_id": "queue"}, {"$inc": {"version": 1}}, upsert=True)
            except DuplicateKeyError:
                # A racing upsert created the counter first (FerretDB does not retry
                # such an upsert as MongoDB does): it exists now, so bump it.
                self.meta.update_one({"_id": "queue"}, {"$inc": {"version": 1}})

        self._retrying("announce new work", bump)

    def find_by_status(
        self, statuses: Sequence[Status], limit: int, after: str | None = None
    ) -> list[TaskDoc]:
        query: dict[str, Any] = {"status": {"$in": [s.value for s in statuses]}}
        sort = [("due_at", ASCENDING), ("_id", ASCENDING)]
        if after is not None:
            query["_id"] = {"$gt": after}
            sort = [("_id", ASCENDING)]

        def attempt() -> list[TaskDoc]:
            # A page must be short only at the end (a sweep stops paging there), so
            # one that lost undecodable documents is read again: they are set aside
            # by now (their status changed), and the next ones take their places.
            for _ in range(_REREADS):
                raw = self._find_in(statuses, query, sort, limit)
                docs = self._decoded(raw)
                if len(docs) == len(raw):
                    break
            return docs

        return self._retrying("find tasks by status", attempt)

    def find_children(self, parent_id: str) -> list[TaskDoc]:
        def attempt() -> list[TaskDoc]:
            # The live queue first: a move copies into finished before it deletes
            # the live copy, so a child moving meanwhile is seen by one read or
            # the other (read the other way round, it could slip between them).
            # A child in both is shown as finished: that copy is the later one.
            found: dict[str, tuple[Mapping[str, Any], Collection[Any]]] = {}
            for live in self.live_collections():
                found.update((d["_id"], (d, live)) for d in live.find({"parent_id": parent_id}))
            found.update(
                (d["_id"], (d, self.finished)) for d in self.finished.find({"parent_id": parent_id})
            )
            # Not a child set aside, or that can't be decoded (set aside now), as in
            # `find_tasks`: inspection must not stop at one bad document.
            return self._decoded(found[key] for key in sorted(found))

        return self._retrying("find children", attempt)

    def find_tasks(self, task_ids: Sequence[str]) -> list[TaskDoc]:
        """One ``find`` per collection (``_id`` in the list); live copies win."""
        ids = list(dict.fromkeys(task_ids))
        if not ids:
            return []

        def attempt() -> list[TaskDoc]:
            return self._decoded(self._documents_of(ids).values())

        return self._retrying("find tasks", attempt)

    def stored_ids(self, task_ids: Sequence[str]) -> set[str]:
        """One ``find`` per live shard holding some, then one per ``records`` shard for
        the run and retry records of the rest, ``_id`` only: a finished task always
        has its run record, and ``records`` is sharded where ``finished``, on FerretDB
        a scan for every read by id, is not."""
        ids = list(dict.fromkeys(task_ids))
        if not ids:
            return set()

        def attempt() -> set[str]:
            found: set[str] = set()
            for shard, in_shard in self._by_live_shard(ids):
                found.update(d["_id"] for d in shard.find(_by_ids(in_shard), {"_id": 1}))
            rest = [task_id for task_id in ids if task_id not in found]
            for records, in_shard in self._by_record_shard(rest):
                wanted = [f(task_id) for task_id in in_shard for f in (run_id, retry_id)]
                found.update(r["task_id"] for r in records.find(_by_ids(wanted), {"task_id": 1}))
            return found

        return self._retrying("find task ids", attempt)

    def _documents_of(self, ids: list[str]) -> dict[Any, tuple[Mapping[str, Any], Collection[Any]]]:
        """The stored documents of ``ids``, each with the collection it was read from:
        one ``find`` per live shard holding some, then one of ``finished`` for the rest.

        The live queue first, as `find_children` (a move copies into ``finished``
        before it deletes the live copy, so a task moving meanwhile is seen by one
        read or the other), and a live copy wins, as `load`'s does.
        """
        found: dict[Any, tuple[Mapping[str, Any], Collection[Any]]] = {}
        for shard, in_shard in self._by_live_shard(ids):
            found.update((d["_id"], (d, shard)) for d in shard.find(_by_ids(in_shard)))
        elsewhere = [task_id for task_id in ids if task_id not in found]
        if elsewhere:
            found.update(
                (d["_id"], (d, self.finished)) for d in self.finished.find(_by_ids(elsewhere))
            )
        return found

    def count_by_status(self) -> dict[Status, int]:
        """Hints counted per status: live ones from the live queue, terminal ones from ``finished``.

        A task caught mid-move (copied, not yet deleted) counts under both
        hints for that moment.
        """

        def attempt() -> dict[Status, int]:
            # One grouping per collection, not one count per status and collection.
            # (Live hints are never terminal, finished ones always are.)
            tally: Counter[str] = Counter()
            group = [{"$group": {"_id": "$status", "n": {"$sum": 1}}}]
            for collection in (*self.live_collections(), self.finished):
                for row in collection.aggregate(group):
                    tally[str(row["_id"])] += int(row["n"])
            return {status: tally[status.value] for status in Status if tally[status.value]}

        return self._retrying("count tasks", attempt)

    # --- the servers' entries -------------------------------------------------------

    def announce_server(self, seen: ServerSeen) -> None:
        """Stamped with the database's clock (``$currentDate``), not ``seen.seen_at``:
        entries are then compared on one clock, whatever the servers' clocks say."""
        update = {
            "$set": {
                "bands": [_encode_band(band) for band in seen.bands],
                "stopped": seen.stopped,
                "every_ms": seen.every // timedelta(milliseconds=1),
                "instance": seen.instance,
            },
            "$currentDate": {"seen_at": True},
        }

        def attempt() -> None:
            try:
                self.servers.update_one({"_id": seen.server}, update, upsert=True)
            except DuplicateKeyError:  # a racing upsert of our own, repeated after a lost reply
                self.servers.update_one({"_id": seen.server}, update)

        self._retrying("record this server's bands", attempt)

    def read_servers(self) -> list[ServerSeen]:
        def attempt() -> list[ServerSeen]:
            found = []
            for raw in self.servers.find({}).sort("_id", ASCENDING):
                try:
                    found.append(_decode_server(raw))
                except Exception as error:  # anything a hand edit can store
                    reason = f"{type(error).__name__}: {error}"
                    key = (repr(raw.get("_id")), reason)  # an _id may be unhashable
                    if key not in self._bad_entries:
                        self._bad_entries.add(key)
                        _log.warning(
                            "server entry %r in %s can't be read (%s); ignoring it",
                            raw,
                            self.servers.name,
                            reason,
                        )
            return found

        return self._retrying("read the servers' bands", attempt)

    def mark_stopped(self, server: str, instance: str) -> None:
        self._retrying(
            "mark this server stopped",
            lambda: self.servers.update_one(
                {"_id": server, "instance": instance}, {"$set": {"stopped": True}}
            ),
        )

    def forget_server(self, server: str, seen_at: datetime) -> None:
        self._retrying(
            "forget a stopped server",
            lambda: self.servers.delete_one({"_id": server, "seen_at": stored_time(seen_at)}),
        )

    def delete_tasks(self, docs: Sequence[TaskDoc]) -> int:
        """Delete the tasks' live copies, then their records, then the finished copies,
        of the tasks as ``docs`` were read (by ``created_at``).

        One read of ``_id`` and ``created_at`` and one ``delete_many`` per
        collection (``_id`` or ``task_id`` in the list), two for each of
        ``records`` (the run records last): on FerretDB every delete reads its
        whole collection, so per batch, not per document.  Records go by
        ``task_id``, so that none is left behind
        past a gap in a chain (a sharded layout's `load` reads a chain only up
        to its first missing record); but not those of an id stored again since
        it was read (a copy with another ``created_at`` is left after the live
        copies are deleted): they are the new task's, the old ones having been
        deleted before the id could be stored again.  Nor a run record that
        names another ``created_at`` (`Record.task_created_at`): a task stored
        again and claimed after those reads, when a racing prune had deleted
        the old one.
        """
        if not docs:
            return 0
        created = {doc.task_id: stored_time(doc.created_at) for doc in docs}
        ids = list(created)
        stored_again: set[str] = set()

        def as_read(found: Mapping[str, Any]) -> bool:
            # A live copy stored before ``created_at`` was kept outside the body
            # carries none there: it goes, as it always did.
            stored = found.get("created_at")
            return stored is None or aware_utc(stored) == created[found["_id"]]

        def read(collection: Collection[Any], task_ids: list[str]) -> list[str]:
            """Those of ``task_ids`` with a copy as read in ``collection``; the others
            found there are stored again (`stored_again`)."""
            going: list[str] = []
            for found in collection.find(_by_ids(task_ids), {"created_at": 1}):
                if as_read(found):
                    going.append(found["_id"])
                else:
                    stored_again.add(found["_id"])
            return going

        def named(field: str, task_ids: list[str]) -> dict[str, Any]:
            """A filter: ``field`` is one of the times read for ``task_ids``, or is
            missing (written by an older version)."""
            times = sorted({created[task_id] for task_id in task_ids})
            return {"$or": [{field: {"$in": times}}, {field: {"$exists": False}}]}

        def delete(collection: Collection[Any], going: list[str]) -> int:
            """Delete the copies ``read`` found as read; by id, and by the times read
            (or none), so that a copy stored again meanwhile under another stays."""
            if not going:
                return 0
            as_read = named("created_at", going)
            return int(collection.delete_many({**_by_ids(going), **as_read}).deleted_count)

        def attempt() -> int:
            stored_again.clear()
            for task_id in ids:
                self._bodies.pop(task_id)
            for shard, in_shard in self._by_live_shard(ids):
                delete(shard, read(shard, in_shard))
            finished = read(self.finished, ids)
            # Not the operators' retry records: tombstones (`tullius.retry`).  And the
            # run records last: a delete_many goes a document at a time, and a keyed
            # call counts a task stored while its run record is (`stored_ids`), so an
            # error part-way never leaves records for a task stored again to inherit.
            # A run record goes only if it names the task as read (or none, written
            # by an older version): one of a task stored again and claimed since the
            # reads above (a racing prune deleted the old one) stays.
            going = [task_id for task_id in ids if task_id not in stored_again]
            for records, in_shard in self._by_record_shard(going):
                others = {"$nin": [_RETRY_KIND, _RUN_KIND]}
                records.delete_many({"task_id": {"$in": in_shard}, "kind": others})
                runs = _by_ids([run_id(task_id) for task_id in in_shard])
                records.delete_many({**runs, **named("task_created_at", in_shard)})
            return delete(self.finished, finished)

        return self._retrying("delete finished tasks", attempt)

    def server_time(self) -> datetime | None:
        """The database server's clock (``hello``'s ``localTime``), or None if it
        does not say: what ``tulliusd --status`` judges the entries' ages by."""

        def attempt() -> datetime | None:
            local = self.db.command("hello").get("localTime")
            return aware_utc(local) if isinstance(local, datetime) else None

        return self._retrying("read the database's clock", attempt)

    def count_set_aside(self) -> int:
        """Documents set aside as undecodable (`_set_aside`): for ``tulliusd --status``."""

        def attempt() -> int:
            live = sum(
                collection.count_documents({"status": UNDECODABLE})
                for collection in self.live_collections()
            )
            return live + self.finished.count_documents({"decode_error": {"$exists": True}})

        return self._retrying("count set-aside documents", attempt)

    def _find_in(
        self,
        statuses: Sequence[Status],
        query: Mapping[str, Any],
        sort: list[tuple[str, int]],
        limit: int,
    ) -> list[tuple[Mapping[str, Any], Collection[Any]]]:
        """Run ``query`` where ``statuses`` live; the first ``limit`` in ``sort`` order.

        Each shard of the live queue is read, and for terminal statuses also
        ``finished`` (a finished task's live copy lingers until its move
        completes; the live copy wins).  Each document comes with its collection.
        A finished document set aside as undecodable keeps its status
        (`_set_aside`), so it is left out by its ``decode_error``, as a live one
        is by its status: else every page would hold it again, and a page of
        them only would end a paging reader (a prune, ``--status``) early.
        """
        collections = list(self.live_collections())
        if any(status in TERMINAL for status in statuses):
            collections.insert(0, self.finished)
        readable = {**query, "decode_error": {"$exists": False}}

        def read(collection: Collection[Any]) -> list[Mapping[str, Any]]:
            asked = readable if collection is self.finished else query
            return list(collection.find(asked).sort(sort).limit(limit))

        if len(collections) == 1:
            answers = [read(collections[0])]
        else:  # in parallel: a claim's latency is one query's, not one per shard
            answers = list(self._readers().map(read, collections))
        found: dict[Any, tuple[Mapping[str, Any], Collection[Any]]] = {}
        for collection, docs in zip(collections, answers, strict=True):
            for doc in docs:
                found[doc["_id"]] = (doc, collection)
                if collection is not self.finished:
                    self._bodies.put(doc["_id"], doc)
        if len(collections) == 1:
            return list(found.values())

        def key(item: tuple[Mapping[str, Any], Collection[Any]]) -> tuple[Any, ...]:
            return tuple(_sortable(item[0].get(field)) for field, _ in sort)

        return sorted(found.values(), key=key)[:limit]

    # --- undecodable documents ----------------------------------------------------

    def _decoded(
        self, raw_docs: Iterable[tuple[Mapping[str, Any], Collection[Any]]]
    ) -> list[TaskDoc]:
        """Decode task documents, setting aside any that can't be decoded (and leaving
        out those set aside before).

        One malformed document (written by hand, or by an incompatible
        version) must not stop a whole band from claiming work: it is moved
        out of every queue by setting its ``status`` to `UNDECODABLE`, with
        the reason in ``decode_error``, and logged.  An operator can fix the
        document and set its status back to ``queued``.
        """
        docs = []
        for raw, collection in raw_docs:
            if raw.get("status") == UNDECODABLE:
                continue
            try:
                docs.append(decode_task(raw))
            except _DECODE_ERRORS as error:
                self._set_aside(collection, raw.get("_id"), error)
        return docs

    def _set_aside(self, collection: Collection[Any], task_id: Any, error: Exception) -> None:
        """Mark a task whose document or records can't be decoded, and log it.

        Its hint becomes `UNDECODABLE`, which no query for work or sweep
        selects, with the reason in ``decode_error`` for an operator.  A
        finished task keeps its terminal hint (nothing would select it anyway).
        """
        reason = redact(f"{type(error).__name__}: {error}")[:500]
        update: dict[str, Any] = {"decode_error": reason}
        if collection is not self.finished:
            update["status"] = UNDECODABLE
        _log.warning(
            "task %r: its document or records can't be decoded (%s); set aside%s",
            task_id,
            reason,
            f" with status {UNDECODABLE!r}" if "status" in update else " (its status kept)",
        )
        collection.update_one({"_id": task_id}, {"$set": update})

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
                        operation, f"{type(error).__name__}: {short_error(error)}"
                    ) from None
                self._sleep(delay)
                delay = min(delay * 2, 2.0)
