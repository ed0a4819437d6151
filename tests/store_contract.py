"""The behaviour every `Store` must have, written once and run against each store.

Subclass `StoreContract` and provide a ``store`` fixture returning an empty
store: tests/unit runs it on `MemoryStore` and on `MongoStore` over mongomock;
tests/integration runs it on `MongoStore` over a real MongoDB-wire server.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tullius.api import insert_queued
from tullius.band import Band
from tullius.document import (
    Failure,
    Record,
    RecordKind,
    Status,
    TaskDoc,
    TaskSpec,
    as_stored,
    handler_id,
    keyed_task_id,
    outcome_id,
    queued_doc,
    retry_id,
    run_id,
    stored_time,
)
from tullius.engine import Conversation, drive
from tullius.errors import KeyConflict
from tullius.keyed import insert_keyed
from tullius.prune import MIN_AGE, prune
from tullius.store import DeleteTasks, LoadMany, ServerSeen, perform

T0 = datetime(2026, 1, 1, 12, 0, 0, 123456, tzinfo=UTC)
DAY = timedelta(days=1)


class Color(enum.StrEnum):
    RED = "red"


class Size(enum.IntEnum):
    BIG = 3


def make_spec(class_name: str = "tests:Nothing", **fields: Any) -> TaskSpec:
    return TaskSpec(
        class_name=class_name,
        fields=fields,
        priority=5,
        timeout=timedelta(seconds=5),
        handler_timeout=timedelta(seconds=60),
        handler_attempts=3,
    )


def make_doc(
    task_id: str, *, priority: float = 5, start_after: datetime = T0, **fields: Any
) -> TaskDoc:
    spec = dataclasses.replace(make_spec(**fields), priority=priority, start_after=start_after)
    return queued_doc(spec, task_id=task_id, now=T0)


def queue_keyed(store: Any, key: str, *specs: TaskSpec, now: datetime = T0) -> list[str]:
    """``tullius.queue(..., key=key)`` as every driver stores it."""

    def no_random_ids() -> str:
        raise AssertionError("a keyed call made a random id")

    return insert_queued(store, specs, now=now, new_id=no_random_ids, key=key)


def after_the_next_read(
    store: Any, monkeypatch: pytest.MonkeyPatch, meanwhile: Callable[[], object]
) -> None:
    """Run ``meanwhile`` right after the next ``store.stored_ids`` (a keyed call's
    first read), as another process would between that read and what follows."""
    stored_ids = store.stored_ids

    def then_meanwhile(task_ids: Any) -> set[str]:
        found = stored_ids(task_ids)
        monkeypatch.setattr(store, "stored_ids", stored_ids)
        meanwhile()
        return found

    monkeypatch.setattr(store, "stored_ids", then_meanwhile)


def delete_as_stored(store: Any, task_ids: list[str]) -> int:
    """A prune's delete of the tasks as they are stored now (`Store.delete_tasks`)."""
    return store.delete_tasks(store.find_tasks(task_ids))


def drive_until(store: Any, conversation: Conversation[Any], kind: type) -> Any:
    """Drive ``conversation`` up to its first operation of ``kind``, not performed
    yet: the moment another process may act before it."""
    op = next(conversation)
    while not isinstance(op, kind):
        op = conversation.send(perform(store, op))
    return op


def drive_on(store: Any, conversation: Conversation[Any], op: Any) -> Any:
    """Drive ``conversation``, paused at ``op`` (`drive_until`), to its end."""
    while True:
        try:
            op = conversation.send(perform(store, op))
        except StopIteration as end:
            return end.value


def make_record(task_id: str, token: str = "tok", **changes: Any) -> Record:
    values: dict[str, Any] = {
        "record_id": run_id(task_id),
        "task_id": task_id,
        "kind": RecordKind.RUN,
        "token": token,
        "at": T0,
        "server": "s1",
        "worker": "w1",
    }
    values.update(changes)
    return Record(**values)


