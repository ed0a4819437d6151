"""Pruning finished tasks (`tullius.prune`), on every in-process store.

Histories are written by the engine itself at chosen times, so that what a
prune keeps or deletes depends on the records' real times; ``now`` is always
an argument.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import mongomock
import pytest

from tests.store_contract import T0, make_doc, make_record, make_spec, queue_keyed
from tullius.band import Band
from tullius.document import (
    Failure,
    FailureKind,
    Origin,
    RecordKind,
    Status,
    TaskDoc,
    TaskSpec,
    handler_id,
    outcome_id,
    retried_as,
    run_id,
)
from tullius.engine import claim, drive, finish, repair
from tullius.errors import WriteWindowClosed
from tullius.events import Failed, HandlerFailed, HandlerSucceeded, Succeeded
from tullius.machine import step
from tullius.prune import MIN_AGE, PruneReport, prune
from tullius.retry import retry
from tullius.runtime.mongo_store import MongoStore
from tullius.sim.memory_store import MemoryStore
from tullius.store import Store, perform

DAY = timedelta(days=1)
SEC = timedelta(seconds=1)
NOW = T0 + 100 * DAY
ALL = Band(1, 0, 10)


@pytest.fixture(params=["memory", "mongomock", "mongomock-sharded"])
def store(request: pytest.FixtureRequest) -> Iterator[Store]:
    if request.param == "memory":
        yield MemoryStore()
        return
    yield mongomock_store(3 if request.param == "mongomock-sharded" else None)


def mongomock_store(shards: int | None = None) -> MongoStore:
    store = MongoStore(mongomock.MongoClient(tz_aware=True)["tullius_test"], live_shards=shards)
    store.ensure_indexes()
    return store


def finished_long_ago_then_queued_again(task_id: str) -> MongoStore:
    """A task that succeeded 10 days ago, whose id was queued again: a live copy,
    which the next claim or sweep that loads it deletes (`MongoStore` only)."""
    store = mongomock_store()
    queued(store, task_id)
    run_to_the_end(store, task_id, at=NOW - 10 * DAY)
    queued(store, task_id)
    return store


def run_to_the_end(
    store: Store, task_id: str, *, at: Any, ok: bool = True, successors: tuple[TaskSpec, ...] = ()
) -> None:
    """Claim ``task_id`` (the only due task) at ``at`` and end its run."""
    job = drive(store, claim(ALL, server="s", worker="w", token=f"{task_id}-run", now=at))
    assert job is not None
    assert job.task_id == task_id
    failure = Failure(FailureKind.EXCEPTION, "boom", at)
    event = Succeeded(job.token, successors) if ok else Failed(job.token, failure)
    drive(store, finish(job, event, now=at))


def handle(store: Store, task_id: str, *, at: Any, replacement: TaskSpec | None = None) -> None:
    """Claim ``task_id``'s failed() at ``at``; it succeeds, queuing ``replacement``."""
    job = drive(store, claim(ALL, server="s", worker="w", token=f"{task_id}-h", now=at))
    assert job is not None
    assert job.task_id == task_id
    specs = () if replacement is None else (replacement,)
    drive(store, finish(job, HandlerSucceeded(job.token, specs), now=at))


def left_unhandled(store: Store, task_id: str, *, at: Any) -> None:
    """Queue ``task_id``; at ``at`` its run fails, and so does its only failed() attempt."""
    queued(store, task_id, handler_attempts=1)
    fails_for_good(store, task_id, at=at)


def fails_for_good(store: Store, task_id: str, *, at: Any) -> None:
    """At ``at`` the run of ``task_id`` (the only due task) fails, and so does its
    failed(), which has one attempt."""
    run_to_the_end(store, task_id, at=at, ok=False)
    job = drive(store, claim(ALL, server="s", worker="w", token=f"{task_id}-h", now=at))
    assert job is not None
    assert job.task_id == task_id
    error = Failure(FailureKind.EXCEPTION, "failed() raised", at)
    drive(store, finish(job, HandlerFailed(job.token, error), now=at))


