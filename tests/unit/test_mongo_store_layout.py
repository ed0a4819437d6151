"""MongoStore keeps live tasks apart from finished ones (on mongomock).

The store contract (tests/store_contract.py) says what every store does; these
tests pin down how MongoStore lays it out, and that the layout's awkward
moments — a move interrupted half-way, a finished task inserted again — end
with the task settled and run once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import bson
import mongomock
import pytest
from pymongo.errors import AutoReconnect

from tests.store_contract import (
    T0,
    after_the_next_read,
    drive_on,
    drive_until,
    make_doc,
    make_spec,
)
from tests.unit.test_prune import fails_for_good
from tullius.api import insert_queued, keyed_id
from tullius.band import Band
from tullius.document import Status, TaskSpec, status_of, stored_time
from tullius.effects import InsertTasks
from tullius.engine import claim, drive, finish, sweep
from tullius.errors import ConfigError, KeyConflict, StoreUnavailable
from tullius.events import Succeeded
from tullius.policy import LeaseWatch
from tullius.prune import MIN_AGE, prune
from tullius.runtime.mongo_store import IDLE_RECHECK, LIVE_FIELDS, MongoStore, pack_live
from tullius.store import DeleteTasks

ALL = Band(1, 0, 10)
SPEC = make_spec(n=1)
NOW = T0 + timedelta(days=20)
LONG_AGO = T0  # (when run_to_success runs a task)


@pytest.fixture
def store() -> MongoStore:
    store = MongoStore(mongomock.MongoClient(tz_aware=True)["tullius_layout"])
    store.ensure_indexes()
    return store


def run_to_success(store: MongoStore, task_id: str) -> None:
    job = drive(store, claim(ALL, server="s1", worker="w1", token=f"tok-{task_id}", now=T0))
    assert job is not None
    assert job.task_id == task_id
    verdict = drive(store, finish(job, Succeeded(job.token), now=T0 + timedelta(seconds=1)))
    assert verdict.accepted


def another_call_runs(store: MongoStore) -> None:
    """Another keyed call takes key "k" with ``amount=10``, and its task runs to its end."""
    (other,) = insert_queued(store, [make_spec(amount=10)], now=T0, new_id=str, key="k")
    run_to_success(store, other)


def ids(collection: Any) -> list[str]:
    return sorted(doc["_id"] for doc in collection.find({}, {"_id": 1}))


def live_ids(store: MongoStore) -> list[str]:
    """The ids in the live queue, in all its shards."""
    return sorted(task_id for shard in store.live_collections() for task_id in ids(shard))


def test_a_task_leaves_the_live_collection_when_it_finishes(store: MongoStore) -> None:
    store.insert_tasks([make_doc("a"), make_doc("b")])
    run_to_success(store, "a")
    assert ids(store.tasks) == ["b"]
    assert ids(store.finished) == ["a"]
    assert store.finished.find_one({"_id": "a"})["fields"] == {}  # readable, not packed
    assert store.load("a").task.status is Status.SUCCEEDED  # type: ignore[union-attr]


def test_live_documents_keep_only_what_queries_use_outside_the_packed_body(
    store: MongoStore,
) -> None:
    store.insert_tasks([make_doc("a", n=1)])
    assert sorted(store.tasks.find_one({"_id": "a"})) == sorted([*LIVE_FIELDS, "body"])
    assert store.load("a").task.fields == {"n": 1}  # type: ignore[union-attr]


def test_a_prune_deletes_a_live_copy_stored_before_created_at_was_kept_outside_its_body(
    store: MongoStore,
) -> None:
    # Given a live document an older version stored, its creation time in its body only
    packed = pack_live(make_doc("old"))
    store.tasks.insert_one({key: value for key, value in packed.items() if key != "created_at"})
    body = bson.decode(packed["body"])
    store.tasks.update_one(
        {"_id": "old"},
        {"$set": {"body": bson.Binary(bson.encode({**body, "created_at": T0}))}},
    )
    assert store.load("old").task.created_at == stored_time(T0)  # type: ignore[union-attr]
    # When a prune deletes it (a live copy it raced with: see `Store.delete_tasks`)
    store.delete_tasks([make_doc("old")])
    # Then it is gone, as before
    assert ids(store.tasks) == []


class StopsAfterOneDocument:
    """A ``records`` collection whose next ``delete_many`` deletes one matching document
    and then fails, as a ``delete_many`` cut short does (it goes a document at a
    time), with ``meanwhile`` run before the error."""

    def __init__(self, inner: Any, meanwhile: Callable[[], object]) -> None:
        self.inner = inner
        self.meanwhile: Callable[[], object] | None = meanwhile

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def delete_many(self, query: Any) -> Any:
        if self.meanwhile is None:
            return self.inner.delete_many(query)
        meanwhile, self.meanwhile = self.meanwhile, None
        self.inner.delete_one(query)
        meanwhile()
        raise AutoReconnect("the primary stepped down")


class FirstDeleteLate(StopsAfterOneDocument):
    """A ``records`` collection whose next ``delete_many`` comes after ``meanwhile``
    (and is whole)."""

    def delete_many(self, query: Any) -> Any:
        meanwhile, self.meanwhile = self.meanwhile, None
        if meanwhile is not None:
            meanwhile()
        return self.inner.delete_many(query)


def test_a_task_stored_again_and_claimed_as_a_late_prune_deletes_records_keeps_its_lease(
    store: MongoStore,
) -> None:
    # Given a keyed task that succeeded long ago, a prune that read it and is about to
    # delete it, and another prune that deleted it since
    (task_id,) = insert_queued(store, [SPEC], now=LONG_AGO, new_id=str, key="k")
    run_to_success(store, task_id)
    late = prune(MIN_AGE, now=NOW)
    delete = drive_until(store, late, DeleteTasks)
    assert drive(store, prune(MIN_AGE, now=NOW)).deleted

    # When the late prune finds no copy of it, and before it deletes its records
    # the keyed call is repeated and a daemon claims the task stored again
    def stored_again_and_claimed() -> None:
        stored_again(store, SPEC)
        assert drive(store, claim(ALL, server="s1", worker="w1", token="again", now=NOW))

    (records,) = store.record_collections()
    store._record_shards = [FirstDeleteLate(records, stored_again_and_claimed)]
    drive_on(store, late, delete)
    # Then the new task keeps its lease (its run is not lost, nor run again)
    view = store.load(task_id)
    assert view is not None
    assert view.run is not None
    assert view.run.token == "again"
    assert status_of(view) is Status.RUNNING


@pytest.mark.parametrize("kind", ["run", "outcome"])
def test_a_prune_whose_records_delete_stops_part_way_leaves_no_old_record_to_a_task_stored_again(
    kind: str,
) -> None:
    # Given a keyed task that ran and settled long ago (a run and an outcome record),
    # whichever of its records a delete_many meets first
    store = MongoStore(mongomock.MongoClient(tz_aware=True)["tullius_layout"], sleep=lambda _: None)
    store.ensure_indexes()
    (task_id,) = insert_queued(store, [SPEC], now=T0, new_id=str, key="k")
    run_to_success(store, task_id)
    (records,) = store.record_collections()
    if kind == "outcome":  # the outcome first in the collection's order
        run = records.find_one({"kind": "run"})
        records.delete_one({"_id": run["_id"]})
        records.insert_one(run)
    # When a prune's delete of its records stops after one document, the call is
    # repeated meanwhile, and the store retries the delete
    now = T0 + timedelta(days=10)

    def repeat() -> None:
        insert_queued(store, [SPEC], now=now, new_id=str, key="k")

    store._record_shards = [StopsAfterOneDocument(records, repeat)]
    assert drive(store, prune(MIN_AGE, now=now)).deleted
    # Then the task, if stored again, has none of the old task's records
    view = store.load(task_id)
    assert view is None or view.records == {}


class PruneDied(Exception):
    """The pruning daemon's process killed (a prune cut short, not retried)."""


