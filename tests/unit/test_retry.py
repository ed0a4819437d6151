"""Retrying an unhandled task's ``failed()`` (`tullius.retry`), on every in-process store.

Histories are written by the engine itself; ``now`` is always an argument.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import mongomock
import pytest

import tullius
from tests import histories
from tests.store_contract import T0, make_doc, make_record
from tullius.band import Band
from tullius.document import (
    Failure,
    FailureKind,
    Origin,
    Status,
    TaskSpec,
    retried_as,
    retry_id,
    status_of,
)
from tullius.effects import InsertTasks
from tullius.engine import JobKind, apply_step, claim, drive, finish
from tullius.errors import InvalidTransition, NotRetried, TaskNotFound, WriteWindowClosed
from tullius.events import Failed, HandlerFailed, HandlerSucceeded, Retried, Succeeded
from tullius.inspection import read_chain
from tullius.machine import step
from tullius.prune import MIN_AGE, prune
from tullius.retry import Retry, current_limits, retry, retry_all
from tullius.runtime.mongo_store import MongoStore
from tullius.sim.memory_store import MemoryStore
from tullius.store import Store, perform

DAY = timedelta(days=1)
NOW = T0 + 100 * DAY
ALL = Band(1, 0, 10)
REPLACEMENT = TaskSpec("tests:Next", {"n": 1}, 5, timedelta(seconds=5), timedelta(seconds=5), 3)


@pytest.fixture(params=["memory", "mongomock", "mongomock-sharded"])
def store(request: pytest.FixtureRequest) -> Iterator[Store]:
    if request.param == "memory":
        yield MemoryStore()
        return
    shards = 3 if request.param == "mongomock-sharded" else None
    mongo = MongoStore(mongomock.MongoClient(tz_aware=True)["tullius_test"], live_shards=shards)
    mongo.ensure_indexes()
    yield mongo


def unhandled(store: Store, task_id: str, *, at: Any = NOW, cls: str = "tests:Nothing") -> None:
    """`tests.histories.left_unhandled` at ``at``; the task is unhandled."""
    histories.left_unhandled(store, task_id, at=at, class_name=cls)
    view = store.load(task_id)
    assert view is not None
    assert status_of(view) is Status.UNHANDLED


def retried(store: Store, task_id: str, *, at: object = NOW, token: str = "op") -> Retry:
    return drive(store, retry(task_id, now=at, token=token, server="ops"))  # type: ignore[arg-type]


def handle_the_copy(store: Store, copy_id: str, *, at: object = NOW) -> None:
    """A daemon claims the copy's failed(), which succeeds and returns REPLACEMENT."""
    job = drive(store, claim(ALL, server="s", worker="w", token="copy-h", now=at))
    assert job is not None
    assert job.task_id == copy_id
    assert job.kind is JobKind.HANDLE
    drive(store, finish(job, HandlerSucceeded(job.token, (REPLACEMENT,)), now=at))


def test_a_retried_task_stays_unhandled_and_its_copy_is_born_failed_with_its_failure(
    store: Store,
) -> None:
    # Given a task whose run timed out and whose only failed() attempt raised
    unhandled(store, "t")
    # When an operator retries it
    done = retried(store, "t")
    # Then the task is still unhandled, and a copy of it is stored as failed, due now
    view = store.load("t")
    assert view is not None
    assert status_of(view) is Status.UNHANDLED
    assert done.new
    assert done.task_id == "t"
    copy = store.load(done.copy_id)
    assert copy is not None
    assert status_of(copy) is Status.FAILED
    assert copy.task.origin is Origin.RETRY
    assert copy.task.parent_id == "t"
    assert copy.task.class_name == view.task.class_name
    assert copy.task.fields == view.task.fields
    # And the copy's failure is the task's own: what its failed() will see
    assert copy.outcome is not None
    assert view.outcome is not None
    assert copy.outcome.failure == view.outcome.failure
    assert done.describe() == f"t: retried as {done.copy_id}; its failed() runs next"


def test_the_copys_failed_runs_next_and_its_replacement_is_queued_once(store: Store) -> None:
    unhandled(store, "t")
    done = retried(store, "t")
    # When a daemon claims work, it gets the copy's failed(), not a run
    handle_the_copy(store, done.copy_id)
    # Then the copy is handled, its replacement queued, and the chain reads through
    chain = read_chain(store, "t")
    assert [(link.status, link.origin) for link in chain] == [
        (Status.UNHANDLED, Origin.QUEUED),
        (Status.HANDLED, Origin.RETRY),
        (Status.QUEUED, Origin.REPLACEMENT),
    ]
    assert chain[1].failure is not None
    assert chain[1].failure.kind == FailureKind.TIMEOUT
    # And nothing else is due: run() is never claimed again for the task or its copy
    assert drive(store, claim(ALL, server="s", worker="w", token="x", now=NOW)) is not None
    assert drive(store, claim(ALL, server="s", worker="w", token="y", now=NOW)) is None


