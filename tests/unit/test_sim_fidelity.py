"""The simulator's drivers decide as tulliusd's do, in the cases where they once did not.

Each test names the daemon code whose behaviour it pins down in the simulator.
"""

from __future__ import annotations

import time
from datetime import timedelta

import pytest

import tullius
from tullius.sim import Simulation, StoreFault
from tullius.testing import assert_outcomes


class Punctual(tullius.Task):
    """Needs 4 s of its 5 s timeout."""

    timeout = timedelta(seconds=5)

    def run(self) -> None:
        time.sleep(4)

    def failed(self) -> None:
        return None


def test_a_run_whose_server_was_paused_past_its_deadline_times_out() -> None:
    # tulliusd (Supervisor._step) enforces deadlines before it reads results: a
    # result it reads after the deadline is late, however little time the user
    # code itself took, and the run fails as a timeout.
    # Given a lone server paused from 3 s to 10 s, during a 4 s run that began
    # within the first second, with a 5 s timeout and a lease that outlasts the pause
    sim = Simulation(seed=1, lease=timedelta(seconds=60))
    task = Punctual()
    sim.queue(task)
    sim.pause_server("s1", at=timedelta(seconds=3), duration=timedelta(seconds=7))
    # When it drains
    sim.drain(within=timedelta(minutes=5))
    # Then the run timed out, as in the daemon, rather than succeeding
    assert_outcomes(sim.chain(task), "timeout")
    sim.close()


class Reshaped(tullius.Task):
    """A field of it becomes a read-only property in a later version of the code."""

    timeout = timedelta(seconds=5)
    size: int

    def run(self) -> None:
        return None


def test_a_task_whose_stored_fields_no_longer_fit_its_class_fails_as_unloadable() -> None:
    # tulliusd's worker (worker.run_job) fails any task it can't rebuild from its
    # document as ``unloadable``, so does its failed(), and the task ends UNHANDLED.
    # Given a queued task, whose field ``size`` then became a read-only property
    sim = Simulation(seed=2)
    task = Reshaped(size=3)
    sim.queue(task)
    Reshaped.size = property(lambda self: 0)  # type: ignore[assignment]
    try:
        # When it drains
        sim.drain(within=timedelta(minutes=5))
    finally:
        del Reshaped.size
    # Then the run and every failed() attempt failed as unloadable
    [link] = sim.chain(task)
    assert link.failure is not None
    assert link.failure.kind == "unloadable"
    assert "size" in link.failure.message
    assert link.status is tullius.Status.UNHANDLED
    sim.close()


CAUGHT: list[str] = []


class Spawner(tullius.Task):
    """Queues a child with ``tullius.queue()`` 3 s into its run."""

    timeout = timedelta(seconds=30)

    def run(self) -> None:
        time.sleep(3)
        try:
            tullius.queue(Punctual())
        except tullius.StoreError as error:
            CAUGHT.append(str(error))
            raise


def test_queue_from_user_code_during_a_store_outage_raises_store_error() -> None:
    # tulliusd's worker sends tullius.queue() to its daemon, whose store insert
    # (Supervisor._queue_for) fails in an outage; the worker raises StoreError in
    # the user code.  The simulator used to insert past every outage and fault.
    # Given a store outage from 2 s to 20 s, and a run that queues a task at 3-4 s
    CAUGHT.clear()
    sim = Simulation(seed=3)
    task = Spawner()
    sim.queue(task)
    sim.store_outage(at=timedelta(seconds=2), duration=timedelta(seconds=18))
    # When it drains
    counts = sim.drain(within=timedelta(minutes=5))
    # Then queue() raised StoreError in run(), which failed with it, and nothing was queued
    assert len(CAUGHT) == 1
    assert "outage" in CAUGHT[0]
    [link] = sim.chain(task)
    assert link.failure is not None
    assert link.failure.kind == "exception"
    assert "StoreError" in link.failure.message
    assert counts.tasks == 1
    sim.close()


class Long(tullius.Task):
    timeout = timedelta(seconds=300)

    def run(self) -> None:
        time.sleep(100)

    def failed(self) -> None:
        return None


def _paused_together(seed: int) -> Simulation:
    sim = Simulation(seed=seed, servers=2, task_processes=[(1, 0, 10)])
    task = Long()
    sim.queue(task)
    sim.run_for(timedelta(seconds=20))  # each server's sweeps have seen the lease beat
    for server in sim.servers:
        sim.pause_server(server, at=sim.elapsed, duration=timedelta(seconds=60))
    sim.drain(within=timedelta(minutes=10))
    return sim


@pytest.mark.parametrize("seed", [1, 3, 4, 13])
def test_a_sweeper_paused_along_with_the_owner_does_not_declare_it_lost(seed: int) -> None:
    # tulliusd's sweeper forgets what it saw when its sweep comes much later than
    # scheduled (LeaseWatch.sweep_starting): it was not watching, and the owner may
    # not have been able to beat either.  Given two servers, one running a long
    # task, both paused together for 60 s (longer than the 15 s a lease may stay
    # silent), when they wake up at the same instant and drain
    sim = _paused_together(seed)
    # Then the run succeeded: neither server's first sweep after the pause judged
    # the lease by a beat it saw before the pause
    assert sim.counts().succeeded == 1
    sim.close()


