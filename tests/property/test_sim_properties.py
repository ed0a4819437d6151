"""Over many seeds, workloads and fault schedules, no failure is ever lost.

Each example runs a whole simulation: every invariant of tullius.sim.invariants
is checked after every event, and at the end every task must have ended
(succeeded, handled, or unhandled for an operator).  Budgets per test are set
with @settings so the suite stays well under two minutes on a 2-core CI machine
(profile ``ci``); ``HYPOTHESIS_PROFILE=nightly`` multiplies them (see
tests/README.md and the README).
"""

from __future__ import annotations

import os
import time
from datetime import timedelta

from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import run_state_machine_as_test

import tullius
from tullius import Task
from tullius.document import Status, status_of
from tullius.sim import Fault, Simulation
from tullius.sim.strategies import SimulationMachine, fault_schedules, server_names, workloads

NIGHTLY = os.environ.get("HYPOTHESIS_PROFILE") == "nightly"
#: Examples of the main property in CI/dev (about 10 s on 2 cores); nightly runs 5000.
#: TULLIUS_SIM_EXAMPLES=N overrides it for a long local hunt.
BUDGET = int(os.environ.get("TULLIUS_SIM_EXAMPLES", 5000 if NIGHTLY else 300))


@st.composite
def worlds(draw: st.DrawFn) -> tuple[int, list[str], float, list[Fault]]:
    servers = draw(server_names(3))
    seed = draw(st.integers(0, 2**32 - 1))
    racy = draw(st.sampled_from([0.0, 0.3, 1.0]))
    schedule = draw(fault_schedules(servers))
    return seed, servers, racy, schedule


@settings(max_examples=BUDGET, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(world=worlds(), tasks=workloads())
def test_every_task_ends_and_every_failure_is_handled_once(
    world: tuple[int, list[str], float, list[Fault]], tasks: list[Task]
) -> None:
    seed, servers, racy, schedule = world
    sim = Simulation(seed=seed, servers=servers, racy_updates=racy, task_processes=[(2, 0, 10)])
    note(
        f"replay: Simulation(seed={seed}, servers={servers}, racy_updates={racy}, "
        f"task_processes=[(2, 0, 10)]).apply({schedule!r})"
    )
    try:
        sim.queue(tasks)
        sim.apply(schedule)
        counts = sim.drain(within=timedelta(hours=3))
        sim.check()
        assert counts.queued == counts.running == counts.handling == 0, counts
        for view in sim.store.all_views():
            status = status_of(view)
            assert status in (Status.SUCCEEDED, Status.HANDLED, Status.UNHANDLED), view.task_id
            outcome = view.outcome
            assert outcome is not None
            if not outcome.ok:
                # the failure reached failed(): an accepted handler record exists
                assert view.handler_attempt >= 1
    finally:
        sim.close()


@settings(
    max_examples=max(BUDGET // 4, 10), deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    seed=st.integers(0, 2**32 - 1),
    tasks=workloads(max_tasks=6),
    schedule=fault_schedules(["s1", "s2"], max_faults=3),
)
def test_same_seed_same_trace(seed: int, tasks: list[Task], schedule: list[Fault]) -> None:
    traces = []
    for _ in range(2):
        sim = Simulation(seed=seed, servers=2, keep_trace=True, task_processes=[(2, 0, 10)])
        sim.queue([task.copy() for task in tasks])
        sim.apply(schedule)
        sim.drain(within=timedelta(hours=3))
        traces.append(sim.trace)
        sim.close()
    assert traces[0] == traces[1]


class MachineTest(SimulationMachine):
    pass


def test_the_state_machine() -> None:
    run_state_machine_as_test(
        MachineTest,
        settings=settings(
            max_examples=max(BUDGET // 3, 10),
            stateful_step_count=15,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )


class ChargeCard(tullius.Task):
    """A user's task: declined cards fail, and failed() retries once with a flag."""

    timeout = timedelta(seconds=20)
    amount: int
    retried: bool

    def run(self) -> None:
        time.sleep(self.amount % 7)
        if self.amount % 5 == 0 and not self.retried:
            raise RuntimeError(f"card declined for {self.amount}")

    def failed(self) -> tullius.Task | None:
        return None if self.retried else self.copy(retried=True)


class ChargeCardMachine(SimulationMachine):
    """What the docs show: the ready machine, subclassed with the user's own tasks."""

    def tasks(self) -> st.SearchStrategy[tullius.Task]:
        return st.builds(ChargeCard, amount=st.integers(1, 500), retried=st.just(False))


def test_a_subclassed_machine_with_user_tasks() -> None:
    run_state_machine_as_test(
        ChargeCardMachine,
        settings=settings(
            max_examples=max(BUDGET // 5, 10),
            stateful_step_count=10,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