def queued(store: Store, task_id: str, **changes: Any) -> None:
    store.insert_tasks([TaskDoc(**{**make_doc(task_id).__dict__, **changes})])


def pruned(store: Store, older_than: timedelta = MIN_AGE, **options: Any) -> PruneReport:
    return drive(store, prune(older_than, now=NOW, **options))


def test_a_task_that_succeeded_long_ago_is_deleted_with_its_records(store: Store) -> None:
    # Given a task that succeeded 10 days ago and one that is still queued
    queued(store, "old")
    run_to_the_end(store, "old", at=NOW - 10 * DAY)
    queued(store, "waiting")
    # When tasks finished over three days ago are pruned
    report = pruned(store)
    # Then the old one is gone with its two records; the queued one is untouched
    assert store.load("old") is None
    assert report.deleted == {Status.SUCCEEDED: 1}
    assert records_gone(store, run_id("old"), outcome_id("old"))
    assert store.load("waiting") is not None
    assert report.describe(MIN_AGE) == (
        "deleted 1 task(s) finished over 3 day(s) ago, with their records (succeeded 1)"
    )


def test_a_task_is_kept_until_the_age_plus_its_own_timeout_has_passed(store: Store) -> None:
    # Given two tasks with a 5 s timeout and a 60 s failed_timeout, finished three
    # days and 59 s ago, and three days and 61 s ago
    for name, ago in (("just", 3 * DAY + 59 * SEC), ("past", 3 * DAY + 61 * SEC)):
        queued(store, name)
        run_to_the_end(store, name, at=NOW - ago)
    # When tasks finished over three days ago are pruned
    report = pruned(store)
    # Then only the one past the age plus its longest time limit is deleted
    assert store.load("past") is None
    assert store.load("just") is not None
    assert report.kept == {"too young": 1}
    assert report.describe(MIN_AGE).endswith("; kept 1 too young")


def test_unhandled_tasks_are_kept_unless_asked_for(store: Store) -> None:
    # Given a task whose only failed() attempt failed 10 days ago: unhandled
    left_unhandled(store, "lost", at=NOW - 10 * DAY)
    # When old tasks are pruned without asking for unhandled ones, then asking
    first = pruned(store)
    assert store.load("lost") is not None
    second = pruned(store, unhandled=True)
    # Then only the second prune deletes it
    assert first.deleted == {}
    assert second.deleted == {Status.UNHANDLED: 1}
    assert store.load("lost") is None


def test_a_handled_failure_and_its_replacement_go_once_both_are_old(store: Store) -> None:
    # Given a failure handled 10 days ago by queuing a replacement that succeeded
    queued(store, "first")
    run_to_the_end(store, "first", at=NOW - 10 * DAY, ok=False)
    spec = dataclasses.replace(_spec_of(store, "first"), fields={"n": 2})
    handle(store, "first", at=NOW - 10 * DAY, replacement=spec)
    (replacement,) = store.find_children("first")
    run_to_the_end(store, replacement.task_id, at=NOW - 9 * DAY)
    # When old tasks are pruned
    report = pruned(store)
    # Then both are gone, with their records
    assert report.deleted == {Status.HANDLED: 1, Status.SUCCEEDED: 1}
    assert records_gone(store, run_id("first"), outcome_id("first"), handler_id("first", 1))
    assert store.load("first") is None
    assert store.load(replacement.task_id) is None


def _spec_of(store: Store, task_id: str) -> TaskSpec:
    view = store.load(task_id)
    assert view is not None
    task = view.task
    return TaskSpec(
        class_name=task.class_name,
        fields=dict(task.fields),
        priority=task.priority,
        timeout=task.timeout,
        handler_timeout=task.handler_timeout,
        handler_attempts=task.handler_attempts,
        start_after=task.start_after,
    )


