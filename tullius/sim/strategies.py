"""Hypothesis strategies for simulations, and a state machine to subclass.

* `work()` / `workloads()`: tasks of the ready-made `SimWork` class, whose
  fields say how it behaves (sleep, raise, hang, return garbage, spawn
  successors, ask for retries).  Every choice shrinks towards the plain case
  (no sleep, success, nothing spawned), so a failing example shrinks to the
  smallest workload that still fails.
* `faults()` / `fault_schedules()`: lists of `tullius.sim.faults` values at
  whole-second offsets, shrinking towards fewer faults, earlier, shorter.
  Crashes and stops always restart unless ``permanent_crashes=True`` (a world with no
  live server can't finish, which is not a bug), or unless a ``survivor`` is
  named: then every other server may crash or stop for good.  Given ``times``, the
  instants of a fault-free run when user code was running (`busy_times`),
  about half of the faults start at one of them (of the server they aim at):
  a fault drawn uniformly over a two-minute horizon mostly lands after a
  small workload has finished.
* `SimulationMachine`: a ``RuleBasedStateMachine`` that queues tasks (and repeats
  keyed calls), lets time pass and injects faults while every invariant is
  checked after every event;
  at teardown it drains, checks that every task ended, and runs on past the
  last fault (a paused server's late results are tried then) to check again.  Subclass it and
  override `SimulationMachine.tasks` to use your own task classes.

Importing this module imports Hypothesis (the rest of ``tullius.sim`` does not).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any, Final

from hypothesis import event, note
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import tullius
from tullius.sim.faults import (
    FAULT_TYPES,
    ClockSkew,
    Fault,
    ServerCrash,
    ServerPause,
    ServerStop,
    StepCrash,
    StoreFault,
    StoreOutage,
    WorkerCrash,
)
from tullius.sim.simulation import Simulation
from tullius.sim.virtual_time import SimulationError

#: How a `SimWork` run or handler behaves; the first is the plain case (shrinks to it).
BEHAVIOURS = ("ok", "raise", "hang", "garbage")


class SimWork(tullius.Task):
    """A task whose fields script its behaviour, for property tests.

    Fields: ``secs`` (sleep in ``run()``), ``run_does`` and ``failed_does``
    (one of `BEHAVIOURS`), ``successors`` (how many copies a success returns,
    each with one fewer), ``retries`` (how many replacements ``failed()`` may
    still return), ``failed_secs`` (sleep in ``failed()``; optional, 0 if not
    given, so that tasks made before it existed behave as they did).
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
    # A class default, not a required field: SimWork(...) calls and stored tasks
    # from before it still work (`Task.fields` holds only what was given).
    failed_secs: int = 0

    def run(self) -> Any:
        time.sleep(self.secs)
        return self._act(self.run_does, self.copy(successors=self.successors - 1), self.successors)

    def failed(self) -> Any:
        # Why a sleep: a failed() that returns at once can't be hit by a crash or a
        # pause while it runs, only by faults at the steps around it.
        time.sleep(self.failed_secs)
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
    *,
    max_secs: int = 12,
    max_priority: int = 10,
    behaviours: tuple[str, ...] = BEHAVIOURS,
    max_failed_secs: int = 6,
    max_delay: int = 0,
) -> st.SearchStrategy[SimWork]:
    """One `SimWork` task.

    Args:
        max_secs: longest sleep of ``run()`` (its timeout is 10 s).
        max_priority: priorities are drawn from 0 to this.
        behaviours: what ``run()`` and ``failed()`` may do (`BEHAVIOURS`).
        max_failed_secs: longest sleep of ``failed()`` (its timeout is 5 s).
        max_delay: longest ``delay`` of the task's start, in seconds (0: none; a
            delayed task needs a drain horizon past its start).
    """
    return st.builds(
        SimWork,
        secs=st.integers(0, max_secs),
        run_does=st.sampled_from(behaviours),
        failed_does=st.sampled_from(behaviours),
        successors=st.integers(0, 2),
        retries=st.integers(0, 2),
        priority=st.integers(0, max_priority),
        failed_secs=st.integers(0, max_failed_secs),
        delay=st.none() if max_delay <= 0 else st.one_of(st.none(), _seconds(1, max_delay)),
    )


def workloads(
    tasks: st.SearchStrategy[tullius.Task] | None = None, *, max_tasks: int = 12
) -> st.SearchStrategy[list[tullius.Task]]:
    """A list of tasks to queue at the start (default: `work()`)."""
    return st.lists(tasks if tasks is not None else work(), min_size=1, max_size=max_tasks)


