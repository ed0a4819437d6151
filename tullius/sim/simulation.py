"""`Simulation`: the daemon's driver recipe, run by a seeded scheduler under virtual time.

The public API lives here, with the set-up of a simulation's state; the
scheduler (events, store operations with faults, invariants after every
write) is `tullius.sim.scheduler`, and the driver loops of each simulated
server (workers, heartbeats, a sweeper: the same engine conversations
``tulliusd`` drives, never a copy of the rules) are `tullius.sim.world`.
"""

from __future__ import annotations

import gc
import math
import random
import threading
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Final

from tullius.api import OPEN_SIMULATIONS, queue_sink, task_id_of
from tullius.band import Band, bands_from_setting
from tullius.document import TERMINAL, Status, TaskSpec, short_name, spawned_of, status_of
from tullius.effects import InsertRecord, InsertTasks
from tullius.engine import Conversation
from tullius.errors import (
    ConfigError,
    TaskError,
)
from tullius.inspection import ChainLink, ChainTree, read_chain, read_tree
from tullius.keyed import check_key
from tullius.policy import DEFAULT_GRACE, DEFAULT_LEASE, LeaseTimings
from tullius.retry import Retry, current_limits, retry
from tullius.sim.clock import DEFAULT_START, EARLIEST, LATEST, ServerClock, SimClock, to_us
from tullius.sim.faults import (
    ClockSkew,
    Fault,
    ServerCrash,
    ServerPause,
    ServerStop,
    StepCrash,
    StoreFault,
    StoreOutage,
    WorkerCrash,
    fault_end,
    validate_schedule,
)
from tullius.sim.invariants import DrainTimeout, Invariants
from tullius.sim.memory_store import MemoryStore
from tullius.sim.scheduler import Scheduler, bind_performers, trace_line
from tullius.sim.threads import BatonPool
from tullius.sim.virtual_asyncio import LOOPS
from tullius.sim.virtual_time import SimulationError, VirtualTime, release_frozen_clock
from tullius.sim.world import (
    FAULT,
    Actor,
    Server,
    server_names,
)
from tullius.store import Operation
from tullius.task import Task, queued_tasks, to_specs

#: The ``server`` of the records an operator's `Simulation.retry_unhandled` writes
#: (``tullius.retry_unhandled()`` writes its host and pid there).
OPERATOR: Final = "operator"
_MILLISECOND: Final = timedelta(milliseconds=1)
_HOUR: Final = timedelta(hours=1)
_DAY: Final = timedelta(days=1)


@dataclass(frozen=True)
class Counts:
    """What a run left behind, by true status (records, not hints).

    Attributes:
        tasks: every task stored (queued ones, successors, replacements).
        queued / running / succeeded / handled / unhandled: by true status.
        failed: tasks whose run failed, whatever ``failed()`` then did.
        handling: failed tasks whose ``failed()`` is due, running or backing off.
        failures: how many runs failed, by `Failure.kind`.
        elapsed: virtual time since the simulation started.
    """

    tasks: int
    queued: int
    running: int
    succeeded: int
    failed: int
    handling: int
    handled: int
    unhandled: int
    failures: dict[str, int] = field(default_factory=dict)
    elapsed: timedelta = timedelta(0)