def test_a_task_whose_parent_has_not_settled_is_kept(store: Store) -> None:
    # Given a child that succeeded 10 days ago, whose parent's hint still says
    # running (its move was cut short: a repair would insert the child again)
    queued(store, "parent")
    job = drive(store, claim(ALL, server="s", worker="w", token="p", now=NOW - 10 * DAY))
    assert job is not None
    queued(store, "child", parent_id="parent", root_id="parent", origin=Origin.SUCCESSOR)
    run_to_the_end(store, "child", at=NOW - 10 * DAY)
    # When old tasks are pruned
    report = pruned(store)
    # Then the child stays, so that a repeated insert can't bring it back to run again
    assert store.load("child") is not None
    assert report.kept == {"parent too young": 1}


def test_a_child_stays_while_its_parents_own_writers_could_still_insert_it(store: Store) -> None:
    # Given a parent with a 5-day timeout that succeeded 7 days ago, queuing a
    # child that succeeded at once: the parent's verdict writer, cut off before
    # its hint write, may still repeat its inserts until a day after its claim
    # and its 5-day time limit
    queued(store, "parent", timeout=5 * DAY)
    child_spec = dataclasses.replace(_spec_of(store, "parent"), timeout=5 * SEC)
    run_to_the_end(store, "parent", at=NOW - 7 * DAY, successors=(child_spec,))
    (child,) = store.find_children("parent")
    run_to_the_end(store, child.task_id, at=NOW - 7 * DAY)
    # When tasks finished over three days ago are pruned
    report = pruned(store)
    # Then the child is kept, as is the parent (its own age rule), until the
    # parent's window has closed too: 3 days plus its 5-day time limit
    assert store.load(child.task_id) is not None
    assert report.kept == {"parent too young": 1, "too young": 1}
    later = drive(store, prune(MIN_AGE, now=NOW + 2 * DAY))
    assert later.deleted == {Status.SUCCEEDED: 2}


def test_age_counts_from_when_the_task_settled_not_from_its_last_record(store: Store) -> None:
    # Given a task whose outcome was recorded 10 days ago, whose server died
    # before settling it, settled by a repair only an hour ago
    queued(store, "late")
    job = drive(store, claim(ALL, server="s", worker="w", token="r", now=NOW - 10 * DAY))
    assert job is not None
    outcome = step(job.view, Succeeded(job.token), now=NOW - 10 * DAY).record
    assert outcome is not None
    store.insert_record(outcome)
    view = store.load("late")
    assert view is not None
    drive(store, repair(view, now=NOW - timedelta(hours=1)))
    # When old tasks are pruned
    report = pruned(store)
    # Then it is kept: a writer that read it unsettled may write for a day more
    assert store.load("late") is not None
    assert report.kept == {"too young": 1}


def test_a_prune_cut_short_among_the_records_is_completed_by_the_next(store: Store) -> None:
    # Given an old finished task that lost its run record alone (a delete cut short)
    queued(store, "old")
    run_to_the_end(store, "old", at=NOW - 10 * DAY)
    if isinstance(store, MongoStore):
        store.records.delete_one({"_id": run_id("old")})
    else:
        _drop_record(store, "old", run_id("old"))
    # When old tasks are pruned
    report = pruned(store)
    # Then the leftover goes, with the record left behind
    assert store.load("old") is None
    assert report.deleted == {Status.SUCCEEDED: 1}
    assert store.insert_record(make_record("old", token="new", record_id=outcome_id("old")))
    assert store.load("old") is None


def _drop_record(store: MemoryStore, task_id: str, record_id: str) -> None:
    del store._records[record_id]
    del store._records_by_task[task_id][record_id]


def records_gone(store: Store, *record_ids: str) -> bool:
    """Whether none of these records is stored (a new one under each id is inserted)."""
    return all(
        store.insert_record(make_record(r.partition(":")[0], token="probe", record_id=r)).token
        == "probe"
        for r in record_ids
    )


