"""`Simulation`: the daemon's driver recipe, run by a seeded scheduler under virtual time.

What lives here: the scheduler (one heap of events, one ``random.Random``),
the driver loops of each simulated server (workers, heartbeats, a sweeper:
the same engine conversations ``tulliusd`` drives, never a copy of the rules),
fault injection between any two store operations, and the public API.

How it runs:

1. Every actor's store operation is one scheduler event.  Events due at the
   same virtual instant are ordered by a draw from the seeded ``rng``, so the
   seed chooses the interleaving of servers, and the same seed replays it.
2. Before an operation is carried out, faults aimed at it apply: an outage or
   a ``not_applied`` fault raises `StoreError` into the conversation without
   touching the store; ``lost_ack`` applies it, then raises.  The driver runs
   the conversation again later with the same token and event, as the daemon.
3. After each write, the touched task is re-read and the invariants checked.
4. The loop runs on pool threads (`tullius.sim.threads`), one at a time,
   while ``run_for`` waits; user code runs on the loop's thread until it
   sleeps.  A sleep becomes an event at its wake-up time, or at the deadline
   if that comes first (a tie goes to the deadline: a run still going at its
   deadline has timed out).
"""

from __future__ import annotations

import gc
import heapq
import random
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial
from types import ModuleType
from typing import Any, Final

from tullius.api import insert_queued, task_id_of
from tullius.band import Band, bands_from_setting
from tullius.document import TERMINAL, RecordKind, Status, TaskSpec, TaskView, spawned_of, status_of
from tullius.effects import InsertRecord, InsertTasks
from tullius.errors import (
    ConfigError,
    StoreError,
    StoreUnavailable,
)
from tullius.inspection import ChainLink, ChainTree, read_chain, read_tree
from tullius.policy import LeaseTimings
from tullius.sim.clock import DEFAULT_START, ServerClock, SimClock, to_us
from tullius.sim.faults import (
    ClockSkew,
    Fault,
    ServerCrash,
    ServerPause,
    StepCrash,
    StoreFault,
    StoreOutage,
    WorkerCrash,
    fault_end,
    validate_schedule,
)
from tullius.sim.invariants import DrainTimeout, Invariants, InvariantViolation
from tullius.sim.memory_store import MemoryStore
from tullius.sim.threads import BatonPool
from tullius.sim.virtual_time import SimulationError, VirtualTime, release_frozen_clock
from tullius.sim.world import (
    ACTOR,
    FAULT,
    NAP,
    OP,
    WAKE,
    Actor,
    ActorGen,
    Claimer,
    Drivers,
    Nap,
    RunUser,
    Server,
    StartJobs,
    Wait,
    describe_op,
    server_names,
)
from tullius.store import PERFORMERS, Operation, operation_name, perform
from tullius.task import Task, queued_tasks, to_specs

_NO_CHECK: Final = frozenset({"Load", "FindDue", "FindByStatus", "Beat", "SetStatus"})

# Read after every write: module globals, not ``RecordKind.RUN`` (the enum
# metaclass's ``__getattr__``, ~75 ns on 3.11).
_RUN_RECORD, _HANDLER_RECORD = RecordKind.RUN, RecordKind.HANDLER


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


