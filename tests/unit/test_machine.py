"""step(): each transition, compared as whole records and effects."""

from __future__ import annotations

import dataclasses
import random
from datetime import datetime, timedelta

import pytest

from tests.store_contract import T0, make_doc
from tullius.document import (
    Failure,
    FailureKind,
    Origin,
    Record,
    RecordKind,
    Status,
    TaskSpec,
    TaskView,
    derive_task_id,
    handler_end_id,
    handler_id,
    outcome_id,
    run_id,
    status_of,
)
from tullius.effects import InsertRecord, InsertTasks, SetStatus
from tullius.errors import InvalidTransition
from tullius.events import (
    Claimed,
    Failed,
    HandlerClaimed,
    HandlerFailed,
    HandlerSucceeded,
    LeaseExpired,
    Succeeded,
    Swept,
)
from tullius.machine import TRANSITIONS, spawn, step
from tullius.policy import handler_backoff

SPEC = TaskSpec("tests:Next", {"n": 1}, 5, timedelta(seconds=5), timedelta(seconds=60), 3)
BOOM = Failure(FailureKind.EXCEPTION, "boom", T0)


def queued() -> TaskView:
    return TaskView(make_doc("t"))


def running(token: str = "a") -> TaskView:
    return step(queued(), Claimed(token, "s1", "w1"), now=T0).view


def failed() -> TaskView:
    return step(running(), Failed("a", BOOM), now=T0).view


def handling(view: TaskView | None = None, token: str = "h") -> TaskView:
    return step(view or failed(), HandlerClaimed(token, "s2", "w2"), now=T0).view


def test_claiming_a_queued_task_inserts_a_run_record_then_sets_the_hint() -> None:
    result = step(queued(), Claimed("a", "s1", "w1"), now=T0)
    # (the record says which task stored under the id it claimed: see MongoStore)
    record = Record(
        run_id("t"), "t", RecordKind.RUN, "a", T0, "s1", worker="w1", task_created_at=T0
    )
    assert result.status is Status.RUNNING
    assert result.record == record
    assert result.effects == (InsertRecord(record), SetStatus("t", Status.RUNNING, None))


def test_a_task_is_not_claimed_before_its_start_after() -> None:
    view = TaskView(make_doc("t", start_after=T0 + timedelta(seconds=1)))
    with pytest.raises(InvalidTransition, match="not due until"):
        step(view, Claimed("a", "s1"), now=T0)


def test_success_records_the_outcome_and_inserts_successors_before_the_terminal_hint() -> None:
    result = step(running(), Succeeded("a", (SPEC,)), now=T0)
    successors = spawn(running().task, (SPEC,), Origin.SUCCESSOR, T0)
    assert successors[0].task_id == derive_task_id(running().task, Origin.SUCCESSOR, 0)
    assert result.status is Status.SUCCEEDED
    assert result.effects == (
        InsertRecord(result.record),
        InsertTasks(successors),
        SetStatus("t", Status.SUCCEEDED, T0),  # a terminal hint's due time: when it settled
    )
    assert result.record is not None
    assert result.record.ok is True


def test_a_childs_id_comes_from_its_parents_id_and_creation_time_as_stored() -> None:
    # Given a task, the same task as a store would give it back (to the millisecond;
    # naive, from a client without tz_aware), and a task stored again under its id
    # a day later
    task = make_doc("t")
    as_read_back = dataclasses.replace(
        task, created_at=task.created_at.replace(microsecond=123000, tzinfo=None)
    )
    stored_again = dataclasses.replace(task, created_at=task.created_at + timedelta(days=1))
    # Then the first two give each child the same id, and the third new ones
    ids = [derive_task_id(doc, Origin.SUCCESSOR, 0) for doc in (task, as_read_back, stored_again)]
    assert ids[0] == ids[1] != ids[2]
    assert derive_task_id(task, Origin.SUCCESSOR, 1) not in ids
    assert derive_task_id(task, Origin.REPLACEMENT, 0) not in ids


def test_only_the_owner_of_the_run_may_report_its_end() -> None:
    with pytest.raises(InvalidTransition, match="does not own"):
        step(running("a"), Succeeded("intruder"), now=T0)


def test_a_failed_run_waits_for_its_handler() -> None:
    result = step(running(), Failed("a", BOOM), now=T0)
    assert result.status is Status.FAILED
    assert result.effects[1:] == (SetStatus("t", Status.FAILED, T0),)


