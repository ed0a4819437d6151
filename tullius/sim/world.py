"""The simulated servers: their state, and the driver loops they run.

Here live the servers, actors and executions, and `Drivers`, the daemon's
driver recipe (``tullius/engine.py`` conversations) written as actors.  An
*actor* is a generator (a band's claim loop, a job, a heartbeat, a sweeper)
that yields commands to the scheduler: a store operation (`tullius.store`
operations, carried out one per scheduler event so that servers interleave; a
`StoreError` thrown into a conversation aborts it, and the driver runs it again
later), `Wait` (virtual time), `Nap` (a claimer's wait, cut short by a poke) or
`RunUser` (call the user's ``run()``/``failed()``).  The faults aimed at a
whole server, and its stop, crash and restart, are in `tullius.sim.server_events`;
the scheduler and the checks in `tullius.sim.scheduler`; the public API in
`tullius.sim.simulation`.  No rule of the task's life is decided here: every
decision is `machine.step`.
"""

from __future__ import annotations

import random
import threading
from collections import deque
from collections.abc import Generator, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Final

from tullius.api import queue_sink
from tullius.band import Band
from tullius.document import (
    Failure,
    FailureKind,
    Status,
    TaskSpec,
    due_at_of,
    short_name,
    status_of,
)
from tullius.effects import InsertRecord, InsertTasks, SetStatus
from tullius.engine import (
    CLAIM_READ,
    REUSE_CANDIDATES_FOR,
    Candidates,
    ClaimInterrupted,
    Job,
    JobKind,
    Verdict,
    claim_many,
    finish,
    renew,
    sweep,
)
from tullius.errors import (
    ConfigError,
    StoreError,
    StoreUnavailable,
    TaskDefinitionError,
    UnknownTaskClass,
)
from tullius.events import Event, Failed, HandlerFailed, HandlerSucceeded, Succeeded
from tullius.policy import DEFAULT_GRACE, LeaseTimings, LeaseWatch, verdict_window
from tullius.sim.clock import US, ServerClock, SimClock, to_us
from tullius.sim.faults import ServerStop
from tullius.sim.invariants import Invariants
from tullius.sim.memory_store import MemoryStore
from tullius.sim.threads import Baton, BatonPool, current_baton
from tullius.sim.tracebacks import format_exception
from tullius.sim.virtual_time import REAL, TaskStopped, UserThreadLeak, VirtualTime, module_of
from tullius.store import (
    AnnounceServer,
    Beat,
    DeleteTasks,
    FindByStatus,
    FindDue,
    ForgetServer,
    Load,
)
from tullius.task import Task, from_doc, to_specs
from tullius.user_errors import bounded_message, bounded_traceback, raised

#: Scheduler event kinds.
OP, ACTOR, WAKE, FAULT, RESTART, NAP = range(6)

#: Real seconds a thread user code started may take to end after the code returned.
LEAK_GRACE: Final = 0.2

#: The kill reasons under which the daemon sends SIGTERM first (a second later,
#: SIGKILL): user code unwinding then may still queue tasks.
_SIGTERMED = frozenset({"timeout", "shutdown"})

# Job kinds as module globals: ``JobKind.RUN`` goes through the enum metaclass's
# ``__getattr__`` (~75 ns on 3.11), and every job reads them several times.
_RUN, _HANDLE = JobKind.RUN, JobKind.HANDLE


#: The store operations that write: refused, they stop store time (`_store_failed`).
WRITES: Final = frozenset(
    {InsertRecord, InsertTasks, SetStatus, Beat, AnnounceServer, ForgetServer, DeleteTasks}
)


class Wait:
    """Command: resume me ``us`` microseconds of virtual time later."""

    __slots__ = ("us",)

    def __init__(self, us: int) -> None:
        self.us = us


class RunUser:
    """Command: run the job's user code; resume me with ``(kill_reason, how, value)``."""

    __slots__ = ("ex",)

    def __init__(self, ex: Execution) -> None:
        self.ex = ex


class Nap:
    """Command of a `Claimer`'s actor: resume me ``us`` later (None: only when poked),
    or as soon as `Drivers._poke` says there may be work."""

    __slots__ = ("claimer", "us")

    def __init__(self, claimer: Claimer, us: int | None) -> None:
        self.claimer = claimer
        self.us = us


class StartJobs:
    """Command of a `Claimer`'s actor: start these jobs' actors, then resume me."""

    __slots__ = ("actors",)

    def __init__(self, actors: list[Actor]) -> None:
        self.actors = actors


ActorGen = Generator[Any, Any, None]