@contextmanager
def finished_deletes_die(store: MongoStore) -> Iterator[None]:
    """While open, a delete from ``finished`` kills its process (`PruneDied`): a
    prune dies once it deleted its tasks' records, before their finished copies
    (which it deletes last)."""

    def dies(*args: object, **kwargs: object) -> None:
        raise PruneDied

    delete_many = store.finished.delete_many
    store.finished.delete_many = dies  # type: ignore[method-assign]
    try:
        yield
    finally:
        store.finished.delete_many = delete_many  # type: ignore[method-assign]


def prune_dies_before_the_finished_copies(store: MongoStore, *, now: Any) -> None:
    """A prune at ``now`` whose process dies before the finished copies."""
    with finished_deletes_die(store), pytest.raises(PruneDied):
        drive(store, prune(MIN_AGE, now=now))


def a_prunes_leftover(store: MongoStore, spec: TaskSpec) -> str:
    """A keyed task that succeeded 20 days ago, and a prune cut short before its
    finished copy: the copy left without records."""
    (task_id,) = insert_queued(store, [spec], now=LONG_AGO, new_id=str, key="k")
    run_to_success(store, task_id)
    prune_dies_before_the_finished_copies(store, now=NOW)
    assert ids(store.finished) == [task_id]
    assert store.load(task_id).records == {}  # type: ignore[union-attr]
    return task_id


def stored_again(store: MongoStore, spec: TaskSpec) -> None:
    """The keyed call repeated now (its application never saw the first answer)."""
    assert insert_queued(store, [spec], now=NOW, new_id=str, key="k") == [keyed_id("k")]