def test_a_task_settled_before_settling_times_were_written_is_aged_by_its_records(
    store: Store,
) -> None:
    # Given two tasks whose terminal hints carry no settling time (an older
    # version wrote them), one whose records are 10 days old, one 1 hour old,
    # and one whose records were all deleted by a prune cut short
    for name, at in (("old", NOW - 10 * DAY), ("young", NOW - timedelta(hours=1))):
        queued(store, name)
        store.insert_record(make_record(name, at=at))
        outcome = make_record(name, record_id=outcome_id(name), at=at, kind=RecordKind.OUTCOME)
        store.insert_record(dataclasses.replace(outcome, ok=True))
        store.set_status(name, Status.SUCCEEDED, None)
    queued(store, "leftover")
    store.set_status("leftover", Status.SUCCEEDED, None)
    # When old tasks are pruned
    report = pruned(store)
    # Then the old one and the leftover go, and the young one stays
    assert report.deleted == {Status.SUCCEEDED: 2}
    assert report.kept == {"too young": 1}
    assert store.load("young") is not None


def test_a_finished_task_inserted_again_is_left_to_the_repairs() -> None:
    # Given an old finished task whose id was queued again
    store = finished_long_ago_then_queued_again("again")
    # When old tasks are pruned
    report = pruned(store)
    # Then it is kept: its live copy's hint is not terminal
    assert report.kept == {"not settled": 1}
    assert store.find_tasks(["again"])[0].status is Status.QUEUED


def test_a_prune_reads_and_deletes_page_by_page(store: Store) -> None:
    # Given seven old finished tasks
    for n in range(7):
        queued(store, f"t{n}")
        run_to_the_end(store, f"t{n}", at=NOW - 10 * DAY)
    # When they are pruned two at a time
    report = pruned(store, batch=2)
    # Then every one is gone
    assert report.deleted == {Status.SUCCEEDED: 7}
    assert store.count_by_status() == {}


def test_a_prune_asked_for_one_page_at_a_time_says_where_to_go_on(store: Store) -> None:
    # Given five old finished tasks
    for n in range(5):
        queued(store, f"t{n}")
        run_to_the_end(store, f"t{n}", at=NOW - 10 * DAY)
    # When they are pruned two at a time, one page per call, each call going on
    # where the last one stopped
    reports, after = [], ""
    while after is not None:
        reports.append(pruned(store, batch=2, after=after, pages=1))
        after = reports[-1].resume_after
    # Then each call deleted one page, and the one that found no more said so
    assert [sum(r.deleted.values()) for r in reports] == [2, 2, 1, 0]
    assert [r.resume_after for r in reports] == ["t1", "t3", "t4", None]
    assert store.count_by_status() == {}


def test_a_page_too_young_as_listed_is_kept_without_reading_it_again(store: Store) -> None:
    # Given three tasks that succeeded a day ago
    for n in range(3):
        queued(store, f"t{n}")
        run_to_the_end(store, f"t{n}", at=NOW - DAY)
    # When they are pruned, the operations asked for noted
    asked: list[str] = []
    conversation = prune(MIN_AGE, now=NOW, batch=2)
    result: Any = None
    try:
        while True:
            op = conversation.send(result)
            asked.append(type(op).__name__)
            result = perform(store, op)
    except StopIteration as stop:
        report = stop.value
    # Then only the pages were read: each was too young as listed
    assert asked == ["FindByStatus", "FindByStatus", "FindByStatus"]
    assert report.kept == {"too young": 3}


@pytest.mark.parametrize("pages", [0, -1])
def test_a_prune_of_no_pages_is_refused(pages: int) -> None:
    with pytest.raises(ValueError, match=rf"pages={pages} must be at least 1"):
        next(prune(MIN_AGE, now=NOW, pages=pages))


@pytest.mark.parametrize("days", [0, 1, 2.99])
def test_an_age_under_three_days_is_refused_before_anything_is_read(days: float) -> None:
    with pytest.raises(ValueError, match=rf"older_than={days:g} day\(s\) .* at least 3 day"):
        next(prune(timedelta(days=days), now=NOW))