def test_asking_again_returns_the_first_retry_and_makes_no_second_copy(store: Store) -> None:
    unhandled(store, "t")
    first = retried(store, "t", token="op1")
    # When another operator asks again, later
    again = retried(store, "t", at=NOW + timedelta(hours=1), token="op2")
    # Then they are told of the first retry; there is one copy
    assert not again.new
    assert (again.copy_id, again.at, again.by) == (first.copy_id, first.at, "ops")
    assert [doc.task_id for doc in store.find_children("t")] == [first.copy_id]
    assert again.describe().startswith(f"t: already retried as {first.copy_id} at ")


def test_two_operators_racing_on_one_read_decide_one_retry(store: Store) -> None:
    unhandled(store, "t")
    view = store.load("t")
    assert view is not None
    # Given two operators who both read the task unhandled and decided a retry
    mine = step(view, Retried("op1", "ops1"), now=NOW)
    theirs = step(view, Retried("op2", "ops2"), now=NOW + timedelta(seconds=1))
    # When both apply their decisions
    won = drive(store, apply_step(view, mine, now=NOW))
    lost = drive(store, apply_step(view, theirs, now=NOW))
    # Then the first record stands, the second writer wrote nothing of its own
    assert won is not None
    assert lost is not None
    assert won.token == lost.token == "op1"
    assert len(store.find_children("t")) == 1


@pytest.mark.parametrize("writes_landed", [1, 2, 3])
def test_a_retry_cut_short_is_completed_by_asking_again(store: Store, writes_landed: int) -> None:
    # Given a retry whose writer stopped after its record (and maybe the copy's records)
    unhandled(store, "t")
    view = store.load("t")
    assert view is not None
    decided = step(view, Retried("op1", "ops"), now=NOW)
    for effect in decided.effects[:writes_landed]:
        perform(store, effect)
    copy_id = derive_copy_id(store, "t")
    assert store.load(copy_id) is None
    # When an operator asks again within a day
    again = retried(store, "t", at=NOW + timedelta(hours=20), token="op2")
    # Then the copy is stored, failed, with the first retry's records
    assert not again.new
    copy = store.load(copy_id)
    assert copy is not None
    assert status_of(copy) is Status.FAILED
    assert copy.run is not None
    assert copy.run.token == "op1"


def test_an_old_retry_whose_copy_is_missing_is_reported_and_not_made_again(store: Store) -> None:
    # Given a retry cut short right after its record, two days ago
    unhandled(store, "t", at=NOW - 2 * DAY)
    view = store.load("t")
    assert view is not None
    perform(store, step(view, Retried("op1", "ops"), now=NOW - 2 * DAY).effects[0])
    # When an operator asks again now
    again = retried(store, "t")
    # Then they are told the copy is not stored, and nothing is written: it may
    # have run and been pruned meanwhile
    assert (again.new, again.stored) == (False, False)
    assert store.load(derive_copy_id(store, "t")) is None
    assert again.describe().endswith(
        f"; {again.copy_id} is no longer stored (pruned once done with, or never written), "
        "and is not written again, as it may have run"
    )


def test_a_pruned_copy_never_comes_back_when_asked_again(store: Store) -> None:
    # Given a task retried ten days ago, whose copy was handled then and pruned since
    unhandled(store, "t", at=NOW - 10 * DAY)
    done = retried(store, "t", at=NOW - 10 * DAY)
    handle_the_copy(store, done.copy_id, at=NOW - 10 * DAY)
    drive(store, prune(MIN_AGE, now=NOW))
    assert store.load(done.copy_id) is None
    assert store.load("t") is not None  # unhandled: kept without --prune-unhandled
    # When an operator asks again, or retries every unhandled task
    assert not retried(store, "t").stored
    report = drive(store, retry_all(now=NOW, token="op", server="ops"))
    assert report.describe() == (
        "retried 0 unhandled task(s); 1 retried before (1 of their copies no longer stored)"
    )
    # Then the copy (and so its failed()) does not come back
    copy = store.load(done.copy_id)
    assert copy is None
    assert store.insert_record(make_record(done.copy_id, token="probe")).token == "probe"