def test_a_task_stored_again_beside_a_prunes_leftover_whose_success_was_cut_short_is_repaired(
    store: MongoStore,
) -> None:
    # Given a keyed task stored again beside an old finished copy a prune left
    task_id = a_prunes_leftover(store, SPEC)
    stored_again(store, SPEC)
    # When it runs and succeeds, returning a successor, and its server dies between
    # the success record and the successor's insert
    job = drive(store, claim(ALL, server="s1", worker="w1", token="second", now=NOW))
    assert job is not None
    verdict = finish(job, Succeeded(job.token, (make_spec(n="next"),)), now=NOW)
    insert = drive_until(store, verdict, InsertTasks)
    (successor,) = insert.docs
    # Then the next sweep repairs it (the old copy proves no move of this task):
    # the successor is inserted, and the task settles as itself
    drive(store, sweep(LeaseWatch(timedelta(seconds=15)), observer="s2", now=NOW, monotonic=float))
    assert [doc.fields for doc in store.find_tasks([successor.task_id])] == [{"n": "next"}]
    assert live_ids(store) == [successor.task_id]
    (settled,) = store.find_tasks([task_id])
    assert (settled.created_at, settled.status) == (stored_time(NOW), Status.SUCCEEDED)


def test_a_task_stored_again_beside_a_prunes_leftover_ends_as_itself_and_outlives_the_leftover(
    store: MongoStore,
) -> None:
    # Given an old success's copy a prune left, another prune that read that copy
    # and is about to delete it, and the task stored again by its key meanwhile
    spec = dataclasses.replace(SPEC, handler_attempts=1)
    task_id = a_prunes_leftover(store, spec)
    late = prune(MIN_AGE, now=NOW)
    delete = drive_until(store, late, DeleteTasks)
    stored_again(store, spec)
    # When the task runs and fails, and so does its one failed() attempt
    fails_for_good(store, task_id, at=NOW)
    # Then its finished copy is its own, unhandled (not the old task's success)
    (settled,) = store.find_tasks([task_id])
    assert (settled.created_at, settled.status) == (stored_time(NOW), Status.UNHANDLED)
    # And the other prune, going on, deletes what it read, not the new task's history
    drive_on(store, late, delete)
    view = store.load(task_id)
    assert view is not None
    assert status_of(view) is Status.UNHANDLED


class PruneDuring:
    """``finished``, whose method ``name`` is followed at once by a racing prune's
    delete (``delete``), once."""

    def __init__(self, inner: Any, name: str, delete: Callable[[], object]) -> None:
        self.inner = inner
        self.name = name
        self.delete: Callable[[], object] | None = delete

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.inner, name)
        if name != self.name or self.delete is None:
            return method

        def then_the_prune(*args: Any, **kwargs: Any) -> Any:
            delete, self.delete = self.delete, None
            try:
                return method(*args, **kwargs)
            finally:
                delete()

        return then_the_prune


@pytest.mark.parametrize("after", ["insert_one", "find_one"])
def test_a_task_stored_again_moves_even_as_a_prune_deletes_the_leftover_under_the_move(
    store: MongoStore, after: str
) -> None:
    # Given a keyed task stored again beside an old copy a prune left, which a second
    # prune has read; the task ran
    task_id = a_prunes_leftover(store, SPEC)
    (old,) = store.find_tasks([task_id])
    stored_again(store, SPEC)
    job = drive(store, claim(ALL, server="s1", worker="w1", token="second", now=NOW))
    assert job is not None
    # When its move to finished meets the old copy, and the second prune deletes
    # that copy right after the move's insert, or after its read of the old copy
    finished = store.finished
    store.finished = PruneDuring(finished, after, lambda: store.delete_tasks([old]))  # type: ignore[assignment]
    assert drive(store, finish(job, Succeeded(job.token), now=NOW)).accepted
    store.finished = finished
    # Then the task is in finished, as itself
    (settled,) = store.find_tasks([task_id])
    assert (settled.created_at, settled.status) == (stored_time(NOW), Status.SUCCEEDED)
    assert live_ids(store) == []


def test_running_and_failed_hints_stay_in_the_live_collection(store: MongoStore) -> None:
    store.insert_tasks([make_doc("a"), make_doc("b")])
    store.set_status("a", Status.RUNNING, None)
    store.set_status("b", Status.FAILED, T0)
    assert ids(store.tasks) == ["a", "b"]
    assert ids(store.finished) == []


@pytest.mark.parametrize("run_record", ["today's", "older"])
@pytest.mark.parametrize("reader", ["load", "move"])
def test_a_finished_tasks_id_queued_again_later_is_dropped_not_taken_for_the_task(
    store: MongoStore, reader: str, run_record: str
) -> None:
    # Given a finished task (its run record written by this version or by one that
    # did not say which task ran), and its id queued again a day later (a repeated
    # call that raced its end: a live copy with the call's created_at)
    store.insert_tasks([make_doc("a")])
    run_to_success(store, "a")
    if run_record == "older":
        store.records_for("a").update_one({"_id": "a:run"}, {"$unset": {"task_created_at": 1}})
    store.insert_tasks([dataclasses.replace(make_doc("a"), created_at=T0 + timedelta(days=1))])
    # When a load reads it, or a repair that read the task before moves its hint
    if reader == "load":
        view = store.load("a")
        assert view is not None
        assert view.task.created_at == stored_time(T0)
    else:
        store.set_status("a", Status.SUCCEEDED, T0)
    # Then the copy is gone, and the finished task is the one that ran
    assert ids(store.tasks) == []
    (settled,) = store.find_tasks(["a"])
    assert settled.created_at == stored_time(T0)


