"""Engine conversations against a MemoryStore: claiming, finishing, renewing, sweeping."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from datetime import timedelta
from functools import partial

import pytest

from tests.store_contract import T0, drive_on, make_doc, make_record
from tullius.band import Band
from tullius.document import (
    Failure,
    FailureKind,
    Status,
    TaskSpec,
    handler_id,
    run_id,
    status_of,
)
from tullius.effects import InsertRecord as InsertRecordOp
from tullius.engine import (
    SWEEP_BATCH,
    Candidates,
    ClaimInterrupted,
    Job,
    JobKind,
    apply_step,
    claim,
    claim_many,
    drive,
    finish,
    renew,
    sweep,
)
from tullius.errors import StoreError
from tullius.events import Claimed, Failed, HandlerSucceeded, LeaseExpired, Succeeded
from tullius.machine import step
from tullius.policy import LeaseTimings, LeaseWatch
from tullius.sim.memory_store import MemoryStore
from tullius.store import FindDue, perform

ALL = Band(1, 0, 10)
SPEC = TaskSpec("tests:Next", {"n": 2}, 5, timedelta(seconds=5), timedelta(seconds=5), 2)
BOOM = Failure(FailureKind.EXCEPTION, "boom", T0)


def claim_one(store: MemoryStore, token: str, band: Band = ALL, now=T0):  # type: ignore[no-untyped-def]
    return drive(store, claim(band, server="s1", worker="w1", token=token, now=now))


def test_workers_claim_the_most_urgent_due_task_in_their_band() -> None:
    store = MemoryStore()
    store.insert_tasks(
        [
            make_doc("p5", priority=5),
            make_doc("p0-later", priority=0, start_after=T0 + timedelta(minutes=1)),
            make_doc("p1", priority=1),
            make_doc("p0", priority=0),
        ]
    )
    assert claim_one(store, "a").task_id == "p0"
    assert claim_one(store, "b").task_id == "p1"
    assert claim_one(store, "c", band=Band(1, 0, 0)) is None
    assert claim_one(store, "d").task_id == "p5"
    assert claim_one(store, "e", now=T0 + timedelta(minutes=1)).task_id == "p0-later"


def test_failures_are_handled_before_new_work_of_the_same_priority() -> None:
    store = MemoryStore()
    store.insert_tasks([make_doc("a", priority=1), make_doc("b", priority=9)])
    job = claim_one(store, "a")
    later = T0 + timedelta(seconds=1)
    drive(store, finish(job, Failed("a", BOOM), now=later))
    store.insert_tasks([make_doc("c", priority=1), make_doc("urgent", priority=0)])
    first, handler = (claim_one(store, token, now=later) for token in ("u", "h"))
    assert first.task_id == "urgent"  # priority comes first
    assert (handler.kind, handler.task_id, handler.lease.attempt) == (JobKind.HANDLE, "a", 1)


def test_a_claim_that_loses_the_race_repairs_the_stale_hint_and_moves_on() -> None:
    store = MemoryStore()
    store.insert_tasks([make_doc("a"), make_doc("b")])
    # A rival's claim record landed, and the rival crashed before setting the hint.
    store.insert_record(make_record("a", token="rival"))
    assert store.load("a").task.status is Status.QUEUED
    job = claim_one(store, "loser")
    assert job.task_id == "b"
    assert store.load("a").task.status is Status.RUNNING


def test_a_failure_whose_handler_a_rival_claimed_gets_its_hint_repaired_for_the_sweeps() -> None:
    store = MemoryStore()
    store.insert_tasks([make_doc("a")])
    drive(store, finish(claim_one(store, "a"), Failed("a", BOOM), now=T0))
    # Given a rival that claimed failed() of "a" and crashed before setting the hint,
    # which still says failed (sweeps, which only read running and handling hints,
    # would never see the rival's lease expire)
    store.insert_record(make_record("a", token="rival", record_id=handler_id("a", 1), attempt=1))
    assert store.load("a").task.status is Status.FAILED
    # When a worker tries to claim it
    job = claim_one(store, "h")
    # Then it gets nothing, and leaves the hint saying handling
    assert job is None
    assert store.load("a").task.status is Status.HANDLING


def test_successors_are_inserted_once_with_ids_derived_from_the_parent() -> None:
    store = MemoryStore()
    store.insert_tasks([make_doc("a")])
    job = claim_one(store, "a")
    verdict = drive(store, finish(job, Succeeded("a", (SPEC, SPEC)), now=T0))
    again = drive(store, finish(job, Succeeded("a", (SPEC, SPEC)), now=T0 + timedelta(seconds=9)))
    assert verdict.accepted
    assert again.accepted
    assert again.record == verdict.record
    children = store.find_children("a")
    assert len(children) == 2
    assert all(store.insert_counts[doc.task_id] == 1 for doc in children)


def test_a_finish_interrupted_by_a_store_error_completes_when_repeated() -> None:
    store = MemoryStore()
    store.insert_tasks([make_doc("a")])
    job = claim_one(store, "a")
    conversation = finish(job, Succeeded("a", (SPEC,)), now=T0)
    op = next(conversation)
    perform(store, op)  # the outcome landed, then the connection dropped
    with contextlib.suppress(StoreError):
        conversation.throw(StoreError("connection reset"))
    assert store.load("a").task.status is Status.RUNNING  # hint not yet repaired
    verdict = drive(store, finish(job, Succeeded("a", (SPEC,)), now=T0 + timedelta(seconds=5)))
    assert verdict.accepted
    assert store.load("a").task.status is Status.SUCCEEDED
    assert len(store.find_children("a")) == 1


def test_a_late_result_after_the_lease_was_declared_lost_is_rejected() -> None:
    store = MemoryStore()
    store.insert_tasks([make_doc("a")])
    job = claim_one(store, "a")
    watch = LeaseWatch(timedelta(seconds=15))
    assert drive(store, sweep(watch, observer="s2", now=T0, monotonic=lambda: 0.0)).expired == []
    report = drive(store, sweep(watch, observer="s2", now=T0, monotonic=lambda: 15.0))
    assert report.expired == [run_id("a")]
    assert drive(store, renew(job)) is False
    verdict = drive(store, finish(job, Succeeded("a"), now=T0))
    assert not verdict.accepted
    assert verdict.record.failure is not None
    assert verdict.record.failure.kind == "lost"
    assert status_of(store.load("a")) is Status.FAILED


def _watching_a_silent_lease() -> tuple[MemoryStore, LeaseWatch, Callable[[float], list[str]]]:
    """A task claimed by another server whose lease never beats again, watched by a
    sweeper that has seen it once, at 0 s; and a sweep at a given second."""
    store = MemoryStore()
    store.insert_tasks([make_doc("a")])
    claim_one(store, "a")
    watch = LeaseWatch(timedelta(seconds=15), late_after=timedelta(seconds=15))

    def sweep_at(second: float) -> list[str]:
        watch.sweep_starting(second)
        report = drive(store, sweep(watch, observer="s2", now=T0, monotonic=lambda: second))
        watch.sweep_ended(second)
        return report.expired

    assert sweep_at(0.0) == []
    return store, watch, sweep_at


@pytest.mark.parametrize(("second", "expired"), [(15.0, True), (15.5, False)])
def test_a_sweep_that_starts_late_forgets_what_it_saw(second: float, expired: bool) -> None:
    _, _, sweep_at = _watching_a_silent_lease()
    assert sweep_at(second) == ([run_id("a")] if expired else [])


def test_store_time_stands_still_from_the_last_call_that_worked_to_the_first_after_an_outage() -> (
    None
):
    _, watch, sweep_at = _watching_a_silent_lease()
    # Given a call that worked at 1 s, one that failed at 2 s, and one asked at 10 s that worked
    watch.store_failed(1.0, 2.0)
    assert watch.down
    watch.store_worked(10.0, 10.0)
    assert not watch.down
    # Then the 9 s between 1 s and 10 s don't count: stale after 15 s of store time
    assert sweep_at(14.0) == []
    assert sweep_at(23.9) == []
    assert sweep_at(24.0) == [run_id("a")]


def test_while_an_outage_is_open_no_lease_goes_stale() -> None:
    _, watch, sweep_at = _watching_a_silent_lease()
    watch.store_failed(1.0, 2.0)
    # A call asked before the failure was seen says nothing of after it
    watch.store_worked(1.5, 3.0)
    assert watch.down
    assert all(sweep_at(second) == [] for second in (5.0, 10.0, 15.0, 20.0, 25.0))


def test_store_errors_now_and_then_delay_a_lost_lease_by_their_own_length_only() -> None:
    # Why: forgetting every observation after any error, a server whose calls failed
    # now and then never declared a dead server's lease lost
    _, watch, sweep_at = _watching_a_silent_lease()
    expired: list[str] = []
    second = 0.0
    while not expired and second < 60:
        # A call that worked, one that failed a tenth of a second later, and one
        # that worked a tenth of a second after that, before every sweep
        watch.store_worked(second + 1.0, second + 1.0)
        watch.store_failed(second + 1.0, second + 1.1)
        watch.store_worked(second + 1.2, second + 1.2)
        second += 2.5
        expired = sweep_at(second)
    assert expired == [run_id("a")]
    assert second == 17.5  # 15 s of store time (0.2 s lost to each of seven outages)


def test_an_owner_whose_run_was_declared_lost_learns_it_while_failed_runs_elsewhere() -> None:
    store = MemoryStore()
    store.insert_tasks([make_doc("a")])
    job = claim_one(store, "a")
    # Given a run declared lost by another server, whose failed() another worker now runs
    watch = LeaseWatch(timedelta(seconds=15))
    drive(store, sweep(watch, observer="s2", now=T0, monotonic=lambda: 0.0))
    assert drive(store, sweep(watch, observer="s2", now=T0, monotonic=lambda: 15.0)).expired
    handler = claim_one(store, "h")
    assert handler.kind is JobKind.HANDLE
    # When the run's owner renews its lease
    renewed = drive(store, renew(job))
    # Then it learns the run is no longer its own (the live lease is the handler's)
    assert renewed is False
    assert drive(store, renew(handler)) is True


def test_a_lease_that_keeps_beating_is_never_declared_lost() -> None:
    store = MemoryStore()
    store.insert_tasks([make_doc("a")])
    job = claim_one(store, "a")
    watch = LeaseWatch(timedelta(seconds=15))
    for second in range(0, 120, 10):
        assert drive(store, renew(job)) is True
        report = drive(store, sweep(watch, observer="s2", now=T0, monotonic=partial(float, second)))
        assert report.expired == []


def test_a_beat_read_late_in_a_slow_sweep_is_dated_when_it_was_read() -> None:
    store = MemoryStore()
    store.insert_tasks([make_doc("a")])
    claim_one(store, "a")
    watch = LeaseWatch(timedelta(seconds=15))
    # A sweep whose load of "a" is asked at 0 s and answered at 10 s (a slow store)
    readings = iter([0.0, 10.0])
    assert (
        drive(store, sweep(watch, observer="s2", now=T0, monotonic=readings.__next__)).expired == []
    )
    # sees the lease's beat at 10 s at the earliest, so 16 s after the sweep began,
    # with the beat unchanged (the owner is 6 s late), the lease is not stale yet,
    report = drive(store, sweep(watch, observer="s2", now=T0, monotonic=lambda: 16.0))
    assert report.expired == []
    # and it is once 15 s have passed since that reading.
    report = drive(store, sweep(watch, observer="s2", now=T0, monotonic=lambda: 25.0))
    assert report.expired == [run_id("a")]


def test_a_slow_read_of_an_unchanged_beat_is_judged_from_when_it_was_asked() -> None:
    store = MemoryStore()
    store.insert_tasks([make_doc("a")])
    claim_one(store, "a")
    watch = LeaseWatch(timedelta(seconds=15))
    # Given a sweeper that saw the lease's beat at 0 s
    assert drive(store, sweep(watch, observer="s2", now=T0, monotonic=lambda: 0.0)).expired == []
    # When its next load, which finds the beat unchanged, is asked at 10 s and answered at
    # 20 s (a slow store: the owner may have been seen alive as late as 10 s)
    readings = iter([10.0, 20.0])
    report = drive(store, sweep(watch, observer="s2", now=T0, monotonic=readings.__next__))
    # Then the lease has been silent for 10 s at most, not 20 s: it is not stale
    assert report.expired == []


def sweeps_until_expired(
    timings: LeaseTimings, *, beats: list[float], sweeps_from: float
) -> float | None:
    """Beat at ``beats`` (seconds) and sweep from ``sweeps_from`` every ``timings.sweep``,
    a beat before a sweep at the same instant, for two leases; when the run was declared
    lost, or None."""
    store = MemoryStore()
    store.insert_tasks([make_doc("a")])
    job = claim_one(store, "a")
    watch = LeaseWatch(timings.stale_after)
    lease, sweep_every = timings.lease.total_seconds(), timings.sweep.total_seconds()
    sweeps = [sweeps_from + k * sweep_every for k in range(int(2 * lease / sweep_every) + 1)]
    for at, is_sweep in sorted([(at, False) for at in beats] + [(at, True) for at in sweeps]):
        if not is_sweep:
            drive(store, renew(job))
            continue
        report = drive(store, sweep(watch, observer="s2", now=T0, monotonic=partial(float, at)))
        if report.expired:
            return at
    return None


def test_a_live_owner_that_misses_two_beats_in_a_row_keeps_its_lease() -> None:
    timings = LeaseTimings(timedelta(seconds=30))
    beat = timings.heartbeat.total_seconds()
    # Given an owner beating every heartbeat whose first two beats are lost (a slow store)
    beats = [k * beat for k in range(3, int(60 / beat) + 1)]
    # When another server sweeps every sweep period
    expired_at = sweeps_until_expired(timings, beats=beats, sweeps_from=0.0)
    # Then the run is never declared lost: only three missed beats in a row make it stale
    assert expired_at is None


def test_a_dead_owners_run_is_declared_lost_within_five_sixths_of_the_lease() -> None:
    timings = LeaseTimings(timedelta(seconds=30))
    beat, sweep_every = timings.heartbeat.total_seconds(), timings.sweep.total_seconds()
    for fraction in (0.02, 0.2, 0.5, 0.8, 0.98):
        # Given an owner that beats twice, then dies right after its beat at 2 heartbeats
        died = 2 * beat
        # When another server sweeps every sweep period, at any phase
        phase = fraction * sweep_every
        expired_at = sweeps_until_expired(timings, beats=[beat, died], sweeps_from=phase)
        # Then the run is declared lost within 5/6 of the lease after the death (a sweep to
        # see the last beat, half a lease of silence, a sweep to act), leaving the last
        # sixth for the store's round trips
        assert expired_at is not None
        assert expired_at - died <= timings.lease.total_seconds() * 5 / 6, phase


def test_a_sweeper_never_expires_its_own_leases() -> None:
    store = MemoryStore()
    store.insert_tasks([make_doc("a")])
    job = claim_one(store, "a")
    watch = LeaseWatch(timedelta(seconds=1))
    for second in range(5):
        report = drive(
            store,
            sweep(
                watch,
                observer="s1",
                now=T0,
                monotonic=partial(float, second),
                own_tokens=frozenset({job.token}),
            ),
        )
        assert report.expired == []


def test_a_handler_result_is_accepted_once_and_its_replacements_inserted_once() -> None:
    store = MemoryStore()
    store.insert_tasks([make_doc("a")])
    drive(store, finish(claim_one(store, "a"), Failed("a", BOOM), now=T0))
    handler = claim_one(store, "h")
    first = drive(store, finish(handler, HandlerSucceeded("h", (SPEC,)), now=T0))
    second = drive(store, finish(handler, HandlerSucceeded("h", (SPEC, SPEC)), now=T0))
    assert first.accepted
    assert second.record == first.record
    assert len(store.find_children("a")) == 1
    assert store.load("a").task.status is Status.HANDLED


def test_one_claim_serves_several_idle_workers_most_urgent_first() -> None:
    store = MemoryStore()
    store.insert_tasks([make_doc(f"p{p}", priority=p) for p in (3, 1, 2)])
    workers = [("w1", "a"), ("w2", "b"), ("w3", "c"), ("w4", "d")]
    jobs = drive(store, claim_many(ALL, server="s1", workers=workers, now=T0))
    assert [(job.lease.worker, job.task_id, job.token) for job in jobs] == [
        ("w1", "p1", "a"),
        ("w2", "p2", "b"),
        ("w3", "p3", "c"),
    ]
    assert all(store.load(job.task_id).task.status is Status.RUNNING for job in jobs)


def a_and_b_queued() -> tuple[MemoryStore, Candidates]:
    """A store with "a" (priority 1) and "b" (priority 2) queued, and empty candidates."""
    store = MemoryStore()
    store.insert_tasks([make_doc("a", priority=1), make_doc("b", priority=2)])
    return store, Candidates(keep_for=timedelta(seconds=1))


def claim_for_w1(store: MemoryStore, candidates: Candidates) -> list[Job]:
    """One claim for worker "w1" at T0, keeping what it reads in ``candidates``."""
    return drive(
        store,
        claim_many(ALL, server="s1", workers=[("w1", "t1")], now=T0, candidates=candidates),
    )


def test_candidates_one_claim_read_serve_the_next_claim_without_reading_again() -> None:
    store, candidates = a_and_b_queued()
    first = claim_for_w1(store, candidates)
    assert [job.task_id for job in first] == ["a"]
    assert [doc.task_id for doc in candidates.docs] == ["b"]
    assert candidates.read_at == T0
    conversation = claim_many(
        ALL, server="s1", workers=[("w2", "t2")], now=T0, candidates=candidates
    )
    ops = [next(conversation)]
    assert not isinstance(ops[0], FindDue)  # it tries "b" straight away
    second = drive_on(store, conversation, ops[0])
    assert [job.task_id for job in second] == ["b"]
    assert candidates.docs == []


def test_a_kept_candidate_a_rival_claimed_meanwhile_is_skipped_and_its_hint_repaired() -> None:
    store, candidates = a_and_b_queued()
    claim_for_w1(store, candidates)
    store.insert_record(make_record("b", token="rival"))  # claimed elsewhere, hint not yet set
    jobs = drive(
        store,
        claim_many(ALL, server="s1", workers=[("w2", "t2")], now=T0, candidates=candidates),
    )
    assert jobs == []
    assert store.load("b").task.status is Status.RUNNING  # type: ignore[union-attr]


def test_after_a_claim_failed_midway_forgotten_candidates_are_read_again() -> None:
    store, candidates = a_and_b_queued()
    conversation = claim_many(
        ALL, server="s1", workers=[("w1", "t1")], now=T0, candidates=candidates
    )
    op = next(conversation)
    op = conversation.send(perform(store, op))  # the read; then "a"'s claim fails:
    assert [doc.task_id for doc in candidates.docs] == ["b"]  # "a" is gone from them
    conversation.close()
    candidates.forget()
    jobs = drive(
        store,
        claim_many(ALL, server="s1", workers=[("w2", "t2")], now=T0, candidates=candidates),
    )
    assert [job.task_id for job in jobs] == ["a"]


def test_candidates_older_than_keep_for_are_read_again() -> None:
    store, candidates = a_and_b_queued()
    claim_for_w1(store, candidates)
    later = T0 + timedelta(seconds=2)
    conversation = claim_many(
        ALL, server="s1", workers=[("w2", "t2")], now=later, candidates=candidates
    )
    assert isinstance(next(conversation), FindDue)


def test_a_dead_lease_is_declared_lost_however_many_live_leases_come_before_it() -> None:
    store = MemoryStore()
    # Given SWEEP_BATCH tasks run by a live server, and one more (sorting last) by a dead one
    ids = [f"t{n:05d}" for n in range(SWEEP_BATCH + 1)]
    store.insert_tasks([make_doc(task_id) for task_id in ids])
    live_jobs = []
    for task_id in ids:
        view = store.load(task_id)
        assert view is not None
        owner = "dead" if task_id == ids[-1] else f"live-{task_id}"
        decided = step(view, Claimed(token=owner, server=owner.partition("-")[0]), now=T0)
        drive(store, apply_step(view, decided, now=T0))
        if task_id != ids[-1]:
            live_jobs.append(run_id(task_id))
    # When another server sweeps every 5 s for a minute, while the live leases beat
    watch = LeaseWatch(timedelta(seconds=15))
    expired: list[str] = []
    for second in range(0, 60, 5):
        for record_id in live_jobs:
            store.beat(record_id)
        report = drive(store, sweep(watch, observer="s3", now=T0, monotonic=partial(float, second)))
        expired += report.expired
    # Then the dead server's lease was declared lost: the sweep read past its first page
    assert expired == [run_id(ids[-1])]


def drive_until_insert_fails(store: MemoryStore, conversation, *, failing: int, applied: bool):  # type: ignore[no-untyped-def]
    """Drive ``conversation``; its ``failing``-th InsertRecord (1-based) raises a StoreError,
    stored first if ``applied`` (a lost acknowledgement).  Returns what the error became."""
    inserts = 0
    result = None
    while True:
        op = conversation.send(result)
        if isinstance(op, InsertRecordOp):
            inserts += 1
            if inserts == failing:
                if applied:
                    perform(store, op)
                try:
                    conversation.throw(StoreError("connection reset"))
                except StoreError as error:
                    return error
                raise AssertionError("the conversation swallowed the store error")
        result = perform(store, op)


def test_a_claim_interrupted_by_a_store_error_keeps_the_jobs_it_already_won() -> None:
    store = MemoryStore()
    store.insert_tasks([make_doc("a"), make_doc("b")])
    candidates = Candidates(timedelta(seconds=1))
    # Given a claim for two workers whose second lease insert meets a store error
    conversation = claim_many(
        ALL, server="s1", workers=[("w1", "t1"), ("w2", "t2")], now=T0, candidates=candidates
    )
    error = drive_until_insert_fails(store, conversation, failing=2, applied=False)
    # Then the error carries the job won before it, which is stored and w1's to run
    assert isinstance(error, ClaimInterrupted)
    assert [(job.task_id, job.token, job.lease.worker) for job in error.jobs] == [("a", "t1", "w1")]
    assert current_token(store, "a") == "t1"
    # And the claim it was making is kept, unsure, with its token
    assert [(unsure.doc.task_id, unsure.token) for unsure in candidates.unsure] == [("b", "t2")]


def test_an_unsure_claim_whose_lease_was_stored_is_its_workers_job_at_the_next_claim() -> None:
    store = MemoryStore()
    store.insert_tasks([make_doc("a")])
    candidates = Candidates(timedelta(seconds=1))
    # Given a claim whose lease insert was stored but whose acknowledgement was lost
    conversation = claim_many(
        ALL, server="s1", workers=[("w1", "t1")], now=T0, candidates=candidates
    )
    error = drive_until_insert_fails(store, conversation, failing=1, applied=True)
    assert not isinstance(error, ClaimInterrupted)  # nothing was won for sure
    assert store.load("a").task.status is Status.QUEUED  # the hint was never written
    candidates.forget()  # as drivers do after a failed claim
    # When the band claims again, for the same idle worker with a new token
    later = T0 + timedelta(seconds=6)
    [job] = claim_for(store, "w1", "new", later, candidates)
    # Then the stored lease is the job, with the token it was stored with, and its hint is right
    assert (job.task_id, job.kind, job.token, job.lease.worker) == ("a", JobKind.RUN, "t1", "w1")
    assert store.load("a").task.status is Status.RUNNING
    assert candidates.unsure == ()


def test_an_unsure_claim_that_was_not_stored_leaves_the_task_to_be_claimed_afresh() -> None:
    store = MemoryStore()
    store.insert_tasks([make_doc("a")])
    candidates = Candidates(timedelta(seconds=1))
    conversation = claim_many(
        ALL, server="s1", workers=[("w1", "t1")], now=T0, candidates=candidates
    )
    drive_until_insert_fails(store, conversation, failing=1, applied=False)
    candidates.forget()
    [job] = claim_for(store, "w1", "new", T0, candidates)
    assert (job.task_id, job.token) == ("a", "new")


def test_an_unsure_claim_already_declared_lost_is_not_run_but_its_failure_handled() -> None:
    store = MemoryStore()
    store.insert_tasks([make_doc("a")])
    candidates = Candidates(timedelta(seconds=1))
    conversation = claim_many(
        ALL, server="s1", workers=[("w1", "t1")], now=T0, candidates=candidates
    )
    drive_until_insert_fails(store, conversation, failing=1, applied=True)
    # Given another server's sweep declared the unrenewed lease lost meanwhile
    view = store.load("a")
    decided = step(view, LeaseExpired(run_id("a"), "s2"), now=T0 + timedelta(seconds=40))
    drive(store, apply_step(view, decided, now=T0))
    # When the band claims again
    later = T0 + timedelta(seconds=41)
    [job] = claim_for(store, "w1", "new", later, candidates)
    # Then the run is not run after all: the job is failed() of the lost run
    assert (job.task_id, job.kind, job.token) == ("a", JobKind.HANDLE, "new")
    assert candidates.unsure == ()


def test_an_unsure_claim_waits_for_its_worker_to_be_idle_again() -> None:
    store = MemoryStore()
    store.insert_tasks([make_doc("a"), make_doc("b")])
    candidates = Candidates(timedelta(seconds=1))
    conversation = claim_many(
        ALL, server="s1", workers=[("w1", "t1")], now=T0, candidates=candidates
    )
    drive_until_insert_fails(store, conversation, failing=1, applied=True)
    candidates.forget()
    # A claim for another worker leaves it unsure
    [other] = claim_for(store, "w2", "t2", T0, candidates)
    assert other.task_id == "b"
    assert candidates.unsure
    [job] = claim_for(store, "w1", "t3", T0, candidates)
    assert (job.task_id, job.token) == ("a", "t1")


def test_an_unsure_claim_whose_worker_stays_busy_past_unsure_for_is_given_up() -> None:
    store = MemoryStore()
    store.insert_tasks([make_doc("a"), make_doc("b")])
    candidates = Candidates(timedelta(seconds=1), unsure_for=timedelta(seconds=30))
    conversation = claim_many(
        ALL, server="s1", workers=[("w1", "t1")], now=T0, candidates=candidates
    )
    drive_until_insert_fails(store, conversation, failing=1, applied=True)
    candidates.forget()
    # Its lease is the driver's own while it waits for w1 (a sweep leaves it alone) ...
    assert candidates.unsure_tokens(T0 + timedelta(seconds=30)) == ["t1"]
    # ... but not once w1 has stayed busy past unsure_for (its worker may never come
    # back): then the sweeps judge it, and fail it as lost, as a dead server's
    later = T0 + timedelta(seconds=31)
    assert candidates.unsure_tokens(later) == []
    [other] = claim_for(store, "w2", "t2", later, candidates)
    assert other.task_id == "b"
    assert candidates.unsure == ()


def current_token(store: MemoryStore, task_id: str) -> str | None:
    view = store.load(task_id)
    assert view is not None
    lease = view.current_lease()
    return None if lease is None else lease.token


W1 = ("w1", "t1")


def claim_for(store: MemoryStore, worker: str, token: str, now, candidates: Candidates):  # type: ignore[no-untyped-def]
    return drive(
        store,
        claim_many(ALL, server="s1", workers=[(worker, token)], now=now, candidates=candidates),
    )


def test_a_second_unsure_claim_does_not_make_the_band_forget_the_first() -> None:
    store = MemoryStore()
    store.insert_tasks([make_doc("a", priority=1), make_doc("b", priority=2), make_doc("c")])
    candidates = Candidates(timedelta(seconds=1))
    # Given w1's claim of "a", stored but unacknowledged
    conversation = claim_many(
        ALL, server="s1", workers=[("w1", "t1")], now=T0, candidates=candidates
    )
    drive_until_insert_fails(store, conversation, failing=1, applied=True)
    candidates.forget()
    # And, while w1 is not idle (its worker process is being replaced), w2's claim of
    # "b" stored but unacknowledged too (its first insert, for "a", lost to w1's lease)
    conversation = claim_many(
        ALL, server="s1", workers=[("w2", "t2")], now=T0, candidates=candidates
    )
    drive_until_insert_fails(store, conversation, failing=2, applied=True)
    assert current_token(store, "b") == "t2"
    candidates.forget()
    # When both workers claim again
    later = T0 + timedelta(seconds=6)
    jobs = drive(
        store,
        claim_many(
            ALL, server="s1", workers=[("w1", "n1"), ("w2", "n2")], now=later, candidates=candidates
        ),
    )
    # Then each runs the lease stored for it: neither is left to be failed as lost unrun
    assert sorted((job.lease.worker, job.task_id, job.token) for job in jobs) == [
        ("w1", "a", "t1"),
        ("w2", "b", "t2"),
    ]