class Claimer:
    """The claim loop of one band of one server, as the daemon's supervisor runs it:
    one claim at a time for all the band's idle worker slots, with the candidates a
    claim read kept for the next (`engine.Candidates`).

    ``nap`` counts naps so that a poke makes the pending wake-up stale; ``read``
    is ``(event count, now)`` of the claim that last read candidates, what the
    priority-order invariant compares a claim with.  ``claiming`` holds the
    ``(worker, token)`` pairs of the claim in flight: its leases may be stored
    already, so the server's sweeper counts them as its own (as the daemon's).
    ``unsure_reads`` is the ``read`` that chose each unsure claim, by token: a
    later claim that runs it is checked against that read, not its own.
    """

    __slots__ = (
        "actor",
        "band",
        "busy",
        "candidates",
        "claiming",
        "nap",
        "napping",
        "poked",
        "read",
        "slots",
        "unsure_reads",
    )

    def __init__(self, band: Band, slots: list[tuple[int, str]], lease: timedelta) -> None:
        self.band = band
        self.slots = slots
        self.busy: set[int] = set()
        self.candidates = Candidates(REUSE_CANDIDATES_FOR, unsure_for=lease)
        self.actor: Actor | None = None
        self.nap = 0
        self.napping = False
        self.poked = False
        self.read: tuple[int, datetime] | None = None
        self.claiming: list[tuple[str | None, str]] = []
        self.unsure_reads: dict[str, tuple[int, datetime] | None] = {}


@dataclass(eq=False)
class Server:
    """One simulated ``tulliusd``: its clock, whether it is up or paused, its live jobs."""

    name: str
    clock: ServerClock
    epoch: int = 0
    up: bool = True
    paused_until: int = 0
    pauses: list[tuple[int, int]] = field(default_factory=list)
    execs: list[Execution] = field(default_factory=list)
    tokens: set[str] = field(default_factory=set)
    restart_at: int | None = None
    claimers: list[Claimer] = field(default_factory=list)
    #: Its sweeper's memory; told of the server's store calls, as the daemon's.
    watch: LeaseWatch | None = None
    #: When its latest store call that worked was made (virtual µs), and whether
    #: its watch has an outage open (the next call that works is reported).
    up_us: int = 0
    store_down: bool = False
    #: The stop it is carrying out (`ServerStop`): no more claims, and from
    #: ``kill_at`` (the grace's end, virtual µs) its jobs are stopped; ``stopped``:
    #: it exited so.
    stopping: ServerStop | None = None
    kill_at: int | None = None
    stopped: bool = False

    def killing(self, now: int) -> bool:
        """Whether a stop's grace is over at ``now``: as the daemon, which compares
        the time with the grace's end before it enforces deadlines or reads results
        (`Supervisor._step`), a job still running then fails as ``shutdown``."""
        return self.kill_at is not None and now >= self.kill_at

    def paused_between(self, start: int, end: int) -> int:
        """Microseconds of ``[start, end)`` this server spent paused."""
        if not self.pauses:  # (most servers never pause: no generator per run)
            return 0
        return sum(max(0, min(end, b) - max(start, a)) for a, b in self.pauses)

    def state(self, now: int) -> str:
        if not self.up:
            return "stopped" if self.stopped else "crashed"
        if self.paused_until > now:
            return f"paused until {self.paused_until / 1e6:.3f}s"
        return "up" if self.stopping is None else "stopping"


class Actor:
    """A generator run by the scheduler on behalf of one server (dies with the server)."""

    __slots__ = ("epoch", "gen", "name", "server")

    def __init__(self, gen: ActorGen, server: Server, name: str) -> None:
        self.gen = gen
        self.server = server
        self.epoch = server.epoch
        self.name = name


@dataclass(eq=False)
class Execution:
    """One job's user code on one worker, from claim to verdict."""

    job: Job
    server: Server
    worker: int
    what: str
    timeout_us: int
    actor: Actor | None = None
    baton: Baton | None = None
    started_us: int = 0
    deadline_us: int = 0
    gen: int = 0
    kill_reason: str | None = None
    running: bool = False
    beating: bool = False
    #: Its user code has ended and its verdict is being recorded (the lease is
    #: still renewed meanwhile, as the daemon's `Finishing` leases are).
    verdict_pending: bool = False
    #: Threads its user code started (`Drivers._adopt_threads`).
    threads: list[threading.Thread] = field(default_factory=list)


def describe_op(op: object) -> str:
    """A short line for the trace."""
    match op:
        case InsertRecord(record):
            return f"InsertRecord {record.record_id} token={record.token}"
        case InsertTasks(docs):
            return "InsertTasks " + ",".join(doc.task_id for doc in docs)
        case SetStatus(task_id, status, _):
            return f"SetStatus {task_id} {status.value}"
        case Load(task_id):
            return f"Load {task_id}"
        case FindDue(statuses, low, high, _, _):
            return f"FindDue {'+'.join(s.value for s in statuses)} {low:g}-{high:g}"
        case FindByStatus():
            return "FindByStatus"
        case Beat(record_id):
            return f"Beat {record_id}"
    return repr(op)