class Simulation(Drivers):
    """A deterministic world of ``tulliusd`` servers sharing one in-memory store.

    Args:
        seed: decides everything (interleavings, tokens, ids, jitter, races).
        servers: a count (named ``s1``, ``s2``...) or a list of names.
        task_processes: ``[(count, min_priority, max_priority), ...]`` per server,
            as ``tullius_deps.task_processes``.
        lease: the lease promise; heartbeat and sweep periods derive from it.
        poll_interval: how often a band with idle workers looks for work (a timedelta,
            or seconds as for the daemon's ``--poll-interval``); as in the daemon, a
            band also looks right after a verdict, a lost lease found, or a
            ``tullius.queue()`` from user code.  Default 1 s, not the daemon's 10 ms:
            it only sets how soon idle workers notice new work from elsewhere, and
            every look is a few scheduler events.
        store_retry: how long a driver waits before repeating a failed conversation.
        kill_grace: slack allowed past a deadline by the run-length invariant.
        racy_updates: probability that a conditional update races (FerretDB).
        start: the wall-clock time at virtual zero.
        wall_limit: real seconds user code may run without sleeping (`UserCodeHang`).
        keep_trace: keep every event for `trace` (off: only the last ones, for reports).
        check_invariants: check after every write (on by default; off for benchmarks).
    """

    def __init__(
        self,
        seed: int = 0,
        *,
        servers: int | Iterable[str] = 1,
        task_processes: Iterable[Any] = ((10, 0, 10),),
        lease: timedelta = timedelta(seconds=30),
        poll_interval: timedelta | float = timedelta(seconds=1),
        store_retry: timedelta = timedelta(seconds=1),
        kill_grace: timedelta = timedelta(0),
        racy_updates: float = 0.0,
        start: datetime = DEFAULT_START,
        wall_limit: timedelta = timedelta(seconds=10),
        keep_trace: bool = False,
        check_invariants: bool = True,
    ) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError("seed", seed, "must be an int")
        self.seed = seed
        self.rng = random.Random(seed)
        # Not list() first: bands_from_setting refuses a string or None as a whole,
        # where list("10:0-10") was refused as "task_processes[0]='1'".
        self.bands: tuple[Band, ...] = bands_from_setting(task_processes)
        self.timings = LeaseTimings(lease)
        if isinstance(poll_interval, int | float) and not isinstance(poll_interval, bool):
            if poll_interval <= 0:
                raise ConfigError("poll_interval", poll_interval, "must be positive")
            poll_interval = timedelta(seconds=poll_interval)
        for name, value in (
            ("poll_interval", poll_interval),
            ("store_retry", store_retry),
            ("wall_limit", wall_limit),
        ):
            if not isinstance(value, timedelta) or value <= timedelta(0):
                raise ConfigError(name, value, "must be a positive timedelta")
        if not isinstance(kill_grace, timedelta) or kill_grace < timedelta(0):
            raise ConfigError("kill_grace", kill_grace, "must be a timedelta >= 0")
        if (
            isinstance(racy_updates, bool)
            or not isinstance(racy_updates, int | float)
            or not 0 <= racy_updates <= 1
        ):
            raise ConfigError("racy_updates", racy_updates, "must be a probability from 0 to 1")
        if not isinstance(start, datetime) or start.tzinfo is None:
            raise ConfigError("start", start, "must be an aware datetime")
        self.clock = SimClock(start)
        self.store = MemoryStore(rng=random.Random(seed ^ 0x5EED), racy_updates=racy_updates)
        self._perform = _dispatcher(self.store)
        self._servers = {
            name: Server(name, ServerClock(self.clock)) for name in server_names(servers)
        }
        self._poll_us = to_us(poll_interval)  # type: ignore[arg-type]  # checked above
        self._retry_us = to_us(store_retry)
        self._grace_us = to_us(kill_grace)
        self._beat_us = to_us(self.timings.heartbeat)
        self._sweep_us = to_us(self.timings.sweep)
        self._heap: list[tuple[int, int, int, int, Any, Any]] = []
        self._tiebreak = self.rng.getrandbits  # bound once: every event draws one
        self._seq = 0
        self.events = 0
        self.faults: list[Fault] = []
        # Armed store faults, [fault, remaining], by (server, operation) in arming
        # order: an operation looks only at the faults aimed at it (the first live
        # one applies).
        self._armed_at: dict[tuple[str, str], list[list[Any]]] = {}
        self._outages: list[tuple[int, int, str | None]] = []
        self._faults_end_us = 0
        self._inv = Invariants()
        self._check = check_invariants
        self._open: set[str] = set()
        self._inserted: dict[str, int] = {}
        self._leases: dict[str, tuple[str, int, int]] = {}
        self._leases_of: dict[str, set[str]] = {}  # task id -> its record ids in _leases
        self._tail: deque[tuple[int, str, object]] = deque(maxlen=40)
        self._trace: list[tuple[int, str, object]] | None = [] if keep_trace else None
        self._pool = BatonPool(wall_limit.total_seconds(), self._loop)
        self._end = 0
        self._drain = False
        self._starting: deque[Actor] = deque()
        self._vt: VirtualTime | None = None
        self._modules: set[ModuleType] = set()
        self._baseline: set[threading.Thread] = set()
        self._task_counter = 0
        self._closed = False
        for server in self._servers.values():
            self._boot(server)

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
    def trace(self) -> list[str]:
        """Every event so far (needs ``keep_trace=True``), one line each."""
        if self._trace is None:
            raise ConfigError("keep_trace", False, "must be True to read the whole trace")
        return [_line(entry) for entry in self._trace]

    def queue(self, task_or_tasks: Task | Iterable[Task]) -> list[str]:
        """Store tasks now, like ``tullius.queue``; return their ids (also set as ``task_id``)."""
        tasks = queued_tasks(task_or_tasks, role="sim.queue() argument")
        specs = to_specs(tasks, role="sim.queue() argument")
        for task, spec in zip(tasks, specs, strict=True):
            if not any(band.covers(spec.priority) for band in self.bands):
                raise ConfigError(
                    f"{type(task).__name__}.priority",
                    spec.priority,
                    f"is outside every band of task_processes {[str(b) for b in self.bands]}; "
                    "no worker would ever run it",
                )
        ids = self._insert_roots(specs, self.clock.now())
        for task, task_id in zip(tasks, ids, strict=True):
            task.task_id = task_id
        return ids

    def run_for(self, duration: timedelta) -> None:
        """Run everything due in the next ``duration`` of virtual time."""
        if not isinstance(duration, timedelta) or duration < timedelta(0):
            raise ConfigError("duration", duration, "must be a timedelta >= 0")
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
        at: timedelta = timedelta(0),
        record_kind: str | None = None,
        count: int = 1,
    ) -> None:
        self.apply([StoreFault(server, operation, kind, at, record_kind, count)])

    def store_outage(
        self, *, at: timedelta, duration: timedelta, server: str | None = None
    ) -> None:
        self.apply([StoreOutage(at=at, duration=duration, server=server)])

    def skew_clock(self, server: str, skew: timedelta, *, at: timedelta = timedelta(0)) -> None:
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
        self._pool.close()
        release_frozen_clock()

    def __enter__(self) -> Simulation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- scheduler ----------------------------------------------------------------

    def _push(self, t: int, kind: int, target: Any, value: Any) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._tiebreak(30), self._seq, kind, target, value))

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
        with self._virtual_time():
            self._end, self._drain = end, drain
            self._pool.run()

    def _loop(self) -> None:
        """The scheduler's loop, run by a pool thread until the run's end.

        A pool thread may leave it while user code it called sleeps, and carry on
        later from where it left it, in a later run: so everything it reads comes
        from ``self`` (the locals below are the same objects for the whole life of
        the simulation), and the checks come first in each round.
        """
        heap = self._heap
        clock = self.clock
        heappop = heapq.heappop
        inv = self._inv
        pool = self._pool
        do_op, advance = self._do_op, self._advance
        while True:
            if inv.violation is not None:
                raise self._violation()
            if pool.interrupted:
                pool.interrupted = False
                raise KeyboardInterrupt
            if not self.events & 1023:  # the CPU may have got busy: see `SharedCpu`
                pool.cpu.check()
            if not heap or heap[0][0] > self._end or (self._drain and not self._open):
                return
            t, _, _, kind, target, value = heappop(heap)
            if t > clock.us:
                clock.us = t
            self.events += 1
            if kind <= ACTOR:
                if self._held_back(target, t, kind, target, value):
                    continue
                if kind == OP:
                    do_op(target, value)
                else:
                    advance(target, value)
            elif kind == WAKE:
                self._wake(target, value)
            elif kind == NAP:
                self._end_nap(target, value, t)
            elif kind == FAULT:
                self._fire(target)
            else:
                self._restart(target)

    @contextmanager
    def _virtual_time(self) -> Iterator[None]:
        if self._vt is not None:  # re-entered from user code: a usage error
            raise ConfigError("run_for/drain", "nested", "can't be called from inside a task")
        # The threads that were there before the run, but not the pool's own (from
        # earlier runs): the leak check counts those apart, and counted twice they
        # hid a thread leaked in any run but the first.
        self._baseline = set(threading.enumerate()) - self._pool.threads
        with VirtualTime(self.clock.now(), self._modules) as vt, _fewer_collections():
            self._vt = vt
            self._pool.cpu.start()
            try:
                yield
            finally:
                self._pool.cpu.stop()
                self._vt = None

    def _log(self, server: str, what: object) -> None:
        # ``what`` is a line, or a store operation formatted only when read
        entry = (self.clock.us, server, what)
        self._tail.append(entry)
        if self._trace is not None:
            self._trace.append(entry)

    def _violation(self) -> InvariantViolation:
        violation = self._inv.violation
        assert violation is not None
        return InvariantViolation(
            violation.promise,
            violation.detail,
            self.seed,
            self.faults,
            [_line(entry) for entry in self._tail],
        )

    def _spawn(self, server: Server, gen: ActorGen, name: str, at: int | None = None) -> Actor:
        actor = Actor(gen, server, name)
        self._push(self.clock.us if at is None else at, ACTOR, actor, None)
        return actor

    def _advance(self, actor: Actor, value: Any, error: BaseException | None = None) -> None:
        try:
            cmd = actor.gen.send(value) if error is None else actor.gen.throw(error)
        except StopIteration:
            return
        kind = type(cmd)
        if kind is Wait:
            self._push(self.clock.us + cmd.us, ACTOR, actor, None)
        elif kind is RunUser:
            cmd.ex.actor = actor
            self._start_user(cmd.ex)
        elif kind is StartJobs:
            # The claimer goes on to its next command, then the jobs start in turn
            # (each runs its user code here until it ends or sleeps).  A sleep moves
            # the loop to another thread, which first makes the jobs not started yet
            # events of their own (`_moved`): after a start, this frame may be
            # resumed much later, and must find nothing left to do (see `_loop`).
            self._advance(actor, None)
            starting = self._starting
            starting.extend(cmd.actors)
            try:
                while starting:
                    self._advance(starting.popleft(), None)
            finally:  # an error left jobs unstarted: they start as events (if ever run again)
                self._start_later()
        elif kind is Nap:
            claimer = cmd.claimer
            claimer.nap += 1
            claimer.napping = True
            if cmd.us is not None:
                self._push(self.clock.us + cmd.us, NAP, claimer, claimer.nap)
        else:
            self._push(self.clock.us, OP, actor, cmd)

    def _end_nap(self, claimer: Claimer, nap: int, t: int) -> None:
        """A claimer's nap is over (its time came, or it was poked), unless it is stale."""
        actor = claimer.actor
        if nap != claimer.nap or not claimer.napping or actor is None:
            return
        if self._held_back(actor, t, NAP, claimer, nap):
            return
        claimer.napping = False
        self._advance(actor, None)

    def _held_back(self, actor: Actor, t: int, kind: int, target: Any, value: Any) -> bool:
        """Whether an event of ``actor``'s can't happen at ``t``: its server crashed since
        (the actor dies with it) or is paused (the event waits for the pause's end)."""
        server = actor.server
        if actor.epoch != server.epoch:
            actor.gen.close()
            return True
        if server.paused_until > t:
            self._push(server.paused_until, kind, target, value)
            return True
        return False

    def _do_op(self, actor: Actor, op: Operation) -> None:
        server = actor.server
        how = self._perform.get(type(op))
        if how is None:  # a subclass of an operation: `perform` finds its kind
            name = operation_name(op)
            how = (lambda op: perform(self.store, op), name, name not in _NO_CHECK)
        do, name, tracked = how
        entry = (self.clock.us, server.name, op)  # as `_log`, without a call per operation
        self._tail.append(entry)
        if self._trace is not None:
            self._trace.append(entry)
        error = self._store_fault(server, op, name) if self._outages or self._armed_at else None
        if error is not None and not error[0]:
            assert error[1] is not None
            self._advance(actor, None, error[1])
            return
        result = do(op)
        if tracked:
            self._after_write(op, result)
        if error is not None and error[1] is None:  # a StepCrash: no reply, no server
            return
        if error is not None:
            self._advance(actor, None, error[1])
        else:
            self._advance(actor, result)

    def _store_fault(
        self, server: Server, op: Operation, name: str
    ) -> tuple[bool, StoreError | None] | None:
        """The fault hitting this operation: (applied?, the error to raise, or None for a
        `StepCrash`, which kills the server once the operation is applied)."""
        now = self.clock.us
        if self._outages and self._outages[0][1] <= now:  # (sorted by their end)
            # Ended outages never apply again (time never goes back): dropped, so that
            # once every fault is over `_do_op` no longer calls this.
            self._outages = [outage for outage in self._outages if outage[1] > now]
        for start, end, target in self._outages:
            if start <= now < end and target in (None, server.name):
                self._log(server.name, f"store outage: {name} refused")
                return False, StoreUnavailable(name, "simulated outage")
        key = (server.name, name)
        for armed in self._armed_at.get(key, ()):
            fault = armed[0]
            if to_us(fault.at) > now:
                continue
            if fault.record_kind is not None and (
                not isinstance(op, InsertRecord) or op.record.kind.value != fault.record_kind
            ):
                continue
            armed[1] -= 1
            if armed[1] <= 0:
                self._disarm(key, armed)
            self._faults_end_us = max(self._faults_end_us, now)
            if isinstance(fault, StepCrash):
                self._log(server.name, f"{fault!r}: dies after this {name}")
                restart = fault.restart_after
                self._crash(server, None if restart is None else now + to_us(restart))
                return True, None
            applied = fault.kind == "lost_ack"
            self._log(server.name, f"store fault {fault.kind}: {name}")
            detail = "write applied, acknowledgement lost" if applied else "write not applied"
            return applied, StoreError(f"simulated store fault on {name}: {detail}")
        return None

    def _disarm(self, key: tuple[str, str], armed: list[Any]) -> None:
        """Forget a used-up store fault: once every one is (and the outages are over),
        `_do_op` no longer looks for faults at all."""
        armed_here = self._armed_at[key]
        armed_here.remove(armed)
        if not armed_here:
            del self._armed_at[key]

    def _after_write(self, op: Operation, result: Any) -> None:
        if isinstance(op, InsertRecord):
            record = op.record
            view = self.store.load(record.task_id)
            if result.token == record.token and (
                record.kind is _RUN_RECORD or record.kind is _HANDLER_RECORD
            ):
                assert view is not None
                timeout = (
                    view.task.timeout if record.kind is _RUN_RECORD else view.task.handler_timeout
                )
                self._leases[record.record_id] = (record.task_id, self.clock.us, to_us(timeout))
                self._leases_of.setdefault(record.task_id, set()).add(record.record_id)
            self._refresh(record.task_id, view)
        elif isinstance(op, InsertTasks):
            parents: set[str] = set()
            for doc in op.docs:
                if doc.task_id not in self._inserted:
                    self._inserted[doc.task_id] = self.events
                    self._open.add(doc.task_id)
                if doc.parent_id is not None:
                    parents.add(doc.parent_id)
            if self._check:
                self._inv.on_tasks_inserted(op.docs, self.store.insert_counts, self.store.load)
            for parent in parents:
                self._refresh(parent)

    def _refresh(self, task_id: str, view: TaskView | None = None) -> None:
        """Track a task after a write to it: the invariants, its live lease, and whether
        it is open.  ``view``: the task as loaded after the write, if already at hand."""
        if view is None:
            view = self.store.load(task_id)
            if view is None:
                return
        status = self._inv.on_status(view)
        leases = self._leases_of.get(task_id)
        if leases:
            # Forget the task's leases that ended: every one but its live lease.
            lease = view.current_lease()
            live = None if lease is None else lease.record_id
            for record_id in [r for r in leases if r != live]:
                del self._leases[record_id]
                leases.discard(record_id)
            if not leases:
                del self._leases_of[task_id]
        if status in TERMINAL:
            inserted = self.store.insert_counts
            if all(d.task_id in inserted for d in spawned_of(view)):
                self._open.discard(task_id)
                return
        self._open.add(task_id)

    def _insert_roots(
        self, specs: tuple[TaskSpec, ...] | list[TaskSpec], now: datetime
    ) -> list[str]:
        ids = []
        for _ in specs:
            self._task_counter += 1
            ids.append(f"t{self._task_counter}-{self.rng.getrandbits(32):08x}")
        self._inv.roots.update(ids)
        for task_id in ids:
            self._inserted[task_id] = self.events
            self._open.add(task_id)
        fresh = iter(ids)
        insert_queued(self.store, specs, now=now, new_id=fresh.__next__)
        self._log("app", f"queued {','.join(ids)}")
        return ids

    # --- checks -------------------------------------------------------------------

    def _check_liveness(self) -> None:
        if self._check and any(s.up for s in self._servers.values()):
            slack = to_us(self.timings.lease) + 2 * self._sweep_us + self._poll_us + self._retry_us
            for record_id, (_task, start, timeout) in self._leases.items():
                since = max(start, self._faults_end_us)
                if self.clock.us - since > timeout + self._grace_us + slack:
                    self._inv.fail(
                        "terminal within the bound after faults stop",
                        f"lease {record_id!r} has been live since {start / 1e6:.3f}s",
                    )
        if self._inv.violation is not None:
            raise self._violation()


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


def _dispatcher(store: MemoryStore) -> dict[type[Any], tuple[Callable[[Any], Any], str, bool]]:
    """`tullius.store.PERFORMERS` bound to ``store``, with each operation's name
    (`operation_name`, what faults aim at) and whether `Simulation._after_write`
    tracks it (not in `_NO_CHECK`): one lookup per operation, and the simulator
    performs tens of thousands per second."""
    return {
        kind: (partial(do, store), kind.__name__, kind.__name__ not in _NO_CHECK)
        for kind, do in PERFORMERS.items()
    }


def _line(entry: tuple[int, str, object]) -> str:
    what = entry[2] if isinstance(entry[2], str) else describe_op(entry[2])
    return f"{entry[0] / 1e6:12.6f}s {entry[1]:<8} {what}"