def _seconds(low: int, high: int) -> st.SearchStrategy[timedelta]:
    return st.integers(low, high).map(lambda n: timedelta(seconds=n))


#: The steps a `StoreFault` or `StepCrash` may aim at, as (operation, record_kind):
#: every valid pair, listed so that none is drawn only to be filtered out, and an
#: InsertRecord narrowed to each kind of record (the OUTCOME of a failed run, a
#: HANDLER_END...), which an unnarrowed fault rarely reaches: it hits the
#: server's next insert, mostly a claim.  The first shrinks best.
WRITE_STEPS: Final = (
    ("InsertRecord", None),
    ("InsertRecord", "run"),
    ("InsertRecord", "outcome"),
    ("InsertRecord", "handler"),
    ("InsertRecord", "handler_end"),
    ("InsertTasks", None),
    ("SetStatus", None),
)
#: Reads a `StoreFault` may aim at too.
READ_STEPS: Final = (("Load", None), ("Beat", None), ("FindDue", None), ("FindByStatus", None))


#: The kinds `faults` draws from, in shrinking order; the two that aim at one step
#: of the protocol have many targets (`WRITE_STEPS`), so they are listed twice.
FAULT_KINDS: Final = (*FAULT_TYPES, StoreFault, StepCrash)

Times = Sequence[timedelta] | Mapping[str, Sequence[timedelta]]


def faults(
    servers: list[str],
    *,
    horizon: timedelta = timedelta(minutes=2),
    permanent_crashes: bool = False,
    times: Times = (),
    survivor: str | None = None,
) -> st.SearchStrategy[Fault]:
    """One fault aimed at one of ``servers``, starting within ``horizon``.

    Args:
        servers: the simulation's server names.
        horizon: latest start of a fault drawn uniformly.
        permanent_crashes: any crash or stop may be for good.
        times: instants worth aiming at, for all servers or by server name
            (`busy_times` of a fault-free run of the same world); about half of
            the faults start at one of the instants of the server they aim at.
        survivor: a server whose crashes always restart; every other server's
            may be for good (the world still finishes its work).
    """
    uniform = _seconds(0, int(horizon.total_seconds()))
    by_server = times if isinstance(times, Mapping) else dict.fromkeys(servers, times)
    every = sorted({t for name in servers for t in by_server.get(name, ())})

    def at(instants: Sequence[timedelta]) -> st.SearchStrategy[timedelta]:
        return st.one_of(st.sampled_from(sorted(instants)), uniform) if instants else uniform

    def restart(name: str) -> st.SearchStrategy[timedelta | None]:
        if permanent_crashes or (survivor is not None and name != survivor):
            return st.one_of(_seconds(1, 90), st.none())
        return _seconds(1, 90)

    @st.composite
    def one_fault(draw: st.DrawFn) -> Fault:
        kind = draw(st.sampled_from(FAULT_KINDS))
        name = draw(st.sampled_from(servers))
        start = draw(at(by_server.get(name, ())))
        if kind is WorkerCrash:
            return WorkerCrash(at=start, server=name)
        if kind is ServerCrash:
            return ServerCrash(at=start, server=name, restart_after=draw(restart(name)))
        if kind is ServerStop:
            return ServerStop(
                at=start,
                server=name,
                grace=draw(_seconds(0, 40)),
                restart_after=draw(restart(name)),
            )
        if kind is ServerPause:
            return ServerPause(at=start, server=name, duration=draw(_seconds(1, 90)))
        if kind is StoreFault:
            operation, record_kind = draw(st.sampled_from(WRITE_STEPS + READ_STEPS))
            return StoreFault(
                server=name,
                operation=operation,
                kind=draw(st.sampled_from(["lost_ack", "not_applied"])),
                at=start,
                record_kind=record_kind,
                count=draw(st.integers(1, 3)),
            )
        if kind is StepCrash:
            operation, record_kind = draw(st.sampled_from(WRITE_STEPS))
            return StepCrash(
                server=name,
                operation=operation,
                record_kind=record_kind,
                at=start,
                restart_after=draw(restart(name)),
            )
        if kind is StoreOutage:
            everyone = draw(st.booleans())
            return StoreOutage(
                at=draw(at(every)) if everyone else start,
                duration=draw(_seconds(1, 60)),
                server=None if everyone else name,
            )
        return ClockSkew(server=name, skew=draw(_seconds(-120, 120)), at=start)

    return one_fault()