class Simulation(Scheduler):
    """A deterministic world of ``tulliusd`` servers sharing one in-memory store.

    Args:
        seed: decides everything (interleavings, tokens, ids, jitter, races).
        servers: a count (named ``s1``, ``s2``...) or a list of names.
        task_processes: ``[(count, min_priority, max_priority), ...]`` per server,
            as ``tullius_deps.task_processes``.
        lease: the lease promise; heartbeat and sweep periods derive from it
            (60 ms to 7 days, as ``tulliusd --lease``).
        poll_interval: how often a band with idle workers looks for work (a timedelta,
            or seconds as for the daemon's ``--poll-interval``); as in the daemon, a
            band also looks right after a verdict, a lost lease found, or a
            ``tullius.queue()`` from user code.  Default 1 s, not the daemon's 10 ms:
            it only sets how soon idle workers notice new work from elsewhere, and
            every look is a few scheduler events.  From 1 ms to 1 hour.
        store_retry: how long a driver waits before repeating a failed conversation
            (at most a day, as ``wall_limit`` and ``kill_grace``).
        kill_grace: slack allowed past a deadline by the run-length invariant.
        racy_updates: probability that a conditional update races (FerretDB).
        start: the wall-clock time at virtual zero, from the year 1000 (`EARLIEST`);
            the clock stays before the year 9000 (`LATEST`), and a run that would
            pass it is refused.
        wall_limit: real seconds user code may run without sleeping (`UserCodeHang`).
        keep_trace: keep every event for `trace` (off: only the last ones, for reports).
        check_invariants: check after every write (on by default; off for benchmarks).
        instant_chain_limit: how many tasks may follow one another at one virtual
            instant (each returned at once by the one before, nothing sleeping)
            before `NoTimePasses` is raised: such a chain never lets time reach a
            horizon, so one that does not end would spin for ever.
    """

    def __init__(
        self,
        seed: int = 0,
        *,
        servers: int | Iterable[str] = 1,
        task_processes: Iterable[Any] = ((10, 0, 10),),
        lease: timedelta = DEFAULT_LEASE,
        poll_interval: timedelta | float = timedelta(seconds=1),
        store_retry: timedelta = timedelta(seconds=1),
        kill_grace: timedelta = timedelta(0),
        racy_updates: float = 0.0,
        start: datetime = DEFAULT_START,
        wall_limit: timedelta = timedelta(seconds=10),
        keep_trace: bool = False,
        check_invariants: bool = True,
        instant_chain_limit: int = 10_000,
    ) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError("seed", seed, "must be an int")
        self.seed = seed
        self.rng = random.Random(seed)
        #: The state of the ``random`` module's sequence that user code draws from
        #: during runs (`_virtual_time`).
        self._user_random = random.Random(seed ^ 0x05E7).getstate()
        # Not list() first: bands_from_setting refuses a string or None as a whole,
        # where list("10:0-10") was refused as "task_processes[0]='1'".
        self.bands: tuple[Band, ...] = bands_from_setting(task_processes)
        self.timings = LeaseTimings(lease)
        poll = poll_interval
        if isinstance(poll, int | float) and not isinstance(poll, bool):
            if not math.isfinite(poll) or poll <= 0:
                raise ConfigError("poll_interval", poll_interval, "must be positive")
            poll = timedelta(seconds=poll)
        if not isinstance(poll, timedelta) or not _MILLISECOND <= poll <= _HOUR:
            raise ConfigError(
                "poll_interval",
                poll_interval,
                "must be a timedelta or number of seconds from 1 ms to 1 hour",
            )
        for name, value in (
            ("store_retry", store_retry),
            ("wall_limit", wall_limit),
        ):
            if not isinstance(value, timedelta) or not timedelta(0) < value <= _DAY:
                raise ConfigError(name, value, "must be a positive timedelta of at most a day")
        if (
            isinstance(instant_chain_limit, bool)
            or not isinstance(instant_chain_limit, int)
            or instant_chain_limit < 1
        ):
            raise ConfigError("instant_chain_limit", instant_chain_limit, "must be an int >= 1")
        self._instant_chain_limit = instant_chain_limit
        if not isinstance(kill_grace, timedelta) or not timedelta(0) <= kill_grace <= _DAY:
            raise ConfigError("kill_grace", kill_grace, "must be a timedelta from 0 to a day")
        if (
            isinstance(racy_updates, bool)
            or not isinstance(racy_updates, int | float)
            or not 0 <= racy_updates <= 1
        ):
            raise ConfigError("racy_updates", racy_updates, "must be a probability from 0 to 1")
        if not isinstance(start, datetime) or start.tzinfo is None or start.utcoffset() is None:
            raise ConfigError("start", start, "must be an aware datetime")
        if not EARLIEST <= start < LATEST:
            raise ConfigError(
                "start",
                start,
                f"must be from {EARLIEST.isoformat()} to before {LATEST.isoformat()}",
            )
        self.clock = SimClock(start)
        self.store = MemoryStore(rng=random.Random(seed ^ 0x5EED), racy_updates=racy_updates)
        self._perform = bind_performers(self.store)
        self._servers = {
            name: Server(name, ServerClock(self.clock)) for name in server_names(servers)
        }
        self._poll_us = to_us(poll)
        self._retry_us = to_us(store_retry)
        self._grace_us = to_us(kill_grace)
        self._beat_us = to_us(self.timings.heartbeat)
        self._sweep_us = to_us(self.timings.sweep)
        self._heap = []
        self._tiebreak = self.rng.getrandbits  # bound once: every event draws one
        self._seq = 0
        self.events = 0
        self.faults: list[Fault] = []
        self._armed_at = {}
        self._outages = []
        self._faults_end_us = 0
        self._inv = Invariants()
        self._check = check_invariants
        self._open: set[str] = set()
        self._inserted: dict[str, int] = {}
        self._same_instant = {}
        self._same_instant_at = -1
        self._leases: dict[str, tuple[str, int, int]] = {}
        self._leases_of = {}
        self._tail: deque[tuple[int, str, object]] = deque(maxlen=40)
        self._trace: list[tuple[int, str, object]] | None = [] if keep_trace else None
        self._pool = BatonPool(wall_limit.total_seconds(), self._loop)
        self._end = 0
        self._drain = False
        self._starting: deque[Actor] = deque()
        self._vt: VirtualTime | None = None
        self._baseline: set[threading.Thread] = set()
        self._thread_owners = {}
        self._task_counter = 0
        self._closed = False
        for server in self._servers.values():
            self._boot(server)
        OPEN_SIMULATIONS.add(self)

    # --- public API ---------------------------------------------------------------

    @property
    def now(self) -> datetime:
        """Virtual wall-clock time (aware UTC), as an unskewed server reads it."""
        return self.clock.now()

    @property
    def elapsed(self) -> timedelta:
        """Virtual time since the simulation started."""
        return self.clock.elapsed

    @property
    def servers(self) -> list[str]:
        return list(self._servers)

    @property
    def faults_end(self) -> timedelta:
        """When the faults applied so far stop disturbing anything, from the start:
        the latest `fault_end` (a restart or a resume counts as the end), moved
        later as a store fault fires or a pause delays a stop.  The liveness
        invariant counts from it; run past it to let late results be tried."""
        return timedelta(microseconds=self._faults_end_us)

    @property
    def trace(self) -> list[str]:
        """Every event so far (needs ``keep_trace=True``), one line each."""
        if self._trace is None:
            raise ConfigError("keep_trace", False, "must be True to read the whole trace")
        return [trace_line(entry) for entry in self._trace]

    def queue(self, task_or_tasks: Task | Iterable[Task], *, key: str | None = None) -> list[str]:
        """Store tasks now, like ``tullius.queue`` (``key`` as there); return their ids
        (also set as ``task_id``)."""
        key = check_key(key)
        tasks = queued_tasks(task_or_tasks, role="sim.queue() argument")
        ids = self._queue_specs(to_specs(tasks, role="sim.queue() argument"), key)
        for task, task_id in zip(tasks, ids, strict=True):
            task.task_id = task_id
        return ids

    @contextmanager
    def queue_calls(self) -> Iterator[Simulation]:
        """Within the block, ``tullius.queue()`` stores into this simulation, as
        `queue` does: for testing application code that queues tasks (a view, a
        signal handler) without a database.  Only in this thread and its context;
        inside tasks ``tullius.queue()`` goes to the simulated store anyway."""
        if self._closed:
            raise SimulationError("this simulation was closed; make a new Simulation")
        with queue_sink(self._queue_specs):
            yield self

    def _queue_specs(self, specs: Sequence[TaskSpec], key: str | None = None) -> list[str]:
        for spec in specs:
            if not any(band.covers(spec.priority) for band in self.bands):
                raise ConfigError(
                    f"{short_name(spec.class_name)}.priority",
                    spec.priority,
                    f"is outside every band of task_processes {[str(b) for b in self.bands]}; "
                    "no worker would ever run it",
                )
        return self._insert_roots(list(specs), self.clock.now(), key)

    def retry_unhandled(self, task_or_id: Task | str) -> Retry:
        """Try ``failed()`` again for an UNHANDLED task, as ``tullius.retry_unhandled()``
        does against MongoDB: an operator's retry, made now (`now`), outside any server.

        The task stays UNHANDLED; a copy of it (origin ``"retry"``), born failed with
        the task's failure, is stored with its records, and the servers run its
        ``failed()`` (never its ``run()``) in the next `run_for` or `drain`, with the
        usual attempts, backoff and leases (``failed_timeout`` and ``failed_attempts``
        from the class as it is now: the fix may raise them).  `chain` follows the task to the copy,
        and `counts` counts the copy among the failed tasks, with the task's failure
        kind.  Asking again returns the same retry (``new`` False) and stores
        nothing.  Its token comes from the seed, and its records name the server
        ``"operator"``; like `queue`, it takes no virtual time and no fault hits it.

        Raises:
            TaskNotFound: no such task.
            NotRetried: the task is not UNHANDLED (the message names its status).
            SimulationError: called from a task's ``run()`` or ``failed()``.
        """
        if self._vt is not None:
            raise SimulationError(
                "sim.retry_unhandled() was called from inside a task's run() or failed() "
                "while the simulation was running it; drive the simulation from the test only"
            )
        task_id = task_id_of(task_or_id)
        try:
            done = self._as_operator(
                retry(
                    task_id,
                    now=self.clock.now(),
                    token=self._new_token(),
                    server=OPERATOR,
                    limits=current_limits,
                )
            )
        except TaskError as refused:
            self._log(OPERATOR, f"retry of {task_id} refused: {refused}")
            raise
        self._log(OPERATOR, done.describe())
        return done

    def _as_operator(self, conversation: Conversation[Retry]) -> Retry:
        """Carry out an operator's conversation at once, each write checked as the
        servers' are (`Scheduler._after_write`), without their faults."""
        send = conversation.send
        try:
            op = next(conversation)
            while True:
                op = send(self._operator_op(op))
        except StopIteration as stop:
            done: Retry = stop.value
        if self._inv.violation is not None:
            raise self._violation()
        return done

    def _operator_op(self, op: Operation) -> Any:
        do, _name, tracked = self._perform[type(op)]
        self._log(OPERATOR, op)
        result = do(op)
        if not tracked:
            return result
        if isinstance(op, InsertRecord):
            # Not `_after_write`: the copy's run record is no lease anybody holds, and
            # it and the copy's outcome come before the copy (`_refresh` skips them).
            self._refresh(op.record.task_id)
        elif isinstance(op, InsertTasks):
            self._after_write(op, result)
            for doc in op.docs:
                self._refresh(doc.task_id)
        return result

    def run_for(self, duration: timedelta) -> None:
        """Run everything due in the next ``duration`` of virtual time."""
        if not isinstance(duration, timedelta) or duration < timedelta(0):
            raise ConfigError("duration", duration, "must be a timedelta >= 0")
        self._check_horizon("duration", duration)
        end = self.clock.us + to_us(duration)
        self._run(end, drain=False)
        self.clock.jump_to(end)
        self._check_liveness()

    def drain(self, within: timedelta = timedelta(hours=1)) -> Counts:
        """Run until no task is open (queued, running, failed or handling, or
        terminal with successors not yet inserted); return the counts.

        Raises:
            ConfigError: ``within`` is not positive, or a task can never finish within it.
            DrainTimeout: the horizon passed with tasks open (each listed with what it waits for).
        """
        if not isinstance(within, timedelta) or within <= timedelta(0):
            raise ConfigError("within", within, "must be a positive timedelta")
        self._check_horizon("within", within)
        end = self.clock.us + to_us(within)
        horizon = self.clock.now() + within
        for task_id in sorted(self._open):
            view = self.store.load(task_id)
            if (
                view is not None
                and status_of(view) is Status.QUEUED
                and view.task.start_after > horizon
            ):
                raise ConfigError(
                    "within",
                    within,
                    f"can never be enough: task {task_id!r} is not due until "
                    f"{view.task.start_after.isoformat()}",
                )
        self._run(end, drain=True)
        if self._open:
            self.clock.jump_to(end)
            raise DrainTimeout(
                within, self.seed, [self._waiting_for(t) for t in sorted(self._open)[:50]]
            )
        self._check_liveness()
        return self.counts()

    def _check_horizon(self, name: str, duration: timedelta) -> None:
        """Refuse a run that would take the clock past `LATEST`."""
        if duration > LATEST - self.clock.now():
            raise ConfigError(
                name,
                duration,
                f"would run the clock past {LATEST.isoformat()}; the simulation is at "
                f"{self.clock.now().isoformat()}",
            )

    def counts(self) -> Counts:
        by_status = dict.fromkeys(Status, 0)
        failures: dict[str, int] = {}
        failed = 0
        views = self.store.all_views()
        for view in views:
            by_status[status_of(view)] += 1
            outcome = view.outcome
            if outcome is not None and not outcome.ok and outcome.failure is not None:
                failed += 1
                failures[outcome.failure.kind] = failures.get(outcome.failure.kind, 0) + 1
        return Counts(
            tasks=len(views),
            queued=by_status[Status.QUEUED],
            running=by_status[Status.RUNNING],
            succeeded=by_status[Status.SUCCEEDED],
            failed=failed,
            handling=by_status[Status.HANDLING] + by_status[Status.FAILED],
            handled=by_status[Status.HANDLED],
            unhandled=by_status[Status.UNHANDLED],
            failures=failures,
            elapsed=self.clock.elapsed,
        )

    def chain(self, task_or_id: Task | str) -> list[ChainLink]:
        """The task and, in order, the first task produced at each step after it."""
        return read_chain(self.store, task_id_of(task_or_id))

    def tree(self, task_or_id: Task | str) -> ChainTree:
        """Everything produced from the task, as a tree."""
        return read_tree(self.store, task_id_of(task_or_id))

    def check(self) -> None:
        """Run every invariant over the whole store now.

        Raises:
            InvariantViolation: with the seed, faults and last events.
        """
        for view in self.store.all_views():
            self._inv.on_status(view)
            if self.store.insert_counts.get(view.task_id, 0) != 1:
                self._inv.fail(
                    "each task inserted once",
                    f"task {view.task_id!r} inserted "
                    f"{self.store.insert_counts.get(view.task_id)} times",
                )
            if view.task.status in TERMINAL and status_of(view) is view.task.status:
                missing = [
                    d.task_id for d in spawned_of(view) if d.task_id not in self.store.insert_counts
                ]
                if missing:
                    self._inv.fail(
                        "each task inserted once",
                        f"settled task {view.task_id!r} lacks spawned tasks {missing}",
                    )
        self._check_liveness()

    # --- faults -------------------------------------------------------------------

    def apply(self, schedule: Iterable[Fault]) -> None:
        """Arm a list of faults (see `tullius.sim.faults`).

        Raises:
            ConfigError: a fault names an unknown server, has a bad value, or is in the past.
        """
        faults = validate_schedule(
            schedule, self.servers, workers=sum(band.count for band in self.bands)
        )
        for index, fault in enumerate(faults):
            if to_us(fault.at) < self.clock.us:
                raise ConfigError(
                    f"faults[{index}].at",
                    fault.at,
                    f"is in the past; the simulation is at {self.clock.elapsed}",
                )
        for fault in faults:
            self.faults.append(fault)
            self._faults_end_us = max(self._faults_end_us, to_us(fault_end(fault)))
            if isinstance(fault, StoreFault | StepCrash):
                armed = [fault, getattr(fault, "count", 1)]
                self._armed_at.setdefault((fault.server, fault.operation), []).append(armed)
            elif isinstance(fault, StoreOutage):
                start = to_us(fault.at)
                self._outages.append((start, start + to_us(fault.duration), fault.server))
                self._outages.sort(key=lambda outage: outage[1])  # ending first: see `_store_fault`
            else:
                self._push(to_us(fault.at), FAULT, fault, None)

    def crash_server(
        self, name: str, *, at: timedelta, restart_after: timedelta | None = None
    ) -> None:
        self.apply([ServerCrash(at=at, server=name, restart_after=restart_after)])

    def stop_server(
        self,
        name: str,
        *,
        at: timedelta,
        grace: timedelta = DEFAULT_GRACE,
        restart_after: timedelta | None = None,
    ) -> None:
        self.apply([ServerStop(at=at, server=name, grace=grace, restart_after=restart_after)])

    def crash_worker(self, server: str, *, at: timedelta, worker: int | None = None) -> None:
        self.apply([WorkerCrash(at=at, server=server, worker=worker)])

    def pause_server(self, name: str, *, at: timedelta, duration: timedelta) -> None:
        self.apply([ServerPause(at=at, server=name, duration=duration)])

    def store_fault(
        self,
        server: str,
        operation: str,
        kind: str = "lost_ack",
        *,
        at: timedelta | None = None,
        record_kind: str | None = None,
        count: int = 1,
    ) -> None:
        """Arm a `StoreFault` from ``at`` (default: now, `elapsed`)."""
        at = self.elapsed if at is None else at
        self.apply([StoreFault(server, operation, kind, at, record_kind, count)])

    def store_outage(
        self, *, at: timedelta, duration: timedelta, server: str | None = None
    ) -> None:
        self.apply([StoreOutage(at=at, duration=duration, server=server)])

    def skew_clock(self, server: str, skew: timedelta, *, at: timedelta | None = None) -> None:
        """Skew ``server``'s wall clock from ``at`` (default: now, `elapsed`)."""
        at = self.elapsed if at is None else at
        self.apply([ClockSkew(server=server, skew=skew, at=at)])

    def replay_command(self, nodeid: str | None = None) -> str:
        if nodeid:
            return f"pytest '{nodeid}' --tullius-seed={self.seed}"
        return f"Simulation(seed={self.seed}, ...).apply({self.faults!r})"

    def close(self) -> None:
        """Stop the user threads, unwinding tasks left sleeping (the simulation can't run
        afterwards), and stop freezegun, which stays started between runs, reading the
        real clock (`virtual_time._HeldFreeze`).  ``with Simulation(...) as sim:`` calls
        it on exit."""
        self._closed = True
        OPEN_SIMULATIONS.discard(self)
        self._pool.close()
        release_frozen_clock()
        LOOPS.release()

    def __enter__(self) -> Simulation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- runs ---------------------------------------------------------------------

    def _run(self, end: int, *, drain: bool) -> None:
        """Run events until ``end`` (or, with ``drain``, until nothing is open): the loop
        runs in the pool's threads (`tullius.sim.threads`) while this one waits."""
        if self._closed:
            # Why here: close() unwound the tasks that were sleeping, so a run would
            # wait ``wall_limit`` for one of them and then blame it as a UserCodeHang.
            raise SimulationError(
                "this simulation was closed (close(), the end of a with block or of the "
                "tullius_sim fixture) and can't run again; make a new Simulation"
            )
        with self._virtual_time("drain()" if drain else "run_for()"):
            self._end, self._drain = end, drain
            self._pool.run()

    @contextmanager
    def _virtual_time(self, call: str) -> Iterator[None]:
        if self._vt is not None:  # re-entered from user code: a usage error
            raise SimulationError(
                f"sim.{call} was called from inside a task's run() or failed() while the "
                "simulation was running it; drive the simulation from the test only"
            )
        # The threads that were there before the run, but not the pool's own (from
        # earlier runs) nor those user code started (`_adopt_threads`): the leak
        # check counts those apart, and counted twice they hid a thread leaked.
        self._baseline = set(threading.enumerate()) - self._pool.threads - set(self._thread_owners)
        LOOPS.cover(self.clock.monotonic, self.clock.start.timestamp())
        with VirtualTime(self.clock.now()) as vt, _fewer_collections():
            self._vt = vt
            self._pool.cpu.start()
            # User code's ``random.random()`` draws from the simulation's own
            # sequence, seeded by its seed: a backoff with jitter made the same seed
            # succeed in one process and time out in another.  The test's sequence
            # is put back after the run.
            outside = random.getstate()
            random.setstate(self._user_random)
            try:
                yield
            finally:
                self._user_random = random.getstate()
                random.setstate(outside)
                self._pool.cpu.stop()
                self._vt = None


#: gc's first threshold while the scheduler runs (the default is 700).
_GC_YOUNG_THRESHOLD: Final = 10_000


@contextmanager
def _fewer_collections() -> Iterator[None]:
    """Let the cyclic garbage collector run less often while the scheduler runs.

    Why: a run allocates a stream of small objects (views, records, events,
    generators) and keeps many of them in the store, so with gc's default
    threshold of 700 it collects every few task lifecycles, and now and then
    a full collection walks the whole growing store: in all about a sixth of
    a short task's cost.  Raising the first threshold to `_GC_YOUNG_THRESHOLD`
    (never lowering it; not if gc is switched off) keeps collecting, in
    batches of at most a few megabytes of young objects; the thresholds are
    restored when the run ends.
    """
    thresholds = gc.get_threshold()
    if 0 < thresholds[0] < _GC_YOUNG_THRESHOLD:
        gc.set_threshold(_GC_YOUNG_THRESHOLD, *thresholds[1:])
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