def test_a_move_interrupted_after_the_copy_is_completed_by_the_next_load(
    store: MongoStore,
) -> None:
    store.insert_tasks([make_doc("a")])
    # As if the server died between copying "a" to finished and deleting its
    # live copy, which still has the hint it had before: running.
    live = store.tasks.find_one({"_id": "a"})
    run_to_success(store, "a")
    store.tasks.insert_one({**live, "status": "running", "due_at": None})
    # The next load (here a sweep's) finds the copy in finished and deletes the live one,
    report = drive(
        store,
        sweep(LeaseWatch(timedelta(seconds=15)), observer="s2", now=T0, monotonic=lambda: 0.0),
    )
    assert ids(store.tasks) == []
    # so nothing is left to repair, and the task reads as it finished.
    assert report.repaired == []
    view = store.load("a")
    assert view is not None
    assert view.task.status is status_of(view) is Status.SUCCEEDED
    assert view.run is not None
    assert view.run.token == "tok-a"


def test_a_decided_task_not_yet_moved_is_repaired_by_the_next_sweep(store: MongoStore) -> None:
    # As if the server died after its outcome record, before the move to finished:
    store.insert_tasks([make_doc("a")])
    live = store.tasks.find_one({"_id": "a"})
    run_to_success(store, "a")
    store.finished.delete_one({"_id": "a"})
    store.tasks.insert_one({**live, "status": "running", "due_at": None})
    assert store.load("a").task.status is Status.RUNNING  # type: ignore[union-attr]
    report = drive(
        store,
        sweep(LeaseWatch(timedelta(seconds=15)), observer="s2", now=T0, monotonic=lambda: 0.0),
    )
    assert report.repaired == ["a"]
    assert ids(store.tasks) == []
    assert store.count_by_status() == {Status.SUCCEEDED: 1}


def test_inserting_a_finished_task_again_does_not_run_it_again(store: MongoStore) -> None:
    store.insert_tasks([make_doc("a")])
    run_to_success(store, "a")
    store.insert_tasks([make_doc("a")])  # a repeated queue() after the task finished
    assert drive(store, claim(ALL, server="s1", worker="w1", token="again", now=T0)) is None
    assert ids(store.tasks) == []
    assert store.count_by_status() == {Status.SUCCEEDED: 1}


def test_inserting_a_finished_task_again_costs_one_claim_not_one_per_descendant(
    store: MongoStore,
) -> None:
    # Given a chain a -> 1 -> 2 -> 3 -> 4 of successors, all finished,
    spec = TaskSpec("tests:Next", {}, 5, timedelta(seconds=5), timedelta(seconds=5), 2)
    store.insert_tasks([make_doc("a")])
    first = None
    for n in range(5):
        job = drive(store, claim(ALL, server="s1", worker="w1", token=f"tok-{n}", now=T0))
        assert job is not None
        verdict = drive(store, finish(job, Succeeded(job.token, (spec,) if n < 4 else ()), now=T0))
        first = first or verdict
    assert ids(store.tasks) == []
    # when a's insert of its successor is repeated (its finish retried after an error on its move),
    assert first is not None
    store.insert_tasks(list(first.record.spawned))
    # then one claim attempt moves the copy out again, and no other copy appears.
    assert drive(store, claim(ALL, server="s1", worker="w1", token="again", now=T0)) is None
    assert ids(store.tasks) == []