def fault_schedules(
    servers: list[str],
    *,
    horizon: timedelta = timedelta(minutes=2),
    max_faults: int = 5,
    permanent_crashes: bool = False,
    times: Times = (),
    survivor: str | None = None,
) -> st.SearchStrategy[list[Fault]]:
    """A list of faults for `Simulation.apply`; shrinks towards none (arguments as `faults`)."""
    return st.lists(
        faults(
            servers,
            horizon=horizon,
            permanent_crashes=permanent_crashes,
            times=times,
            survivor=survivor,
        ),
        max_size=max_faults,
    )


def busy_times(sim: Simulation) -> dict[str, list[timedelta]]:
    """Whole-second instants, from the simulation's start, worth aiming faults at,
    by the server concerned (every server's list holds the instants that concern
    no server in particular: a delayed task's wait, a backoff).

    Read from the records of a (fault-free) run: a few instants inside each
    ``run()`` and each ``failed()`` attempt that took a second or more (its
    first whole second, its middle, its last), the middle of each backoff
    before a handler's retry and of each delayed task's wait.  The same world
    run again with faults keeps to the same timeline until its first fault, and
    roughly after it.
    """
    start = sim.now - sim.elapsed
    found: dict[str, set[int]] = {name: set() for name in sim.servers}
    anywhere: set[int] = set()

    def add(server: str | None, begin: Any, end: Any, *, edges: bool = True) -> None:
        if begin is None or end is None:
            return
        low, high = (begin - start).total_seconds(), (end - start).total_seconds()
        inside = range(math.ceil(low), math.ceil(high))  # the whole seconds in [low, high)
        if not inside:
            return
        seconds = anywhere if server is None else found.setdefault(server, set())
        seconds.add(inside[len(inside) // 2])
        if edges:
            seconds.update((inside[0], inside[-1]))

    for view in sim.store.all_views():
        if view.task.start_after > view.task.created_at:
            add(None, view.task.created_at, view.task.start_after, edges=False)
        run, outcome = view.run, view.outcome
        if run is None:
            continue
        add(run.server, run.at, outcome.at if outcome is not None else None)
        previous_end = outcome
        for attempt in range(1, view.handler_attempt + 1):
            handler, end = view.handler(attempt), view.handler_end(attempt)
            if handler is None:
                break
            if attempt > 1 and previous_end is not None:
                add(None, previous_end.at, handler.at, edges=False)
            add(handler.server, handler.at, end.at if end is not None else None)
            previous_end = end
    return {
        name: [timedelta(seconds=second) for second in sorted(seconds | anywhere)]
        for name, seconds in found.items()
    }


def server_names(max_servers: int = 3) -> st.SearchStrategy[list[str]]:
    return st.integers(1, max_servers).map(lambda n: [f"s{i}" for i in range(1, n + 1)])


class SimulationMachine(RuleBasedStateMachine):
    """Queue tasks (some with a key, calls repeated), let time pass, inject faults
    and retry unhandled tasks; every invariant holds throughout.

    Subclass and override `tasks` (and `simulation_options`) for your own task
    classes, and `initial` to queue first tasks.  ``self.sim`` is the
    simulation, made by the ``start`` rule; teardown drains it within
    ``drain_within`` and requires every task to have ended (unless a step
    failed already: then it only closes it, and that failure is the report).
    """

    servers: tuple[str, ...] = ("s1", "s2")
    drain_within = timedelta(hours=2)

    def __init__(self) -> None:
        super().__init__()
        self._made: Simulation | None = None
        #: The tasks of each key's first call (`queue_with_a_key`).
        self._keyed: dict[str, list[tullius.Task]] = {}

    @property
    def sim(self) -> Simulation:
        """The simulation.

        Raises:
            SimulationError: asked for before ``start`` made it.  Hypothesis runs
                ``@initialize`` rules in any order, so one of a subclass may come
                first: queue first tasks in `initial` instead.
        """
        if self._made is None:
            raise SimulationError(
                "self.sim is made by SimulationMachine's start rule, which Hypothesis may "
                "run after an @initialize rule of yours; queue first tasks in an override "
                "of initial(self, data) instead, which start calls once the simulation exists"
            )
        return self._made

    def tasks(self) -> st.SearchStrategy[tullius.Task]:
        """The tasks to queue; override with your own."""
        return work()

    def simulation_options(self) -> dict[str, Any]:
        """Extra `Simulation` arguments; override to change them."""
        return {"task_processes": [(2, 0, 10)]}

    def initial(self, data: st.DataObject) -> None:
        """Called by ``start`` once ``self.sim`` exists; override to queue first tasks
        (draw them with ``data.draw``).  Does nothing here."""

    @initialize(seed=st.integers(0, 2**32 - 1), racy=st.sampled_from([0.0, 0.3]), data=st.data())
    def start(self, seed: int, racy: float, data: st.DataObject) -> None:
        self._made = Simulation(
            seed=seed, servers=list(self.servers), racy_updates=racy, **self.simulation_options()
        )
        self.initial(data)

    @rule(data=st.data())
    def queue(self, data: st.DataObject) -> None:
        self.sim.queue(data.draw(st.lists(self.tasks(), min_size=1, max_size=4), label="tasks"))

    @rule(data=st.data(), key=st.sampled_from(("a", "b")))
    def queue_with_a_key(self, data: st.DataObject, key: str) -> None:
        """The application queues with a key, or repeats a keyed call (a retried
        request, any time later): either way the key's tasks are stored once, which
        the invariants check (each task inserted once)."""
        first = self._keyed.get(key)
        if first is None:
            tasks = data.draw(st.lists(self.tasks(), min_size=1, max_size=2), label="keyed")
            self._keyed[key] = [task.copy() for task in tasks]
        else:
            tasks = [task.copy() for task in first]
            event("a keyed call repeated")
        ids = self.sim.queue(tasks, key=key)
        assert ids == [tullius.keyed_id(key, index) for index in range(len(tasks))], ids

    @rule(seconds=st.integers(1, 60))
    def advance(self, seconds: int) -> None:
        self.sim.run_for(timedelta(seconds=seconds))

    @rule(data=st.data())
    def inject(self, data: st.DataObject) -> None:
        # Within the next 15 s, not only now: a fault injected now mostly finds the
        # servers between two claims, and most runs last a few seconds.
        # Crashes and stops of every server but the first may be for good.
        horizon = timedelta(seconds=15)
        fault = data.draw(
            faults(list(self.servers), horizon=horizon, survivor=self.servers[0]), label="fault"
        )
        # The draw's time is from now; the report shows the fault as applied, which
        # pastes back into ``sim.apply`` as it is.
        fault = _shift(fault, self.sim.elapsed)
        note(f"fault applied: {fault!r}")
        self.sim.apply([fault])

    @rule(data=st.data())
    def retry_unhandled(self, data: st.DataObject) -> None:
        """An operator retries an unhandled task's ``failed()`` (`Simulation.retry_unhandled`).

        Any of them, read page by page: a copy that failed again is as likely
        as the first tasks left unhandled.
        """
        unhandled: list[str] = []
        after = ""
        while page := self.sim.store.find_by_status([tullius.Status.UNHANDLED], 500, after):
            unhandled.extend(doc.task_id for doc in page)
            after = page[-1].task_id
        if unhandled:
            task_id = data.draw(st.sampled_from(unhandled), label="retry")
            self.sim.retry_unhandled(task_id)
            event("an unhandled task retried")

    @invariant()
    def promises_hold(self) -> None:
        if self._made is not None:
            self._made.check()

    def teardown(self) -> None:
        if self._made is None:
            return
        try:
            if sys.exc_info()[1] is not None:
                # Hypothesis tears down in a ``finally``: a step failed (a hang, a
                # broken promise, a test's own assertion).  Draining on would add a
                # second failure for the same bug (a hung simulation can't run again).
                return
            counts = self.sim.drain(within=self.drain_within)
            assert counts.queued == counts.running == counts.handling == 0, counts
            self.sim.check()
            # drain() returns once nothing is open, maybe before a paused server
            # wakes up: run on past the last fault, so that late results are tried.
            last = self.sim.faults_end
            self.sim.run_for(max(last - self.sim.elapsed, timedelta(0)) + timedelta(minutes=1))
            self.sim.check()
            after = self.sim.counts()
            assert after.queued == after.running == after.handling == 0, after
        finally:
            self._made.close()


def _shift(fault: Fault, by: timedelta) -> Fault:
    import dataclasses

    return dataclasses.replace(fault, at=fault.at + by)