class Tidy(tullius.Task):
    """Queues a clean-up task however its run ends, even when stopped."""

    timeout = timedelta(seconds=30)

    def run(self) -> None:
        try:
            time.sleep(10)
        finally:
            tullius.queue(Punctual())

    def failed(self) -> None:
        return None


def test_user_code_stopped_by_a_shutdown_may_still_queue_its_clean_up() -> None:
    # A stop's kill is SIGTERM, and SIGKILL only a second later, as at a deadline:
    # the run's finally block runs under tulliusd too, and what it queues is stored.
    sim = Simulation(seed=4)
    task = Tidy()
    sim.queue(task)
    sim.stop_server(
        "s1",
        at=timedelta(seconds=2),
        grace=timedelta(seconds=3),
        restart_after=timedelta(seconds=1),
    )
    counts = sim.drain(within=timedelta(minutes=5))
    assert_outcomes(sim.chain(task), "shutdown")
    assert counts.tasks == 2
    assert counts.succeeded == 1  # the clean-up task, run after the restart
    sim.close()


@pytest.mark.parametrize("fault", ["worker crash", "server crash"])
def test_user_code_whose_process_died_queues_nothing(fault: str) -> None:
    # Under tulliusd a crashed worker, or every worker of a crashed server (their
    # process groups die with it), runs no more code: its finally blocks never
    # run.  The simulator stops user code by raising TaskStopped at its sleep, so
    # a finally block does run there; its tullius.queue() must store nothing.
    # Given a run that queues a task in a finally block, whose worker dies at 5 s
    sim = Simulation(seed=4)
    task = Tidy()
    sim.queue(task)
    if fault == "worker crash":
        sim.crash_worker("s1", at=timedelta(seconds=5))
    else:
        sim.crash_server("s1", at=timedelta(seconds=5), restart_after=timedelta(seconds=1))
    # When it drains
    counts = sim.drain(within=timedelta(minutes=5))
    # Then the run failed as its worker died, and no clean-up task was queued
    assert_outcomes(sim.chain(task), "crashed" if fault == "worker crash" else "lost")
    assert counts.tasks == 1
    sim.close()


STARTED: list[str] = []


class Recorded(tullius.Task):
    """Notes each start of its run()."""

    timeout = timedelta(seconds=5)

    def run(self) -> None:
        STARTED.append(self.task_id)

    def failed(self) -> None:
        return None


def test_a_job_whose_lease_was_failed_as_lost_during_a_paused_claim_is_not_started() -> None:
    # tulliusd renews the leases of a claim that took longer than a heartbeat before
    # it dispatches their jobs, and drops a job whose lease is no longer its own
    # (Supervisor._claim_for, Running.confirm): a loaded FerretDB once saw a
    # failed() start after its attempt had been failed as lost.
    # Given s1 paused for 5 s right after its claim stored the run's lease (seed 78:
    # the pause lands between the lease's insert and the hint's), and a 3 s lease
    STARTED.clear()
    sim = Simulation(seed=78, servers=["s1", "s2"], lease=timedelta(seconds=3), keep_trace=True)
    task = Recorded()
    sim.queue(task)
    sim.pause_server("s1", at=timedelta(milliseconds=34), duration=timedelta(seconds=5))
    # When it drains, and runs on past the pause
    sim.drain(within=timedelta(minutes=5))
    sim.run_for(timedelta(seconds=10))
    trace = [str(line) for line in sim.trace]
    sim.close()
    lease_stored = next(
        i for i, line in enumerate(trace) if f"s1       InsertRecord {task.task_id}:run" in line
    )
    assert "fault ServerPause" in trace[lease_stored + 1], "the pause no longer lands mid-claim"
    # Then s2 failed the lease as lost during the pause and handled that failure,
    # and s1, waking up, renewed before starting and did not start the run
    [link] = sim.chain(task)
    assert link.failure is not None
    assert link.failure.kind == "lost"
    assert any(f"s1/w0 did not start {task.task_id}: its lease was lost" in line for line in trace)
    assert STARTED == []


def test_a_job_settled_from_an_unsure_claim_is_renewed_before_it_starts() -> None:
    # tulliusd renews a lease stored over a heartbeat ago before it dispatches its
    # job, such as the lease of a claim whose hint write lost its reply, settled by
    # the band's next claim a store retry later (Supervisor._claim_for, Running.confirm).
    # Given a 2.4 s lease (a 0.4 s heartbeat), and the claim's hint write applied
    # with its acknowledgement lost
    sim = Simulation(seed=0, servers=["s1"], lease=timedelta(seconds=2.4), keep_trace=True)
    task = Recorded()
    sim.queue(task)
    sim.apply([StoreFault(server="s1", operation="SetStatus", kind="lost_ack", count=1)])
    # When it drains
    sim.drain(within=timedelta(minutes=5))
    trace = [str(line) for line in sim.trace if task.task_id in line]
    sim.close()
    # Then the job, settled a second later, was renewed before its run: the lease
    # beat before the outcome was recorded (a run that doesn't sleep never beats)
    assert any("store fault lost_ack: SetStatus" in line for line in sim.trace)
    settled = next(i for i, line in enumerate(trace) if "s1/w0 claimed" in line)
    assert "Beat" in trace[settled + 1]
    assert "InsertRecord" in trace[settled + 3]
    assert ":outcome" in trace[settled + 3]
    [link] = sim.chain(task)
    assert link.outcome == "succeeded"
