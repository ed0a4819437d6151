"""MongoStore under driver errors that a real MongoDB or FerretDB reports (on mongomock).

Each test makes one pymongo call fail the way a server does and checks that
the store operation still does what the contract promises: applied once, and
no error where the write was in fact applied.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

import mongomock
import pytest
from pymongo.errors import BulkWriteError, DuplicateKeyError

from tests.store_contract import make_doc, make_record
from tullius.band import Band
from tullius.document import Status
from tullius.runtime.mongo_store import MongoStore

T_SEEN = datetime(2026, 1, 1, 12, tzinfo=UTC)


@pytest.fixture
def store() -> MongoStore:
    store = MongoStore(
        mongomock.MongoClient(tz_aware=True)["tullius_errors"], sleep=lambda seconds: None
    )
    store.ensure_indexes()
    return store


class RacingUpsert:
    """A collection whose first upsert loses to a rival's upsert of the same ``_id``.

    As FerretDB answers two clients upserting a missing document at once: one
    inserts it, the other gets a duplicate-key error (MongoDB retries such an
    upsert itself; FerretDB 1.24 does not).
    """

    def __init__(self, collection: Any) -> None:
        self._collection = collection
        self.lost = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._collection, name)

    def update_one(self, query: Any, update: Any, upsert: bool = False) -> Any:
        if upsert and not self.lost:
            self.lost += 1
            self._collection.update_one(query, update, upsert=True)  # the rival's
            raise DuplicateKeyError("E11000 duplicate key error", 11000)
        return self._collection.update_one(query, update, upsert=upsert)


def test_inserting_tasks_while_another_store_first_announces_work_is_not_an_error(
    store: MongoStore,
) -> None:
    racing = RacingUpsert(store.meta)
    store.meta = racing  # type: ignore[assignment]
    assert store.insert_tasks([make_doc("a")]) == 1
    assert racing.lost == 1
    assert store.load("a") is not None


def test_a_failed_hint_while_another_store_first_announces_work_is_not_an_error(
    store: MongoStore,
) -> None:
    store.insert_tasks([make_doc("a")])
    store.meta.delete_many({})  # a database whose queue was never announced yet
    racing = RacingUpsert(store.meta)
    store.meta = racing  # type: ignore[assignment]
    store.set_status("a", Status.FAILED, None)
    assert racing.lost == 1


class WriteConcernTimeoutOnce:
    """A live collection whose first ``insert_many`` is applied but not acknowledged
    by a majority within ``wTimeoutMS``: pymongo reports it as a `BulkWriteError`
    carrying only ``writeConcernErrors``."""

    def __init__(self, collection: Any) -> None:
        self._collection = collection
        self.timeouts = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._collection, name)

    def insert_many(self, documents: Any, ordered: bool = True) -> Any:
        if self.timeouts:
            return self._collection.insert_many(documents, ordered=ordered)
        self.timeouts += 1
        self._collection.insert_many(documents, ordered=ordered)
        raise BulkWriteError(
            {
                "writeErrors": [],
                "writeConcernErrors": [
                    {
                        "code": 64,
                        "codeName": "WriteConcernFailed",
                        "errmsg": "waiting for replication timed out",
                    }
                ],
                "nInserted": len(documents),
                "nUpserted": 0,
                "nMatched": 0,
                "nModified": 0,
                "nRemoved": 0,
                "upserted": [],
            }
        )


def test_a_write_concern_timeout_on_inserting_tasks_is_retried(store: MongoStore) -> None:
    slow = WriteConcernTimeoutOnce(store.tasks)
    store._shards = [slow]  # type: ignore[list-item]
    store.insert_tasks([make_doc("a")])  # retried, as a write-concern timeout of any other write
    assert slow.timeouts == 1
    assert store.load("a") is not None


class NotYetOnAMajority:
    """A records collection where a rival's record is on the primary only: inserting
    the same ``_id`` is a duplicate, but a majority read does not see it until
    ``commit_after`` reads have passed (its replication catching up)."""

    def __init__(self, collection: Any, rival: dict[str, Any], commit_after: int) -> None:
        self._collection = collection
        self._rival = rival
        self.reads_before_commit = commit_after

    def __getattr__(self, name: str) -> Any:
        return getattr(self._collection, name)

    def insert_one(self, document: Any) -> Any:
        raise DuplicateKeyError("E11000 duplicate key error", 11000)

    def find_one(self, query: Any) -> Any:
        if self.reads_before_commit:
            self.reads_before_commit -= 1
            return None
        return self._rival


def test_a_rival_record_not_yet_on_a_majority_is_waited_for_not_taken_as_missing(
    store: MongoStore,
) -> None:
    from tullius.document import record_to_bson

    rival = record_to_bson(make_record("a", token="rival"))
    records = NotYetOnAMajority(store.records_for("a"), rival, commit_after=2)
    store.records_for = lambda task_id: records  # type: ignore[method-assign,assignment,return-value]
    # Our insert loses to the rival's record; it is read back only once committed,
    stored = store.insert_record(make_record("a", token="ours"))
    assert records.reads_before_commit == 0
    # and the decision returned is the rival's.
    assert stored.token == "rival"


def test_records_are_read_with_majority_read_concern(store: MongoStore) -> None:
    assert store.records.read_concern.level == "majority"
    sharded = MongoStore(mongomock.MongoClient(tz_aware=True)["sharded"], record_shards=3)
    assert [shard.read_concern.level for shard in sharded.record_collections()] == ["majority"] * 3


def test_an_unreachable_database_is_reported_in_one_short_line_without_credentials() -> None:
    from pymongo.errors import ServerSelectionTimeoutError

    from tullius.errors import StoreUnavailable

    class Unreachable:
        def __getattr__(self, name: str) -> Any:
            def call(*args: Any, **kwargs: Any) -> Any:
                raise ServerSelectionTimeoutError(
                    "mongodb://app:secret@db:27017: [Errno 111] Connection refused "
                    "(configured timeouts: socketTimeoutMS: 20000.0ms), Timeout: 30s, "
                    "Topology Description: <TopologyDescription id: 1, servers: [...]>"
                )

            return call

    ticks = iter(range(0, 1000, 10))
    store = MongoStore(
        mongomock.MongoClient(tz_aware=True)["tullius_errors"],
        sleep=lambda seconds: None,
        monotonic=lambda: float(next(ticks)),
    )
    store._shards = [Unreachable()]  # type: ignore[list-item]
    with pytest.raises(StoreUnavailable) as caught:
        store.insert_tasks([make_doc("a")])
    assert caught.value.cause == (
        "ServerSelectionTimeoutError: mongodb://***@db:27017: [Errno 111] Connection refused"
    )


def test_server_entries_a_hand_edit_broke_are_skipped_and_reported_once(
    store: MongoStore, caplog: pytest.LogCaptureFixture
) -> None:
    # Given one good entry and entries broken in each way a hand edit can break them
    good = {
        "_id": "ok",
        "bands": [{"count": 2, "min": 0, "max": None}],
        "seen_at": T_SEEN,
        "stopped": False,
        "every_ms": 30_000,
        "instance": "i1",
    }
    broken = [
        {**good, "_id": "date", "seen_at": "yesterday"},
        {**good, "_id": "end", "bands": [{"count": 2, "min": None, "max": "ten"}]},
        {**good, "_id": "order", "bands": [{"count": 2, "min": 10, "max": 0}]},
        {**good, "_id": "count", "bands": [{"count": True, "min": 0, "max": 1}]},
        {**good, "_id": "shape", "bands": [[2, 0, 10]]},
        {"_id": "gone"},
        {**good, "_id": "period", "every_ms": 0},
        {**good, "_id": "flag", "stopped": "no"},
    ]
    store.servers.insert_many([good, *broken])
    # When they are read twice
    with caplog.at_level("WARNING", logger="tullius.store"):
        first = store.read_servers()
        second = store.read_servers()
    # Then the good one is read, with its open end, and each broken one is named once
    assert first == second
    assert [(seen.server, seen.bands) for seen in first] == [("ok", (Band(2, 0, math.inf),))]
    named = [record.getMessage() for record in caplog.records]
    assert len(named) == len(broken)
    for entry in broken:
        assert sum(f"'_id': '{entry['_id']}'" in message for message in named) == 1
