"""Bad input to the simulator: each a clear error naming the value."""

from __future__ import annotations

import math
import re
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

import tullius
from tullius.errors import ConfigError, TaskDefinitionError
from tullius.sim import (
    ClockSkew,
    DrainTimeout,
    NoTimePasses,
    ServerCrash,
    ServerStop,
    Simulation,
    SimulationError,
    StoreFault,
    memory_store,
)


class Nap(tullius.Task):
    timeout = timedelta(seconds=5)

    def run(self) -> None:
        time.sleep(1)


@pytest.mark.parametrize(
    ("entry", "shown"),
    [
        ((0, 0, 10), "(0, 0, 10)"),
        ((2, 5, 1), "(2, 5, 1)"),
        ((2, 0), "(2, 0)"),
        ("10:0-10", "'10:0-10'"),
    ],
)
def test_bad_task_processes_entry_is_named(entry: Any, shown: str) -> None:
    with pytest.raises(ConfigError, match=r"task_processes\[0\]") as caught:
        Simulation(task_processes=[entry])
    assert shown in str(caught.value)


@pytest.mark.parametrize("setting", ["10:0-10", None])
def test_task_processes_that_is_not_a_list_is_named_whole(setting: Any) -> None:
    with pytest.raises(ConfigError, match=rf"task_processes={setting!r} must be a list"):
        Simulation(task_processes=setting)


@pytest.mark.parametrize("servers", [0, -1, [], ["a", "a"], [""], "web1"])
def test_bad_servers_are_refused(servers: Any) -> None:
    with pytest.raises(ConfigError, match="servers="):
        Simulation(servers=servers)


@pytest.mark.parametrize("name", ["lease", "poll_interval", "store_retry", "wall_limit"])
def test_non_positive_durations_are_refused(name: str) -> None:
    options: dict[str, Any] = {name: timedelta(0)}
    with pytest.raises(ConfigError, match=f"{name}=datetime.timedelta\\(0\\)"):
        Simulation(**options)


def test_zero_or_negative_task_timeout_is_refused_where_the_class_is_written() -> None:
    for bad in (timedelta(0), timedelta(seconds=-1)):
        with pytest.raises(TaskDefinitionError, match=r"timeout="):
            type("Bad", (tullius.Task,), {"timeout": bad, "run": lambda self: None})


def test_fault_aimed_at_an_unknown_server_names_it() -> None:
    sim = Simulation(servers=["a", "b"])
    with pytest.raises(ConfigError, match=r"faults\[0\].server='nope'.*\['a', 'b'\]"):
        sim.apply([ServerCrash(at=timedelta(seconds=1), server="nope")])
    with pytest.raises(ConfigError, match="'Insert'"):
        sim.apply([StoreFault("a", "Insert")])
    with pytest.raises(ConfigError, match="kind='maybe'"):
        sim.apply([StoreFault("a", "InsertRecord", "maybe")])
    with pytest.raises(ConfigError, match="record_kind='run'"):
        sim.apply([StoreFault("a", "SetStatus", record_kind="run")])
    assert sim.faults == []


def test_a_worker_crash_aimed_at_a_slot_no_server_has_is_refused() -> None:
    sim = Simulation(task_processes=[(2, 0, 4), (1, 5, 10)])
    with pytest.raises(ConfigError, match=r"faults\[0\].worker=3 .*has 3 \(0 to 2\)"):
        sim.crash_worker("s1", at=timedelta(seconds=1), worker=3)
    sim.crash_worker("s1", at=timedelta(seconds=1), worker=2)
    assert len(sim.faults) == 1


def test_a_stop_with_a_bad_grace_restart_or_server_names_the_value() -> None:
    sim = Simulation()
    with pytest.raises(ConfigError, match=r"faults\[0\].grace=.*must be a timedelta >= 0"):
        sim.stop_server("s1", at=timedelta(seconds=1), grace=timedelta(seconds=-1))
    with pytest.raises(ConfigError, match=r"faults\[0\].restart_after=.*positive timedelta"):
        sim.apply([ServerStop(at=timedelta(0), server="s1", restart_after=timedelta(0))])
    with pytest.raises(ConfigError, match=r"faults\[0\]=ServerStop.* ends past the largest"):
        sim.stop_server("s1", at=timedelta(seconds=1), grace=timedelta.max)
    with pytest.raises(ConfigError, match=r"faults\[0\].server=None is not a simulated server"):
        sim.apply([ServerStop(at=timedelta(0), server=None)])  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"faults\[0\].server=None is not a simulated server"):
        sim.apply([ServerCrash(at=timedelta(0), server=None)])  # type: ignore[arg-type]
    assert sim.faults == []  # nothing armed by a refused schedule
    sim.stop_server("s1", at=timedelta(seconds=1), grace=timedelta(0))  # no grace: stop at once
    assert len(sim.faults) == 1


def test_fault_in_the_past_is_refused() -> None:
    sim = Simulation()
    sim.run_for(timedelta(seconds=10))
    with pytest.raises(ConfigError, match="in the past"):
        sim.crash_server("s1", at=timedelta(seconds=5))