def test_a_write_past_its_window_is_given_up_and_nothing_is_written() -> None:
    # Given a queued task, and a claim whose write window closed before its lease insert
    store = MemoryStore()
    queued(store, "t")
    conversation = claim(ALL, server="s", worker="w", token="late", now=T0)
    # When it is driven with the window closed at 150, the clock reading 200
    with pytest.raises(WriteWindowClosed, match="InsertRecord given up: 50 s past"):
        drive(store, conversation, write_by=150.0, clock=lambda: 200.0)
    # Then nothing was written: the task is still queued, with no record
    view = store.load("t")
    assert view is not None
    assert (view.task.status, dict(view.records)) == (Status.QUEUED, {})


def test_a_conversation_that_only_reads_is_not_held_back_past_its_window() -> None:
    store = MemoryStore()
    queued(store, "t")
    docs = drive(store, prune(MIN_AGE, now=NOW), write_by=0.0, clock=lambda: 1.0)
    assert docs.deleted == {}


def test_a_claim_whose_lease_wins_on_a_task_pruned_since_its_read_does_not_run_it(
    store: Store,
) -> None:
    from tullius.engine import CLAIM_READ, REUSE_CANDIDATES_FOR, Candidates, claim_many

    # Given a claim that read two due tasks, ran the first, and kept the second
    queued(store, "a")
    queued(store, "b")
    kept = Candidates(REUSE_CANDIDATES_FOR)

    def claim_for(token: str) -> list[Any]:
        return drive(
            store,
            claim_many(
                ALL, server="s", workers=[("w", token)], now=T0, batch=CLAIM_READ, candidates=kept
            ),
        )

    assert [job.task_id for job in claim_for("first")] == ["a"]
    assert [doc.task_id for doc in kept.docs] == ["b"]
    # When the second is deleted (a prune: documents first, then records) and
    # the next claim tries the candidate it kept
    store.delete_tasks(store.find_tasks(["b"]))
    jobs = claim_for("second")
    # Then its lease insert wins (nothing is left to lose to), but it is no job
    assert jobs == []
    assert store.load("b") is None