@pytest.mark.parametrize("status", ["queued", "running", "failed", "succeeded", "handled"])
def test_only_an_unhandled_task_is_retried(store: Store, status: str) -> None:
    store.insert_tasks([make_doc("t")])
    if status != "queued":
        job = drive(store, claim(ALL, server="s", worker="w", token="run", now=NOW))
        assert job is not None
        if status == "succeeded":
            drive(store, finish(job, Succeeded(job.token), now=NOW))
        elif status != "running":
            failure = Failure(FailureKind.EXCEPTION, "boom", NOW)
            drive(store, finish(job, Failed(job.token, failure), now=NOW))
            if status == "handled":
                job = drive(store, claim(ALL, server="s", worker="w", token="h", now=NOW))
                assert job is not None
                drive(store, finish(job, HandlerSucceeded(job.token), now=NOW))
    with pytest.raises(NotRetried, match=f"its status is '{status}'; expected 'unhandled'"):
        retried(store, "t")
    assert store.find_children("t") == []


def test_an_unknown_task_is_not_found(store: Store) -> None:
    with pytest.raises(TaskNotFound, match="no task with task_id='nope'"):
        retried(store, "nope")


def test_a_retry_past_its_write_window_writes_nothing(store: Store) -> None:
    unhandled(store, "t")
    # When the retry's window closed before its first write (a process frozen a day)
    with pytest.raises(WriteWindowClosed, match="InsertRecord given up"):
        drive(store, retry("t", now=NOW, token="op", server="ops"), write_by=0.0, clock=lambda: 1.0)
    # Then the task has no retry record and no copy
    view = store.load("t")
    assert view is not None
    assert retry_id("t") not in view.records
    assert store.find_children("t") == []


def test_a_copy_that_fails_again_ends_unhandled_and_can_be_retried_in_turn(store: Store) -> None:
    unhandled(store, "t")
    copy_id = retried(store, "t").copy_id
    job = drive(store, claim(ALL, server="s", worker="w", token="copy-h", now=NOW))
    assert job is not None
    error = Failure(FailureKind.EXCEPTION, "still broken", NOW)
    drive(store, finish(job, HandlerFailed(job.token, error), now=NOW))
    copy = store.load(copy_id)
    assert copy is not None
    assert status_of(copy) is Status.UNHANDLED
    # When the copy is retried in turn, its copy has the first task's failure still
    second = retried(store, copy_id, at=NOW + DAY)
    grandchild = store.load(second.copy_id)
    assert grandchild is not None
    assert grandchild.outcome is not None
    assert grandchild.outcome.failure is not None
    assert grandchild.outcome.failure.message == "slow"
    assert [link.task_id for link in read_chain(store, "t")] == ["t", copy_id, second.copy_id]


def test_retry_all_takes_every_unhandled_task_of_a_class_but_not_its_own_copies(
    store: Store,
) -> None:
    # Given unhandled tasks of two classes, one retried before
    unhandled(store, "a1", cls="billing:Invoice")
    unhandled(store, "a2", cls="billing:Invoice")
    unhandled(store, "b1", cls="mail:Notice")
    retried(store, "a2", at=NOW - timedelta(hours=1))
    # When every unhandled Invoice is retried
    report = drive(
        store, retry_all(now=NOW, token="op", server="ops", class_name="Invoice", batch=1)
    )
    # Then a1 is retried, a2 reported as retried before, b1 left alone
    assert [done.task_id for done in report.retried] == ["a1"]
    assert [done.task_id for done in report.earlier] == ["a2"]
    assert report.refused == []
    assert store.find_children("b1") == []
    assert report.describe() == "retried 1 unhandled task(s); 1 retried before"


def test_retry_all_does_not_retry_a_copy_it_made_that_failed_again(store: Store) -> None:
    # Given an unhandled task "0", whose copy's id comes after it in id order
    unhandled(store, "0")
    # When retry_all retries it, and the copy's failed() fails at once, while
    # retry_all goes on through later pages
    conversation = retry_all(now=NOW, token="op", server="ops", batch=1)
    op = next(conversation)
    while True:
        result = perform(store, op)
        if isinstance(op, InsertTasks) and op.docs[0].origin is Origin.RETRY:
            job = drive(store, claim(ALL, server="s", worker="w", token="copy-h", now=NOW))
            assert job is not None
            error = Failure(FailureKind.EXCEPTION, "still broken", NOW)
            drive(store, finish(job, HandlerFailed(job.token, error), now=NOW))
        try:
            op = conversation.send(result)
        except StopIteration as stop:
            report = stop.value
            break
    # Then the copy, unhandled too by the time retry_all reached it, is not retried
    [done] = report.retried
    assert done.copy_id > "0"
    copy = store.load(done.copy_id)
    assert copy is not None
    assert status_of(copy) is Status.UNHANDLED
    assert store.find_children(done.copy_id) == []