def test_a_running_task_with_an_expired_lease_fails_as_lost() -> None:
    result = step(running(), LeaseExpired(run_id("t"), "s9"), now=T0)
    assert result.status is Status.FAILED
    assert result.record is not None
    assert result.record.record_id == outcome_id("t")
    assert result.record.failure is not None
    assert result.record.failure.kind == FailureKind.LOST
    assert "'s1'" in result.record.failure.message
    assert "'s9'" in result.record.failure.message


def test_an_expired_lease_must_be_the_live_one() -> None:
    with pytest.raises(InvalidTransition, match="not the live lease"):
        step(running(), LeaseExpired("t:other", "s9"), now=T0)


def test_handler_attempts_are_numbered_from_one() -> None:
    result = step(failed(), HandlerClaimed("h", "s2", "w2"), now=T0)
    assert result.status is Status.HANDLING
    assert result.record is not None
    assert (result.record.record_id, result.record.attempt) == (handler_id("t", 1), 1)


def test_a_handler_result_inserts_replacements_then_settles_as_handled() -> None:
    view = handling()
    result = step(view, HandlerSucceeded("h", (SPEC, SPEC)), now=T0)
    assert result.status is Status.HANDLED
    replacements = spawn(view.task, (SPEC, SPEC), Origin.REPLACEMENT, T0)
    assert result.effects[1:] == (InsertTasks(replacements), SetStatus("t", Status.HANDLED, T0))
    assert len({doc.task_id for doc in replacements}) == 2


def test_a_failed_handler_is_retried_after_backoff() -> None:
    result = step(handling(), HandlerFailed("h", BOOM), now=T0)
    assert result.status is Status.FAILED
    retry_at = T0 + handler_backoff(1)
    assert result.record is not None
    assert result.record.retry_at == retry_at
    assert result.effects[1:] == (SetStatus("t", Status.FAILED, retry_at),)
    with pytest.raises(InvalidTransition, match="not due until"):
        step(result.view, HandlerClaimed("h2", "s2"), now=T0)
    assert step(result.view, HandlerClaimed("h2", "s2"), now=retry_at).status is Status.HANDLING


def test_a_handler_that_succeeds_on_a_later_attempt_inserts_its_replacements() -> None:
    # Given a task whose first attempt at failed() failed and whose second is running
    retry_at = T0 + handler_backoff(1)
    view = step(handling(), HandlerFailed("h", BOOM), now=T0).view
    view = step(view, HandlerClaimed("h2", "s2", "w2"), now=retry_at).view
    # When the second attempt returns a replacement
    result = step(view, HandlerSucceeded("h2", (SPEC,)), now=retry_at)
    # Then that replacement is inserted before the hint settles as handled
    replacements = spawn(view.task, (SPEC,), Origin.REPLACEMENT, retry_at)
    assert result.status is Status.HANDLED
    handled = SetStatus("t", Status.HANDLED, retry_at)
    assert result.effects[1:] == (InsertTasks(replacements), handled)


def test_failed_is_retried_at_most_five_minutes_after_it_failed_however_often() -> None:
    # Given a task allowed many attempts at failed(), nine of which have failed
    view, now = TaskView(dataclasses.replace(make_doc("t"), handler_attempts=20)), T0
    view = step(step(view, Claimed("a", "s1"), now=now).view, Failed("a", BOOM), now=now).view
    for attempt in range(1, 10):
        view = step(view, HandlerClaimed(f"h{attempt}", "s2"), now=now).view
        view = step(view, HandlerFailed(f"h{attempt}", BOOM), now=now).view
        now += handler_backoff(attempt)
    # When the tenth attempt fails too
    view = step(view, HandlerClaimed("h10", "s2"), now=now).view
    result = step(view, HandlerFailed("h10", BOOM), now=now)
    # Then the next attempt is due after the five-minute cap, not after 2**9 seconds
    assert result.record is not None
    assert result.record.retry_at == now + timedelta(minutes=5)


def test_backoff_jitter_comes_from_the_rng_argument() -> None:
    one = step(handling(), HandlerFailed("h", BOOM), now=T0, rng=random.Random(1)).record
    two = step(handling(), HandlerFailed("h", BOOM), now=T0, rng=random.Random(1)).record
    assert one is not None
    assert two is not None
    assert one.retry_at == two.retry_at


class LowestDraw(random.Random):
    """A random source whose every draw is the lowest possible, 0.0."""

    def random(self) -> float:
        return 0.0