def test_a_finished_tasks_copy_dropped_or_moved_again_makes_it_young_again() -> None:
    # Given an old finished task whose id was queued again
    store = finished_long_ago_then_queued_again("again")
    # When a load drops the copy (anyone who read it may still act for a window)
    view = store.load("again")
    assert view is not None
    assert view.task.status is Status.SUCCEEDED
    # Then its settling time is now, and a prune keeps it for the whole age again
    (settled,) = store.find_tasks(["again"])
    assert settled.due_at is not None
    assert settled.due_at > NOW - 10 * DAY + timedelta(days=5)
    # And a copy moved again by a repair moves the settling time up too
    store.finished.update_one({"_id": "again"}, {"$set": {"due_at": NOW - 10 * DAY}})
    queued(store, "again")
    store.set_status("again", Status.SUCCEEDED, NOW)
    (moved,) = store.find_tasks(["again"])
    assert moved.due_at == NOW.replace(microsecond=NOW.microsecond // 1000 * 1000)


def test_an_unsure_claim_settled_on_a_prunes_leftover_is_no_job(store: Store) -> None:
    from tullius.engine import REUSE_CANDIDATES_FOR, Candidates, UnsureClaim, claim_many

    # Given a finished task a prune cut short after its records, and a claim's
    # lease, inserted late, whose acknowledgement was lost: an unsure claim
    queued(store, "t")
    store.set_status("t", Status.SUCCEEDED, NOW - 10 * DAY)
    store.insert_record(make_record("t", token="late", worker="w"))
    kept = Candidates(REUSE_CANDIDATES_FOR)
    (doc,) = store.find_tasks(["t"])
    kept.unsure = (UnsureClaim(doc, "w", "late", T0),)
    # When the worker's next claim settles it
    jobs = drive(
        store, claim_many(ALL, server="s", workers=[("w", "next")], now=T0, candidates=kept)
    )
    # Then it is no job: its lease is ours, but the task is a prune's leftover
    assert jobs == []
    assert kept.unsure == ()


def test_a_copy_of_a_task_settled_without_a_settling_time_gets_one_when_dropped() -> None:
    # Given a finished task an older version settled (no settling time), queued again
    store = finished_long_ago_then_queued_again("old")
    store.finished.update_one({"_id": "old"}, {"$set": {"due_at": None}})
    # When a load drops the copy
    view = store.load("old")
    # Then the finished copy now has a settling time
    assert view is not None
    (settled,) = store.find_tasks(["old"])
    assert settled.due_at is not None


# --- a keyed task stored again after its prune ---------------------------------


def test_a_keyed_task_stored_again_after_its_prune_spawns_apart_from_its_first_runs_kept_child(
    store: Store,
) -> None:
    # Given a keyed task that ran 20 days ago, returning a successor due in 30 days
    # (still queued), and a prune that deleted the task but keeps the successor
    first_child = dataclasses.replace(make_spec(n="first"), delay=30 * DAY)
    (keyed,) = queue_keyed(store, "report", make_spec(), now=NOW - 20 * DAY)
    run_to_the_end(store, keyed, at=NOW - 20 * DAY, successors=(first_child,))
    assert pruned(store).deleted == {Status.SUCCEEDED: 1}
    # When the keyed call is repeated (its application never saw the first answer)
    # and the task stored again runs, returning another successor
    assert queue_keyed(store, "report", make_spec(), now=NOW) == [keyed]
    second_child = dataclasses.replace(make_spec(n="second"), delay=30 * DAY)
    run_to_the_end(store, keyed, at=NOW, successors=(second_child,))
    # Then both successors are stored, each with its own fields: the second was not
    # taken for the first (the same id) and dropped without a word
    children = store.find_children(keyed)
    assert sorted(child.fields["n"] for child in children) == ["first", "second"]
    assert all(child.status is Status.QUEUED for child in children)


def test_a_child_of_a_keyed_task_stored_again_does_not_inherit_a_pruned_namesakes_retry(
    store: Store,
) -> None:
    # Given a keyed task whose successor was left unhandled 20 days ago and retried
    # by an operator, and the whole tree pruned since (the retry record stays: a
    # tombstone)
    doomed = dataclasses.replace(make_spec(n=1), handler_attempts=1)
    (keyed,) = queue_keyed(store, "report", make_spec(), now=NOW - 20 * DAY)
    run_to_the_end(store, keyed, at=NOW - 20 * DAY, successors=(doomed,))
    first = unhandled_child(store, keyed, at=NOW - 20 * DAY)
    copy = drive(store, retry(first, now=NOW - 20 * DAY, token="op", server="ops")).copy_id
    handle(store, copy, at=NOW - 20 * DAY)
    while sum(pruned(store, unhandled=True).deleted.values()):
        pass
    assert store.find_tasks([keyed, first, copy]) == []
    # When the keyed call is repeated and runs again, and its successor is left
    # unhandled too
    queue_keyed(store, "report", make_spec(), now=NOW)
    run_to_the_end(store, keyed, at=NOW, successors=(doomed,))
    second = unhandled_child(store, keyed, at=NOW)
    # Then the new successor is a task of its own, not retried yet: an operator's
    # retry of it makes a copy and runs its failed() (not "already retried")
    view = store.load(second)
    assert view is not None
    assert retried_as(view) is None
    assert drive(store, retry(second, now=NOW, token="op2", server="ops")).new
    assert second != first


def unhandled_child(store: Store, parent_id: str, *, at: Any) -> str:
    """The only child of ``parent_id``: its run fails at ``at``, and so does its one
    failed() attempt."""
    (child,) = store.find_children(parent_id)
    fails_for_good(store, child.task_id, at=at)
    return child.task_id