def test_a_schedule_that_can_never_finish_within_the_horizon_is_named() -> None:
    sim = Simulation()
    sim.queue(Nap(delay=timedelta(hours=2)))
    with pytest.raises(ConfigError, match=r"within=.*not due until"):
        sim.drain(within=timedelta(hours=1))
    with pytest.raises(ConfigError, match=r"within=datetime.timedelta\(0\) must be a positive"):
        sim.drain(within=timedelta(0))


def test_a_priority_no_band_serves_is_refused_at_queue_time() -> None:
    sim = Simulation(task_processes=[(2, 0, 3)])
    with pytest.raises(ConfigError, match="priority=7 is outside every band"):
        sim.queue(Nap(priority=7))
    assert sim.counts().tasks == 0


def test_chain_of_an_unqueued_task_is_refused() -> None:
    sim = Simulation()
    with pytest.raises(ConfigError, match="has not been queued"):
        sim.chain(Nap())


@pytest.mark.parametrize("argument", [None, "Nap"])
def test_queueing_something_that_is_not_tasks_names_it(argument: Any) -> None:
    sim = Simulation()
    with pytest.raises(TaskDefinitionError, match=rf"argument {argument!r} is a"):
        sim.queue(argument)
    assert sim.counts().tasks == 0


def test_running_a_closed_simulation_is_refused_at_once() -> None:
    # Before: a task left sleeping had been unwound by close(), so run_for waited
    # wall_limit real seconds and then blamed it ("Nap.run() ... without calling
    # time.sleep()").
    sim = Simulation(wall_limit=timedelta(seconds=1))
    sim.queue(Nap())
    sim.run_for(timedelta(seconds=0.5))
    sim.close()
    with pytest.raises(SimulationError, match="was closed"):
        sim.run_for(timedelta(seconds=1))
    with pytest.raises(SimulationError, match="was closed"):
        sim.drain()


def test_a_single_fault_given_to_apply_is_refused_with_a_hint() -> None:
    sim = Simulation()
    with pytest.raises(ConfigError, match=r"faults=ServerCrash.* must be a list of faults"):
        sim.apply(ServerCrash(at=timedelta(seconds=1), server="s1"))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("options", "shown"),
    [
        ({"racy_updates": "0.3"}, "racy_updates='0.3'"),
        ({"racy_updates": 2.0}, "racy_updates=2.0"),
        ({"start": "2030-01-01"}, "start='2030-01-01'"),
    ],
)
def test_bad_store_and_clock_settings_are_named(options: dict[str, Any], shown: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(shown)):
        Simulation(**options)


def test_a_poll_interval_of_the_wrong_type_names_both_accepted_forms() -> None:
    with pytest.raises(
        ConfigError, match=r"poll_interval='1' must be a timedelta or number of seconds"
    ):
        Simulation(poll_interval="1")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("options", "shown", "expected"),
    [
        # Heartbeats and sweeps 0 apart: run_for swept for ever at one instant.
        ({"lease": timedelta(microseconds=2)}, "lease=", "from 0.06 seconds to 7 days"),
        ({"lease": timedelta(days=8)}, "lease=", "from 0.06 seconds to 7 days"),
        ({"poll_interval": math.nan}, "poll_interval=nan", "must be positive"),
        ({"poll_interval": math.inf}, "poll_interval=inf", "must be positive"),
        ({"poll_interval": 1e-9}, "poll_interval=1e-09", "from 1 ms to 1 hour"),
        ({"poll_interval": timedelta.max}, "poll_interval=", "from 1 ms to 1 hour"),
        ({"wall_limit": timedelta.max}, "wall_limit=", "of at most a day"),
        ({"store_retry": timedelta(days=2)}, "store_retry=", "of at most a day"),
        ({"kill_grace": timedelta(days=2)}, "kill_grace=", "from 0 to a day"),
        ({"servers": 2.0}, "servers=2.0", "a count >= 1 or a list of names"),
        ({"servers": None}, "servers=None", "a count >= 1 or a list of names"),
        ({"start": datetime(9000, 1, 1, tzinfo=UTC)}, "start=", "to before 9000-01-01"),
        ({"start": datetime(999, 12, 31, tzinfo=UTC)}, "start=", "from 1000-01-01"),
    ],
)
def test_settings_out_of_their_bounds_are_named(
    options: dict[str, Any], shown: str, expected: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(shown) + ".*" + re.escape(expected)):
        Simulation(**options)


def test_a_run_that_would_take_the_clock_past_the_year_9000_is_refused() -> None:
    sim = Simulation(start=datetime(8999, 12, 31, tzinfo=UTC))
    with pytest.raises(ConfigError, match=r"within=.* would run the clock past 9000-01-01"):
        sim.drain(within=timedelta.max)
    with pytest.raises(ConfigError, match=r"duration=.* would run the clock past 9000-01-01"):
        sim.run_for(timedelta(days=2))
    sim.run_for(timedelta(hours=1))
    sim.close()


