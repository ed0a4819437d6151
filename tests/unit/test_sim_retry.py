"""An operator's retry of an unhandled task, under the simulator: ``sim.retry_unhandled()``.

The story users test: ``failed()`` kept failing, so the task was left unhandled;
the bug is fixed, the operator retries, and now the failure is handled, once,
without ``run()`` running again.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import ClassVar

import pytest

import tullius
from tullius.document import Origin, TaskView, retried_as
from tullius.errors import NotRetried, TaskNotFound
from tullius.sim import Simulation
from tullius.sim.invariants import Invariants
from tullius.testing import assert_chain, assert_outcomes, describe_chain, expect


class Refund(tullius.Task):
    """Refunds a declined card.  Its ``failed()`` has a bug until a test sets ``fixed``;
    fixed, it queues one `Apology` naming the failure it handled."""

    timeout = timedelta(seconds=10)
    failed_timeout = timedelta(seconds=30)
    failed_attempts = 3
    fixed: ClassVar[bool] = False
    #: Seconds the fixed failed() takes (for a fault to land meanwhile).
    fixed_takes: ClassVar[float] = 0
    run_calls: ClassVar[int] = 0
    failed_calls: ClassVar[int] = 0
    card: str

    def run(self) -> None:
        type(self).run_calls += 1
        time.sleep(2)
        raise RuntimeError(f"card {self.card} declined")

    def failed(self) -> tullius.Task:
        type(self).failed_calls += 1
        if not type(self).fixed:
            raise KeyError("refund_account")  # the bug
        time.sleep(type(self).fixed_takes)
        assert self.failure is not None
        return Apology(card=self.card, kind=self.failure.kind, message=self.failure.message)


class Apology(tullius.Task):
    timeout = timedelta(seconds=10)
    sent: ClassVar[list[tuple[str, str]]] = []
    card: str
    kind: str
    message: str

    def run(self) -> None:
        type(self).sent.append((self.kind, self.message))


class Quick(tullius.Task):
    """Sleeps ``secs``, then succeeds."""

    timeout = timedelta(seconds=60)
    secs: float

    def run(self) -> None:
        time.sleep(self.secs)


@pytest.fixture(autouse=True)
def _broken_failed() -> Iterator[None]:
    """Every test starts with the bug in Refund.failed() and its counters at zero."""
    Refund.fixed, Refund.fixed_takes = False, 0
    Refund.run_calls = Refund.failed_calls = 0
    Apology.sent = []
    yield
    Refund.fixed, Refund.fixed_takes = False, 0


def left_unhandled(sim: Simulation, card: str = "4242") -> Refund:
    """A Refund whose run failed and whose failed() failed on all three attempts."""
    task = Refund(card=card)
    sim.queue(task)
    sim.drain(within=timedelta(minutes=10))
    assert sim.chain(task)[0].status is tullius.Status.UNHANDLED
    assert (Refund.run_calls, Refund.failed_calls) == (1, 3)
    return task


def test_a_fixed_failed_handles_an_unhandled_task_once_retried(tullius_sim: Simulation) -> None:
    # Given a task left unhandled: run() failed, then failed() raised three times
    task = left_unhandled(tullius_sim)
    # When failed() is fixed and the operator retries the task
    Refund.fixed = True
    retry = tullius_sim.retry_unhandled(task)
    counts = tullius_sim.drain(within=timedelta(minutes=10))
    # Then the task stays unhandled, and its copy handled the very same failure
    assert retry.new
    assert retry.task_id == task.task_id
    assert retry.by == "operator"
    original, copy, apology = tullius_sim.chain(task)
    assert original.status is tullius.Status.UNHANDLED
    assert copy.task_id == retry.copy_id
    assert copy.origin is Origin.RETRY
    assert copy.parent_id == task.task_id
    assert copy.status is tullius.Status.HANDLED
    assert copy.fields == original.fields
    assert copy.failure is not None
    assert original.failure is not None
    assert (copy.failure.kind, copy.failure.message) == (
        original.failure.kind,
        original.failure.message,
    )
    assert copy.failure == original.failure
    assert copy.handler_error is None
    assert copy.handler_attempts == 1
    assert apology.origin is Origin.REPLACEMENT
    assert apology.status is tullius.Status.SUCCEEDED
    # and the replacement the copy's failed() returned was queued and run exactly once,
    # while run() never ran again: failed() ran three times, then once fixed
    assert Apology.sent == [("exception", "run() raised RuntimeError: card 4242 declined")]
    assert (Refund.run_calls, Refund.failed_calls) == (1, 4)
    assert counts.tasks == 3
    assert (counts.unhandled, counts.handled, counts.succeeded) == (1, 1, 1)


def test_the_retried_chain_reads_with_the_assert_helpers(tullius_sim: Simulation) -> None:
    task = left_unhandled(tullius_sim)
    Refund.fixed = True
    retry = tullius_sim.retry_unhandled(task)
    tullius_sim.drain(within=timedelta(minutes=10))

    # The copy reads as its parent's failure: born failed, it never ran
    assert_outcomes(tullius_sim.chain(task), "exception*2 succeeded")
    assert_chain(
        tullius_sim.chain(task),
        [
            expect("exception", handler_error="exception", duration=timedelta(seconds=2)),
            expect("exception", card="4242"),
            expect("succeeded", card="4242"),
        ],
    )
    lines = describe_chain(tullius_sim.chain(task)).splitlines()
    assert lines[0].endswith(f"left unhandled after 3 attempt(s)]; retried as {retry.copy_id}")
    assert lines[1] == (
        "1. Refund(card='4242') failed exception: run() raised RuntimeError: card 4242 "
        f"declined, retried from {task.task_id} by operator"
    )
    # A duration can't match the copy: its run() never ran
    with pytest.raises(AssertionError, match=r"link 1: ran None, expected 0:00:00"):
        assert_chain(tullius_sim.chain(task)[:2], ["exception", expect(duration=timedelta(0))])


def test_retrying_twice_returns_the_same_copy_and_queues_nothing_more(
    tullius_sim: Simulation,
) -> None:
    task = left_unhandled(tullius_sim)
    Refund.fixed = True
    first = tullius_sim.retry_unhandled(task)
    # Asked again before the servers ran the copy (by id), and again after
    assert task.task_id is not None
    again = tullius_sim.retry_unhandled(task.task_id)
    counts = tullius_sim.drain(within=timedelta(minutes=10))
    later = tullius_sim.retry_unhandled(task)
    tullius_sim.run_for(timedelta(minutes=10))

    assert first.new
    assert not again.new
    assert not later.new
    assert {again.copy_id, later.copy_id} == {first.copy_id}
    assert again.at == later.at == first.at
    assert "already retried as" in later.describe()
    assert tullius_sim.counts().tasks == counts.tasks == 3
    assert len(Apology.sent) == 1
    assert (Refund.run_calls, Refund.failed_calls) == (1, 4)


@pytest.mark.parametrize(
    ("secs", "run_for", "status"),
    [(1, timedelta(minutes=1), "succeeded"), (30, timedelta(seconds=5), "running")],
)
def test_a_task_that_is_not_unhandled_is_not_retried_and_its_status_is_named(
    tullius_sim: Simulation, secs: float, run_for: timedelta, status: str
) -> None:
    task = Quick(secs=secs)
    tullius_sim.queue(task)
    tullius_sim.run_for(run_for)
    assert tullius_sim.chain(task)[0].status.value == status

    with pytest.raises(NotRetried, match=f"its status is '{status}'; expected 'unhandled'"):
        tullius_sim.retry_unhandled(task)

    counts = tullius_sim.drain(within=timedelta(minutes=5))
    assert [link.task_id for link in tullius_sim.chain(task)] == [task.task_id]
    assert counts.tasks == 1


def test_a_handled_task_is_not_retried_either(tullius_sim: Simulation) -> None:
    Refund.fixed = True
    task = Refund(card="1")
    tullius_sim.queue(task)
    tullius_sim.drain(within=timedelta(minutes=5))
    with pytest.raises(NotRetried, match="its status is 'handled'"):
        tullius_sim.retry_unhandled(task)


def test_an_unknown_task_is_not_found(tullius_sim: Simulation) -> None:
    with pytest.raises(TaskNotFound, match="no task with task_id='t9-nothing'"):
        tullius_sim.retry_unhandled("t9-nothing")


def test_a_copy_whose_failed_still_fails_is_left_unhandled_and_can_be_retried_in_turn(
    tullius_sim: Simulation,
) -> None:
    # Given a retry made before the fix: the copy's failed() fails three times too
    task = left_unhandled(tullius_sim)
    first = tullius_sim.retry_unhandled(task)
    tullius_sim.drain(within=timedelta(minutes=10))
    assert [link.status.value for link in tullius_sim.chain(task)] == ["unhandled"] * 2
    # When the fix is in and the copy is retried
    Refund.fixed = True
    second = tullius_sim.retry_unhandled(first.copy_id)
    tullius_sim.drain(within=timedelta(minutes=10))
    # Then the chain goes on from copy to copy, and the last one is handled
    chain = tullius_sim.chain(task)
    assert [link.task_id for link in chain[:3]] == [task.task_id, first.copy_id, second.copy_id]
    assert [link.status.value for link in chain] == ["unhandled"] * 2 + ["handled", "succeeded"]
    assert chain[2].parent_id == first.copy_id
    assert (Refund.run_calls, Refund.failed_calls) == (1, 7)
    assert len(Apology.sent) == 1


def test_a_server_crash_while_the_copys_failed_runs_still_handles_it_exactly_once() -> None:
    # Given two servers of one worker each, and a retried task whose fixed
    # failed() takes 5 s
    with Simulation(seed=21, servers=2, task_processes=[(1, 0, 10)]) as sim:
        task = left_unhandled(sim)
        Refund.fixed, Refund.fixed_takes = True, 5
        retry = sim.retry_unhandled(task)
        # When the server running the copy's failed() crashes 2 s into it, for good
        sim.run_for(timedelta(seconds=2))
        view = sim.store.load(retry.copy_id)
        assert view is not None
        lease = view.current_lease()
        assert lease is not None
        assert lease.server in sim.servers
        sim.crash_server(lease.server, at=sim.elapsed)
        counts = sim.drain(within=timedelta(minutes=10))
        # Then the other server declared that attempt lost, ran failed() again,
        # and accepted its result once: one apology
        _, copy, apology = sim.chain(task)
        assert copy.status is tullius.Status.HANDLED
        assert copy.handler_attempts == 2
        assert apology.status is tullius.Status.SUCCEEDED
        assert (Refund.run_calls, Refund.failed_calls) == (1, 5)
        assert len(Apology.sent) == 1
        assert counts.tasks == 3
        sim.check()


def test_the_same_seed_gives_the_same_trace_with_a_retry_in_it() -> None:
    traces = []
    for _ in range(2):
        Refund.fixed, Refund.failed_calls, Apology.sent = False, 0, []
        with Simulation(seed=42, servers=2, keep_trace=True, racy_updates=0.3) as sim:
            tasks = [Refund(card=str(n)) for n in range(3)]
            sim.queue(tasks)
            sim.drain(within=timedelta(minutes=10))
            Refund.fixed = True
            for task in tasks:
                sim.retry_unhandled(task)
            sim.crash_server("s1", at=sim.elapsed, restart_after=timedelta(seconds=20))
            sim.drain(within=timedelta(minutes=10))
            sim.check()
            traces.append(sim.trace)
    assert traces[0] == traces[1]
    assert sum("operator" in line for line in traces[0]) >= 3 * 6
    assert len(Apology.sent) == 3


def test_retry_unhandled_from_inside_a_task_is_refused() -> None:
    with Simulation(seed=3) as sim:
        target = left_unhandled(sim)

        class OperatorInATask(tullius.Task):
            timeout = timedelta(seconds=5)

            def run(self) -> None:
                sim.retry_unhandled(target)

        task = OperatorInATask()
        sim.queue(task)
        sim.drain(within=timedelta(minutes=5))
        [link] = sim.chain(task)
        assert link.failure is not None
        assert "retry_unhandled() was called from inside a task's run()" in link.failure.message
        assert sim.chain(target)[0].children == ()


def test_the_invariants_hold_a_retry_copy_to_its_parents_retry_record_and_its_records() -> None:
    # Given a retried task, checked as the simulation checked it
    with Simulation(seed=5) as sim:
        task = left_unhandled(sim)
        sim.retry_unhandled(task)
        assert task.task_id is not None
        parent = sim.store.load(task.task_id)
        assert parent is not None
        copy = retried_as(parent)
        assert copy is not None
        stored = sim.store.load(copy.task_id)
        assert stored is not None
    # Then the copy, listed in its parent's retry record and stored after its
    # records, keeps every promise
    checked = Invariants()
    views = {task.task_id: parent, copy.task_id: stored}
    checked.on_tasks_inserted([copy], {copy.task_id: 1}, views.get)
    assert checked.violation is None
    # But a copy stored before its records would read as queued, its run() to run
    views[copy.task_id] = TaskView(copy, {})
    checked.on_tasks_inserted([copy], {copy.task_id: 1}, views.get)
    assert checked.violation is not None
    assert "stored before its run and outcome records" in checked.violation.detail
    # And a copy its parent's records don't list breaks conservation
    unlisted = Invariants()
    views = {task.task_id: TaskView(parent.task, {}), copy.task_id: stored}
    unlisted.on_tasks_inserted([copy], {copy.task_id: 1}, views.get)
    assert unlisted.violation is not None
    assert unlisted.violation.promise == "conservation"


def test_a_retry_is_made_at_the_simulations_time_and_takes_none(
    tullius_sim: Simulation,
) -> None:
    task = left_unhandled(tullius_sim)
    before = tullius_sim.now
    retry = tullius_sim.retry_unhandled(task)
    assert tullius_sim.now == before
    assert abs(retry.at - before) < timedelta(milliseconds=1)  # (stored to the millisecond)
    [_, copy] = tullius_sim.chain(task)
    assert copy.started_at == copy.finished_at == retry.at
    assert copy.server == "operator"


def test_the_readmes_retry_example_runs_as_written() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    [example] = [
        block
        for block in re.findall(r"```python\n(.*?)```", readme, flags=re.DOTALL)
        if "sim.retry_unhandled(task)" in block
    ]
    with Simulation(seed=8) as sim:
        task = left_unhandled(sim)
        exec(example, {"Refund": Refund, "sim": sim, "task": task})
        assert len(Apology.sent) == 1


class Keyed(tullius.Task):
    """Its failed() records the ids it sees; fails until ``fixed``."""

    timeout = timedelta(seconds=10)
    failed_timeout = timedelta(seconds=5)
    failed_attempts = 1
    fixed: ClassVar[bool] = False
    seen: ClassVar[list[tuple[str | None, str | None]]] = []

    def run(self) -> None:
        raise RuntimeError("declined")

    def failed(self) -> None:
        type(self).seen.append((self.task_id, self.retried_from()))
        if not type(self).fixed:
            raise KeyError("refund_account")


def test_the_copys_failed_knows_the_task_it_retries(tullius_sim: Simulation) -> None:
    # Given a task left unhandled (its failed() saw no retry)
    Keyed.fixed, Keyed.seen = False, []
    task = Keyed()
    tullius_sim.queue(task)
    tullius_sim.drain(within=timedelta(minutes=1))
    assert Keyed.seen == [(task.task_id, None)]
    # When it is retried once fixed
    Keyed.fixed = True
    retry = tullius_sim.retry_unhandled(task)
    tullius_sim.drain(within=timedelta(minutes=1))
    # Then the copy's failed() sees its own id, and the task's as retried_from()
    assert Keyed.seen[1:] == [(retry.copy_id, task.task_id)]


def test_a_fix_that_raises_failed_attempts_and_failed_timeout_applies_to_the_copy(
    tullius_sim: Simulation, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a task left unhandled after its class's three attempts
    task = left_unhandled(tullius_sim)
    # When the fix raises failed_attempts to 5 and failed_timeout to a minute
    # (failed() still fails), and the task is retried
    monkeypatch.setattr(Refund, "failed_attempts", 5)
    monkeypatch.setattr(Refund, "failed_timeout", timedelta(minutes=1))
    retry = tullius_sim.retry_unhandled(task)
    tullius_sim.drain(within=timedelta(hours=1))
    # Then the copy got five attempts under the new time limit
    copy = tullius_sim.chain(task)[1]
    assert copy.task_id == retry.copy_id
    assert copy.handler_attempts == 5
    assert copy.status is tullius.Status.UNHANDLED
    view = tullius_sim.store.load(retry.copy_id)
    assert view is not None
    assert view.task.handler_timeout == timedelta(minutes=1)
    assert Refund.failed_calls == 3 + 5