def test_a_new_keyed_call_never_reads_finished_tasks_and_a_repeat_reads_its_own(
    store: MongoStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Why: on FerretDB every read of `finished` by id scans it all, so a keyed call
    # that read it would slow down with history (bench/queue_bench.py).
    # Given a finished task, and a count of the reads of `finished`
    (done,) = insert_queued(store, [SPEC], now=T0, new_id=str, key="done")
    run_to_success(store, done)
    reads: list[Any] = []
    find = type(store.finished).find
    monkeypatch.setattr(
        type(store.finished),
        "find",
        lambda self, *a, **k: (
            (reads.append(a[0]) if self.name == "finished" else None) or find(self, *a, **k)
        ),
    )
    # When a new key is queued, the read finds it nowhere without reading `finished`
    (new,) = insert_queued(store, [SPEC], now=T0, new_id=str, key="new")
    assert reads == []
    # And a repeat of the finished task's call reads only its document there, and
    # queues nothing
    assert insert_queued(store, [SPEC], now=T0, new_id=str, key="done") == [done]
    assert reads == [{"_id": done}]
    assert ids(store.live_collections()[0]) + ids(store.finished) == sorted([new, done])


def test_a_client_without_tz_aware_reads_a_finished_tasks_times_aware_and_keys_match() -> None:
    # Given a store on a client without tz_aware=True (as the README's make_db() makes),
    # and a keyed task with times in its fields that ran to its end
    store = MongoStore(mongomock.MongoClient()["tullius_naive"])
    store.ensure_indexes()
    spec = make_spec(at=T0, nested={"times": [T0]})
    (task_id,) = insert_queued(store, [spec], now=T0, new_id=str, key="k")
    run_to_success(store, task_id)
    # Then its fields read back from finished are aware UTC times
    fields = store.load(task_id).task.fields
    assert fields["at"] == T0.replace(microsecond=123000)
    assert fields["at"].tzinfo is not None
    assert fields["nested"]["times"][0].tzinfo is not None
    # And a repeat of the call is the same task, not a conflict
    assert insert_queued(store, [spec], now=T0, new_id=str, key="k") == [task_id]


def test_a_keyed_call_whose_key_was_used_and_run_between_its_read_and_insert_conflicts(
    store: MongoStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a keyed call whose read finds its key unused, and, before it inserts,
    # another call with the key and a different task whose task runs to its end
    after_the_next_read(store, monkeypatch, lambda: another_call_runs(store))
    # When the call inserts (a live copy of the finished task, to MongoStore)
    with pytest.raises(KeyConflict, match=r"field 'amount': 10 stored, 12 given"):
        insert_queued(store, [make_spec(amount=12)], now=T0, new_id=str, key="k")
    # Then it raised rather than return as if its task were stored, and the copy
    # is gone: the finished task stands, and nothing is left to claim
    assert ids(store.live_collections()[0]) == []
    assert store.load(keyed_id("k")).task.fields == {"amount": 10}
    assert drive(store, claim(ALL, server="s1", worker="w1", token="late", now=T0)) is None


def test_a_live_copy_of_a_finished_task_that_cant_be_decoded_reads_as_set_aside(
    store: MongoStore,
) -> None:
    # Given a finished task whose document can't be decoded (a hand edit), and a
    # live copy of it inserted again
    store.insert_tasks([make_doc("t")])
    run_to_success(store, "t")
    store.finished.update_one({"_id": "t"}, {"$set": {"handler_attempts": "five"}})
    store.insert_tasks([make_doc("t")])
    # When it is read
    # Then it reads as missing, as any undecodable document does, rather than raise;
    # the live copy is gone and nothing is claimed
    assert store.load("t") is None
    assert ids(store.live_collections()[0]) == []
    assert drive(store, claim(ALL, server="s1", worker="w1", token="again", now=T0)) is None


def test_a_repeat_after_a_lost_answer_sees_the_finished_task_behind_its_own_live_copy(
    store: MongoStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a keyed call whose key another call takes, with a different task that
    # runs to its end, between the call's read and its insert; and whose insert is
    # then applied (a live copy of that finished task) but its answer lost
    insert_tasks = store.insert_tasks

    def insert_then_lose_the_answer(docs: Any) -> int:
        monkeypatch.setattr(store, "insert_tasks", insert_tasks)
        insert_tasks(docs)
        raise StoreUnavailable("insert tasks", "answer lost")

    def meanwhile() -> None:
        another_call_runs(store)
        monkeypatch.setattr(store, "insert_tasks", insert_then_lose_the_answer)

    after_the_next_read(store, monkeypatch, meanwhile)
    with pytest.raises(StoreUnavailable):
        insert_queued(store, [make_spec(amount=12)], now=T0, new_id=str, key="k")
    # When the application repeats the call
    # Then it sees the finished task, not its own copy, and raises
    with pytest.raises(KeyConflict, match=r"field 'amount': 10 stored, 12 given"):
        insert_queued(store, [make_spec(amount=12)], now=T0, new_id=str, key="k")
    assert ids(store.live_collections()[0]) == []


def test_a_keyed_call_whose_task_is_pruned_between_its_reads_stores_it_again(
    store: MongoStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a keyed task that ran, and a repeat of its call whose first read finds it,
    # before a prune deletes it
    (task_id,) = insert_queued(store, [SPEC], now=T0, new_id=str, key="k")
    run_to_success(store, task_id)
    after_the_next_read(
        store, monkeypatch, lambda: drive(store, prune(MIN_AGE, now=T0 + 10 * MIN_AGE))
    )
    # When the repeat goes on
    # Then it asks again, finds the task gone, and stores it again (as after a prune),
    # rather than call it unreadable
    assert insert_queued(store, [SPEC], now=T0, new_id=str, key="k") == [task_id]
    assert store.load(task_id).task.status is Status.QUEUED


def test_a_late_hint_for_a_finished_task_changes_nothing(store: MongoStore) -> None:
    store.insert_tasks([make_doc("a")])
    run_to_success(store, "a")
    store.set_status("a", Status.RUNNING, None)
    assert ids(store.tasks) == []
    assert store.find_by_status([Status.RUNNING], 10) == []
    assert [d.task_id for d in store.find_by_status([Status.SUCCEEDED], 10)] == ["a"]


def test_a_sharded_live_queue_spreads_tasks_and_claims_them_in_priority_order() -> None:
    db = mongomock.MongoClient(tz_aware=True)["tullius_sharded"]
    store = MongoStore(db, live_shards=4)
    store.ensure_indexes()
    store.insert_tasks([make_doc(f"t{n}", priority=n % 10) for n in range(40)])
    assert [c.name for c in store.live_collections()] == ["tasks", "tasks_1", "tasks_2", "tasks_3"]
    assert all(c.count_documents({}) > 0 for c in store.live_collections())
    claimed = [
        drive(store, claim(ALL, server="s1", worker="w1", token=f"k{n}", now=T0)) for n in range(4)
    ]
    assert [job.view.task.priority for job in claimed if job is not None] == [0, 0, 0, 0]
    assert store.count_by_status() == {Status.QUEUED: 36, Status.RUNNING: 4}


def test_the_first_store_of_a_database_records_its_layout_for_every_other() -> None:
    db = mongomock.MongoClient(tz_aware=True)["tullius_layout_shared"]
    MongoStore(db, live_shards=5).insert_tasks([make_doc("a")])
    follower = MongoStore(db)
    assert len(follower.live_collections()) == 5
    assert follower.load("a") is not None


def test_a_store_asking_for_another_layout_than_the_recorded_one_is_refused() -> None:
    db = mongomock.MongoClient(tz_aware=True)["tullius_layout_clash"]
    MongoStore(db, live_shards=2).insert_tasks([make_doc("a")])
    with pytest.raises(ConfigError, match=r"live_shards=3 does not match .* set up with 2"):
        MongoStore(db, live_shards=3).load("a")


def test_a_database_with_live_tasks_from_before_layouts_keeps_one_live_collection() -> None:
    db = mongomock.MongoClient(tz_aware=True)["tullius_layout_old"]
    db["tasks"].insert_one(pack_live(make_doc("old")))
    store = MongoStore(db)
    assert store.live_collections() == [store.tasks]
    assert store.load("old") is not None


@pytest.mark.parametrize("bad", [0, -1, 65, 2.5, "4"])
def test_a_live_shard_count_that_is_not_a_small_whole_number_is_refused(bad: object) -> None:
    db = mongomock.MongoClient(tz_aware=True)["tullius_layout_bad"]
    with pytest.raises(ConfigError, match="expected a whole number from 1 to 64"):
        MongoStore(db, live_shards=bad)  # type: ignore[arg-type]


def test_sharded_records_keep_each_tasks_records_together_and_decide_as_one_collection() -> None:
    # Given a store whose records are split over four collections
    db = mongomock.MongoClient(tz_aware=True)["tullius_record_shards"]
    store = MongoStore(db, record_shards=4)
    store.ensure_indexes()
    store.insert_tasks([make_doc(f"t{n}") for n in range(20)])
    jobs = [
        drive(store, claim(ALL, server="s1", worker="w1", token=f"k{n}", now=T0)) for n in range(20)
    ]
    for job in jobs[:10]:
        assert job is not None
        drive(store, finish(job, Succeeded(job.token), now=T0))
    names = [c.name for c in store.record_collections()]
    assert names == ["records", "records_1", "records_2", "records_3"]
    # Then each task's records are in its own shard, and the tasks are spread
    for n in range(20):
        held = [
            c.name for c in store.record_collections() if c.count_documents({"task_id": f"t{n}"})
        ]
        assert held == [store.records_for(f"t{n}").name]
    assert all(c.count_documents({}) > 0 for c in store.record_collections())
    # And a late insert of a decided step loses to the first, in its shard
    late = dataclasses.replace(jobs[0].lease, token="late")  # type: ignore[union-attr]
    assert store.insert_record(late).token == "k0"
    # And a lease's heartbeat is counted, in whichever shard its record is
    running = jobs[10]
    assert running is not None
    assert store.beat(running.lease.record_id) == 1


def test_a_layout_with_sharded_records_is_one_a_version_before_them_cannot_read() -> None:
    # A version from before record shards reads ``live_shards`` (and records in
    # ``records`` alone): it must stop at start-up, not run beside this one.
    sharded = mongomock.MongoClient(tz_aware=True)["tullius_layout_sharded_records"]
    MongoStore(sharded, live_shards=2, record_shards=4).insert_tasks([make_doc("a")])
    assert "live_shards" not in sharded["tullius_meta"].find_one({"_id": "layout"})
    follower = MongoStore(sharded)
    assert (len(follower.live_collections()), len(follower.record_collections())) == (2, 4)
    # A layout with one records collection is the one older versions read
    plain = mongomock.MongoClient(tz_aware=True)["tullius_layout_one_records"]
    MongoStore(plain, live_shards=2).insert_tasks([make_doc("a")])
    assert plain["tullius_meta"].find_one({"_id": "layout"})["live_shards"] == 2


def test_a_layout_recorded_before_records_were_sharded_keeps_one_records_collection() -> None:
    db = mongomock.MongoClient(tz_aware=True)["tullius_layout_before_record_shards"]
    db["tullius_meta"].insert_one({"_id": "layout", "live_shards": 3})
    store = MongoStore(db)
    assert store.record_collections() == [store.records]
    assert len(store.live_collections()) == 3


def test_a_database_with_records_from_before_layouts_keeps_one_records_collection() -> None:
    db = mongomock.MongoClient(tz_aware=True)["tullius_records_old"]
    db["records"].insert_one({"_id": "old:run", "task_id": "old"})
    store = MongoStore(db, record_shards=None)
    assert store.record_collections() == [store.records]


def test_a_store_asking_for_other_record_shards_than_the_recorded_ones_is_refused() -> None:
    db = mongomock.MongoClient(tz_aware=True)["tullius_record_shards_clash"]
    MongoStore(db, record_shards=2).insert_tasks([make_doc("a")])
    assert len(MongoStore(db).record_collections()) == 2
    with pytest.raises(ConfigError, match=r"record_shards=3 does not match .* set up with 2"):
        MongoStore(db, record_shards=3).load("a")
    with pytest.raises(ConfigError, match="expected a whole number from 1 to 256"):
        MongoStore(db, record_shards=0)


def test_an_empty_claim_query_is_repeated_from_memory_until_work_is_announced(
    store: MongoStore,
) -> None:
    assert store.find_due([Status.QUEUED], 0, 10, T0, 8) == []
    # Written behind the store's back: no announcement.
    store.live_for("quiet").insert_one(pack_live(make_doc("quiet")))
    assert store.find_due([Status.QUEUED], 0, 10, T0 + timedelta(seconds=0.1), 8) == []
    # Looked at again once IDLE_RECHECK has passed.
    later = T0 + IDLE_RECHECK + timedelta(seconds=0.1)
    assert [d.task_id for d in store.find_due([Status.QUEUED], 0, 10, later, 8)] == ["quiet"]


def test_queueing_work_is_seen_by_the_next_claim_query_at_once(store: MongoStore) -> None:
    assert store.find_due([Status.QUEUED], 0, 10, T0, 8) == []
    store.insert_tasks([make_doc("new")])
    assert [d.task_id for d in store.find_due([Status.QUEUED], 0, 10, T0, 8)] == ["new"]


def test_a_failed_hint_is_seen_by_the_next_handler_claim_at_once(store: MongoStore) -> None:
    store.insert_tasks([make_doc("a")])
    assert store.find_due([Status.FAILED], 0, 10, T0, 8) == []
    store.set_status("a", Status.FAILED, T0)
    assert [d.task_id for d in store.find_due([Status.FAILED], 0, 10, T0, 8)] == ["a"]


def test_heartbeats_are_counted_in_the_live_document_not_in_the_record(
    store: MongoStore,
) -> None:
    store.insert_tasks([make_doc("a")])
    job = drive(store, claim(ALL, server="s1", worker="w1", token="tok", now=T0))
    assert job is not None
    assert store.beat(job.lease.record_id) == 1
    assert store.beat(job.lease.record_id) == 2
    assert store.tasks.find_one({"_id": "a"})["beats"] == {"run": 2}
    assert store.records.find_one({"_id": job.lease.record_id})["beat"] == 0
    assert store.load("a").run.beat == 2  # type: ignore[union-attr]


def test_a_heartbeat_for_a_finished_task_is_refused(store: MongoStore) -> None:
    store.insert_tasks([make_doc("a")])
    run_to_success(store, "a")
    assert store.beat("a:run") is None


def running_with_an_undecodable_record(store: MongoStore) -> None:
    """Tasks ``bad`` and ``good`` claimed, the run record of ``bad`` mangled."""
    store.insert_tasks([make_doc("bad"), make_doc("good")])
    for task_id in ("bad", "good"):
        job = drive(store, claim(ALL, server="s1", worker="w1", token=f"t-{task_id}", now=T0))
        assert job is not None
    store.records.update_one({"_id": "bad:run"}, {"$set": {"kind": "no-such-kind"}})


def test_a_task_whose_record_cannot_be_decoded_is_set_aside_and_sweeps_go_on(
    store: MongoStore,
) -> None:
    running_with_an_undecodable_record(store)
    report = drive(
        store,
        sweep(LeaseWatch(timedelta(seconds=15)), observer="s2", now=T0, monotonic=lambda: 0.0),
    )
    assert report.examined == 1  # "good"; "bad" was passed by, not a failed sweep
    assert store.load("bad") is None
    live = store.tasks.find_one({"_id": "bad"})
    assert live["status"] == "undecodable"
    assert "no-such-kind" in live["decode_error"]
    assert store.find_by_status([Status.RUNNING], 10)[0].task_id == "good"


def test_loading_many_sets_aside_a_task_whose_record_cannot_be_decoded_and_gives_the_rest(
    store: MongoStore,
) -> None:
    # Given two running tasks, the record of one of which can't be decoded
    running_with_an_undecodable_record(store)
    # When both are loaded at once
    views = store.load_many(["bad", "good"])
    # Then the good one is given, and the bad one is left out and set aside
    assert [view.task_id for view in views] == ["good"]
    assert views[0].run is not None
    assert store.tasks.find_one({"_id": "bad"})["status"] == "undecodable"


def test_loading_many_drops_a_decided_live_copy_of_a_task_already_moved(store: MongoStore) -> None:
    # Given a finished task inserted again (a repeated queue()), with its records
    store.insert_tasks([make_doc("a")])
    run_to_success(store, "a")
    store.insert_tasks([make_doc("a")])
    assert ids(store.tasks) == ["a"]
    # When it is loaded with others
    views = store.load_many(["a"])
    # Then it is given as finished, and its stale live copy is gone
    assert [view.task.status for view in views] == [Status.SUCCEEDED]
    assert ids(store.tasks) == []


def test_a_page_of_running_tasks_that_lost_an_undecodable_one_is_read_again_in_full(
    store: MongoStore,
) -> None:
    # Given three running tasks, the first of which can't be decoded
    store.insert_tasks([make_doc(task_id) for task_id in ("a", "b", "c")])
    for task_id in ("a", "b", "c"):
        store.set_status(task_id, Status.RUNNING, None)
    store.tasks.update_one({"_id": "a"}, {"$set": {"body": b"not bson"}})
    # When a sweep reads a page of two
    page = store.find_by_status([Status.RUNNING, Status.HANDLING], 2)
    # Then the page is full (a short one would end the sweep's paging early)
    assert [doc.task_id for doc in page] == ["b", "c"]
    assert store.tasks.find_one({"_id": "a"})["status"] == "undecodable"


class MovesChildAfterEachRead:
    """``finished``, where a child's move lands just after the reader's query ran."""

    def __init__(self, store: MongoStore, child: str) -> None:
        self._finished = store.finished
        self._store = store
        self._child = child

    def __getattr__(self, name: str) -> Any:
        return getattr(self._finished, name)

    def find(self, *args: Any, **kwargs: Any) -> Any:
        found = list(self._finished.find(*args, **kwargs))
        if self._child in ids(self._store.tasks):
            run_to_success(self._store, self._child)  # copied to finished, then deleted live
        return iter(found)


def test_children_are_all_found_while_one_of_them_moves_to_finished(store: MongoStore) -> None:
    # Given a parent's two children, one of which finishes while they are listed
    doc = make_doc("c1")
    store.insert_tasks([dataclasses.replace(doc, parent_id="p"), make_doc("c2")])
    store.tasks.update_one({"_id": "c2"}, {"$set": {"parent_id": "p"}})
    racing = MovesChildAfterEachRead(store, "c1")
    # When the children are read while c1 moves out of the live queue
    store.finished = racing  # type: ignore[assignment]
    found = [child.task_id for child in store.find_children("p")]
    store.finished = racing._finished
    # Then both are found
    assert found == ["c1", "c2"]


def test_a_child_set_aside_as_undecodable_is_left_out_of_its_parents_children(
    store: MongoStore,
) -> None:
    # Given a parent with two children, one of which a daemon set aside (a retry's
    # copy an older version could not read, say)
    children = [dataclasses.replace(make_doc(name), parent_id="p") for name in ("c1", "c2")]
    store.insert_tasks([make_doc("p"), *children])
    store.tasks.update_one(
        {"_id": "c2"}, {"$set": {"status": "undecodable", "decode_error": "ValueError: 'x'"}}
    )
    # When the parent's children are read, they are the one that can be read
    assert [doc.task_id for doc in store.find_children("p")] == ["c1"]


def test_a_finished_child_that_cannot_be_decoded_is_left_out_and_set_aside(
    store: MongoStore,
) -> None:
    # Given a parent whose finished child lost a field it needs
    child = dataclasses.replace(make_doc("c1"), parent_id="p")
    store.insert_tasks([make_doc("p"), child])
    run_to_success(store, "c1")
    run_to_success(store, "p")
    store.finished.update_one({"_id": "c1"}, {"$unset": {"handler_attempts": ""}})
    # When the parent's children are read, the bad one is left out, and its reason kept
    assert store.find_children("p") == []
    assert "handler_attempts" in store.finished.find_one({"_id": "c1"})["decode_error"]


def test_finished_documents_set_aside_are_left_out_of_pages_so_paging_reaches_the_rest(
    store: MongoStore,
) -> None:
    # Given five finished tasks, the first two of which can't be decoded any more
    for name in ("a0", "a1", "b0", "b1", "b2"):
        store.insert_tasks([make_doc(name)])
        run_to_success(store, name)
    for name in ("a0", "a1"):
        store.finished.update_one({"_id": name}, {"$set": {"origin": "bogus"}})
    # When they are read two at a time in id order (as a prune or --status pages)
    pages, after = [], ""
    while page := store.find_by_status([Status.SUCCEEDED], 2, after):
        pages.append([doc.task_id for doc in page])
        after = page[-1].task_id
    # Then the bad ones are set aside (and counted), and every other one is read
    assert pages == [["b0", "b1"], ["b2"]]
    assert store.count_set_aside() == 2