@pytest.mark.parametrize(
    ("fault", "shown"),
    [
        (ClockSkew("s1", timedelta(days=3654)), "skew=datetime.timedelta(days=3654) must be"),
        (StoreFault("s1", ["Load"]), "operation=['Load'] must be one of"),  # type: ignore[arg-type]
        (StoreFault("s1", "Load", kind=["lost_ack"]), "kind=['lost_ack'] must be one of"),  # type: ignore[arg-type]
    ],
)
def test_a_fault_with_a_value_out_of_bounds_or_of_the_wrong_shape_is_named(
    fault: Any, shown: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(shown)):
        Simulation().apply([fault])


def test_a_fault_holding_a_number_for_a_timedelta_prints_and_is_refused_by_apply() -> None:
    # Its repr raised AttributeError ('int' object has no attribute 'total_seconds').
    fault = ClockSkew("s1", 60)  # type: ignore[arg-type]
    assert repr(fault) == "ClockSkew(server='s1', skew=60, at=timedelta(seconds=0))"
    with pytest.raises(ConfigError, match=r"faults\[0\].skew=60 must be a timedelta"):
        Simulation().apply([fault])


REENTERED: list[Simulation] = []


class DrivesTheSimulation(tullius.Task):
    timeout = timedelta(seconds=5)

    def run(self) -> None:
        REENTERED[0].run_for(timedelta(seconds=1))


def test_run_for_called_from_a_tasks_run_fails_that_run_naming_the_mistake() -> None:
    with Simulation() as sim:
        REENTERED[:] = [sim]
        task = DrivesTheSimulation()
        sim.queue(task)
        sim.drain(within=timedelta(minutes=5))
        [link] = sim.chain(task)
    assert link.failure is not None
    assert link.failure.kind == "exception"
    assert "sim.run_for() was called from inside a task's run() or failed()" in (
        link.failure.message
    )


def test_an_insert_that_fails_part_way_leaves_open_only_the_tasks_it_stored(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # As MongoDB's ordered insert_many: the tasks before the one refused are stored.
    sim = Simulation()
    real = memory_store.stored_task

    def refuse_the_second(doc: Any) -> Any:
        if doc.fields.get("n") == 2:
            raise OverflowError("date value out of range")
        return real(doc)

    monkeypatch.setattr(memory_store, "stored_task", refuse_the_second)
    with pytest.raises(OverflowError):
        sim.queue([Nap(n=1), Nap(n=2), Nap(n=3)])
    monkeypatch.undo()
    sim.queue(Nap(n=4))
    counts = sim.drain(within=timedelta(minutes=1))  # once failed on the ids never stored
    assert (counts.tasks, counts.succeeded) == (2, 2)
    sim.check()
    sim.close()


class RetriesAtOnce(tullius.Task):
    timeout = timedelta(seconds=5)

    def run(self) -> None:
        raise ConnectionRefusedError("payment gateway down")

    def failed(self) -> tullius.Task:
        return self.copy()  # no delay: the next attempt comes at the same instant


class RetriesAfterASecond(RetriesAtOnce):
    def failed(self) -> tullius.Task:
        return self.copy(delay=timedelta(seconds=1))


def test_a_chain_that_lets_no_virtual_time_pass_is_named_instead_of_spinning() -> None:
    # drain() ran for ever at 0.821 s, its memory growing with every task.
    sim = Simulation(seed=1, instant_chain_limit=300)
    sim.queue(RetriesAtOnce())
    spinning = r"300 tasks followed one another at 0:00:00\."
    with pytest.raises(NoTimePasses, match=spinning) as caught:
        sim.drain(within=timedelta(minutes=1))
    assert caught.value.seed == 1
    assert "self.copy(delay=timedelta(seconds=5))" in str(caught.value)
    sim.close()


def test_a_chain_that_retries_for_ever_after_a_delay_meets_the_horizon() -> None:
    sim = Simulation(seed=1, instant_chain_limit=300)
    sim.queue(RetriesAfterASecond())
    with pytest.raises(DrainTimeout, match="RetriesAfterASecond"):
        sim.drain(within=timedelta(minutes=10))  # some 600 generations, a second apart
    sim.close()


class Page(tullius.Task):
    """Pages through data, each run queueing the next page at once: a finite chain."""

    timeout = timedelta(seconds=5)
    n: int

    def run(self) -> tullius.Task | None:
        return Page(n=self.n - 1) if self.n > 1 else None


def test_a_finite_chain_longer_than_the_limit_runs_once_the_limit_is_raised() -> None:
    with Simulation(seed=1, instant_chain_limit=100) as sim:
        sim.queue(Page(n=150))
        with pytest.raises(NoTimePasses, match="raise Simulation\\(instant_chain_limit="):
            sim.drain(within=timedelta(minutes=1))
    with Simulation(seed=1, instant_chain_limit=200) as sim:
        sim.queue(Page(n=150))
        assert sim.drain(within=timedelta(minutes=1)).succeeded == 150
    with pytest.raises(ConfigError, match="instant_chain_limit=0 must be an int >= 1"):
        Simulation(instant_chain_limit=0)