@pytest.mark.parametrize("task_id", ["0", "~"])  # its id sorting before its copy's, or after
def test_retry_all_retries_an_earlier_retrys_copy_that_failed_again(
    store: Store, task_id: str
) -> None:
    # Given a task retried before, whose copy failed again
    unhandled(store, task_id)
    first = retried(store, task_id, at=NOW - timedelta(hours=1))
    assert (task_id < first.copy_id) == (task_id == "0")
    job = drive(store, claim(ALL, server="s", worker="w", token="copy-h", now=NOW))
    assert job is not None
    error = Failure(FailureKind.EXCEPTION, "still broken", NOW)
    drive(store, finish(job, HandlerFailed(job.token, error), now=NOW))
    # When every unhandled task is retried, each result told as it comes
    told: list[str] = []
    report = drive(
        store,
        retry_all(now=NOW, token="op", server="ops", on_each=lambda r: told.append(r.describe())),
    )
    # Then the copy is retried, and then the task is told as retried before, its copy
    # unhandled too and retried now: in either order of ids, never advised to be
    # retried by hand (once told so just before this very pass retried it)
    [done] = report.retried
    assert done.task_id == first.copy_id
    [earlier] = report.earlier
    assert earlier.copy_status is Status.UNHANDLED
    assert told == [
        done.describe(),
        f"{task_id}: already retried as {first.copy_id} at "
        f"{first.at.isoformat(timespec='seconds')} by {first.by}; "
        f"{first.copy_id} is unhandled too, and retried as {done.copy_id}",
    ]
    assert report.classes == {"tests:Nothing": 2}


def derive_copy_id(store: Store, task_id: str) -> str:
    view = store.load(task_id)
    assert view is not None
    copy = retried_as(view)
    assert copy is not None
    return copy.task_id


def prune_in_the_middle_of_reading_records(store: MongoStore) -> Iterator[list[object]]:
    """Have a prune of unhandled tasks delete task ``t`` (but its retry record)
    just before the first read of its records that a load makes after reading its
    document: one by one along the chain (`retry`), or all at once (`retry_all`)."""
    pruned: list[object] = []
    read_one, read_all = store.records.find_one, store.records.find

    def prune_first() -> None:
        if not pruned:
            pruned.append(drive(store, prune(MIN_AGE, now=NOW, unhandled=True)))

    def find_one(query: Any, *args: Any, **kwargs: Any) -> Any:
        if query == {"_id": retry_id("t")}:
            prune_first()
        return read_one(query, *args, **kwargs)

    def find(query: Any = None, *args: Any, **kwargs: Any) -> Any:
        if query == {"task_id": {"$in": ["t"]}}:
            prune_first()
        return read_all(query, *args, **kwargs)

    store.records.find_one = find_one  # type: ignore[method-assign]
    store.records.find = find  # type: ignore[method-assign]
    yield pruned
    store.records.find_one, store.records.find = read_one, read_all  # type: ignore[method-assign]
    assert pruned, "the prune was never set off"


@pytest.mark.parametrize("one_by_one", [True, False], ids=["retry", "retry_all"])
def test_a_retry_asked_for_while_its_task_is_pruned_finds_the_first_retry(
    one_by_one: bool,
) -> None:
    # Given a task retried long ago, whose copy was handled and pruned since
    store = MongoStore(mongomock.MongoClient(tz_aware=True)["db"], live_shards=3)
    store.ensure_indexes()
    unhandled(store, "t", at=NOW - 30 * DAY)
    done = retried(store, "t", at=NOW - 30 * DAY)
    handle_the_copy(store, done.copy_id, at=NOW - 30 * DAY)
    drive(store, prune(MIN_AGE, now=NOW - 10 * DAY))
    assert store.load(done.copy_id) is None
    # When it is retried again (alone, whose records the sharded layout reads one by
    # one, or with every unhandled task, whose records are read at once) while a
    # prune of unhandled tasks deletes it between the reads of its document and of
    # its records
    results: list[Retry | NotRetried] = []
    for _ in prune_in_the_middle_of_reading_records(store):
        if one_by_one:
            with contextlib.suppress(NotRetried, TaskNotFound):
                results.append(drive(store, retry("t", now=NOW, token="op2", server="ops2")))
        else:
            report = drive(store, retry_all(now=NOW, token="op2", server="ops2"))
            results += [*report.retried, *report.earlier, *report.refused]
    # Then the load still saw the first retry (a tombstone the prune keeps), or
    # refused the half-deleted task: no new retry is decided, and the pruned copy
    # does not come back to run again
    assert store.load("t") is None
    assert not any(isinstance(result, Retry) and result.new for result in results)
    assert store.load(done.copy_id) is None
    claimed = [
        job.task_id
        for n in range(3)
        if (job := drive(store, claim(ALL, server="s", worker="w", token=f"j{n}", now=NOW)))
    ]
    assert done.copy_id not in claimed  # (the copy's replacement, unrun, may be claimed)