class Drivers:
    """The driver loops of a simulated server and the running of user code.

    A mixin of `tullius.sim.simulation.Simulation` (the scheduler is `tullius.sim.scheduler`);
    kept apart so that each module stays readable.  Each loop is the daemon's
    recipe (claim, run under a deadline with heartbeats, finish with retries;
    sweep) written as an actor.
    """

    rng: random.Random
    bands: tuple[Band, ...]
    timings: LeaseTimings
    clock: SimClock
    store: MemoryStore
    events: int
    _check: bool
    _inv: Invariants
    _poll_us: int
    _retry_us: int
    _beat_us: int
    _sweep_us: int
    _grace_us: int
    _faults_end_us: int
    _vt: VirtualTime | None
    _pool: BatonPool
    _baseline: set[threading.Thread]
    _thread_owners: dict[threading.Thread, Execution]
    _inserted: dict[str, int]
    #: Per task spawned at `_same_instant_at` (µs): how many tasks of its chain,
    #: itself included, were inserted at that instant (`_count_generation`).
    _same_instant: dict[str, int]
    _same_instant_at: int
    _instant_chain_limit: int
    _starting: deque[Actor]
    _servers: dict[str, Server]
    _outages: list[tuple[int, int, str | None]]
    _armed_at: dict[tuple[str, str], list[list[Any]]]

    def _spawn(self, server: Server, gen: ActorGen, name: str, at: int | None = None) -> Actor:
        raise NotImplementedError

    def _advance(self, actor: Actor, value: Any, error: BaseException | None = None) -> None:
        raise NotImplementedError

    def _push(self, t: int, kind: int, target: Any, value: Any) -> None:
        raise NotImplementedError

    def _held_back(self, actor: Actor, t: int, kind: int, target: Any, value: Any) -> bool:
        raise NotImplementedError

    def _log(self, server: str, what: object) -> None:
        raise NotImplementedError

    def _insert_roots(
        self, specs: list[TaskSpec], now: datetime, key: str | None = None
    ) -> list[str]:
        raise NotImplementedError

    def _store_fault(
        self, server: Server, op: Any, name: str
    ) -> tuple[bool, StoreError | None] | None:
        raise NotImplementedError

    def _exit_if_done(self, server: Server) -> None:
        raise NotImplementedError

    def _boot(self, server: Server) -> None:
        index = 0
        server.claimers = []
        for band in self.bands:
            slots = [(i, f"{server.name}/w{i}") for i in range(index, index + band.count)]
            index += band.count
            claimer = Claimer(band, slots, self.timings.lease)
            server.claimers.append(claimer)
            claimer.actor = self._spawn(
                server, self._claimer(server, claimer), f"{server.name}/{band}"
            )
        self._spawn(server, self._sweeper(server), f"{server.name}/sweeper")

    def _new_token(self) -> str:
        return f"{self.rng.getrandbits(64):016x}"

    def _claimer(self, server: Server, c: Claimer) -> ActorGen:
        """Claim for the band's idle slots; nap a poll interval when work ran out, or
        until poked (a slot freed, a verdict recorded, a task queued from user code)."""
        yield Nap(c, self.rng.randrange(self._poll_us // 1000 + 1) * 1000)
        while True:
            if server.stopping is not None:  # (a nap ends it sooner: `Scheduler._advance`)
                self._claimer_ended(server, c)
                return
            c.poked = False
            idle = [slot for slot in c.slots if slot[0] not in c.busy]
            if not idle:
                yield Nap(c, None)
                continue
            workers: list[tuple[str | None, str]] = [(name, self._new_token()) for _, name in idle]
            # As the daemon: the leases of a claim in flight are ours to our sweeper
            # (kept as the list, not added to a set: most claims find nothing), and
            # so is the lease of a claim a store error left unsure (`UnsureClaim`).
            unsure = c.candidates.unsure
            c.claiming = (
                workers if not unsure else [*workers, *((u.worker, u.token) for u in unsure)]
            )
            started, now, started_us = self.events, server.clock.now(), self.clock.us
            docs = c.candidates.docs
            kept = {doc.task_id for doc in docs} if c.candidates.fresh(now) else set()
            kept_read = c.read
            try:
                jobs = yield from claim_many(
                    c.band,
                    server=server.name,
                    workers=workers,
                    now=now,
                    rng=self.rng,
                    batch=CLAIM_READ,
                    candidates=c.candidates,
                )
            except StoreError as error:  # as the daemon: read afresh after the retry delay
                c.claiming = []
                c.candidates.forget()
                if not isinstance(error, ClaimInterrupted):
                    c.unsure_reads = _unsure_reads(
                        c, c.unsure_reads, kept, kept_read, (started, now)
                    )
                    yield Nap(c, self._retry_us)
                    continue
                jobs = error.jobs  # won before the error: ours to run all the same
                retry: int | None = self._retry_us
            else:
                retry = None
            c.claiming = []
            # As the daemon (`Running.confirm`): a lease stored over a heartbeat ago,
            # unrenewed (its server paused in the middle of the claim, or an unsure
            # lease of an earlier claim settled by this one), is renewed first.
            slow = self.clock.us - started_us > self._beat_us
            old_by = server.clock.now() - timedelta(microseconds=self._beat_us)
            if jobs:
                server.tokens.update(job.token for job in jobs)  # claimed: ours till done
            if c.candidates.docs is not docs:  # this claim read them
                c.read = (started, now)
            settled = c.unsure_reads
            c.unsure_reads = _unsure_reads(c, settled, kept, kept_read, (started, now))
            index_of = {name: index for index, name in idle}
            starts = []
            for job in jobs:
                name = job.lease.worker
                assert name is not None
                index = index_of[name]
                c.busy.add(index)
                self._log(server.name, f"{name} claimed {job.task_id} ({job.kind.value})")
                if job.token in settled and job.token not in c.unsure_reads:
                    read = settled[job.token]  # an unsure claim this claim settled
                else:
                    read = kept_read if job.task_id in kept else c.read
                if self._check and read is not None:
                    self._check_claim(c.band, job, read[1], read[0])
                confirm = slow or job.lease.at < old_by
                starts.append(Actor(self._work(server, job, index, name, c, confirm), server, name))
            if starts:
                yield StartJobs(starts)
            if retry is not None:
                yield Nap(c, retry)
            elif len(jobs) < len(idle) and not c.poked:
                yield Nap(c, self._poll_us)

    def _claimer_ended(self, server: Server, c: Claimer) -> None:
        """A stopping server's claim loop is over (its generator returned or was closed)."""
        c.actor = None
        c.napping = False
        self._exit_if_done(server)

    def _poke(self, server: Server) -> None:
        """There may be work for ``server``'s idle slots: claim now, as the daemon does
        after a verdict, a lost lease found, or a ``tullius.queue()`` from user code."""
        for c in server.claimers:
            if c.napping:
                c.nap += 1
                self._push(self.clock.us, NAP, c, c.nap)
            else:
                c.poked = True

    def _work(
        self, server: Server, job: Job, index: int, name: str, claimer: Claimer, confirm: bool
    ) -> ActorGen:
        what = f"{short_name(job.view.task.class_name)}.{job.role} of task {job.task_id!r}"
        ex = Execution(job, server, index, what, to_us(job.time_limit))
        server.execs.append(ex)  # (its token is the server's own since the claim: `_claimer`)
        # As the daemon's `Running.write_by` (claims take no virtual time: now is the claim's).
        write_by = self.clock.us + to_us(verdict_window(job.time_limit))
        if server.killing(self.clock.us):
            # Claimed once the grace was over (a claim in flight then): failed as
            # shutdown at once, where the daemon would start it and stop it within
            # the second (worded "while run() was running" there).
            outcome: tuple[str | None, str, Any] | None = ("shutdown", "not started", None)
        elif confirm and not (yield from self._confirmed(server, job)):
            self._log(server.name, f"{name} did not start {job.task_id}: its lease was lost")
            outcome = None
        else:
            outcome = yield RunUser(ex)
        event = None if outcome is None else self._event_for(ex, outcome)
        ex.verdict_pending = event is not None
        while event is not None:
            if self.clock.us > write_by:  # given up: no longer ours, the sweeps fail it as lost
                self._log(server.name, f"{name} gave up the verdict of {job.task_id}: too late")
                break
            try:
                verdict: Verdict = yield from finish(
                    job, event, now=server.clock.now(), rng=self.rng
                )
            except StoreError:
                self._keep_renewing(ex)  # the verdict waits: its lease must not go stale
                yield Wait(self._retry_us)
                continue
            self._log(
                server.name,
                f"{name} finish {job.task_id} {'accepted' if verdict.accepted else 'rejected'}",
            )
            if verdict.accepted and self._check:
                self._inv.on_accepted(verdict.record, job.token, job.lease)
            break
        ex.verdict_pending = False
        server.tokens.discard(job.token)
        server.execs.remove(ex)
        claimer.busy.discard(index)
        self._poke(server)
        if server.stopping is not None:
            self._exit_if_done(server)

    def _confirmed(self, server: Server, job: Job) -> Generator[Any, Any, bool]:
        """Whether the lease of a job claimed slowly is still ours, renewing it (as the
        daemon before it dispatches such a job), until the store answers."""
        while True:
            try:
                ours: bool = yield from renew(job)
            except StoreError:
                yield Wait(self._retry_us)
                continue
            return ours

    def _keep_renewing(self, ex: Execution) -> None:
        """Start ``ex``'s `_heartbeat` unless it beats already: at its first sleep (to
        beat at its start + the heartbeat period), or when its verdict first fails."""
        if not ex.beating:
            ex.beating = True
            server = ex.server
            self._spawn(
                server,
                self._heartbeat(server, ex),
                f"{server.name}/w{ex.worker}/heartbeat",
                at=max(ex.started_us + self._beat_us, self.clock.us),
            )

    def _heartbeat(self, server: Server, ex: Execution) -> ActorGen:
        """Renew the job's lease while its user code runs and until its verdict is
        recorded, as the daemon's supervisor does.  Spawned by the first sleep of the user
        code, to beat at its start + the heartbeat period, or by the first failure to
        record the verdict: a run that ends without letting virtual time pass, its
        verdict recorded at once, never needs one."""
        while ex.running or ex.verdict_pending:
            try:
                ours = yield from renew(ex.job)
            except StoreError:
                # Again soon, as the daemon's renewal (after at most a second): its
                # observers' store time stops only while they see the store fail, so
                # a beat put off for a whole period made a live owner look silent.
                yield Wait(min(self._beat_us, self._retry_us))
                continue
            if not ours:
                if ex.running:
                    self._log(server.name, f"lease lost: stopping {ex.what}")
                    self._stop(ex, "lease lost")
                return
            yield Wait(self._beat_us)
        ex.beating = False  # a verdict that fails later starts another (`_work`)

    def _store_failed(self, server: Server, error: BaseException, op: object) -> None:
        """A store call of ``server`` failed: if the store could not be reached (a
        `StoreOutage`) or refused a write (a `StoreFault` on one), its sweeper's
        store time stands still from its latest call that worked (`LeaseWatch`),
        as the daemon's does (`runtime.store_watch`); a read refused is an answer."""
        watch = server.watch
        if watch is None:
            return
        if isinstance(error, StoreUnavailable) or type(op) in WRITES:
            watch.store_failed(server.up_us / US, server.clock.monotonic())
            server.store_down = True
        else:
            self._store_answered(server)

    def _store_answered(self, server: Server) -> None:
        """A store call of ``server`` was answered: it ends an outage open."""
        server.up_us = self.clock.us
        watch = server.watch
        if server.store_down and watch is not None:
            now = server.clock.monotonic()
            watch.store_worked(now, now)
            server.store_down = watch.down

    @staticmethod
    def _own_tokens(server: Server) -> frozenset[str]:
        """The leases ``server``'s sweeps leave alone, as the daemon's do: those of
        its jobs, of its claims in flight, and of a claim a store error left unsure."""
        own = set(server.tokens)
        for c in server.claimers:
            own.update(token for _, token in c.claiming)
            own.update(c.candidates.unsure_tokens(server.clock.now()))
        return frozenset(own)

    def _sweeper(self, server: Server) -> ActorGen:
        """Sweep every sweep period, as the daemon's `Sweeper`: the same `LeaseWatch`
        rules (store time stands still through the server's outages; a late sweep
        forgets)."""
        watch = self.timings.watch()
        server.watch, server.store_down = watch, False
        yield Wait(self.rng.randrange(self._sweep_us // 1000 + 1) * 1000)
        while True:
            watch.sweep_starting(server.clock.monotonic())
            try:
                report = yield from sweep(
                    watch,
                    observer=server.name,
                    now=server.clock.now(),
                    monotonic=server.clock.monotonic,
                    own_tokens=self._own_tokens(server),
                    rng=self.rng,
                )
                watch.sweep_ended(server.clock.monotonic())
                if report.expired:
                    self._log(server.name, f"sweep expired {','.join(report.expired)}")
                    self._poke(server)
            except StoreError:  # still watching: what it saw stays
                watch.sweep_ended(server.clock.monotonic())
            yield Wait(self._sweep_us)

    def _event_for(self, ex: Execution, outcome: tuple[str | None, str, Any]) -> Event | None:
        reason, how, value = outcome
        job, server = ex.job, ex.server
        run = job.kind is _RUN
        role = "run()" if run else "failed()"
        if reason == "lease lost":
            return None

        def failure(kind: str, message: str, tb: str | None = None) -> Failure:
            now = server.clock.now()
            return Failure(kind, bounded_message(message), now, bounded_traceback(tb), server.name)

        if reason == "timeout":
            error = failure(
                FailureKind.TIMEOUT,
                f"{role} did not finish within its timeout of "
                f"{timedelta(microseconds=ex.timeout_us)}; stopped at the deadline",
            )
        elif reason == "crashed":
            error = failure(FailureKind.CRASHED, f"the worker process running {role} died")
        elif reason == "shutdown":
            # Worded as the daemon words it (`WorkerKeeping`, `Supervisor._handle_stop`).
            if how == "not started":
                message = "the daemon stopped before the job started"
            else:
                stop = server.stopping
                grace = (stop.grace if stop is not None else DEFAULT_GRACE).total_seconds()
                message = f"the daemon stopped (grace of {grace:g}s over) while {role} was running"
            error = failure(FailureKind.SHUTDOWN, message)
        elif how == "unloadable":
            error = failure(FailureKind.UNLOADABLE, str(value))
        elif how == "raised" and isinstance(value, KeyboardInterrupt):
            raise value
        elif how == "raised":
            # As tulliusd's worker does: anything user code raises, SystemExit and
            # other BaseExceptions included, is an ``exception`` with its traceback.
            error = failure(FailureKind.EXCEPTION, raised(role, value), format_exception(value))
        elif how == "stopped":  # no kill: user code raised the simulator's TaskStopped itself
            error = failure(FailureKind.EXCEPTION, f"{role} raised TaskStopped: {value}")
        else:
            try:
                specs = to_specs(value, role=role)
            except TaskDefinitionError as bad:
                error = failure(FailureKind.BAD_RETURN, str(bad))
            except KeyboardInterrupt:
                raise
            except BaseException as broken:  # as the worker: user code (an iterator, a
                # ``fields`` property) raised while what it returned was read
                tb = format_exception(broken)
                error = failure(FailureKind.EXCEPTION, raised(role, broken), tb)
            else:
                return Succeeded(job.token, specs) if run else HandlerSucceeded(job.token, specs)
        return Failed(job.token, error) if run else HandlerFailed(job.token, error)

    def _start_user(self, ex: Execution) -> None:
        job, server = ex.job, ex.server
        vt = self._vt
        assert vt is not None
        failure = job.view.outcome.failure if job.kind is _HANDLE and job.view.outcome else None
        try:
            task = from_doc(job.view.task, failure=failure)
        except UnknownTaskClass as error:
            self._push(self.clock.us, ACTOR, ex.actor, (None, "unloadable", error))
            return
        module = module_of(type(task))
        if module is not None:
            vt.patch_module(module)
        method = task.run if job.kind is _RUN else task.failed
        sink_server = server

        def sink(specs: Any, key: str | None) -> list[str]:
            return self._queue_from_user(sink_server, list(specs), ex, key)

        def call() -> Any:
            with queue_sink(sink):
                return _read_in_the_step(method())

        ex.running = True
        ex.started_us = self.clock.us
        ex.deadline_us = self.clock.us + ex.timeout_us
        ex.baton = baton = current_baton()
        assert baton is not None  # the loop runs in a pool thread
        vt.set_now(server.clock.now())
        if baton.run_inline(call, ex.what, lambda: self._moved(ex)) == "done":
            self._after_user_step(ex, "done")

    def _queue_from_user(
        self, server: Server, specs: list[TaskSpec], ex: Execution, key: str | None
    ) -> list[str]:
        """``tullius.queue()`` in user code: as tulliusd, the server's own insert of the
        tasks (`Supervisor._queue_for`), which its store faults and outages hit.  Its
        error is raised in the user code, worded as the daemon's worker words it.  (One
        operation carried out at once, not a scheduler event: the user code is running.)

        User code stopped because its process died (a crashed worker or server, a
        lost lease: the daemon SIGKILLs the worker) still unwinds here, through its
        ``finally`` blocks; under tulliusd it would run no more code, so its calls
        store nothing.  (A run stopped at its deadline or by a shutdown gets SIGTERM
        and a second of grace in the daemon, and its calls are served here too,
        though a sleep there raises `TaskStopped` again at once.)"""
        if ex.kill_reason is not None and ex.kill_reason not in _SIGTERMED:
            raise TaskStopped(ex.kill_reason)
        fault = (
            self._store_fault(server, InsertTasks(()), "InsertTasks")
            if self._outages or self._armed_at
            else None
        )
        ids: list[str] = []
        if fault is None or fault[0]:  # no fault, or one that applies the insert
            ids = self._insert_roots(specs, server.clock.now(), key)
        if fault is not None:
            error = fault[1] or StoreError("the server died")  # (a StepCrash: it did)
            self._store_failed(server, error, InsertTasks(()))
            raise StoreError(f"queue() failed in the daemon: {type(error).__name__}: {error}")
        self._store_answered(server)
        self._poke(server)
        return ids

    def _moved(self, ex: Execution) -> None:
        """Run by the thread the loop moved to when ``ex``'s user code first slept."""
        self._after_user_step(ex, "sleeping")
        self._start_later()

    def _start_later(self) -> None:
        """Make the jobs a `StartJobs` had yet to start events of their own."""
        while self._starting:
            self._push(self.clock.us, ACTOR, self._starting.popleft(), None)

    def _after_user_step(self, ex: Execution, state: str) -> None:
        baton = ex.baton
        assert baton is not None
        self._adopt_threads(ex)
        if state == "sleeping":
            self._keep_renewing(ex)
            ex.gen += 1
            wake = self.clock.us + baton.sleep_us
            if wake >= ex.deadline_us:
                self._push(ex.deadline_us, WAKE, ex, (ex.gen, "timeout"))
            else:
                self._push(wake, WAKE, ex, (ex.gen, None))
            return
        how, value = baton.result
        ex.baton = None
        if ex.threads:
            self._check_threads_ended(ex)
        ex.running = False
        # Until `_work` knows (held back by a pause, say): the lease is renewed on
        # from the end of the user code, as the daemon's `Finishing` is.
        ex.verdict_pending = True
        server = ex.server
        if ex.kill_reason == "server crashed":
            return
        ran = self.clock.us - ex.started_us - server.paused_between(ex.started_us, self.clock.us)
        if self._check:
            self._inv.on_run_length(ex.what, ran, ex.timeout_us + self._grace_us)
        outcome = (ex.kill_reason, how, value)
        actor = ex.actor
        assert actor is not None
        # No event of its own (the worker's next store operation is one), unless
        # the server is paused: then it waits for the pause's end.
        if not self._held_back(actor, self.clock.us, ACTOR, actor, outcome):
            self._advance(actor, outcome)

    def _adopt_threads(self, ex: Execution) -> None:
        """Threads that appeared during this step of ``ex``'s user code are its own.

        Why by step: only one step of user code runs at a time, so a thread new
        since the last step was started by this one.  A task that returned was
        blamed for a thread of another task still running (an event loop's
        executor, kept until its ``asyncio.run`` ends).
        """
        owners = self._thread_owners
        expected = (
            len(self._pool.threads)
            + sum(t.is_alive() for t in self._baseline)
            + sum(t.is_alive() for t in owners)
        )
        if threading.active_count() <= expected:  # (threads that ended don't count)
            return
        pool, baseline = self._pool.threads, self._baseline
        for thread in threading.enumerate():
            if thread in baseline or thread in pool or thread in owners or not thread.is_alive():
                continue
            owners[thread] = ex
            ex.threads.append(thread)

    def _check_threads_ended(self, ex: Execution) -> None:
        """``ex``'s user code returned: the threads it started must have ended.  One told
        to end but not yet gone (the executor of an event loop closed with
        ``loop.close()``) gets a moment (`LEAK_GRACE`) to finish."""
        give_up = REAL[1]() + LEAK_GRACE
        for thread in ex.threads:
            thread.join(max(0.0, give_up - REAL[1]()))
            self._thread_owners.pop(thread, None)
        leaked = [t.name for t in ex.threads if t.is_alive()]
        ex.threads.clear()
        if leaked:
            raise UserThreadLeak(ex.what, leaked)

    def _wake(self, ex: Execution, value: tuple[int, str | None]) -> None:
        gen, kill = value
        if gen != ex.gen or ex.baton is None:
            return
        server = ex.server
        if server.paused_until > self.clock.us:
            self._push(server.paused_until, WAKE, ex, value)
            return
        if server.killing(self.clock.us):
            # A stop's grace is over (a pause carried this wake-up past it, or it
            # ends at this very instant): as tulliusd, which stops its jobs before
            # it enforces deadlines or reads results, a shutdown.
            kill = "shutdown"
        elif kill is None and self.clock.us >= ex.deadline_us:
            # A wake-up that a pause of the server carried past the deadline: as
            # tulliusd, which enforces deadlines before it reads results (a result
            # read late is late, however little time the user code took), a timeout.
            kill = "timeout"
        if kill is not None:
            ex.kill_reason = kill
            self._log(server.name, f"deadline: stopping {ex.what}")
        assert self._vt is not None
        self._vt.set_now(server.clock.now())
        self._after_user_step(ex, ex.baton.resume(ex.what, kill))

    def _stop(self, ex: Execution, reason: str) -> None:
        ex.kill_reason = reason
        if ex.baton is not None and ex.baton.state == "sleeping":
            ex.gen += 1
            self._after_user_step(ex, ex.baton.resume(ex.what, reason))

    def _check_claim(self, band: Band, job: Job, now: datetime, started: int) -> None:
        priority = job.view.task.priority
        if not band.covers(priority):
            self._inv.fail(
                "band reservation", f"band {band} claimed {job.task_id!r} of priority {priority}"
            )
        if job.kind is not _RUN:
            return
        lowest = self.store.lowest_due_priority(Status.QUEUED)
        if lowest is None or lowest >= priority:
            return  # nothing queued is more urgent: the query below would find nothing
        for doc in self.store.find_due((Status.QUEUED,), band.min_priority, priority, now, 8):
            if doc.priority >= priority:
                break
            view = self.store.load(doc.task_id)
            if (
                self._inserted.get(doc.task_id, self.events) < started
                and view is not None
                and (status_of(view) is Status.QUEUED)
            ):
                self._inv.fail(
                    "priority order",
                    f"claimed {job.task_id!r} (priority {priority}) "
                    f"while {doc.task_id!r} (priority {doc.priority}) was due",
                )

    def _waiting_for(self, task_id: str) -> str:
        view = self.store.load(task_id)
        assert view is not None
        status = status_of(view)
        name = short_name(view.task.class_name)
        head = f"{task_id} {name}{dict(view.task.fields)} {status.value}"
        lease = view.current_lease()
        due_at = due_at_of(view)
        if due_at is not None and due_at > self.clock.now():
            # Why first: a deferred task (delay, start_after, failed()'s backoff) was
            # reported as waiting for a worker, though workers were idle.
            what = "its start" if status is Status.QUEUED else "failed() attempt"
            if status is Status.FAILED:
                what += f" {view.handler_attempt + 1}"
            return f"{head}: waits for {what}, not due until {due_at.isoformat()}"
        if lease is None and status in (Status.QUEUED, Status.FAILED):
            states = {name: server.state(self.clock.us) for name, server in self._servers.items()}
            if "up" not in states.values():
                # Why: with every server down, it blamed the bands, which were fine.
                down = ", ".join(f"{name} {state}" for name, state in states.items())
                what = "a worker" if status is Status.QUEUED else "failed()"
                return f"{head}: waits for {what}, but no server is up to claim it ({down})"
        if status is Status.QUEUED:
            return f"{head}: waits for a worker in a band covering priority {view.task.priority}"
        if lease is not None:
            state = (
                self._servers[lease.server].state(self.clock.us)
                if lease.server in self._servers
                else "?"
            )
            return (
                f"{head}: waits for the lease {lease.record_id!r} of server {lease.server!r} "
                f"({state}) to end or be declared lost"
            )
        if status is Status.FAILED:
            return f"{head}: waits for failed() attempt {view.handler_attempt + 1}"
        return f"{head}: waits for its successors or replacements to be inserted by a sweep"


def _read_in_the_step(returned: Any) -> Any:
    """What ``run()``/``failed()`` returned, an iterator read to a list within the user
    code's step, as the daemon's worker reads it within the job: a generator that
    sleeps while it is read sleeps in virtual time, against the job's deadline (read
    by the scheduler, after the step, it crashed the run and left the task running)."""
    if (
        returned is None
        or isinstance(returned, Task | list | tuple | str | bytes | Mapping)
        or not isinstance(returned, Iterable)
    ):
        return returned
    return list(returned)


def _unsure_reads(
    c: Claimer,
    before: dict[str, tuple[int, datetime] | None],
    kept: set[str],
    kept_read: tuple[int, datetime] | None,
    read: tuple[int, datetime],
) -> dict[str, tuple[int, datetime] | None]:
    """``c.unsure_reads`` after a claim: the read that chose each claim still unsure,
    known from before, or else this claim's (a kept candidate's, or its own read)."""
    return {
        u.token: before.get(u.token, kept_read if u.doc.task_id in kept else read)
        for u in c.candidates.unsure
    }


def server_names(servers: int | Iterable[str]) -> list[str]:
    if isinstance(servers, bool):
        raise ConfigError("servers", servers, "must be a count >= 1 or a list of names")
    if isinstance(servers, int):
        if servers < 1:
            raise ConfigError("servers", servers, "must be a count >= 1 or a list of names")
        return [f"s{n}" for n in range(1, servers + 1)]
    if isinstance(servers, str) or not isinstance(servers, Iterable):
        # list("web1") would be four servers: 'w', 'e', 'b', '1'
        raise ConfigError("servers", servers, "must be a count >= 1 or a list of names")
    names = list(servers)
    if (
        not names
        or any(not isinstance(n, str) or not n for n in names)
        or len(set(names)) != len(names)
    ):
        raise ConfigError(
            "servers", names, "must be a count >= 1 or a list of unique, non-empty names"
        )
    return names
