"""Fault injection: each fault of tullius.sim.faults ends in a visible, handled failure."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest

import tullius
from tullius.policy import LeaseTimings
from tullius.sim import (
    DrainTimeout,
    ServerPause,
    ServerStop,
    Simulation,
    StepCrash,
    StoreFault,
    StoreOutage,
)
from tullius.sim.strategies import SimWork
from tullius.testing import assert_chain, assert_outcomes, expect

FAILURES: list[str] = []


class Sleeper(tullius.Task):
    """Sleeps ``secs``; its failed() records the failure kind and asks for nothing more."""

    timeout = timedelta(seconds=60)
    failed_timeout = timedelta(seconds=10)
    secs: float

    def run(self) -> None:
        time.sleep(self.secs)

    def failed(self) -> None:
        assert self.failure is not None
        FAILURES.append(self.failure.kind)


def owner_of(sim: Simulation, task: tullius.Task) -> str:
    """The server that claimed ``task`` (it must have been claimed)."""
    owner = sim.chain(task)[0].server
    assert owner is not None, "not claimed yet"
    return owner


def running_on_one_of_two_servers(
    seed: int, task: tullius.Task, after: timedelta
) -> tuple[Simulation, str, str]:
    """Two servers of one worker each, ``after`` the task was queued: the
    simulation, the server running the task and the other one."""
    sim = Simulation(seed=seed, servers=["s1", "s2"], task_processes=[(1, 0, 10)])
    sim.queue(task)
    sim.run_for(after)
    owner = owner_of(sim, task)
    return sim, owner, "s2" if owner == "s1" else "s1"


def test_crashed_server_task_is_declared_lost_by_another_server() -> None:
    # Given two servers, the one running the task crashing mid-run and never coming back
    task = Sleeper(secs=20)
    sim, owner, _ = running_on_one_of_two_servers(3, task, timedelta(seconds=2))
    sim.crash_server(owner, at=sim.elapsed)
    # When the survivors drain
    sim.drain(within=timedelta(minutes=5))
    # Then the run failed as lost, within the lease, and failed() ran
    [link] = sim.chain(task)
    assert link.outcome == "failed"
    assert link.failure is not None
    assert link.failure.kind == "lost"
    assert link.finished_at is not None
    assert link.started_at is not None
    assert link.finished_at - link.started_at <= timedelta(seconds=2) + sim.timings.lease
    assert link.status is tullius.Status.HANDLED
    sim.close()


def test_a_restarted_lone_server_declares_its_own_old_lease_lost() -> None:
    sim = Simulation(seed=4)
    task = Sleeper(secs=20)
    sim.queue(task)
    sim.crash_server("s1", at=timedelta(seconds=3), restart_after=timedelta(seconds=10))
    sim.drain(within=timedelta(minutes=5))
    assert_outcomes(sim.chain(task), "lost")
    sim.close()


def test_a_stopped_server_lets_its_running_work_finish_within_the_grace_then_exits() -> None:
    # Given a lone server running a 5 s task, told to stop at 2 s with 10 s of grace
    sim = Simulation(seed=7, keep_trace=True)
    task = Sleeper(secs=5)
    sim.queue(task)
    sim.stop_server("s1", at=timedelta(seconds=2), grace=timedelta(seconds=10))
    sim.run_for(timedelta(seconds=3))
    # And a task queued while it stops
    later = Sleeper(secs=1)
    sim.queue(later)
    # When time passes
    sim.run_for(timedelta(minutes=5))
    # Then the running task succeeded, and the server exited as soon as it did
    assert_chain(sim.chain(task), [expect("succeeded", duration=timedelta(seconds=5))])
    assert any("stopped: every verdict recorded" in line for line in sim.trace)
    # And it claimed nothing after the stop: the later task still waits for a worker
    assert sim.chain(later)[0].outcome is None
    with pytest.raises(DrainTimeout, match="waits for a worker"):
        sim.drain(within=timedelta(minutes=1))
    sim.close()


def _first_claim_at(seed: int) -> timedelta:
    """When a lone server of ``seed`` first looks for work (its first claim's offset)."""
    with Simulation(seed=seed, keep_trace=True) as probe:
        probe.queue(Sleeper(secs=1))
        probe.run_for(timedelta(seconds=2))
        line = next(line for line in probe.trace if " claimed " in line)
    return timedelta(seconds=float(line.split("s", 1)[0]))


def test_jobs_claimed_as_the_stop_signal_arrives_run_before_the_server_exits() -> None:
    # A claim in flight when the stop arrives runs the jobs it wins, as the daemon's.
    # They start only after the claim loop went on to its next nap, which a stop
    # ends: a server that exited there left the claimed task to fail as lost.
    caught_mid_claim = 0
    for seed in range(60):
        # Given a lone idle server, a task queued, and a stop at the instant of its
        # next look for work (which of the two comes first is the seed's draw)
        at = timedelta(seconds=3) + _first_claim_at(seed)
        sim = Simulation(seed=seed, keep_trace=True)
        sim.run_for(timedelta(seconds=2.5))
        task = Sleeper(secs=1)
        sim.queue(task)
        sim.stop_server(
            "s1", at=at, grace=timedelta(seconds=10), restart_after=timedelta(seconds=1)
        )
        sim.drain(within=timedelta(minutes=5))
        # Then the task ran to its end, whether claimed before the stop or after the restart
        assert_outcomes(sim.chain(task), "succeeded")
        lines = sim.trace
        stopping, claimed, restarted = (
            next((i for i, line in enumerate(lines) if what in line), len(lines))
            for what in ("stopping:", " claimed ", "restarted")
        )
        caught_mid_claim += stopping < claimed < restarted
        sim.close()
    assert caught_mid_claim >= 2  # the case above happened, and more than once


def test_work_still_running_after_the_grace_fails_as_shutdown_and_is_handled_elsewhere() -> None:
    # Given two one-slot servers, each running a 50 s task
    FAILURES.clear()
    sim = Simulation(seed=8, servers=["s1", "s2"], task_processes=[(1, 0, 10)])
    tasks = [Sleeper(secs=50), Sleeper(secs=50)]
    sim.queue(tasks)
    sim.run_for(timedelta(seconds=2))
    on_s1 = next(task for task in tasks if sim.chain(task)[0].server == "s1")
    # When s1 is stopped with 10 s of grace (a deploy), coming back 30 s after it exits
    stopped_at = sim.now
    sim.stop_server(
        "s1", at=sim.elapsed, grace=timedelta(seconds=10), restart_after=timedelta(seconds=30)
    )
    sim.drain(within=timedelta(minutes=10))
    # Then its task was stopped when the grace ran out, failed as shutdown, and
    # its failed() ran once; the other server's task ran to its end
    [link] = sim.chain(on_s1)
    assert link.failure is not None
    assert link.failure.kind == "shutdown"
    assert link.failure.message == (
        "the daemon stopped (grace of 10s over) while run() was running"
    )
    assert link.finished_at == stopped_at + timedelta(seconds=10)
    assert link.status is tullius.Status.HANDLED
    assert FAILURES == ["shutdown"]
    assert sim.counts().succeeded == 1
    sim.check()
    sim.close()


def test_a_lone_server_restarted_after_a_stop_handles_the_work_it_stopped() -> None:
    sim = Simulation(seed=9)
    task = Sleeper(secs=50)
    sim.queue(task)
    sim.stop_server(
        "s1", at=timedelta(seconds=5), grace=timedelta(0), restart_after=timedelta(seconds=60)
    )
    counts = sim.drain(within=timedelta(minutes=10))
    [link] = sim.chain(task)
    assert link.failure is not None
    assert link.failure.kind == "shutdown"
    assert link.status is tullius.Status.HANDLED
    assert counts.failures == {"shutdown": 1}
    assert sim.elapsed >= timedelta(seconds=65)  # failed() ran on the restarted server
    sim.close()


def test_a_server_stopping_while_the_store_is_out_of_reach_gives_up_and_the_task_is_lost() -> None:
    # Given two servers, s1 running a long task, stopped with 5 s of grace while
    # cut off from the store for five minutes
    sim = Simulation(seed=10, servers=["s1", "s2"], task_processes=[(1, 0, 10)], keep_trace=True)
    task = Sleeper(secs=100)
    sim.queue(task)
    sim.run_for(timedelta(seconds=2))
    owner = owner_of(sim, task)
    sim.store_outage(at=sim.elapsed, duration=timedelta(minutes=5), server=owner)
    sim.stop_server(owner, at=sim.elapsed, grace=timedelta(seconds=5))
    # When the other server drains, and a minute passes
    sim.drain(within=timedelta(minutes=10))
    sim.run_for(timedelta(minutes=1))
    # Then the other server failed the task as lost (its lease was no longer
    # renewed once the run was stopped), and the stopping server gave its
    # verdict up 31 s after the kill and exited
    assert any("stopped without recording the verdicts of" in line for line in sim.trace)
    [link] = sim.chain(task)
    assert link.failure is not None
    assert link.failure.kind == "lost"
    assert link.status is tullius.Status.HANDLED
    sim.check()
    sim.close()


@pytest.mark.parametrize("seed", range(8))
def test_a_run_waking_as_the_grace_ends_fails_as_shutdown_as_in_the_daemon(seed: int) -> None:
    # tulliusd stops its jobs before it reads results (`Supervisor._step`): a run
    # whose result comes at the grace's very end, or later, is a shutdown, never
    # a success, whichever event the seed's tie-break puts first.
    sim = Simulation(seed=seed)
    task = Sleeper(secs=5)
    sim.queue(task)
    sim.run_for(timedelta(seconds=2))
    started = sim.chain(task)[0].started_at
    assert started is not None
    wakes = started + timedelta(seconds=5)
    sim.stop_server("s1", at=sim.elapsed, grace=wakes - sim.now, restart_after=timedelta(seconds=1))
    sim.drain(within=timedelta(days=2))
    assert_outcomes(sim.chain(task), "shutdown")
    sim.close()


@pytest.mark.parametrize("seed", range(8))
def test_a_run_a_pause_carried_past_the_grace_fails_as_shutdown_not_timeout(seed: int) -> None:
    # The grace ends at 6 s and the deadline at 8 s, both while the server is
    # paused (2 s to 12 s): as tulliusd, the stop is enforced first.
    class SleepsSeven(Sleeper):
        timeout = timedelta(seconds=8)

    sim = Simulation(seed=seed)
    task = SleepsSeven(secs=7)
    sim.queue(task)
    sim.stop_server(
        "s1",
        at=timedelta(seconds=1),
        grace=timedelta(seconds=5),
        restart_after=timedelta(seconds=1),
    )
    sim.pause_server("s1", at=timedelta(seconds=2), duration=timedelta(seconds=10))
    sim.drain(within=timedelta(days=2))
    assert_outcomes(sim.chain(task), "shutdown")
    sim.close()


class Quick(Sleeper):
    timeout = timedelta(seconds=1)
    failed_timeout = timedelta(seconds=1)


def test_a_stop_a_pause_delayed_moves_the_end_of_the_faults_with_it() -> None:
    # A claim left unsure (its lease stored, the reply lost), then a pause, and a
    # stop sent during it with a restart a minute after the exit.  Only the
    # restarted server can fail the orphaned lease as lost; the liveness bound
    # counted from the stop's `fault_end` (at + grace + 31 s + restart), which the
    # pause had made too early, and failed.
    for seed in range(20):
        sim = Simulation(seed=seed)
        sim.queue(Quick(secs=0.1))
        sim.apply(
            [
                StoreFault("s1", "InsertRecord", "lost_ack", record_kind="run"),
                ServerPause(at=timedelta(seconds=0.5), server="s1", duration=timedelta(seconds=90)),
                ServerStop(
                    at=timedelta(seconds=1), server="s1", restart_after=timedelta(seconds=60)
                ),
            ]
        )
        sim.run_for(timedelta(minutes=4))
        sim.check()
        assert sim.faults_end >= timedelta(seconds=0.5 + 90 + 30 + 31 + 60)
        sim.close()


def test_a_stop_of_a_server_already_stopping_or_down_is_ignored() -> None:
    sim = Simulation(seed=11, servers=["s1", "s2"], keep_trace=True)
    sim.stop_server("s1", at=timedelta(seconds=1))
    sim.stop_server("s1", at=timedelta(seconds=1), grace=timedelta(0))
    sim.crash_server("s2", at=timedelta(seconds=1))
    sim.stop_server("s2", at=timedelta(seconds=2))
    sim.run_for(timedelta(seconds=5))
    ignored = [line for line in sim.trace if "stop signal ignored" in line]
    assert len(ignored) == 2
    assert "the server is stopped" in ignored[0] or "the server is stopping" in ignored[0]
    assert "the server is crashed" in ignored[1]
    sim.close()


def test_a_stop_sent_to_a_paused_server_is_carried_out_when_it_wakes_up() -> None:
    FAILURES.clear()
    sim = Simulation(seed=12, servers=["s1", "s2"], task_processes=[(1, 0, 10)])
    task = Sleeper(secs=100)
    sim.queue(task)
    sim.run_for(timedelta(seconds=2))
    owner = owner_of(sim, task)
    # Paused for 10 s (shorter than the lease), stopped with 5 s of grace while paused
    sim.pause_server(owner, at=sim.elapsed, duration=timedelta(seconds=10))
    sim.stop_server(owner, at=sim.elapsed + timedelta(seconds=1), grace=timedelta(seconds=5))
    sim.drain(within=timedelta(minutes=10))
    # The grace counts from the wake-up, when the signal is acted upon
    [link] = sim.chain(task)
    assert link.failure is not None
    assert link.failure.kind == "shutdown"
    assert link.finished_at == sim.now - sim.elapsed + timedelta(seconds=2 + 10 + 5)
    sim.close()


def test_paused_server_wakes_up_and_its_late_result_is_rejected() -> None:
    sim = Simulation(seed=5, servers=2, task_processes=[(1, 0, 10)], keep_trace=True)
    task = Sleeper(secs=5)
    sim.queue(task)
    sim.run_for(timedelta(seconds=1.5))
    owner = owner_of(sim, task)
    sim.pause_server(owner, at=sim.elapsed, duration=timedelta(seconds=120))
    # On waking, its lease renewals fail too, so it does try to record its late result
    # (with a working renewal it would learn of the lost lease first and stop the task).
    sim.apply([StoreFault(owner, "Beat", "not_applied", at=sim.elapsed, count=1000)])
    sim.drain(within=timedelta(minutes=10))
    sim.run_for(timedelta(minutes=3))  # let the paused server wake up and try to finish
    [link] = sim.chain(task)
    assert link.failure is not None
    assert link.failure.kind == "lost"
    assert any("rejected" in line and owner in line for line in sim.trace)
    sim.close()


@pytest.mark.parametrize("kind", ["lost_ack", "not_applied"])
@pytest.mark.parametrize("record_kind", ["run", "outcome"])
def test_store_faults_on_decisive_inserts_are_retried_without_duplicates(
    kind: str, record_kind: str
) -> None:
    sim = Simulation(seed=6)
    task = Sleeper(secs=1)
    sim.queue(task)
    sim.apply([StoreFault("s1", "InsertRecord", kind, record_kind=record_kind, count=2)])
    counts = sim.drain(within=timedelta(minutes=5))
    sim.check()
    # a claim whose ack was lost is settled by the next claim: its lease is ours, so it runs
    assert_outcomes(sim.chain(task), "succeeded")
    assert counts.tasks == 1
    sim.close()


def test_a_server_cut_off_for_days_gives_up_its_verdict_and_the_task_fails_as_lost() -> None:
    # Given two servers, and the one running a 5 s task cut off from the store
    # for three days (its verdict retried every hour meanwhile; idle bands
    # polling every ten minutes, to keep three simulated days quick)
    sim = Simulation(
        seed=5,
        servers=2,
        task_processes=[(1, 0, 10)],
        store_retry=timedelta(hours=1),
        poll_interval=timedelta(minutes=10),  # (an idle band is woken by a lost lease)
        keep_trace=True,
    )
    task = Sleeper(secs=5)
    sim.queue(task)
    while sim.chain(task)[0].server is None and sim.elapsed < timedelta(minutes=30):
        sim.run_for(timedelta(seconds=1))  # (the 5 s run is still going at each stop)
    owner = owner_of(sim, task)
    sim.apply([StoreOutage(at=sim.elapsed, duration=timedelta(days=3), server=owner)])
    # When the outage is over
    sim.run_for(timedelta(days=3, hours=2))
    # Then the other server failed the run as lost and failed() ran, and the
    # cut-off server gave its result up instead of writing it a day too late
    [link] = sim.chain(task)
    assert link.failure is not None
    assert link.failure.kind == "lost"
    assert link.status is tullius.Status.HANDLED
    gave_up = [line for line in sim.trace if "gave up the verdict" in line]
    assert len(gave_up) == 1
    assert owner in gave_up[0]
    assert not any("rejected" in line for line in sim.trace)
    sim.check()
    sim.close()


def test_store_outage_delays_but_loses_nothing() -> None:
    sim = Simulation(seed=7, servers=2)
    tasks = [Sleeper(secs=n) for n in range(1, 6)]
    sim.queue(tasks)
    sim.apply([StoreOutage(at=timedelta(seconds=2), duration=timedelta(seconds=40))])
    counts = sim.drain(within=timedelta(minutes=10))
    assert counts.tasks == 5
    assert counts.succeeded + counts.handled == 5
    # An outage longer than the lease: no owner could renew, and no sweep counted it
    assert counts.failures.get("lost", 0) == 0
    sim.close()


def lost_after_the_crash(faults_of_the_other: Callable[[str], list[Any]]) -> timedelta:
    """How long after its server crashed a task was failed as lost by the other
    server, whose faults ``faults_of_the_other(name)`` gives (from 2 s)."""
    task = Sleeper(secs=300)
    sim, owner, other = running_on_one_of_two_servers(1, task, timedelta(seconds=1))
    sim.apply(faults_of_the_other(other))
    sim.run_for(timedelta(seconds=2))
    crashed_at = sim.now
    sim.crash_server(owner, at=sim.elapsed)
    sim.drain(within=timedelta(hours=1))
    [link] = sim.chain(task)
    sim.close()
    assert link.failure is not None
    assert link.failure.kind == "lost"
    assert link.finished_at is not None
    return link.finished_at - crashed_at


def test_brief_outages_now_and_then_do_not_keep_a_crashed_servers_task_from_being_lost() -> None:
    # Why: a sweeper forgot what it had seen after any store error of its server, so
    # a tenth of a second without the store every 4 s kept a crashed server's task
    # running for as long as they went on (lost 811 s after the crash here; now 31 s,
    # and 20 s without them)
    def every_4s(server: str) -> list[Any]:
        tenth = timedelta(seconds=0.1)
        return [
            StoreOutage(at=timedelta(seconds=2 + 4 * n), duration=tenth, server=server)
            for n in range(200)
        ]

    # Each outage stops the sweeps' store time from the server's last call that worked
    # to its next (its claims poll every second, and wait a second after an error):
    # up to 2 s in every 4, so at worst about twice the lease
    assert lost_after_the_crash(every_4s) < 2 * LeaseTimings().lease


def test_refused_store_calls_now_and_then_cost_a_crashed_servers_task_no_time() -> None:
    # A refused read is an answer: the store is up, and owners can renew
    def every_second(server: str) -> list[Any]:
        at = [timedelta(seconds=2 + n) for n in range(600)]
        return [StoreFault(server, "FindDue", "not_applied", at=t) for t in at]

    assert lost_after_the_crash(every_second) <= LeaseTimings().lease


def outages(first: float, every: float, count: int) -> list[StoreOutage]:
    """``count`` outages of the whole store, 50 ms each, centred ``every`` seconds
    apart from ``first``."""
    return [
        StoreOutage(
            at=timedelta(seconds=first - 0.025 + every * k), duration=timedelta(seconds=0.05)
        )
        for k in range(count)
    ]


@pytest.mark.parametrize(
    "schedule",
    [
        # Why: a simulated owner whose renewal failed waited a whole heartbeat to try
        # again (the daemon: a second), so with store time counted, outages at its
        # beats got its running task failed as lost by the other server, which saw
        # every outage
        outages(first=10.006, every=5, count=6),
        # Its renewal and each of its retries a second later fall in an outage the
        # other server sees too: its store time stands still
        outages(first=10.001, every=1, count=25),
    ],
    ids=["at-its-beats", "at-its-beats-and-retries"],
)
def test_brief_outages_of_the_whole_store_do_not_get_a_live_owner_failed_as_lost(
    schedule: list[StoreOutage],
) -> None:
    sim = Simulation(
        seed=1,
        servers=["s1", "s2"],
        task_processes=[(1, 0, 10)],
        poll_interval=timedelta(milliseconds=10),
    )
    task = Sleeper(secs=40)
    sim.queue(task)
    sim.apply(schedule)
    sim.drain(within=timedelta(minutes=30))
    [link] = sim.chain(task)
    assert link.outcome == "succeeded", link.failure
    sim.close()


def test_worker_crash_is_recorded_as_crashed_and_handled() -> None:
    FAILURES.clear()
    sim = Simulation(seed=8)
    task = Sleeper(secs=10)
    sim.queue(task)
    sim.crash_worker("s1", at=timedelta(seconds=4))
    sim.drain(within=timedelta(minutes=5))
    assert_outcomes(sim.chain(task), "crashed")
    assert FAILURES == ["crashed"]
    sim.close()


def test_clock_skew_on_one_server_does_not_expire_live_leases() -> None:
    sim = Simulation(seed=9, servers=2, racy_updates=0.3)
    sim.skew_clock("s2", timedelta(hours=1))
    sim.queue([Sleeper(secs=n) for n in range(0, 50, 5)])
    counts = sim.drain(within=timedelta(minutes=10))
    assert counts.succeeded == 10
    assert counts.failed == 0
    sim.close()


def test_racy_updates_everywhere_still_decide_each_task_once() -> None:
    sim = Simulation(seed=10, servers=3, racy_updates=0.5, task_processes=[(3, 0, 10)])
    sim.queue([Sleeper(secs=n % 7) for n in range(60)])
    sim.crash_server("s2", at=timedelta(seconds=3), restart_after=timedelta(seconds=5))
    counts = sim.drain(within=timedelta(minutes=30))
    sim.check()
    assert counts.tasks == 60
    assert counts.succeeded + counts.handled == 60
    sim.close()


def test_drain_past_its_horizon_lists_open_tasks_and_what_they_wait_for() -> None:
    sim = Simulation(seed=11)
    task = Sleeper(secs=20)
    sim.queue(task)
    sim.crash_server("s1", at=timedelta(seconds=5))
    with pytest.raises(DrainTimeout) as caught:
        sim.drain(within=timedelta(minutes=2))
    message = str(caught.value)
    assert task.task_id is not None
    assert task.task_id in message
    assert "running" in message
    assert "'s1' (crashed)" in message
    assert "seed=11" in message
    sim.close()


class Retries(tullius.Task):
    timeout = timedelta(seconds=10)

    def run(self) -> None:
        raise RuntimeError("no")

    def failed(self) -> tullius.Task:
        return self.copy(delay=timedelta(minutes=1))


class FailsToHandle(tullius.Task):
    timeout = timedelta(seconds=10)

    def run(self) -> None:
        raise RuntimeError("no")

    def failed(self) -> None:
        raise RuntimeError("neither")


def test_drain_past_its_horizon_names_when_a_deferred_task_is_due_not_a_worker() -> None:
    # Workers were idle: the open task waits for its own delay (or failed()'s
    # backoff), and the message used to say it waited for a worker in its band.
    sim = Simulation(seed=13)
    sim.queue(Retries(n=1))
    with pytest.raises(DrainTimeout) as caught:
        sim.drain(within=timedelta(seconds=90))
    assert "queued: waits for its start, not due until 2030-01-01T00:02:" in str(caught.value)
    assert "waits for a worker" not in str(caught.value)
    sim.close()

    sim = Simulation(seed=13)
    sim.queue(FailsToHandle(n=1))
    with pytest.raises(DrainTimeout) as caught:
        sim.drain(within=timedelta(seconds=2))
    # attempts 1 and 2 failed at 0 s and 1 s; the backoff puts attempt 3 at 3 s
    assert "failed: waits for failed() attempt 3, not due until 2030-01-01T00:00:03" in str(
        caught.value
    )
    sim.close()


class Pair(tullius.Task):
    timeout = timedelta(seconds=10)
    left: int

    def run(self) -> list[tullius.Task]:
        time.sleep(1)
        return [Sleeper(secs=1), Sleeper(secs=2)] if self.left else []


def test_a_crash_between_the_outcome_and_its_successors_is_repaired_by_a_sweep() -> None:
    # Given a lone server that dies right after recording a success, before
    # inserting the successors that success carries
    sim = Simulation(seed=12, keep_trace=True)
    task = Pair(left=1)
    sim.queue(task)
    sim.apply(
        [StepCrash("s1", "InsertRecord", record_kind="outcome", restart_after=timedelta(seconds=5))]
    )
    # When it restarts and drains
    counts = sim.drain(within=timedelta(minutes=5))
    # Then its sweep inserted the successors exactly once, and they ran
    assert counts.tasks == 3
    assert counts.succeeded == 3
    assert len(sim.tree(task).walk()) == 3
    assert any("StepCrash" in line for line in sim.trace)
    sim.close()


class Urgent(tullius.Task):
    timeout = timedelta(seconds=30)

    def run(self) -> None:
        return None


def test_a_claim_that_failed_midway_does_not_let_less_urgent_work_go_first() -> None:
    # (a retry sooner than the 0.25 s the candidates of a read are kept for)
    sim = Simulation(
        seed=0,
        task_processes=[(1, 0, 10)],
        poll_interval=0.1,
        store_retry=timedelta(seconds=0.1),
        keep_trace=True,
    )
    sim.run_for(timedelta(seconds=1))
    sim.store_fault("s1", "InsertRecord", "not_applied", at=sim.elapsed, record_kind="run")
    urgent_id, later_id = sim.queue([Urgent(priority=1), Urgent(priority=5)])
    sim.drain(within=timedelta(minutes=1))
    claims = [line for line in sim.trace if " claimed " in line]
    assert [urgent_id in claims[0], later_id in claims[1]] == [True, True], claims
    sim.close()


def test_a_links_finished_at_is_when_its_outcome_was_recorded_after_an_outage() -> None:
    # run() returns after 3 s, well within its 60 s timeout, but the store is out
    # from 1 s to 121 s: the outcome, and so finished_at, is written when it is back.
    sim = Simulation(seed=14)
    task = Sleeper(secs=3)
    sim.queue(task)
    sim.store_outage(at=timedelta(seconds=1), duration=timedelta(minutes=2))
    sim.drain(within=timedelta(minutes=10))
    [link] = sim.chain(task)
    assert link.outcome == "succeeded"
    assert link.started_at is not None
    assert link.finished_at is not None
    assert link.finished_at - link.started_at > Sleeper.timeout
    sim.close()


def test_an_unsure_claim_settled_later_is_checked_against_the_read_that_chose_it() -> None:
    # Found by a hunt of claim faults.  A lost acknowledgement leaves t2's claim
    # (priority 1, the most urgent due at 1.4 s) unsure; the next claim, at 2.4 s,
    # runs it, when t6 (priority 0, delayed to 2 s) has come due.  That is no
    # breach of priority order, as t2 was chosen before t6 was due; the
    # simulator's check compared it with the later claim's read, and failed.
    sim = Simulation(seed=0, task_processes=[(3, 0, 10)])
    now = SimWork(secs=0, run_does="ok", failed_does="ok", successors=0, retries=0)
    sim.queue(
        [
            now.copy(priority=0),
            now.copy(priority=1),
            now.copy(priority=1),
            now.copy(priority=0, secs=1),
            now.copy(priority=0, delay=timedelta(seconds=2)),
            now.copy(priority=0, delay=timedelta(seconds=2)),
        ]
    )
    sim.apply(
        [
            StoreFault("s1", "InsertRecord", "lost_ack", record_kind="run", count=1),
            StoreFault("s1", "InsertRecord", "lost_ack", record_kind="run", count=2),
        ]
    )
    counts = sim.drain(within=timedelta(minutes=5))
    sim.check()
    assert counts.succeeded == 6
    sim.close()


def test_a_store_fault_or_skew_without_a_time_is_armed_now_not_at_the_start() -> None:
    # Its at defaulted to 0 and was refused as in the past once the run had moved on.
    with Simulation(seed=1) as sim:
        sim.run_for(timedelta(seconds=10))
        sim.store_fault("s1", "InsertRecord", "lost_ack", record_kind="outcome")
        sim.skew_clock("s1", timedelta(minutes=5))
        assert [fault.at for fault in sim.faults] == [timedelta(seconds=10)] * 2


def test_a_drain_timeout_with_every_server_down_says_so_rather_than_blame_the_bands() -> None:
    with Simulation(seed=1, servers=["a"]) as sim:
        sim.stop_server("a", at=timedelta(seconds=1), grace=timedelta(0))
        sim.run_for(timedelta(seconds=5))
        sim.queue(Sleeper(secs=1))
        with pytest.raises(DrainTimeout, match=r"no server is up to claim it \(a stopped\)"):
            sim.drain(within=timedelta(minutes=1))


def test_a_run_that_ended_during_an_outage_keeps_its_lease_until_its_verdict_is_recorded() -> None:
    # The daemon renewed no lease while a verdict waited: with a short lease, a
    # success held up by a long outage was failed as lost by a server back first.
    # (Outages of 40 to 44.5 s end at every point between two verdict attempts.)
    for tenths in range(400, 450, 5):
        with Simulation(
            seed=tenths,
            servers=2,
            lease=timedelta(seconds=3),
            store_retry=timedelta(seconds=5),  # the daemon's longest verdict backoff
        ) as sim:
            task = Sleeper(secs=2)
            sim.queue(task)
            outage = timedelta(seconds=tenths / 10)
            sim.store_outage(at=timedelta(seconds=1.5), duration=outage)
            sim.drain(within=timedelta(minutes=5))
            assert_outcomes(sim.chain(task), "succeeded")


def test_a_verdict_held_back_by_a_pause_keeps_its_lease_renewed_through_an_outage() -> None:
    # The heartbeat ended at the pause's end, before the crashed run's verdict was
    # pending, and none renewed the lease while the verdict waited out the outage:
    # a run the daemon records as crashed was failed as lost.
    for seconds in (41, 42, 43):
        with Simulation(
            seed=1, servers=2, lease=timedelta(seconds=3), store_retry=timedelta(seconds=5)
        ) as sim:
            task = Sleeper(secs=20)
            sim.queue(task)
            sim.run_for(timedelta(seconds=1))
            owner = owner_of(sim, task)
            sim.pause_server(owner, at=timedelta(seconds=2), duration=timedelta(seconds=1))
            sim.crash_worker(owner, at=timedelta(seconds=2.8))
            sim.store_outage(at=timedelta(seconds=2.95), duration=timedelta(seconds=seconds))
            sim.drain(within=timedelta(minutes=5))
            assert_outcomes(sim.chain(task), "crashed")