def test_a_jittered_retry_of_failed_waits_at_least_half_its_backoff() -> None:
    # Given a driver whose random source draws the lowest jitter
    rng = LowestDraw()
    # When a handler attempt fails
    result = step(handling(), HandlerFailed("h", BOOM), now=T0, rng=rng)
    # Then the retry still waits half the nominal backoff, never less
    assert result.record is not None
    assert result.record.retry_at == T0 + handler_backoff(1) / 2


def after_failed_handler_attempts(attempts: int) -> tuple[TaskView, datetime]:
    """A failed task whose ``failed()`` failed ``attempts`` times, and when it may retry."""
    view, now = failed(), T0
    for attempt in range(1, attempts + 1):
        view = step(view, HandlerClaimed(f"h{attempt}", "s2"), now=now).view
        view = step(view, HandlerFailed(f"h{attempt}", BOOM), now=now).view
        now += handler_backoff(attempt)
    return view, now


def test_the_last_failed_handler_attempt_leaves_the_task_unhandled() -> None:
    view, now = after_failed_handler_attempts(3)
    assert status_of(view) is Status.UNHANDLED
    last = view.handler_end(3)
    assert last is not None
    assert last.retry_at is None
    assert last.failure == BOOM
    with pytest.raises(InvalidTransition, match="in status 'unhandled'"):
        step(view, HandlerClaimed("h4", "s2"), now=now)


def test_a_handler_whose_lease_expires_counts_as_a_failed_attempt() -> None:
    result = step(handling(), LeaseExpired(handler_id("t", 1), "s9"), now=T0)
    assert result.status is Status.FAILED
    assert result.record is not None
    assert result.record.record_id == handler_end_id("t", 1)
    assert result.record.failure is not None
    assert result.record.failure.kind == FailureKind.LOST


def test_a_last_handler_attempt_whose_lease_expires_leaves_the_task_unhandled() -> None:
    # Given a task whose failed() has failed twice and whose third and last attempt is running
    view, now = after_failed_handler_attempts(2)
    view = step(view, HandlerClaimed("h3", "s2"), now=now).view
    # When its server stops renewing the lease and another server declares it lost
    result = step(view, LeaseExpired(handler_id("t", 3), "s9"), now=now)
    # Then the task is unhandled, with no retry, and its hint says so
    assert result.status is Status.UNHANDLED
    assert result.record is not None
    assert result.record.retry_at is None
    assert result.effects[1:] == (SetStatus("t", Status.UNHANDLED, now),)


def test_terminal_statuses_accept_only_sweeps() -> None:
    view = step(running(), Succeeded("a"), now=T0).view
    for event in (Claimed("x", "s"), Failed("a", BOOM), HandlerClaimed("x", "s")):
        with pytest.raises(InvalidTransition, match="in status 'succeeded'"):
            step(view, event, now=T0)


def test_sweeping_a_settled_task_writes_nothing() -> None:
    assert step(queued(), Swept(), now=T0).effects == ()


def test_sweeping_a_task_with_a_stale_hint_repairs_hint_and_inserts() -> None:
    decided = step(running(), Succeeded("a", (SPEC,)), now=T0)
    stale = TaskView(running().task, decided.view.records)  # crashed before the inserts
    assert stale.task.status is Status.QUEUED
    assert step(stale, Swept(), now=T0).effects == decided.effects[1:]


def test_sweeping_a_failed_task_whose_hint_lags_only_in_its_due_time_repairs_it() -> None:
    # Given a task whose first attempt at failed() failed, to be retried after backoff,
    retried = step(handling(), HandlerFailed("h", BOOM), now=T0).view
    # whose hint still says failed, due when the run failed (both later hint writes lost)
    hint = dataclasses.replace(make_doc("t"), status=Status.FAILED, due_at=T0)
    lagging = TaskView(hint, retried.records)
    # When it is swept
    effects = step(lagging, Swept(), now=T0).effects
    # Then the hint is moved to the retry time, so claimers don't try it before then
    assert effects == (SetStatus("t", Status.FAILED, T0 + handler_backoff(1)),)


def test_invalid_transition_message_names_the_event_status_and_task() -> None:
    with pytest.raises(InvalidTransition) as caught:
        step(queued(), Succeeded("a"), now=T0)
    assert str(caught.value) == "can't handle Succeeded in status 'queued' (task_id='t')"
    assert (caught.value.task_id, caught.value.status) == ("t", "queued")


def test_every_status_has_a_row_in_the_table() -> None:
    assert set(TRANSITIONS) == set(Status)
