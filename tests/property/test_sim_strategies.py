"""The strategies produce valid input, and faults print as constructor calls."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any, ClassVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import run_state_machine_as_test

import tullius
from tullius.sim import Simulation
from tullius.sim import faults as faults_module
from tullius.sim.faults import Fault, ServerCrash, ServerStop, StepCrash, validate_schedule
from tullius.sim.strategies import (
    SimulationMachine,
    SimWork,
    busy_times,
    fault_schedules,
    server_names,
    work,
)
from tullius.sim.virtual_time import SimulationError, UserCodeHang
from tullius.task import to_spec


@settings(max_examples=100, deadline=None)
@given(data=st.data(), servers=server_names(3))
def test_generated_schedules_are_valid_and_print_as_constructor_calls(
    data: st.DataObject, servers: list[str]
) -> None:
    schedule: list[Fault] = data.draw(fault_schedules(servers, permanent_crashes=True))
    assert validate_schedule(schedule, servers) == schedule
    namespace = {**vars(faults_module), "timedelta": timedelta}
    for fault in schedule:
        assert eval(repr(fault), namespace) == fault  # our own repr, nothing untrusted


@settings(max_examples=300, deadline=None)
@given(at=st.timedeltas(min_value=timedelta(0)), restart=st.timedeltas(min_value=timedelta(0)))
def test_a_fault_at_any_time_prints_back_exactly(at: timedelta, restart: timedelta) -> None:
    # Printed with six digits, a crash at 1239.4755 s came back at 1239.48 s.
    fault = ServerCrash(at=at, server="s1", restart_after=restart)
    namespace = {**vars(faults_module), "timedelta": timedelta}
    assert eval(repr(fault), namespace) == fault  # our own repr, nothing untrusted


@settings(max_examples=50, deadline=None)
@given(task=work())
def test_generated_tasks_are_storable(task: SimWork) -> None:
    spec = to_spec(task)
    assert spec.class_name == "tullius.sim.strategies:SimWork"
    assert 0 <= spec.priority <= 10


@settings(max_examples=50, deadline=None)
@given(data=st.data(), servers=server_names(3))
def test_only_the_survivors_crashes_and_stops_always_restart(
    data: st.DataObject, servers: list[str]
) -> None:
    times = {name: [timedelta(seconds=n)] for n, name in enumerate(servers)}
    schedule: list[Fault] = data.draw(
        fault_schedules(servers, times=times, survivor=servers[0], max_faults=8)
    )
    assert validate_schedule(schedule, servers) == schedule
    for fault in schedule:
        if isinstance(fault, ServerCrash | ServerStop | StepCrash) and fault.server == servers[0]:
            assert fault.restart_after is not None, fault


def test_busy_times_are_whole_seconds_inside_each_run_and_handler() -> None:
    with Simulation(seed=1, servers=["s1", "s2"], task_processes=[(2, 0, 10)]) as sim:
        sim.queue(
            [
                SimWork(
                    secs=4,
                    run_does="raise",
                    failed_does="ok",
                    successors=0,
                    retries=0,
                    failed_secs=3,
                )
            ]
        )
        sim.drain(within=timedelta(minutes=5))
        (view,) = sim.store.all_views()
        times = busy_times(sim)
    run, outcome, handler, end = view.run, view.outcome, view.handler(1), view.handler_end(1)
    assert run is not None
    assert outcome is not None
    assert handler is not None
    assert end is not None
    start = sim.now - sim.elapsed
    instants = [start + t for t in times[run.server]]
    assert all(t.microsecond == 0 for t in instants)
    assert sum(run.at <= t < outcome.at for t in instants) == 3  # first, middle, last second
    assert sum(handler.at <= t < end.at for t in instants) >= 2
    assert all(run.at <= t < outcome.at or handler.at <= t < end.at for t in instants)
    if handler.server == run.server:  # nothing ran on the other server
        assert [times[name] for name in sim.servers if name != run.server] == [[]]


class Charge(tullius.Task):
    timeout = timedelta(seconds=20)
    amount: int

    def run(self) -> None:
        time.sleep(1)


class FirstChargeMachine(SimulationMachine):
    """A user's machine that queues a first task of its own."""

    started: ClassVar[list[int]] = []

    def tasks(self) -> st.SearchStrategy[tullius.Task]:
        return st.builds(Charge, amount=st.integers(1, 500))

    def initial(self, data: st.DataObject) -> None:
        self.sim.queue(Charge(amount=data.draw(st.integers(1, 500), label="first")))
        FirstChargeMachine.started.append(self.sim.counts().queued)


def test_a_subclass_queues_its_first_tasks_in_initial_once_the_simulation_exists() -> None:
    FirstChargeMachine.started.clear()
    run_state_machine_as_test(
        FirstChargeMachine,
        settings=settings(max_examples=5, stateful_step_count=3, deadline=None),
    )
    assert FirstChargeMachine.started
    assert set(FirstChargeMachine.started) == {1}


def test_the_simulation_asked_for_before_start_says_where_to_queue_first_tasks() -> None:
    # Hypothesis runs @initialize rules in any order: a user's may come before start
    with pytest.raises(SimulationError, match=r"initial\(self, data\)"):
        FirstChargeMachine().sim  # noqa: B018


class Spins(tullius.Task):
    """A run that never sleeps: the simulation gives up on it as hung."""

    timeout = timedelta(seconds=20)

    def run(self) -> None:
        while True:
            pass


class SpinningMachine(SimulationMachine):
    def simulation_options(self) -> dict[str, Any]:
        return {"task_processes": [(2, 0, 10)], "wall_limit": timedelta(seconds=0.2)}


@settings(max_examples=1, deadline=None)
@given(data=st.data())
def test_a_step_that_hung_is_reported_as_such_not_as_a_teardown_error(
    data: st.DataObject,
) -> None:
    # Given a machine whose simulation runs a task that never sleeps
    machine = SpinningMachine()
    machine.start(seed=0, racy=0.0, data=data)
    machine.sim.queue(Spins())
    # When a step hangs, and the machine is torn down as Hypothesis does (in a finally)
    # Then the hang is what is raised: teardown does not drain the hung simulation
    with pytest.raises(UserCodeHang):
        advance_then_tear_down(machine)


def advance_then_tear_down(machine: SimulationMachine) -> None:
    try:
        machine.advance(seconds=5)
    finally:
        machine.teardown()
