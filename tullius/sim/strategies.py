"""Hypothesis strategies for simulations, and a state machine to subclass.

* `work()` / `workloads()`: tasks of the ready-made `SimWork` class, whose
  fields say how it behaves (sleep, raise, hang, return garbage, spawn
  successors, ask for retries).  Every choice shrinks towards the plain case
  (no sleep, success, nothing spawned), so a failing example shrinks to the
  smallest workload that still fails.
* `faults()` / `fault_schedules()`: lists of `tullius.sim.faults` values at
  whole-second offsets, shrinking towards fewer faults, earlier, shorter.
  Crashes always restart unless ``permanent_crashes=True`` (a world with no
  live server can't finish, which is not a bug).
* `SimulationMachine`: a ``RuleBasedStateMachine`` that queues tasks, lets time
  pass and injects faults while every invariant is checked after every event;
  at teardown it drains and checks that every task ended.  Subclass it and
  override `SimulationMachine.tasks` to use your own task classes.

Importing this module imports Hypothesis (the rest of ``tullius.sim`` does not).
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import tullius
from tullius.sim.faults import (
    ClockSkew,
    Fault,
    ServerCrash,
    ServerPause,
    StepCrash,
    StoreFault,
    StoreOutage,
    WorkerCrash,
)
from tullius.sim.simulation import Simulation

#: How a `SimWork` run or handler behaves; the first is the plain case (shrinks to it).
BEHAVIOURS = ("ok", "raise", "hang", "garbage")


class SimWork(tullius.Task):
    """A task whose fields script its behaviour, for property tests.

    Fields: ``secs`` (sleep in ``run()``), ``run_does`` and ``failed_does``
    (one of `BEHAVIOURS`), ``successors`` (how many copies a success returns,
    each with one fewer), ``retries`` (how many replacements ``failed()`` may
    still return).
    """

    timeout = timedelta(seconds=10)
    failed_timeout = timedelta(seconds=5)
    failed_attempts = 3
    task_name = "tullius.sim.strategies:SimWork"

    secs: int
    run_does: str
    failed_does: str
    successors: int
    retries: int

    def run(self) -> Any:
        time.sleep(self.secs)
        return self._act(self.run_does, self.copy(successors=self.successors - 1), self.successors)

    def failed(self) -> Any:
        return self._act(
            self.failed_does, self.copy(retries=self.retries - 1, run_does="ok"), self.retries
        )

    def _act(self, does: str, again: tullius.Task, count: int) -> Any:
        if does == "raise":
            raise RuntimeError(f"scripted failure of {self!r}")
        if does == "hang":
            time.sleep(3600)
        if does == "garbage":
            return {"not": "a task"}
        return [again] * min(count, 2) if count > 0 else None


def work(
    *, max_secs: int = 12, max_priority: int = 10, behaviours: tuple[str, ...] = BEHAVIOURS
) -> st.SearchStrategy[SimWork]:
    """One `SimWork` task."""
    return st.builds(
        SimWork,
        secs=st.integers(0, max_secs),
        run_does=st.sampled_from(behaviours),
        failed_does=st.sampled_from(behaviours),
        successors=st.integers(0, 2),
        retries=st.integers(0, 2),
        priority=st.integers(0, max_priority),
    )


def workloads(
    tasks: st.SearchStrategy[tullius.Task] | None = None, *, max_tasks: int = 12
) -> st.SearchStrategy[list[tullius.Task]]:
    """A list of tasks to queue at the start (default: `work()`)."""
    return st.lists(tasks if tasks is not None else work(), min_size=1, max_size=max_tasks)


def _seconds(low: int, high: int) -> st.SearchStrategy[timedelta]:
    return st.integers(low, high).map(lambda n: timedelta(seconds=n))


def faults(
    servers: list[str],
    *,
    horizon: timedelta = timedelta(minutes=2),
    permanent_crashes: bool = False,
) -> st.SearchStrategy[Fault]:
    """One fault aimed at one of ``servers``, starting within ``horizon``."""
    end = int(horizon.total_seconds())
    server = st.sampled_from(servers)
    at = _seconds(0, end)
    restart = _seconds(1, 90)
    return st.one_of(
        st.builds(WorkerCrash, at=at, server=server),
        st.builds(
            ServerCrash,
            at=at,
            server=server,
            restart_after=st.one_of(st.none(), restart) if permanent_crashes else restart,
        ),
        st.builds(ServerPause, at=at, server=server, duration=_seconds(1, 90)),
        st.builds(
            StoreFault,
            server=server,
            operation=st.sampled_from(["InsertRecord", "InsertTasks", "SetStatus", "Load", "Beat"]),
            kind=st.sampled_from(["lost_ack", "not_applied"]),
            at=at,
            count=st.integers(1, 3),
        ),
        st.builds(
            StepCrash,
            server=server,
            operation=st.sampled_from(["InsertRecord", "InsertTasks", "SetStatus"]),
            record_kind=st.sampled_from([None, "run", "outcome", "handler", "handler_end"]),
            at=at,
            restart_after=st.one_of(st.none(), restart) if permanent_crashes else restart,
        ).filter(lambda f: f.record_kind is None or f.operation == "InsertRecord"),
        st.builds(
            StoreOutage, at=at, duration=_seconds(1, 60), server=st.one_of(st.none(), server)
        ),
        st.builds(ClockSkew, server=server, skew=_seconds(-120, 120), at=at),
    )


def fault_schedules(
    servers: list[str],
    *,
    horizon: timedelta = timedelta(minutes=2),
    max_faults: int = 5,
    permanent_crashes: bool = False,
) -> st.SearchStrategy[list[Fault]]:
    """A list of faults for `Simulation.apply`; shrinks towards none."""
    return st.lists(
        faults(servers, horizon=horizon, permanent_crashes=permanent_crashes), max_size=max_faults
    )


def server_names(max_servers: int = 3) -> st.SearchStrategy[list[str]]:
    return st.integers(1, max_servers).map(lambda n: [f"s{i}" for i in range(1, n + 1)])


class SimulationMachine(RuleBasedStateMachine):
    """Queue tasks, let time pass and inject faults; every invariant holds throughout.

    Subclass and override `tasks` (and `simulation_options`) for your own task
    classes.  ``self.sim`` is the simulation; teardown drains it within
    ``drain_within`` and requires every task to have ended.
    """

    servers: tuple[str, ...] = ("s1", "s2")
    drain_within = timedelta(hours=2)

    def __init__(self) -> None:
        super().__init__()
        self.sim: Simulation | None = None

    def tasks(self) -> st.SearchStrategy[tullius.Task]:
        """The tasks to queue; override with your own."""
        return work()

    def simulation_options(self) -> dict[str, Any]:
        """Extra `Simulation` arguments; override to change them."""
        return {"task_processes": [(2, 0, 10)]}

    @property
    def _sim(self) -> Simulation:
        assert self.sim is not None
        return self.sim

    @initialize(seed=st.integers(0, 2**32 - 1), racy=st.sampled_from([0.0, 0.3]))
    def start(self, seed: int, racy: float) -> None:
        self.sim = Simulation(
            seed=seed, servers=list(self.servers), racy_updates=racy, **self.simulation_options()
        )

    @rule(data=st.data())
    def queue(self, data: st.DataObject) -> None:
        self._sim.queue(data.draw(st.lists(self.tasks(), min_size=1, max_size=4), label="tasks"))

    @rule(seconds=st.integers(1, 60))
    def advance(self, seconds: int) -> None:
        self._sim.run_for(timedelta(seconds=seconds))

    @rule(data=st.data())
    def inject(self, data: st.DataObject) -> None:
        fault = data.draw(faults(list(self.servers), horizon=timedelta(0)), label="fault")
        fault = _shift(fault, self._sim.elapsed)
        self._sim.apply([fault])

    @invariant()
    def promises_hold(self) -> None:
        if self.sim is not None:
            self.sim.check()

    def teardown(self) -> None:
        if self.sim is None:
            return
        try:
            counts = self.sim.drain(within=self.drain_within)
            assert counts.queued == counts.running == counts.handling == 0, counts
            self.sim.check()
        finally:
            self.sim.close()


def _shift(fault: Fault, by: timedelta) -> Fault:
    import dataclasses

    return dataclasses.replace(fault, at=fault.at + by)