def test_a_retry_decided_on_a_retried_task_is_refused_by_the_machine(store: Store) -> None:
    unhandled(store, "t")
    retried(store, "t")
    view = store.load("t")
    assert view is not None
    with pytest.raises(InvalidTransition, match="already retried as task"):
        step(view, Retried("op2", "ops"), now=NOW)


def test_the_copy_takes_the_limits_the_retry_found_on_the_class(store: Store) -> None:
    # Given an unhandled task stored with one failed() attempt of 60 s
    unhandled(store, "t")
    # When it is retried by a process whose class now allows 4 attempts of 2 minutes
    asked: list[str] = []

    def limits(class_name: str) -> tuple[timedelta, int]:
        asked.append(class_name)
        return timedelta(minutes=2), 4

    done = drive(store, retry("t", now=NOW, token="op", server="ops", limits=limits))
    # Then the copy has them; the task keeps its own
    copy = store.load(done.copy_id)
    task = store.load("t")
    assert copy is not None
    assert task is not None
    assert (copy.task.handler_timeout, copy.task.handler_attempts) == (timedelta(minutes=2), 4)
    assert task.task.handler_attempts == 1
    assert asked == [task.task.class_name]


def test_current_limits_are_the_loaded_classs_or_none_if_it_cannot_be_loaded() -> None:
    assert current_limits("tests.unit.test_retry:Limited") == (timedelta(minutes=3), 7)
    assert current_limits("no.such.module:Nothing") is None


class Limited(tullius.Task):
    timeout = timedelta(seconds=1)
    failed_timeout = timedelta(minutes=3)
    failed_attempts = 7

    def run(self) -> None:
        return None


def test_a_copy_set_aside_as_undecodable_is_reported_so_not_as_completed() -> None:
    # Given a retried task whose copy a daemon older than retries set aside (it can't
    # read the origin "retry")
    store = MongoStore(mongomock.MongoClient(tz_aware=True)["db"])
    store.ensure_indexes()
    unhandled(store, "t")
    done = retried(store, "t")
    store.tasks.update_one({"_id": done.copy_id}, {"$set": {"origin": "bogus"}})
    assert store.find_tasks([done.copy_id]) == []  # (this read sets it aside)
    # When the operator asks again
    again = retried(store, "t", at=NOW + timedelta(minutes=5), token="op2")
    # Then they are told it is stored but can't be read, not that it was completed
    assert (again.unreadable, again.completed, again.copy_status) == (True, False, None)
    assert "is stored but set aside as undecodable" in again.describe()


def test_a_dry_run_of_a_retry_cut_short_says_it_would_complete_it_and_writes_nothing(
    store: Store,
) -> None:
    unhandled(store, "t")
    view = store.load("t")
    assert view is not None
    perform(store, step(view, Retried("op1", "ops"), now=NOW).effects[0])
    done = drive(store, retry("t", now=NOW, token="op2", server="ops", dry_run=True))
    assert done.dry_run
    assert done.describe().endswith(
        f"; {done.copy_id} is missing (that retry was cut short) and would be stored"
    )
    assert store.load(done.copy_id) is None


def test_the_public_call_retries_within_a_window_and_may_only_say_what_it_would_do() -> None:
    store = MemoryStore()
    unhandled(store, "t", at=datetime.now(UTC) - timedelta(hours=1))
    would = tullius.retry_unhandled("t", store=store, dry_run=True)
    assert (would.new, would.dry_run) == (True, True)
    assert store.find_children("t") == []
    done = tullius.retry_unhandled("t", store=store)
    assert (done.new, done.copy_id) == (True, would.copy_id)
    assert done.by.startswith("retry_unhandled() on ")
    assert store.load(done.copy_id) is not None
    with pytest.raises(tullius.ConfigError, match="123 is not a task; expected a queued Task"):
        tullius.retry_unhandled(123, store=store)  # type: ignore[arg-type]
