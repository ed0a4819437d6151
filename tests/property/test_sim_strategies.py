"""The strategies produce valid input, and faults print as constructor calls."""

from __future__ import annotations

from datetime import timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from tullius.sim import faults as faults_module
from tullius.sim.faults import Fault, validate_schedule
from tullius.sim.strategies import SimWork, fault_schedules, server_names, work
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


@settings(max_examples=50, deadline=None)
@given(task=work())
def test_generated_tasks_are_storable(task: SimWork) -> None:
    spec = to_spec(task)
    assert spec.class_name == "tullius.sim.strategies:SimWork"
    assert 0 <= spec.priority <= 10