class StoreContract:
    """Behaviour suite; subclasses supply the ``store`` fixture."""

    @pytest.fixture
    def store(self) -> Any:  # pragma: no cover - always overridden
        raise NotImplementedError

    def test_inserted_task_loads_back_as_stored(self, store: Any) -> None:
        doc = make_doc("t1", when=T0, items=(1, "two"), nested={"a": [b"x", None, 1.5]})
        assert store.insert_tasks([doc]) == 1
        view = store.load("t1")
        assert view.task == as_stored(doc)
        assert view.task.fields["items"] == [1, "two"]
        assert view.task.fields["when"] == T0.replace(microsecond=123000)
        assert view.records == {}

    def test_a_field_of_a_builtin_subclass_loads_back_as_the_builtin(self, store: Any) -> None:
        doc = make_doc("t1", color=Color.RED, size=Size.BIG, labels={Color.RED: Size.BIG})
        store.insert_tasks([doc])
        fields = store.load("t1").task.fields
        assert fields == {"color": "red", "size": 3, "labels": {"red": 3}}
        assert type(fields["color"]) is str
        assert type(fields["size"]) is int
        assert [type(key) for key in fields["labels"]] == [str]
        assert type(fields["labels"]["red"]) is int

    def test_loading_a_missing_task_returns_none(self, store: Any) -> None:
        assert store.load("nope") is None

    def test_inserting_an_existing_task_changes_nothing(self, store: Any) -> None:
        store.insert_tasks([make_doc("t1", n=1)])
        assert store.insert_tasks([make_doc("t1", n=2), make_doc("t2", n=3)]) == 1
        assert store.load("t1").task.fields == {"n": 1}
        assert store.load("t2").task.fields == {"n": 3}

    def test_inserting_no_tasks_is_a_no_op(self, store: Any) -> None:
        assert store.insert_tasks([]) == 0

    def test_first_record_insert_wins_and_later_ones_return_it(self, store: Any) -> None:
        store.insert_tasks([make_doc("t1")])
        first = store.insert_record(make_record("t1", token="a"))
        second = store.insert_record(make_record("t1", token="b", server="s2"))
        assert first.token == "a"
        assert second == first
        assert list(store.load("t1").records.values()) == [first]

    def test_repeating_ones_own_record_insert_returns_ones_own_record(self, store: Any) -> None:
        store.insert_tasks([make_doc("t1")])
        record = make_record("t1", token="a")
        assert store.insert_record(record).token == "a"
        assert store.insert_record(record).token == "a"

    def test_records_round_trip_with_failures_and_spawned_tasks(self, store: Any) -> None:
        store.insert_tasks([make_doc("t1")])
        # The chain before a handler's end: its run, a failed outcome, the handler's lease.
        store.insert_record(make_record("t1"))
        store.insert_record(
            make_record("t1", record_id=outcome_id("t1"), kind=RecordKind.OUTCOME, ok=False)
        )
        store.insert_record(
            make_record("t1", record_id=handler_id("t1", 1), kind=RecordKind.HANDLER, attempt=1)
        )
        failure = Failure("exception", "boom", T0, traceback="Traceback...", server="s1")
        record = make_record(
            "t1",
            record_id=handler_id("t1", 1) + ":end",
            kind=RecordKind.HANDLER_END,
            attempt=1,
            ok=False,
            failure=failure,
            spawned=(make_doc("c1", n=1),),
            retry_at=T0 + timedelta(seconds=2),
        )
        stored = store.insert_record(record)
        assert stored.failure == Failure(
            "exception", "boom", T0.replace(microsecond=123000), "Traceback...", "s1"
        )
        assert stored.spawned == (as_stored(make_doc("c1", n=1)),)
        assert store.load("t1").records[record.record_id] == stored

    def test_beat_increments_the_counter_of_a_lease(self, store: Any) -> None:
        store.insert_tasks([make_doc("t1")])
        store.insert_record(make_record("t1"))
        assert store.beat(run_id("t1")) == 1
        assert store.beat(run_id("t1")) == 2
        assert store.load("t1").run.beat == 2

    def test_beat_of_a_missing_record_returns_none(self, store: Any) -> None:
        assert store.beat("nope:run") is None

    def test_set_status_changes_hints(self, store: Any) -> None:
        store.insert_tasks([make_doc("t1")])
        store.set_status("t1", Status.RUNNING, None)
        task = store.load("t1").task
        assert (task.status, task.due_at) == (Status.RUNNING, None)

    def test_set_status_never_changes_a_terminal_hint(self, store: Any) -> None:
        store.insert_tasks([make_doc("t1")])
        store.set_status("t1", Status.SUCCEEDED, None)
        store.set_status("t1", Status.RUNNING, None)
        assert store.load("t1").task.status is Status.SUCCEEDED

    def test_set_status_of_a_missing_task_is_a_no_op(self, store: Any) -> None:
        assert store.set_status("nope", Status.RUNNING, None) is False
        assert store.load("nope") is None

    def test_set_status_says_it_found_the_task_even_when_nothing_changes(self, store: Any) -> None:
        store.insert_tasks([make_doc("t1")])
        assert store.set_status("t1", Status.RUNNING, None) is True
        assert store.set_status("t1", Status.RUNNING, None) is True

    def test_find_due_returns_the_most_urgent_due_tasks_in_the_band(self, store: Any) -> None:
        store.insert_tasks(
            [
                make_doc("late", priority=1, start_after=T0 + timedelta(seconds=2)),
                make_doc("p3", priority=3),
                make_doc("p1-later", priority=1, start_after=T0 + timedelta(seconds=1)),
                make_doc("p1", priority=1),
                make_doc("p0", priority=0),
                make_doc("p9", priority=9),
            ]
        )
        now = T0 + timedelta(seconds=1)
        found = store.find_due([Status.QUEUED], 1, 5, now, 10)
        assert [doc.task_id for doc in found] == ["p1", "p1-later", "p3"]
        assert [d.task_id for d in store.find_due([Status.QUEUED], 0, 10, now, 2)] == ["p0", "p1"]

    def test_find_due_returns_a_task_due_exactly_now_and_not_a_millisecond_before(
        self, store: Any
    ) -> None:
        # Given a task whose start is a whole millisecond, exactly as stored
        start = T0.replace(microsecond=0) + timedelta(seconds=1)
        store.insert_tasks([make_doc("t1", start_after=start)])
        # When due work is read at that very instant, and a millisecond before it
        at_start = store.find_due([Status.QUEUED], 0, 10, start, 10)
        before = store.find_due([Status.QUEUED], 0, 10, start - timedelta(milliseconds=1), 10)
        # Then it is due at its start (as `machine.step` lets it be claimed then), not before
        assert [doc.task_id for doc in at_start] == ["t1"]
        assert before == []

    def test_find_due_only_returns_the_asked_status(self, store: Any) -> None:
        store.insert_tasks([make_doc("a"), make_doc("b")])
        store.set_status("b", Status.FAILED, T0)
        assert [d.task_id for d in store.find_due([Status.FAILED], 0, 10, T0, 10)] == ["b"]

    def test_find_due_puts_failures_before_new_work_of_the_same_priority(self, store: Any) -> None:
        later = T0 + timedelta(seconds=5)
        store.insert_tasks(
            [make_doc("q1", priority=1), make_doc("f1", priority=1), make_doc("q0", priority=0)]
        )
        store.insert_tasks([make_doc("f2", priority=2)])
        store.set_status("f1", Status.FAILED, later)
        store.set_status("f2", Status.FAILED, T0)
        store.set_status("q0", Status.RUNNING, None)
        found = store.find_due([Status.QUEUED, Status.FAILED], 0, 10, later, 10)
        assert [doc.task_id for doc in found] == ["f1", "q1", "f2"]
        assert [
            d.task_id for d in store.find_due([Status.FAILED, Status.QUEUED], 0, 10, later, 2)
        ] == [
            "f1",
            "q1",
        ]

    def test_find_by_status_returns_matching_hints_by_due_then_id(self, store: Any) -> None:
        store.insert_tasks([make_doc("c"), make_doc("a"), make_doc("b")])
        store.set_status("c", Status.RUNNING, None)
        store.set_status("a", Status.HANDLING, None)
        store.set_status("b", Status.FAILED, T0)
        found = store.find_by_status([Status.RUNNING, Status.HANDLING], 10)
        assert [doc.task_id for doc in found] == ["a", "c"]

    def test_find_by_status_reads_page_by_page_after_an_id(self, store: Any) -> None:
        store.insert_tasks([make_doc(name) for name in ("d", "c", "a", "b", "e")])
        for name in ("a", "b", "c", "e"):
            store.set_status(name, Status.RUNNING if name != "c" else Status.HANDLING, None)
        first = store.find_by_status([Status.RUNNING, Status.HANDLING], 2)
        rest = store.find_by_status([Status.RUNNING, Status.HANDLING], 2, first[-1].task_id)
        last = store.find_by_status([Status.RUNNING, Status.HANDLING], 2, rest[-1].task_id)
        assert [[doc.task_id for doc in page] for page in (first, rest, last)] == [
            ["a", "b"],
            ["c", "e"],
            [],
        ]

    def test_find_children_returns_spawned_tasks_by_id(self, store: Any) -> None:
        parent = make_doc("p")
        children = [
            TaskDoc(**{**make_doc(name).__dict__, "parent_id": "p", "root_id": "p"})
            for name in ("y", "x")
        ]
        store.insert_tasks([parent, *children])
        assert [doc.task_id for doc in store.find_children("p")] == ["x", "y"]
        assert store.find_children("x") == []

    def test_count_by_status_counts_hints(self, store: Any) -> None:
        store.insert_tasks([make_doc("a"), make_doc("b"), make_doc("c")])
        store.set_status("c", Status.RUNNING, None)
        assert store.count_by_status() == {Status.QUEUED: 2, Status.RUNNING: 1}

    def test_find_due_takes_an_infinite_bound_as_no_bound(self, store: Any) -> None:
        store.insert_tasks(
            [
                make_doc("low", priority=-3),
                make_doc("mid", priority=5),
                make_doc("high", priority=50),
            ]
        )
        below = store.find_due([Status.QUEUED], -math.inf, math.nextafter(0, -math.inf), T0, 10)
        above = store.find_due([Status.QUEUED], math.nextafter(10, math.inf), math.inf, T0, 10)
        assert [doc.task_id for doc in below] == ["low"]
        assert [doc.task_id for doc in above] == ["high"]
        assert len(store.find_due([Status.QUEUED], -math.inf, math.inf, T0, 10)) == 3

    def test_count_due_counts_what_find_due_would_find_per_priority(self, store: Any) -> None:
        later = T0 + timedelta(seconds=5)
        store.insert_tasks(
            [
                make_doc("a1", priority=1, start_after=later),
                make_doc("a2", priority=1),
                make_doc("b", priority=2.5),
                make_doc("late", priority=2.5, start_after=later),
                make_doc("far", priority=70),
                make_doc("failed", priority=70),
            ]
        )
        store.set_status("failed", Status.FAILED, T0)
        queued = [Status.QUEUED]
        assert store.count_due(queued, -math.inf, math.inf, T0) == {1: 1, 2.5: 1, 70: 1}
        assert store.count_due(queued, 1, 10, later) == {1: 2, 2.5: 2}
        assert store.count_due([Status.QUEUED, Status.FAILED], 3, math.inf, T0) == {70: 2}
        assert store.count_due(queued, 3, 60, T0) == {}

    def test_count_due_counts_an_int_and_a_float_priority_of_equal_value_together(
        self, store: Any
    ) -> None:
        store.insert_tasks([make_doc("int", priority=5), make_doc("float", priority=5.0)])
        assert store.count_due([Status.QUEUED], 0, 10, T0) == {5: 2}

    def test_a_server_is_marked_stopped_only_by_the_start_that_wrote_its_entry(
        self, store: Any
    ) -> None:
        # Given an entry written by a newer start of server "a" than the one stopping
        store.announce_server(ServerSeen("a", (Band(1, 0, 10),), T0, instance="new"))
        store.announce_server(ServerSeen("b", (Band(1, 0, 10),), T0, instance="b1"))
        # When the old start of "a", and "b", mark themselves stopped
        store.mark_stopped("a", "old")
        store.mark_stopped("b", "b1")
        store.mark_stopped("c", "c1")  # no entry: nothing happens
        # Then the newer "a" still runs, and "b" is stopped
        assert [(seen.server, seen.stopped) for seen in store.read_servers()] == [
            ("a", False),
            ("b", True),
        ]

    def test_forgetting_a_server_deletes_its_entry_only_if_it_was_not_renewed(
        self, store: Any
    ) -> None:
        store.announce_server(ServerSeen("a", (Band(1, 0, 10),), T0))
        store.announce_server(ServerSeen("b", (Band(1, 0, 10),), T0 + timedelta(seconds=5)))
        (a, b) = store.read_servers()
        store.forget_server("a", a.seen_at)
        store.forget_server("b", b.seen_at - timedelta(seconds=1))  # b renewed since: kept
        assert [seen.server for seen in store.read_servers()] == ["b"]

    def test_deleting_tasks_deletes_them_and_all_their_records_and_nothing_else(
        self, store: Any
    ) -> None:
        # Given a parent with two finished children, each with a record
        parent = make_doc("p")
        children = [
            TaskDoc(**{**make_doc(name).__dict__, "parent_id": "p", "root_id": "p"})
            for name in ("x", "y")
        ]
        store.insert_tasks([parent, *children])
        for name in ("x", "y"):
            store.insert_record(make_record(name))
            store.insert_record(
                make_record(name, record_id=outcome_id(name), kind=RecordKind.OUTCOME)
            )
            store.set_status(name, Status.SUCCEEDED, T0)
        # When one child is deleted
        assert delete_as_stored(store, ["x"]) == 1
        # Then it is gone, with its records; the other child and the parent stay
        assert store.load("x") is None
        assert store.insert_record(make_record("x", token="new")).token == "new"
        outcome = make_record("x", token="new", record_id=outcome_id("x"), kind=RecordKind.OUTCOME)
        assert store.insert_record(outcome).token == "new"
        assert [doc.task_id for doc in store.find_children("p")] == ["y"]
        assert store.load("y").run.token == "tok"
        assert store.load("p") is not None
        assert store.count_by_status() == {Status.QUEUED: 1, Status.SUCCEEDED: 1}

    def test_deleting_a_task_keeps_an_operators_retry_record_as_a_tombstone(
        self, store: Any
    ) -> None:
        # Given an unhandled task an operator retried
        store.insert_tasks([make_doc("t")])
        store.insert_record(make_record("t"))
        retry = make_record("t", token="op", record_id=retry_id("t"), kind=RecordKind.RETRY)
        store.insert_record(retry)
        store.set_status("t", Status.UNHANDLED, T0)
        # When it is deleted
        assert delete_as_stored(store, ["t"]) == 1
        # Then its run record is gone, but its retry record still wins an insert
        assert store.load("t") is None
        assert store.insert_record(make_record("t", token="new")).token == "new"
        again = make_record("t", token="again", record_id=retry_id("t"), kind=RecordKind.RETRY)
        assert store.insert_record(again).token == "op"

    def test_deleting_a_finished_task_inserted_again_deletes_every_copy(self, store: Any) -> None:
        # Given a finished task whose id was inserted again (MongoStore: a live copy)
        store.insert_tasks([make_doc("t1")])
        store.insert_record(make_record("t1"))
        store.set_status("t1", Status.SUCCEEDED, T0)
        store.insert_tasks([make_doc("t1")])
        # When it is deleted, twice
        assert delete_as_stored(store, ["t1"]) == 1
        assert delete_as_stored(store, ["t1"]) == 0
        # Then no copy is left anywhere
        assert store.load("t1") is None
        assert store.find_by_status(list(Status), 10) == []

    def test_deleting_a_task_takes_all_its_records_whatever_their_times(self, store: Any) -> None:
        # Given a finished task whose record was written by a clock two days ahead
        store.insert_tasks([make_doc("t")])
        store.insert_record(make_record("t", at=T0 + 2 * DAY))
        store.set_status("t", Status.SUCCEEDED, T0)
        # When it is deleted
        assert delete_as_stored(store, ["t"]) == 1
        # Then no record is left for a task stored again under its id to inherit
        store.insert_tasks([make_doc("t")])
        assert store.load("t").records == {}

    @pytest.mark.parametrize("ran", [False, True], ids=["queued", "ran"])
    def test_deleting_a_task_as_read_spares_one_stored_again_under_its_id_since(
        self, store: Any, ran: bool
    ) -> None:
        # Given a task that finished at T0, read by two prunes, and deleted by one;
        # then stored again under its id two days later (and perhaps run since)
        store.insert_tasks([make_doc("t")])
        store.insert_record(make_record("t"))
        store.set_status("t", Status.SUCCEEDED, T0)
        read = store.find_tasks(["t"])
        assert store.delete_tasks(read) == 1
        later = stored_time(T0 + 2 * DAY)
        store.insert_tasks([dataclasses.replace(make_doc("t"), created_at=later)])
        if ran:
            store.insert_record(make_record("t", token="new", at=later))
            store.set_status("t", Status.SUCCEEDED, later)
        # When the other prune deletes the task as it read it
        assert store.delete_tasks(read) == 0
        # Then the new task is kept, with its records
        view = store.load("t")
        assert view.task.created_at == later
        assert view.task.status == (Status.SUCCEEDED if ran else Status.QUEUED)
        assert [record.token for record in view.records.values()] == (["new"] if ran else [])

    def test_a_task_stored_again_by_key_between_two_racing_prunes_is_kept(self, store: Any) -> None:
        # Given a keyed task that ran and settled at T0
        spec = make_spec(n=1)
        (task_id,) = queue_keyed(store, "k", spec)
        store.insert_record(make_record(task_id))
        store.insert_record(
            make_record(task_id, record_id=outcome_id(task_id), kind=RecordKind.OUTCOME)
        )
        store.set_status(task_id, Status.SUCCEEDED, T0)
        # And, ten days later, a prune that has read it and is about to delete it
        now = T0 + 10 * DAY
        late = prune(MIN_AGE, now=now)
        delete = drive_until(store, late, DeleteTasks)
        # When another prune deletes it meanwhile, and the keyed call, repeated
        # late, stores it again (its application never saw the first answer)
        assert drive(store, prune(MIN_AGE, now=now)).deleted[Status.SUCCEEDED] == 1
        assert queue_keyed(store, "k", spec, now=now) == [task_id]
        # And the first prune then deletes what it judged
        drive_on(store, late, delete)
        # Then the task stored again is still there, to run
        view = store.load(task_id)
        assert view.task.status == Status.QUEUED
        assert view.task.created_at == stored_time(now)
        assert view.records == {}

    def test_find_tasks_gives_the_stored_documents_asked_for_a_live_copy_first(
        self, store: Any
    ) -> None:
        # Given a queued task, and a finished one whose id was inserted again
        store.insert_tasks([make_doc("q"), make_doc("f")])
        store.insert_record(make_record("f"))
        store.set_status("f", Status.SUCCEEDED, T0)
        store.insert_tasks([make_doc("f")])
        # When both are asked for, with a missing one and a repeat
        docs = store.find_tasks(["q", "nope", "f", "q"])
        # Then each stored one comes once, as load would give its hint
        assert sorted(doc.task_id for doc in docs) == ["f", "q"]
        hints = {doc.task_id: doc.status for doc in docs}
        assert hints["f"] is store.load("f").task.status
        assert store.find_tasks([]) == []

    def test_loading_many_gives_each_stored_task_once_as_load_gives_it(self, store: Any) -> None:
        # Given a queued task, a running one whose lease beat twice, and a finished
        # one with an outcome
        store.insert_tasks([make_doc("q"), make_doc("r"), make_doc("f")])
        store.insert_record(make_record("r", token="tok-r"))
        store.set_status("r", Status.RUNNING, None)
        store.beat(run_id("r"))
        store.beat(run_id("r"))
        store.insert_record(make_record("f"))
        store.insert_record(make_record("f", record_id=outcome_id("f"), kind=RecordKind.OUTCOME))
        store.set_status("f", Status.SUCCEEDED, T0)
        # When they are loaded at once, with a missing one and a repeat
        views = store.load_many(["r", "nope", "f", "q", "r"])
        # Then each stored one comes once, in the order asked, with its records and
        # heartbeat count, as load gives it
        assert [view.task_id for view in views] == ["r", "f", "q"]
        assert views == [store.load(task_id) for task_id in ("r", "f", "q")]
        assert views[0].records[run_id("r")].beat == 2
        assert set(views[1].records) == {run_id("f"), outcome_id("f")}
        assert store.load_many([]) == []

    def test_stored_ids_are_those_stored_live_or_finished_until_deleted(self, store: Any) -> None:
        # Given a queued task, a running one and a finished one
        store.insert_tasks([make_doc("q"), make_doc("r"), make_doc("f")])
        store.insert_record(make_record("r"))
        store.set_status("r", Status.RUNNING, None)
        store.insert_record(make_record("f"))
        store.set_status("f", Status.SUCCEEDED, T0)
        # Then each is stored, a missing one not, whatever the repeats
        assert store.stored_ids(["q", "nope", "f", "r", "q"]) == {"q", "r", "f"}
        assert store.stored_ids([]) == set()
        # And a deleted (pruned) one no longer is, unless an operator's retry record of
        # it is kept (a tombstone)
        store.insert_record(make_record("r", record_id=retry_id("r"), kind=RecordKind.RETRY))
        delete_as_stored(store, ["f", "r"])
        assert store.stored_ids(["f", "q", "r"]) == {"q", "r"}

    def test_a_keyed_call_repeated_stores_its_tasks_once_under_the_same_ids(
        self, store: Any
    ) -> None:
        # Given a call with a key that stored two tasks
        first = queue_keyed(store, "order-7", make_spec(n=1), make_spec(n=2))
        # When it is repeated, later
        again = queue_keyed(store, "order-7", make_spec(n=1), make_spec(n=2), now=T0 + DAY)
        # Then it gives the same ids and stores nothing new: the first call's tasks stand
        assert again == first
        assert len(set(first)) == 2
        assert len(store.find_by_status([Status.QUEUED], 10)) == 2
        assert store.load(first[0]).task.created_at == stored_time(T0)

    def test_a_keyed_call_repeated_after_its_task_finished_queues_nothing(self, store: Any) -> None:
        # Given a keyed task that ran and succeeded
        (task_id,) = queue_keyed(store, "order-7", make_spec(n=1))
        store.insert_record(make_record(task_id))
        store.set_status(task_id, Status.SUCCEEDED, T0)
        # When the call is repeated
        assert queue_keyed(store, "order-7", make_spec(n=1)) == [task_id]
        # Then the task is still the finished one, and nothing is queued again
        # (MongoStore: no live copy in the queue)
        assert store.find_by_status([Status.QUEUED], 10) == []
        assert store.load(task_id).task.status is Status.SUCCEEDED
        assert store.count_due([Status.QUEUED], 0, 10, T0 + DAY) == {}

    def test_a_keyed_call_matches_fields_as_the_store_gives_them_back(self, store: Any) -> None:
        # Given a keyed task with a tuple, a microsecond time, an enum member and a NaN
        fields = {"items": (1, "two"), "at": T0, "color": Color.RED, "ratio": math.nan}
        (task_id,) = queue_keyed(store, "k", make_spec(**fields))
        # When the call is repeated with the same values, or as the store gave them back
        again = queue_keyed(store, "k", make_spec(**fields))
        as_read = queue_keyed(store, "k", make_spec(**store.load(task_id).task.fields))
        # Then both are the same task
        assert again == as_read == [task_id]

    def test_a_keyed_call_with_a_different_task_is_refused_and_stores_nothing(
        self, store: Any
    ) -> None:
        # Given a call with a key that stored one task
        (stored,) = queue_keyed(store, "order-7", make_spec(amount=10))
        # When the key is used again for two tasks, the first of them different
        with pytest.raises(KeyConflict) as refused:
            queue_keyed(store, "order-7", make_spec(amount=12), make_spec(amount=1))
        # Then the error names the key, the stored task and the difference, and the
        # call stored nothing
        error = refused.value
        assert (error.key, error.index, error.task_id) == ("order-7", 0, stored)
        assert error.difference == "field 'amount': 10 stored, 12 given"
        assert "key='order-7' is already task" in str(error)
        assert [d.task_id for d in store.find_by_status([Status.QUEUED], 10)] == [stored]
        assert store.load(stored).task.fields == {"amount": 10}

    @pytest.mark.parametrize(
        ("given", "difference"),
        [
            (make_spec("tests:Other", amount=10), "stored Nothing, given Other"),
            (make_spec(amount=10, note="x"), "field 'note' only in the given task"),
            (make_spec(), "field 'amount' only in the stored task"),
            (make_spec(amount=10.5), "field 'amount': 10 stored, 10.5 given"),
            (make_spec(amount=10.0), "field 'amount': 10 stored, 10.0 given"),
        ],
    )
    def test_a_key_conflict_says_what_differs(
        self, store: Any, given: TaskSpec, difference: str
    ) -> None:
        queue_keyed(store, "k", make_spec(amount=10))
        with pytest.raises(KeyConflict) as refused:
            queue_keyed(store, "k", given)
        assert refused.value.difference == difference

    def test_a_key_conflict_tells_a_bool_from_the_int_python_finds_equal(self, store: Any) -> None:
        queue_keyed(store, "k", make_spec(on=1, items=[0]))
        for given in (make_spec(on=True, items=[0]), make_spec(on=1, items=[False])):
            with pytest.raises(KeyConflict):
                queue_keyed(store, "k", given)
        assert queue_keyed(store, "k", make_spec(on=1, items=[0])) == [keyed_task_id("k", 0)]

    def test_a_keyed_call_after_its_task_was_pruned_stores_it_again_unless_retried(
        self, store: Any
    ) -> None:
        # Given two keyed tasks that ended, the second one retried by an operator,
        # both pruned (deleted: the retry record stays as a tombstone)
        (plain,) = queue_keyed(store, "plain", make_spec(n=1))
        (retried,) = queue_keyed(store, "retried", make_spec(n=2))
        for task_id in (plain, retried):
            store.insert_record(make_record(task_id))
            store.set_status(task_id, Status.UNHANDLED, T0)
        store.insert_record(
            make_record(retried, record_id=retry_id(retried), kind=RecordKind.RETRY)
        )
        delete_as_stored(store, [plain, retried])
        # When each call is repeated
        # Then the first is stored again, as new; the second is refused, since a task
        # stored again under its id would inherit the old retry record
        assert queue_keyed(store, "plain", make_spec(n=1)) == [plain]
        assert store.load(plain).records == {}
        with pytest.raises(KeyConflict) as refused:
            queue_keyed(store, "retried", make_spec(n=2))
        assert refused.value.difference == KeyConflict.UNREADABLE
        assert "which can't be read (set aside as undecodable, or pruned" in str(refused.value)
        assert store.load(retried) is None

    def test_a_keyed_call_whose_task_is_pruned_and_stored_again_as_it_reads_compares_it(
        self, store: Any
    ) -> None:
        # Given a keyed task that ran, and a repeat of its call, days later, that
        # found it stored and is about to read it
        spec = make_spec(n=1)
        (task_id,) = queue_keyed(store, "k", spec)
        store.insert_record(make_record(task_id))
        store.set_status(task_id, Status.SUCCEEDED, T0)
        repeat = insert_keyed([spec], key="k", now=T0 + 10 * DAY)
        read = drive_until(store, repeat, LoadMany)
        # When the task is pruned before the read, so the call asks again, and
        # another repeat of the call stores it again before that
        delete_as_stored(store, [task_id])
        asked_again = repeat.send(perform(store, read))
        queue_keyed(store, "k", spec, now=T0 + 10 * DAY)
        # Then the call reads the task stored again, and returns its id
        assert drive_on(store, repeat, asked_again) == [task_id]
        assert len(store.find_tasks([task_id])) == 1

    def test_a_conflict_in_a_later_task_of_a_keyed_call_stores_none_of_it(self, store: Any) -> None:
        queue_keyed(store, "k", make_spec(n=0), make_spec(n=1))
        with pytest.raises(KeyConflict, match=r"\(task 1 of the call\)") as refused:
            queue_keyed(store, "k", make_spec(n=0), make_spec(n=9), make_spec(n=2))
        assert refused.value.index == 1
        assert len(store.find_by_status([Status.QUEUED], 10)) == 2

    def test_finished_tasks_keep_when_they_settled_and_are_read_by_id_after_an_id(
        self, store: Any
    ) -> None:
        # Given three tasks settled at different times, not in id order
        store.insert_tasks([make_doc(name) for name in ("a", "b", "c")])
        settled = T0.replace(microsecond=0)  # (stored to the millisecond)
        for name, minutes in (("a", 3), ("b", 1), ("c", 2)):
            store.insert_record(make_record(name))
            store.set_status(name, Status.SUCCEEDED, settled + timedelta(minutes=minutes))
        # Then the hint keeps its settling time, and pages after an id are in id order
        assert store.load("b").task.due_at == settled + timedelta(minutes=1)
        assert [d.task_id for d in store.find_by_status([Status.SUCCEEDED], 10)] == ["b", "c", "a"]
        pages = [store.find_by_status([Status.SUCCEEDED], 2, after) for after in ("", "b")]
        assert [[d.task_id for d in page] for page in pages] == [["a", "b"], ["c"]]


def is_about_now(when: datetime) -> bool:
    """Whether a store stamped ``when`` with its own clock (a server on this machine)."""
    return abs(when - datetime.now(UTC)) < timedelta(minutes=10)
